"""The training loop: settings from gin, the graph on a mesh, a session, checkpoints, logs.

The `train.*` gin knobs are the parameters of `settings`, which freezes them into one
`Settings`; `train` (bin/train) checks them and reads top to bottom: the runtime (server,
TPU), the graph (train_graph.py), the run files, then the `Loop` of steps, logs, checkpoints
and evaluations.
"""
import dataclasses
import functools
import inspect
import json
import os
import signal
import sys
import threading
import time

from absl import logging
import gin
import numpy as np

from gptneo import checkpoints as checkpoints_lib
from gptneo import evaluate as evaluate_lib
from gptneo import flops
from gptneo import gin_utils
from gptneo import loggers as loggers_lib
from gptneo import memory
from gptneo import model_dir as model_dir_lib
from gptneo import runtime
from gptneo import storage
from gptneo import train_graph
from gptneo.harness import run as harness_run
from gptneo.optim import optimizers
from gptneo.compat import tf
from gptneo.data import inputs
from gptneo.data import prepare
from gptneo.data import tokenizer as tokenizer_lib
from gptneo.errors import Diverged, UserError
from gptneo.layout_search import cost_model


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
    check_ranges(self)
    if self.batch_size % self.microbatches_per_batch:
      raise UserError(f"train.microbatches_per_batch = {self.microbatches_per_batch} does not "
                      f"divide train.batch_size = {self.batch_size}")
    self.mesh.validate(self.model.dims(self.batch_size // self.microbatches_per_batch).sizes())
    optimizers.check_sharding(self.optimizer, self.mesh.sharding())
    runtime.variable_dtype(self.precision)
    check_loop(self.mesh, self.steps_per_loop)
    check_memory(self)
    info = inputs.read_dataset_info(self.dataset_dir)
    check_dataset(self.model, info, self.dataset_dir)
    harness_run.check_training(self)
    splits = ["train"] + (["validation"] if self.evaluates and "validation" in info["splits"]
                          else [])
    for split in splits:
      check_first_records(self.dataset_dir, split, info["n_ctx"])


NONFINITE_POLICIES = ("stop", "skip")


def check_ranges(s):
  """Every train.* number in its range, and the learning rate: one line naming the binding."""
  for name in ("train_steps", "batch_size", "microbatches_per_batch", "steps_per_checkpoint",
               "keep_checkpoints", "log_every_n_steps", "max_nonfinite_steps", "steps_per_loop"):
    _check_number(f"train.{name}", getattr(s, name), int, 1, "a positive integer")
  for name in ("eval_every_n_steps", "eval_steps"):
    _check_number(f"train.{name}", getattr(s, name), int, 0, "0 or a positive integer")
  if s.init_from_step is not None:
    _check_number("train.init_from_step", s.init_from_step, int, 0, "None (the newest) or a step")
  if s.eval_batches is not None:
    _check_number("train.eval_batches", s.eval_batches, int, 0,
                  "None (as train.eval_steps), or 0 or a positive integer")
  for name in ("clip_norm", "checkpoint_every_secs"):
    if getattr(s, name) is not None:
      _check_number(f"train.{name}", getattr(s, name), (int, float), 0, "None or 0 (off), or a "
                    "positive number")
  if s.on_nonfinite not in NONFINITE_POLICIES:
    raise UserError(f"train.on_nonfinite = {s.on_nonfinite!r}; use one of {NONFINITE_POLICIES}")
  if s.sampling not in inputs.SAMPLINGS:  # inputs would say so too, once the graph is built
    raise UserError(f"train.sampling = {s.sampling!r} is unknown; use one of "
                    f"{list(inputs.SAMPLINGS)}")
  flops.check_peak_setting(s.peak_flops)
  loggers_lib.check(s.loggers)
  _check_learning_rate()


def _check_number(binding, value, types, least, fix):
  # bool is an int to Python, never to a user who wrote True
  if isinstance(value, bool) or not isinstance(value, types) or not value >= least:
    raise UserError(f"{binding} = {value!r}; use {fix}")


def _check_learning_rate():
  """The schedule's peak rate if bound: negative would train uphill, without a word."""
  try:
    rate = gin.query_parameter("learning_rate_schedule.learning_rate")
  except ValueError:  # not bound: the schedule's default
    return
  if isinstance(rate, (int, float)) and not isinstance(rate, bool) and not rate >= 0:
    raise UserError(f"learning_rate_schedule.learning_rate = {rate!r}; use a positive number, "
                    f"e.g. 6e-4")


def check_dataset(model, info, dataset_dir):
  """The dataset must fit the model's vocabulary and context."""
  if info["n_vocab"] > model.n_vocab:
    raise UserError(f"dataset {dataset_dir!r} has vocab size {info['n_vocab']} > "
                    f"GPT.n_vocab = {model.n_vocab}; raise GPT.n_vocab to at least "
                    f"{info['n_vocab']}")
  if info["n_ctx"] != model.n_ctx:
    raise UserError(f"dataset {dataset_dir!r} has n_ctx {info['n_ctx']} but GPT.n_ctx = "
                    f"{model.n_ctx}; set GPT.n_ctx = {info['n_ctx']} or prepare the data "
                    f"with --n_ctx={model.n_ctx}")


TRAINING_FIXES = ("lower train.batch_size or raise train.microbatches_per_batch, set "
                  "GPT.recompute_grad = True or train.precision = 'bfloat16', or split the model "
                  "over more devices (gptneo-search-layout --gin_file=... --devices=N)")


def training_estimate(s):
  """A step's estimated memory (gptneo/memory.py) on one device of the mesh's layout."""
  micro = s.batch_size // s.microbatches_per_batch
  return memory.per_device(
      memory.training_memory_bytes(s.model, micro, s.precision, s.optimizer),
      cost_model.Workload.of(s.model, s.batch_size, s.microbatches_per_batch, s.precision),
      s.mesh, s.optimizer)


def check_memory(s):
  """A step's estimated memory must fit the mesh's devices; analytic, before anything is
  built or allocated."""
  micro = s.batch_size // s.microbatches_per_batch
  estimate = training_estimate(s)
  what = (f"training {s.model.num_parameters() / 1e6:.0f}M parameters on batches of {micro} x "
          f"{s.model.n_ctx} tokens (train.batch_size / train.microbatches_per_batch, GPT.n_ctx)")
  memory.check(estimate, s.mesh, what, TRAINING_FIXES)


def check_first_records(dataset_dir, split, n_ctx):
  """The first record of each local shard of `split` must be a window of n_ctx + 1 tokens:
  a corrupt or foreign shard is named now, before the model dir is touched (a gs:// dataset's
  shards, fetched as they are read, are checked as they are read: `corrupt_shard`)."""
  for _, folder, _, info in inputs.components(dataset_dir):
    for name in info["splits"][split]["files"]:
      path = os.path.join(folder, name)
      if os.path.isfile(path):
        _check_first_record(path, n_ctx)


def _check_first_record(path, n_ctx):
  rerun = "prepare the dataset again (gptneo-prepare-data --overwrite)"
  try:
    record = next(iter(tf.io.tf_record_iterator(path)), None)
    example = tf.train.Example.FromString(record) if record is not None else None
  except (tf.errors.OpError, ValueError) as error:  # DecodeError is a ValueError
    raise UserError(f"dataset shard {path} is corrupt ({_record_error(error)}); {rerun}") from None
  if example is None:
    raise UserError(f"dataset shard {path} holds no window; {rerun}")
  tokens = example.features.feature[prepare.TOKEN_FEATURE].int64_list.value
  if len(tokens) != n_ctx + 1:
    raise UserError(f"dataset shard {path} holds windows of {len(tokens)} tokens, not "
                    f"n_ctx + 1 = {n_ctx + 1} as its dataset.json says; {rerun}")


def _record_error(error):
  """What a record reader's error says about the record (TF's message of a session.run
  wraps it in the node's name and stack), else its first line."""
  lines = [line.strip() for line in (getattr(error, "message", None) or str(error)).splitlines()
           if line.strip()] or [type(error).__name__]
  return next((line for line in lines if " record" in line), lines[0])


def corrupt_shard(dataset_dir, splits):
  """The first local shard of `splits` whose records do not all read back whole, or None:
  what a DataLossError in the middle of a run (which names no file) was about."""
  for _, folder, _, info in inputs.components(dataset_dir):
    for split in splits:
      for name in info["splits"].get(split, {}).get("files", []):
        path = os.path.join(folder, name)
        try:
          for _ in tf.io.tf_record_iterator(path) if os.path.isfile(path) else ():
            pass
        except tf.errors.DataLossError:
          return path
  return None


def check_loop(spec, steps_per_loop):
  """Loops on the device exist on the TPU only."""
  if spec.implementation != "simd" and steps_per_loop != 1:
    raise UserError(f"train.steps_per_loop = {steps_per_loop} loops on a TPU only; drop it or "
                    f"set mesh.implementation = 'simd' (docs/tpu.md)")


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
  return Settings(**locals())


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
    dict with the final training loss, validation loss (None without a validation split, on a
    TPU, which has no evaluation loop yet, and when preempted) and "preempted": True if
    SIGTERM or SIGINT stopped the run early, at a step boundary with a checkpoint.
  """
  s = run_settings or configured_settings()
  if not s.mesh.is_peer:  # a peer only serves its devices: task 0 checks and drives
    s.check()
    logging.info("%s", start_summary(s, model_dir))
  with runtime.started(s.mesh) as rt, Preemption(enabled=not s.mesh.is_peer) as preemption:
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
      f"about {cost_model.format_bytes(training_estimate(s).peak)} per device",
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
    loop = Loop(session, graph, s, model_dir, lambda: storage.sync_up(model_dir, remote_dir),
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


class Preemption:
  """While training: SIGTERM or SIGINT asks the loop to stop at its next step boundary; a
  second one ends the process at once.

  Clusters and TPU VMs preempt with SIGTERM and a grace period; Ctrl-C is SIGINT. Python runs
  its handlers only between bytecodes of the main thread, which may sit for long in one
  session.run (a step, a checkpoint's write): two signals then would reach a handler as one.
  So the handlers do nothing, and a thread counts the signals as they arrive, through the
  byte per signal Python's C-level handler writes to its wakeup fd: the first sets `signal`
  (the loop then saves a checkpoint and returns); a second exits at once with code 128 + its
  number (143 for SIGTERM, 130 for SIGINT, as a shell reports a process a signal killed),
  without a checkpoint: one being written, if any, never gets its manifest and is never read
  (gptneo/checkpoints.py), so a rerun resumes from the newest complete one. The previous handlers and wakeup fd come back when the block ends.
  """
  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, enabled=True):
    self.signal, self._enabled, self._previous = None, enabled, {}
    self.signalled = threading.Event()  # set with `signal`: tests wait on it, never sleep
    self._pipe, self._previous_wakeup, self._watcher = None, None, None

  def __enter__(self):
    # Python lets only the main thread handle signals; elsewhere they keep their default.
    if self._enabled and threading.current_thread() is threading.main_thread():
      read_end, write_end = os.pipe()
      os.set_blocking(write_end, False)  # Python's C handler must never block on it
      self._pipe = (read_end, write_end)
      self._previous = {signum: signal.signal(signum, _ignore_here) for signum in self.SIGNALS}
      self._previous_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
      self._watcher = threading.Thread(target=self._watch, name="preemption", daemon=True)
      self._watcher.start()
    return self

  def __exit__(self, *exc_info):
    if self._pipe:
      signal.set_wakeup_fd(self._previous_wakeup)
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    if self._pipe:
      os.close(self._pipe[1])  # the watcher reads the end of the pipe and returns
      self._watcher.join()
      os.close(self._pipe[0])
      self._pipe = None

  def _watch(self):
    while data := os.read(self._pipe[0], 64):
      for signum in data:  # one byte per signal delivered, its number
        if signum in self.SIGNALS:
          self._received(signal.Signals(signum))

  def _received(self, signum):
    if self.signal is None:
      self.signal = signum
      self.signalled.set()
      logging.warning("train: %s: stopping after this step with a checkpoint; a second signal "
                      "stops at once, without one", signum.name)
      return
    logging.warning("train: a second signal (%s): exiting at once with code %d, without a "
                    "checkpoint; the newest complete one is kept and a rerun resumes from it",
                    signum.name, 128 + signum)
    sys.stderr.flush()
    os._exit(128 + signum)  # pylint: disable=protected-access


def _ignore_here(signum, frame):
  """The Python-level handler of Preemption's signals: Preemption's thread acts on them."""
  del signum, frame


class Loop:
  """Steps from `start` to train_steps: logs, checkpoints and evaluations on their cadence.

  Between session.runs it looks at `preemption`: once signalled, it saves a checkpoint and
  stops (`preempted` then holds the signal, the step and the checkpoint).
  """

  def __init__(self, session, graph, settings, model_dir, after_checkpoint, preemption=None,
               harness=None):
    self.session, self.graph, self.settings, self.model_dir = session, graph, settings, model_dir
    self.after_checkpoint = after_checkpoint
    self.preemption = preemption or Preemption(enabled=False)
    self.harness = harness  # harness_run.Scorer of train.harness_tasks, or None
    self.nonfinite = NonFinite(settings.on_nonfinite, settings.max_nonfinite_steps)
    self.progress, self.preempted, self.step, self.loss = None, None, None, None

  def run(self, start):
    """Returns (the last logged loss, the last evaluation's metrics or None)."""
    s = self.settings
    drop_rerun_steps(self.model_dir, start)
    self.progress = Progress(self.model_dir, s.train_steps, s.tokens_per_step, start,
                             flops.training_flops_per_token(s.model),
                             flops.peak_flops(s.mesh, s.peak_flops,
                                             precision=s.precision),
                             loggers_lib.make(s.loggers, self.model_dir, _plain_knobs(s)))
    self.step, self._start, self._since_log = int(start), int(start), []
    self._saved = (self.step, time.monotonic())  # step and time of the last checkpoint
    evaluation = None
    while self.step < s.train_steps and not self.preemption.signal:
      self.reading_data(self.take_steps)
      if self.checkpoint_due():
        self.save()
      if s.periodic_eval_at(self.step) and self.graph.eval_fetches:
        evaluation = self.reading_data(self.periodic_eval, self.step)
      if self.harness and harness_run.due(s, self.step):
        self.harness_eval()
    if self.preemption.signal:
      self.preempted = (self.preemption.signal, self.step, self.stop_checkpoint())
      return self.loss, None
    return self.loss, self.reading_data(self.final_eval, self.step, evaluation)

  def reading_data(self, function, *args):
    """function(*args); a corrupt shard it meets (one the start-up check did not read) ends
    the run in one line naming it; nothing of the failed step is saved."""
    try:
      return function(*args)
    except tf.errors.DataLossError as error:
      raise self.data_loss(error) from None

  def data_loss(self, error):
    """The UserError of a DataLossError (which names no file): the shard found corrupt, and
    the last checkpoint, intact."""
    shard = corrupt_shard(self.settings.dataset_dir, ["train", "validation"])
    latest = self.graph.checkpoints.latest() or "none yet"
    return UserError(f"dataset shard {shard or 'of ' + repr(self.settings.dataset_dir)} is "
                     f"corrupt ({_record_error(error)}) at step {self.step}; the last checkpoint "
                     f"({latest}) is intact: prepare the dataset again (gptneo-prepare-data "
                     f"--overwrite) and run the same command to resume")

  def take_steps(self):
    """One session.run: a step, or a device loop's steps up to the next log or checkpoint."""
    s = self.settings
    steps = steps_this_run(self.step, self._start, s.train_steps, self.graph.steps_per_run,
                           (s.log_every_n_steps, s.steps_per_checkpoint, s.eval_every_n_steps))
    step_loss, *self._last_scalars = self.graph.run(self.session, steps)
    self.step += steps
    # Before anything of this step is logged or saved: a non-finite step stops or is skipped.
    if self.nonfinite.check(self.step, steps, step_loss, self._last_scalars[1],
                            self.graph.checkpoints):
      self._since_log.extend([step_loss] * steps)  # a device loop reports its steps' mean loss
    if self.step % s.log_every_n_steps == 0 or self.step in (self._start + 1, s.train_steps):
      self.log()

  def log(self):
    # One batch's loss is noisy; the mean since the last log shows the trend.
    self.loss = float(np.mean(self._since_log)) if self._since_log else float("nan")
    learning_rate, norm, aux_losses = self._last_scalars
    if self.settings.on_nonfinite == "skip":
      aux_losses = {**aux_losses, "skipped_steps": self.nonfinite.skipped}
    self.progress.log(self.step, self.loss, learning_rate, norm, aux_losses)
    self._since_log = []

  def checkpoint_due(self):
    s, (_, saved_time) = self.settings, self._saved
    return (self.step % s.steps_per_checkpoint == 0 or self.step == s.train_steps or
            (bool(s.checkpoint_every_secs) and
             time.monotonic() - saved_time >= s.checkpoint_every_secs))

  def save(self):
    path = self.graph.checkpoints.save(self.session, self.step)
    logging.info("saved checkpoint %s", path)
    self.after_checkpoint()
    self._saved = (self.step, time.monotonic())
    return path

  def stop_checkpoint(self):
    """Preempted: the steps since the last log are logged and saved; returns the checkpoint."""
    if self._since_log:
      self.log()
    if self.step != self._saved[0]:
      return self.save()
    return self.graph.checkpoints.latest()  # no step since: the restored one, or None

  def periodic_eval(self, step):
    """Validation metrics to TensorBoard (eval/...) and to model_dir/eval.jsonl."""
    metrics = self.evaluate(self.settings.eval_steps)
    self.progress.scalars(step, {f"eval/{name}": metrics[name]
                                 for name in ("loss", "perplexity", "bits_per_byte", "accuracy")})
    record = {"step": int(step), "task": "lm", "split": "validation", **metrics,
              "batches": self.settings.eval_steps}
    evaluate_lib.append_result(self.model_dir, record)
    logging.info("step %d  validation loss %.4f  bits/byte %.4f  accuracy %.4f", step,
                 metrics["loss"], metrics["bits_per_byte"], metrics["accuracy"])
    return record

  def harness_eval(self):
    """train.harness_tasks on this step's checkpoint (saved now if it wasn't), to eval.jsonl and
    TensorBoard (harness/<task>/<metric>)."""
    if self._saved[0] != self.step:
      self.save()
    records = self.harness()
    harness_run.append(self.model_dir, records)
    self.progress.scalars(self.step, harness_run.scalars(records))

  def final_eval(self, step, last_periodic):
    """The last periodic evaluation if it was at this step and scored the same batches, else
    train.eval_batches' (as many as eval_steps unless set)."""
    batches = self.settings.final_eval_batches
    if not self.graph.eval_fetches or batches is None:
      return None
    if last_periodic is None and step == self._start:  # a finished run resumed: no new weights
      recorded = self.recorded_validation(step)
      if recorded is None or recorded["batches"] != batches:
        logging.info("step %d was reached before: not evaluated again (gptneo-eval scores the "
                     "checkpoint)", step)
        return None
      return recorded
    if last_periodic and last_periodic["step"] == step and batches == self.settings.eval_steps:
      return last_periodic
    return {"step": int(step), **self.evaluate(batches)}

  def recorded_validation(self, step):
    """The periodic evaluation eval.jsonl holds of `step` (the newest), or None."""
    found = None
    try:
      with model_dir_lib.open_file(os.path.join(self.model_dir, "eval.jsonl"), "r") as f:
        for line in f:
          try:
            record = json.loads(line)
          except ValueError:  # a line cut short by a crash: not this record
            continue
          if (isinstance(record, dict) and record.get("step") == step and record.get("task") == "lm" and
              record.get("split") == "validation" and "batches" in record):
            found = record
    except FileNotFoundError:
      return None
    return found

  def evaluate(self, batches):
    """lm metrics over the validation split's first `batches` batches (0: all of it), each
    window once: the same every time, so evaluations compare across steps, a resumed run
    evaluates as an uninterrupted one, and bin/eval on the checkpoint agrees."""
    self.session.run(self.graph.eval_reset, {self.graph.eval_limit: batches})
    return evaluate_lib.metrics_of_batches(self.session, self.graph.eval_fetches,
                                           self._byte_lengths, self.graph.eval_batches(batches))

  @functools.cached_property
  def _byte_lengths(self):
    """Bytes per token id, read once from the run's tokenizer (not at every evaluation)."""
    return evaluate_lib.token_byte_lengths(
        tokenizer_lib.load_tokenizer(os.path.join(self.model_dir, "tokenizer.json")))


class NonFinite:
  """What the loop does about a step whose loss or gradient norm is NaN or infinite.

  "stop": raise Diverged before anything of that step is logged or saved. "skip": the graph
  kept weights and optimizer state (train_graph.skip_unless_finite); count the step, and raise
  once `most_in_a_row` steps in a row were skipped. A device loop (TPU) reports its steps' mean
  loss: one non-finite step marks all of its steps.
  """

  def __init__(self, policy, most_in_a_row):
    self.policy, self.most_in_a_row = policy, most_in_a_row
    self.skipped, self.in_a_row = 0, 0  # since this run (re)started

  def check(self, step, steps, loss, grad_norm, checkpoints):
    """True if the `steps` up to `step` were finite; False if skipped; raises Diverged."""
    if np.isfinite(loss) and np.isfinite(grad_norm):
      self.in_a_row = 0
      return True
    what, fix = f"loss {loss}, gradient norm {grad_norm}", " (or set train.on_nonfinite = 'skip')"
    if self.policy == "skip":
      self.skipped, self.in_a_row = self.skipped + steps, self.in_a_row + steps
      if self.in_a_row < self.most_in_a_row:
        logging.warning("step %d: %s: update skipped (%d in a row, %d in all)", step, what,
                        self.in_a_row, self.skipped)
        return False
      what += f"; {self.in_a_row} in a row, train.max_nonfinite_steps = {self.most_in_a_row}"
      fix = ""
    latest = checkpoints.latest() or "none: nothing was saved yet"
    raise Diverged(f"the loss went non-finite at step {step} ({what}); the last good "
                   f"checkpoint is {latest}; lower learning_rate_schedule.learning_rate{fix} "
                   f"and run again to resume from it")


def drop_rerun_steps(model_dir, start):
  """Takes out of the run's logs the lines of steps after `start`, which it is to take again.

  A run resumed from the checkpoint of step `start` (after a crash, a kill, a fall-back to an
  older checkpoint) logs the steps after it anew; the old lines would show a reader, the sweep
  report and its plots, each of those steps twice. train_metrics.jsonl is all ours; of
  eval.jsonl only training's periodic records (bin/eval's own carry "seconds").
  """
  _drop_lines_after(os.path.join(model_dir, "train_metrics.jsonl"), start, lambda record: True)
  _drop_lines_after(os.path.join(model_dir, "eval.jsonl"), start,
                    lambda record: record.get("task") == "lm" and "seconds" not in record)


def _drop_lines_after(path, start, ours):
  """Rewrites a JSONL file without `ours` lines of step > start, nor a line cut short by a
  crash; atomically (a temporary file, os.replace), so a kill leaves the old or the new."""
  temporary = f"{path}.tmp"
  if os.path.exists(temporary):  # a kill in the middle of an earlier rewrite
    os.remove(temporary)
  if not os.path.exists(path):
    return
  with model_dir_lib.open_file(path) as f:
    lines = f.readlines()
  kept = [line.rstrip("\n") + "\n" for line in lines if _kept(line, start, ours)]
  if kept != lines:
    with model_dir_lib.open_file(temporary, "w") as f:
      f.writelines(kept)
    os.replace(temporary, path)


def _kept(line, start, ours):
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    return False
  return not (isinstance(record, dict) and ours(record) and record.get("step", 0) > start)


def steps_this_run(step, start, train_steps, steps_per_run, every):
  """Up to `steps_per_run` steps, stopping at the next log, checkpoint or eval step."""
  stops = [train_steps, start + 1] + [(step // n + 1) * n for n in every if n]
  return max(1, min([steps_per_run] + [stop - step for stop in stops if stop > step]))


class Progress:
  """Logs step, loss, learning rate, tokens/s, MFU, elapsed and ETA; writes TensorBoard
  summaries."""

  def __init__(self, model_dir, train_steps, tokens_per_step, first_step, flops_per_token,
               peak_flops, loggers=()):
    self._writer = tf.summary.FileWriter(model_dir)
    self._loggers = loggers  # train.loggers' (gptneo/loggers.py)
    self._metrics = model_dir_lib.open_file(os.path.join(model_dir, "train_metrics.jsonl"), "a")
    self._train_steps, self._tokens_per_step = train_steps, tokens_per_step
    self._flops_per_token, self._peak_flops = flops_per_token, peak_flops
    self._start, self._first_step = time.time(), first_step
    self._last_time, self._last_step = self._start, first_step

  def log(self, step, loss, learning_rate, grad_norm, aux_losses=None):
    now = time.time()
    tokens_per_sec = (step - self._last_step) * self._tokens_per_step / max(now - self._last_time,
                                                                            1e-9)
    done = step - self._first_step
    eta = (now - self._start) / max(done, 1) * (self._train_steps - step)
    use = flops.utilization(tokens_per_sec, self._flops_per_token, self._peak_flops)
    mfu = f"MFU {use['mfu']:.1%} ({use['tflops']:.3g} TFLOP/s)" if "mfu" in use else (
        f"{use['tflops']:.3g} TFLOP/s")
    logging.info("step %d/%d  loss %.4f  lr %.2e  %.0f tokens/s  %s  elapsed %s  ETA %s", step,
                 self._train_steps, loss, learning_rate, tokens_per_sec, mfu,
                 _clock(now - self._start), _clock(eta))
    values = {"loss": float(loss), "learning_rate": float(learning_rate),
              "tokens_per_sec": tokens_per_sec, **use, "grad_norm": float(grad_norm),
              **{name: float(value) for name, value in (aux_losses or {}).items()}}
    self.scalars(step, values)
    self._metrics.write(json.dumps({"step": int(step), **values}) + "\n")
    self._metrics.flush()
    self._last_time, self._last_step = now, step

  def scalars(self, step, values):
    summary = tf.Summary(value=[tf.Summary.Value(tag=k, simple_value=float(v))
                                for k, v in values.items()])
    self._writer.add_summary(summary, step)
    self._writer.flush()
    for logger in self._loggers:
      logger.scalars(step, values)

  def close(self):
    for logger in self._loggers:
      logger.close()


def _plain_knobs(s):
  """The train.* knobs that are plain values, and the model's size: a logger's run config."""
  knobs = {name: value for name, value in vars(s).items()
           if isinstance(value, (bool, int, float, str)) or value is None}
  return {**knobs, "parameters": s.model.num_parameters(), "n_ctx": s.model.n_ctx}


def _clock(seconds):
  minutes, seconds = divmod(int(seconds), 60)
  return f"{minutes // 60:d}:{minutes % 60:02d}:{seconds:02d}"
