"""Training a model: the `train.*` settings from gin, checked, then the run.

The `train.*` gin knobs are the parameters of `settings`, which freezes them (and the
schedule's bound peak rate) into one `Settings`; `Settings.check` runs train_checks.py's
checks; `train` (bin/train) reads top to bottom: the runtime (server, TPU), the graph
(train_graph.py), the run files, then loop.py's `Loop` of steps, logs (progress.py),
checkpoints and evaluations.
"""
import dataclasses
import inspect
import os
import signal

from absl import logging
import gin

from gptneo import checkpoints as checkpoints_lib
from gptneo import flops
from gptneo import gin_utils
from gptneo import loop as loop_lib
from gptneo import model_dir as model_dir_lib
from gptneo import runtime
from gptneo import storage
from gptneo import train_checks
from gptneo import train_graph
from gptneo.harness import run as harness_run
from gptneo.compat import tf
from gptneo.data import inputs
from gptneo.errors import UserError
from gptneo.layout_search import cost_model
from gptneo.optim import optimizers


@dataclasses.dataclass(frozen=True)
class Settings:
  """The `train.*` knobs of one run, as gin bound them (see `settings` for each)."""
  model: object
  dataset_dir: object
  train_steps: int
  batch_size: int
  optimizer: object
  mesh: object
  precision: str
  microbatches_per_batch: int
  clip_norm: float
  seed: int
  steps_per_checkpoint: int
  keep_checkpoints: int
  log_every_n_steps: int
  eval_batches: object  # int or None
  eval_every_n_steps: int
  eval_steps: int
  init_from: str
  steps_per_loop: int
  sampling: str
  checkpoint_every_secs: float
  on_nonfinite: str
  max_nonfinite_steps: int
  harness_tasks: object  # a list of names
  harness_every_n_steps: int
  harness_limit: object  # int or None
  peak_flops: object  # None, FLOP/s per device, or a device name of flops.PEAK_FLOPS
  init_from_step: object  # None (the newest) or a checkpoint step of init_from
  loggers: object  # names of gptneo.loggers.LOGGERS
  # Not a train.* knob: learning_rate_schedule.learning_rate as gin bound it (None: unbound),
  # read by `settings`, where the bindings become values, so that `check` reads no gin.
  schedule_learning_rate: object = dataclasses.field(default=None, metadata={"knob": False})

  @property
  def tokens_per_step(self):
    return self.batch_size * self.model.n_ctx

  @property
  def evaluates(self):
    """Whether the run evaluates at all: at the end (eval_batches) or periodically."""
    return bool(self.eval_every_n_steps) or self.eval_batches != 0

  @property
  def final_eval_batches(self):
    """Batches of the end-of-run evaluation (0: the whole split), or None for none."""
    if self.eval_batches == 0:
      return None
    return self.eval_steps if self.eval_batches is None else self.eval_batches

  def periodic_eval_at(self, step):
    return bool(self.eval_every_n_steps) and step % self.eval_every_n_steps == 0

  def check(self):
    """Raises UserError (one line) if the run can't work, before anything is built or
    written: the knobs, the memory, the dataset (one record of each shard read)."""
    train_checks.check_ranges(self)
    if self.batch_size % self.microbatches_per_batch:
      raise UserError(f"train.microbatches_per_batch = {self.microbatches_per_batch} does not "
                      f"divide train.batch_size = {self.batch_size}")
    self.mesh.validate(self.model.dims(self.batch_size // self.microbatches_per_batch).sizes())
    optimizers.check_parametrization(self.optimizer, self.model)
    runtime.variable_dtype(self.precision)
    train_checks.check_loop(self.mesh, self.steps_per_loop)
    train_checks.check_memory(self)
    info = inputs.read_dataset_info(self.dataset_dir)
    train_checks.check_dataset(self.model, info, self.dataset_dir)
    harness_run.check_training(self)
    splits = ["train"] + (["validation"] if self.evaluates and "validation" in info["splits"]
                          else [])
    for split in splits:
      train_checks.check_first_records(self.dataset_dir, split, info["n_ctx"])


@gin.configurable("train")
def settings(model=gin.REQUIRED, dataset_dir=gin.REQUIRED, train_steps=gin.REQUIRED,
             batch_size=8, optimizer=gin.REQUIRED, mesh=gin.REQUIRED, precision="float32",
             microbatches_per_batch=1, clip_norm=1.0, seed=1234, steps_per_checkpoint=500,
             keep_checkpoints=5, log_every_n_steps=10, eval_batches=None, eval_every_n_steps=0,
             eval_steps=0, init_from=None, steps_per_loop=1, sampling="fixed",
             checkpoint_every_secs=None, on_nonfinite="stop", max_nonfinite_steps=10,
             harness_tasks=(), harness_every_n_steps=0, harness_limit=None, peak_flops=None,
             init_from_step=None, loggers=()):
  """Trains `model` on `dataset_dir` until `train_steps`, resuming from the model dir.

  Args:
    model: the model, e.g. @GPT().
    dataset_dir: a folder written by bin/prepare_data, a gs:// URI of one (its shards
      fetched into $GPTNEO_CACHE_DIR as they are read, at most $GPTNEO_CACHE_MAX_BYTES of
      them), or a mixture {folder or URI: weight} of datasets prepared with one tokenizer
      and n_ctx, drawn at random by weight.
    train_steps: the step to stop at (counting steps of earlier runs in model_dir).
    batch_size: sequences per step (all microbatches together).
    optimizer: e.g. @Adam() or @Adafactor().
    mesh: the device mesh, e.g. @mesh().
    precision: "float32", or "bfloat16" activations with float32 master weights. On a CPU
      with AVX512_BF16 or AMX, bfloat16 trains faster (1.1-1.5x tiny's, 1.6-1.7x 20m's float32
      tokens/s on an AVX-512 EPYC: bench/RESULTS.md); without, its matmuls are emulated
      and slower (a warning says so).
    microbatches_per_batch: gradient accumulation; must divide batch_size.
    clip_norm: clip gradients to this global norm (0 or None: no clipping).
    seed: seeds weights, data order and dropout; same seed, same run.
    steps_per_checkpoint: save a checkpoint every this many steps (and at the end).
    keep_checkpoints: how many recent checkpoints to keep.
    log_every_n_steps: log and write summaries every this many steps; the loss logged is
      the mean over the steps since the previous log.
    eval_batches: the end-of-run evaluation (its loss is printed and returned): None scores
      what the periodic one does (train.eval_steps); 0: none; n: the first n batches.
    eval_every_n_steps: every this many steps, write validation loss, perplexity, bits per
      byte and accuracy to TensorBoard (eval/...) and eval.jsonl (0: never).
    eval_steps: what validation is: the validation split's first eval_steps * batch_size
      windows (0, the default: the whole split), in stored order, each window once, a last
      partial batch padded with rows that count nothing; the same at every evaluation and
      after a resume. bin/eval scores the same windows (evaluate.max_batches, 0: the whole
      split) and reports the same numbers.
    init_from: a model dir (e.g. from bin/import_hf) whose latest weights start a new run:
      fine-tuning, with fresh optimizer state; unused once model_dir has a checkpoint.
    init_from_step: the step of init_from's checkpoint to start from (None: its newest), as
      the reading programs' --checkpoint_step.
    loggers: where else the logged scalars go, beside TensorBoard and train_metrics.jsonl:
      ["wandb"] adds Weights & Biases, offline unless wandb.mode says otherwise
      (gptneo/loggers.py).
    steps_per_loop: with mesh.implementation = "simd" (TPU): steps per session.run, looped on
      the TPU; a loop also ends at each log, checkpoint and the last step.
    sampling: how training windows are cut from the packed token stream: "fixed" (the
      stored windows), "random_chunk" (at a random offset, so a token is not always at the
      same position) or "document" (starting after a window's first end of document).
      Evaluation always reads the stored windows.
    checkpoint_every_secs: also save a checkpoint once this many seconds have passed since
      the last one (None or 0: only every steps_per_checkpoint steps), so a preemption or
      crash loses at most this much time.
    on_nonfinite: a step whose loss or gradient norm is NaN or infinite never reaches a
      checkpoint: "stop" ends the run at once, naming the step and the last good checkpoint
      (bin/train exit code 3); "skip" leaves weights and optimizer state as they were, counts
      the step (skipped_steps in train_metrics.jsonl) and trains on.
    max_nonfinite_steps: with on_nonfinite = "skip", stop as "stop" does once this many steps
      in a row were skipped.
    harness_tasks: lm-evaluation-harness task names (as bin/lm_eval --tasks) scored on the
      checkpoint every harness_every_n_steps steps, into eval.jsonl and TensorBoard
      (harness/<task>/<metric>); [] (the default): none.
    harness_every_n_steps: with harness_tasks, score them every this many steps (a
      checkpoint is saved at those steps) and at the last step; 0: at the last step only.
    harness_limit: with harness_tasks, each task's first this many examples (None: all).
    peak_flops: the denominator of the MFU every log line and TensorBoard (mfu, tflops)
      report: FLOP/s per device, or a device of gptneo/flops.py's PEAK_FLOPS ("tpu_v3",
      "tpu_v4", "a100", "h100", ...: dense bf16 from the vendors' datasheets). None: on CPU,
      this machine's matmul rate at `precision` (measured by the first runs, cached per
      machine and precision); a GPU by its
      name; a TPU must be named, else MFU is left out.

  Returns:
    the Settings of these knobs, for `train`.
  """
  return Settings(**locals(), schedule_learning_rate=_bound_value(
      "learning_rate_schedule.learning_rate"))


def configured_settings():
  """`settings()` of the parsed config; its required knobs unbound are one line, not gin's
  traceback."""
  missing = [f"train.{name}" for name, parameter in inspect.signature(settings).parameters.items()
             if parameter.default is gin.REQUIRED and not _bound(f"train.{name}")]
  if missing:
    raise UserError(f"{', '.join(missing)} not bound; start from a preset (e.g. "
                    f"--gin_file=tiny.gin) or bind them with --gin_param")
  return settings()


def _bound(binding):
  try:
    gin.query_parameter(binding)
  except ValueError:
    return False
  return True


def _bound_value(binding):
  """What gin binds `binding` to, or None if nothing does (the default applies)."""
  return gin.query_parameter(binding) if _bound(binding) else None


def train(model_dir, run_settings=None, force=False):
  """Trains as `run_settings` say (default: the `train.*` bindings) in `model_dir`.

  Args:
    model_dir: where checkpoints, summaries and the operative config go (a flag): a folder,
      or gs://bucket/prefix, worked on in a local mirror ($GPTNEO_CACHE_DIR) and synced
      back after every checkpoint.
    run_settings: a Settings, or None for `settings()`.
    force: take over the lease of a gs:// model dir that another machine holds
      (model_dir.lock); a local model dir another process writes is always refused.

  Returns:
    dict with the final training loss, validation loss (None without a validation split or
    an evaluation, and when preempted) and "preempted": True if
    SIGTERM or SIGINT stopped the run early, at a step boundary with a checkpoint.
  """
  s = run_settings or configured_settings()
  if not s.mesh.is_peer:  # a peer only serves its devices: task 0 checks and drives
    s.check()
    logging.info("%s", start_summary(s, model_dir))
  with (runtime.started(s.mesh) as rt,
        loop_lib.Preemption(enabled=not s.mesh.is_peer) as preemption):
    if s.mesh.is_peer:
      rt.serve_until_released()
      return None
    init_from = _init_from(s.init_from, s.init_from_step)
    # The one writer, however the run ends (the kernel frees the lock if the process dies); a
    # refusal below leaves the model dir as it was: the lock goes with its file.
    with model_dir_lib.lock(model_dir, force):
      loss, evaluation, preempted = _train_in(s, model_dir, rt, preemption, init_from)
  if preempted:
    _log_preempted(preempted, model_dir)
    return {"loss": loss, "validation_loss": None, "preempted": True}
  validation_loss = evaluation and evaluation["loss"]
  if evaluation:
    logging.info("validation loss %.4f after step %d", validation_loss, s.train_steps)
  return {"loss": loss, "validation_loss": validation_loss, "preempted": False}


def start_summary(s, model_dir) -> str:
  """What the run is about to do, in three lines, logged before the graph is built.

  Args:
    s: the run's checked Settings.
    model_dir: the model dir, as the user named it.
  """
  mesh = s.mesh
  layout = ",".join(f"{tensor}:{mesh_dim}" for tensor, mesh_dim in mesh.layout) or "none"
  shape = ",".join(f"{name}:{size}" for name, size in mesh.shape) or "one device"
  every = (f"validation every {s.eval_every_n_steps}" if s.eval_every_n_steps else
           "validation at the end" if s.final_eval_batches is not None else "no validation")
  return "\n".join([
      f"model: {s.model.num_parameters() / 1e6:.2f}M parameters, "
      f"{flops.training_flops_per_token(s.model) / 1e6:.1f} MFLOP per token trained; "
      f"{s.tokens_per_step:,} tokens per step ({s.batch_size} x {s.model.n_ctx}); "
      f"about {cost_model.format_bytes(train_checks.training_estimate(s).peak)} per device",
      f"mesh: {shape} ({mesh.size} {mesh.device_type} device(s), {mesh.implementation}), "
      f"layout {layout}, {s.precision}; {s.train_steps} steps, checkpoint every "
      f"{s.steps_per_checkpoint}, {every}",
      f"effective config: {os.path.join(model_dir, 'operative_config.gin')} (every binding)"])


def _train_in(s, remote_dir, rt, preemption, init_from):
  """The locked part of `train`: graph, run files, session, loop, the last sync.

  Returns:
    (the last logged loss, the final evaluation or None, Loop.preempted).
  """
  model_dir = storage.working_copy(remote_dir)
  graph = train_graph.build(s, model_dir, rt)
  with graph.graph.as_default():  # a resume that can't work fails before anything is written
    graph.checkpoints.check(init_from)
  # The weights' tokenizer (of the run resumed, or of init_from) must be the dataset's.
  inputs.check_model_tokenizer(s.dataset_dir,
                               model_dir if graph.checkpoints.found.path else init_from)
  gin_utils.write_run_files(model_dir)
  _copy_tokenizer(s.dataset_dir, model_dir)
  with rt.session(graph.graph) as session:
    graph.checkpoints.restore_or_initialize(session, graph.init_ops, init_from)
    start = session.run(graph.step)
    logging.info("%s at step %d", graph.checkpoints.describe(), start)  # and what it skipped
    _warn_if_bfloat16_is_emulated(s)
    loop = loop_lib.Loop(session, graph, s, model_dir, lambda: storage.sync_up(model_dir, remote_dir),
                preemption, harness=harness_run.training_scorer(s, rt, model_dir))
    try:
      loss, evaluation = loop.run(start)
    finally:
      if loop.progress:
        loop.progress.close()
  storage.sync_up(model_dir, remote_dir)  # what was written after the last checkpoint
  return loss, evaluation, loop.preempted


def _log_preempted(preempted, remote_dir):
  """The one line a preempted run ends on: where it stopped and where it resumes."""
  signum, step, path = preempted
  saved = (f"checkpoint {os.path.join(remote_dir, os.path.basename(path))} saved" if path else
           "no checkpoint yet")
  logging.warning("train: preempted (%s) at step %d; %s; run the same command to resume",
                  signal.Signals(signum).name, step, saved)


def _init_from(model_dir, step=None):
  """The local copy of train.init_from's model dir, which must hold a checkpoint (of `step`,
  train.init_from_step, if given), or None."""
  if not model_dir:
    return None
  local = storage.local_copy(model_dir)
  checkpoints_lib.choose(local, step, "train.init_from_step")  # None: the newest
  if step is not None:
    checkpoints_lib.require(local)  # that step there, intact, or one line saying which are
  elif not checkpoints_lib.newest(local).path:  # found by listing, verified: as for resuming
    raise UserError(f"train.init_from = {local!r} has no checkpoint (none intact); point it "
                    f"at a model dir that gptneo-train or gptneo-import-hf wrote")
  return local


def _warn_if_bfloat16_is_emulated(s):
  if (s.precision == "bfloat16" and s.mesh.device_type == "cpu"
      and runtime.cpu_has_native_bfloat16() is False):
    logging.warning("train.precision = \"bfloat16\" on a CPU without AVX512_BF16 or AMX: its "
                    "bfloat16 matmuls are emulated, slower than float32 (oneDNN may even "
                    "abort); use \"float32\"")


def _copy_tokenizer(dataset_dir, model_dir):
  """The model dir carries its tokenizer, so sampling needs nothing else."""
  with (tf.io.gfile.GFile(inputs.tokenizer_path(dataset_dir), "rb") as source,
        model_dir_lib.open_file(os.path.join(model_dir, "tokenizer.json"), "wb") as target):
    target.write(source.read())
