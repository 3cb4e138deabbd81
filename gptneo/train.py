"""The training loop: mtf graph on a mesh, a tf.compat.v1 Session, checkpoints, resume, logs."""
import dataclasses
import json
import os
import time

from absl import logging
import gin
import numpy as np

from gptneo import evaluate as evaluate_lib
from gptneo import gin_utils
from gptneo import runtime
from gptneo import storage
from gptneo import tpu
from gptneo.compat import mtf, tf
from gptneo.data import inputs
from gptneo.data import tokenizer as tokenizer_lib
from gptneo.errors import UserError
from gptneo.model import gpt as gpt_lib
from gptneo.model import ops
from gptneo.optim import optimizers


@dataclasses.dataclass
class TrainGraph:
  graph: tf.Graph
  step: tf.Tensor
  loss: tf.Tensor
  learning_rate: tf.Tensor
  grad_norm: tf.Tensor
  train_op: tf.Operation
  eval_loss: tf.Tensor
  init_ops: list
  checkpoints: runtime.Checkpoints
  aux_losses: dict = dataclasses.field(default_factory=dict)  # name -> tf scalar, logged
  eval_metrics: dict = dataclasses.field(default_factory=dict)  # accuracy, targets (tf)
  steps_per_run: int = 1  # > 1: a device loop takes that many steps per session.run (TPU)
  loop_steps: tf.Tensor = None  # with a device loop: the placeholder of its step count
  enqueue: tf.Operation = None  # with a device loop: feeds its batches (infeed)

  def run(self, session, steps=1):
    """Takes `steps` steps; returns (loss, learning rate, gradient norm, auxiliary losses).

    With a device loop the loss is the mean over its steps, the rest are of its last step.
    """
    fetches = [self.train_op, self.loss, self.learning_rate, self.grad_norm, self.aux_losses]
    if self.loop_steps is None:
      return session.run(fetches)[1:]
    return session.run([self.enqueue] + fetches, {self.loop_steps: steps})[2:]


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


def _import_batch(mtf_mesh, batch, dims):
  """Splits [batch, n_ctx+1] windows into mtf inputs and next-token targets."""
  shape = [dims.batch, dims.sequence]
  tokens = mtf.import_tf_tensor(mtf_mesh, batch[:, :-1], shape, name="tokens")
  targets = mtf.import_tf_tensor(mtf_mesh, batch[:, 1:], shape, name="targets")
  return tokens, targets


def _gradients(model, features, dims, dtype, dropout, microbatches):
  """Mean losses and gradients, summed over microbatches when there are several.

  "loss" is the training objective: cross-entropy plus the model's auxiliary losses (MoE
  balancing, z-loss), which are also returned under their own names for the logs.
  """
  def loss_fn(f):
    logits = model(f["tokens"], dtype, dropout)
    losses = {"loss": gpt_lib.loss(logits, f["targets"], dims.vocab), **model.aux_losses}
    for aux in model.aux_losses.values():
      losses["loss"] += aux
    return losses

  variables = features["tokens"].graph.trainable_variables
  if microbatches == 1:
    losses = loss_fn(features)
    return losses, mtf.gradients([losses["loss"]], [v.outputs[0] for v in variables])
  grads, outputs = mtf.serialize_training_step(features, loss_fn, dims.batch, microbatches)
  return ({name: value / microbatches for name, value in outputs.items()},
          [g / microbatches for g in grads])


@dataclasses.dataclass
class MtfStep:
  """One training step as an mtf graph: losses, gradient norm, learning rate, update ops."""
  losses: dict  # "loss" (the objective) and the auxiliary losses, mtf scalars
  grad_norm: mtf.Tensor
  learning_rate: tf.Tensor
  update_ops: list


def mtf_step(model, optimizer, features, dims, step, train_steps, seed, precision,
             microbatches, clip_norm):
  """Builds loss, gradients and the optimizer update of one step on `features`' mesh.

  Shared by the placement loop here and the TPU loop (gptneo/tpu.py); `step` is the tf scalar
  of the step being taken (it drives the schedule, Adam's bias correction and dropout).
  """
  mtf_mesh = features["tokens"].mesh
  dtype = runtime.variable_dtype(precision)
  dropout = ops.Dropout(is_training=True, seed=seed, step=step)
  losses, grads = _gradients(model, features, dims, dtype, dropout, microbatches)
  norm = optimizers.global_norm(grads)
  grads = optimizers.clip_by_global_norm(grads, norm, clip_norm)
  learning_rate = optimizers.learning_rate_schedule(step, train_steps)
  optimizer.learning_rate = mtf.import_fully_replicated(mtf_mesh, learning_rate, [], "lr")
  optimizer.step = mtf.import_fully_replicated(
      mtf_mesh, tf.cast(step + 1, tf.float32), [], "step")
  update_ops = optimizer.apply_grads(grads, mtf_mesh.graph.trainable_variables)
  return MtfStep(losses, norm, learning_rate, update_ops)


@dataclasses.dataclass
class LoweredStep:
  """An MtfStep's tf side, on whichever mesh it was lowered."""
  loss: tf.Tensor
  grad_norm: tf.Tensor
  aux_losses: dict
  updates: tf.Operation  # runs after loss and norm have read this step's weights


def lower_step(lowering, step):
  """The tf tensors of an MtfStep; the update is ordered after the loss reads the weights."""
  losses = dict(step.losses)
  tf_loss = lowering.export_to_tf_tensor(losses.pop("loss"))
  tf_norm = lowering.export_to_tf_tensor(step.grad_norm)
  with tf.control_dependencies([tf_loss, tf_norm]):
    updates = tf.group([lowering.lowered_operation(op) for op in step.update_ops])
  return LoweredStep(tf_loss, tf_norm, {name: lowering.export_to_tf_tensor(value)
                                        for name, value in losses.items()}, updates)


def build_graph(model, optimizer, spec, dataset_dir, batch_size, train_steps, seed,
                precision, microbatches, clip_norm, eval_batches, model_dir, keep,
                sampling="fixed"):
  """The placement mesh's training graph: one step per session.run."""
  graph = tf.Graph()
  with graph.as_default():
    tf.set_random_seed(seed)
    step = tf.train.get_or_create_global_step()
    iterator = tf.data.make_initializable_iterator(
        inputs.make_dataset(dataset_dir, "train", batch_size, seed=seed, sampling=sampling))
    mtf_graph, mtf_mesh = runtime.new_mesh()
    dims = model.dims(batch_size)
    tokens, targets = _import_batch(mtf_mesh, iterator.get_next(), dims)
    step_graph = mtf_step(model, optimizer, {"tokens": tokens, "targets": targets}, dims, step,
                          train_steps, seed, precision, microbatches, clip_norm)
    eval_loss, eval_init = _eval_loss(model, mtf_mesh, dataset_dir, batch_size, dims,
                                      runtime.variable_dtype(precision), eval_batches)
    lowering = runtime.lower(mtf_graph, mtf_mesh, spec)
    lowered = lower_step(lowering, step_graph)
    with tf.control_dependencies([lowered.updates]):
      train_op = tf.assign_add(step, 1).op
    saveable = tf.data.experimental.make_saveable_from_iterator(iterator)
    checkpoints = runtime.Checkpoints(lowering, model_dir, keep, [saveable])
    tf_eval = {name: lowering.export_to_tf_tensor(value)
               for name, value in (eval_loss or {}).items()}
    return TrainGraph(graph, step, lowered.loss, step_graph.learning_rate, lowered.grad_norm,
                      train_op, tf_eval.pop("loss", None), [iterator.initializer] + eval_init,
                      checkpoints, lowered.aux_losses, tf_eval)


def build_tpu_graph(model, optimizer, spec, dataset_dir, batch_size, train_steps, seed,
                    precision, microbatches, clip_norm, model_dir, keep, steps_per_loop,
                    sampling="fixed"):
  """The SIMD (TPU) mesh's training graph: up to `steps_per_loop` steps per session.run.

  The same step as build_graph (mtf_step, lower_step), built inside tpu.device_loop on every
  core; batches come from the same saveable iterator through tpu.Infeed. Needs
  spec.device_assignment (tpu.connect, or tpu.synthetic_device_assignment to only build).
  """
  graph = tf.Graph()
  with graph.as_default(), tpu.v1_control_flow():
    tf.set_random_seed(seed)
    with tf.device(tpu.host_devices(spec)[0]):
      step = tf.train.get_or_create_global_step()
      iterator = tf.data.make_initializable_iterator(
          inputs.make_dataset(dataset_dir, "train", batch_size, seed=seed, sampling=sampling))
      loop_steps = tf.placeholder_with_default(1, [], "loop_steps")
      start = tf.identity(step)
    dims = model.dims(batch_size)
    infeed = tpu.Infeed(spec, iterator.get_next, mtf.Shape([dims.batch, dims.sequence]),
                        loop_steps)
    built = {}

    def body(current):
      mtf_graph, mtf_mesh = runtime.new_mesh(tpu.variable_placer(spec))
      tokens, targets = infeed.dequeue(mtf_mesh)
      step_graph = mtf_step(model, optimizer, {"tokens": tokens, "targets": targets}, dims,
                            current, train_steps, seed, precision, microbatches, clip_norm)
      built["lowering"] = runtime.lower(mtf_graph, mtf_mesh, spec)
      lowered = lower_step(built["lowering"], step_graph)
      built["aux"] = sorted(lowered.aux_losses)
      return lowered.updates, [lowered.loss, step_graph.learning_rate, lowered.grad_norm,
                               *[lowered.aux_losses[name] for name in built["aux"]]]

    loss, learning_rate, norm, *aux = tpu.device_loop(spec, body, start, loop_steps)
    with tf.control_dependencies([loss, learning_rate, norm, *aux]):
      train_op = tf.assign_add(step, tf.cast(loop_steps, step.dtype)).op
    saveable = tf.data.experimental.make_saveable_from_iterator(iterator)
    checkpoints = runtime.Checkpoints(built["lowering"], model_dir, keep, [saveable])
    return TrainGraph(graph, step, loss, learning_rate, norm, train_op, None,
                      [iterator.initializer], checkpoints, dict(zip(built["aux"], aux, strict=True)),
                      steps_per_run=steps_per_loop, loop_steps=loop_steps,
                      enqueue=infeed.enqueue)


def _eval_loss(model, mtf_mesh, dataset_dir, batch_size, dims, dtype, eval_batches):
  """Validation loss, accuracy and targets of one batch (dropout off), or None."""
  info = inputs.read_dataset_info(dataset_dir)
  if not eval_batches or info["splits"].get("validation", {}).get("windows", 0) < batch_size:
    return None, []
  iterator = tf.data.make_initializable_iterator(inputs.make_dataset(
      dataset_dir, "validation", batch_size, shuffle=False, repeat=True))
  tokens, targets = _import_batch(mtf_mesh, iterator.get_next(), dims)
  no_dropout = ops.Dropout(is_training=False, seed=0, step=0)
  logits = model(tokens, dtype, no_dropout)
  outputs = evaluate_lib.batch_outputs(logits, targets, dims.vocab)
  return {**outputs, "targets": targets}, [iterator.initializer]


class Progress:
  """Logs step, loss, learning rate, tokens/s, elapsed and ETA; writes TensorBoard summaries."""

  def __init__(self, model_dir, train_steps, tokens_per_step, first_step):
    self._writer = tf.summary.FileWriter(model_dir)
    self._metrics = open(os.path.join(model_dir, "train_metrics.jsonl"), "a")
    self._train_steps, self._tokens_per_step = train_steps, tokens_per_step
    self._start, self._first_step = time.time(), first_step
    self._last_time, self._last_step = self._start, first_step

  def log(self, step, loss, learning_rate, grad_norm, aux_losses=None):
    now = time.time()
    tokens_per_sec = (step - self._last_step) * self._tokens_per_step / max(now - self._last_time,
                                                                            1e-9)
    done = step - self._first_step
    eta = (now - self._start) / max(done, 1) * (self._train_steps - step)
    logging.info("step %d/%d  loss %.4f  lr %.2e  %.0f tokens/s  elapsed %s  ETA %s", step,
                 self._train_steps, loss, learning_rate, tokens_per_sec,
                 _clock(now - self._start), _clock(eta))
    values = {"loss": float(loss), "learning_rate": float(learning_rate),
              "tokens_per_sec": tokens_per_sec, "grad_norm": float(grad_norm),
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


def _clock(seconds):
  minutes, seconds = divmod(int(seconds), 60)
  return f"{minutes // 60:d}:{minutes % 60:02d}:{seconds:02d}"


@gin.configurable(denylist=["model_dir"])
def train(model_dir, model=gin.REQUIRED, dataset_dir=gin.REQUIRED, train_steps=gin.REQUIRED,
          batch_size=8, optimizer=gin.REQUIRED, mesh=gin.REQUIRED, precision="float32",
          microbatches_per_batch=1, clip_norm=1.0, seed=1234, steps_per_checkpoint=500,
          keep_checkpoints=5, log_every_n_steps=10, eval_batches=10, eval_every_n_steps=0,
          eval_steps=10, init_from=None, steps_per_loop=1, sampling="fixed"):
  """Trains `model` on `dataset_dir` until `train_steps`, resuming from `model_dir`.

  Args:
    model_dir: where checkpoints, summaries and the operative config go (a flag): a folder,
      or gs://bucket/prefix, worked on in a local mirror ($GPTNEO_CACHE_DIR) and synced
      back after every checkpoint.
    model: the model, e.g. @GPT().
    dataset_dir: a folder written by bin/prepare_data, a gs:// URI of one (mirrored into
      $GPTNEO_CACHE_DIR, default ~/.cache/gptneo), or a mixture {folder or URI: weight}
      of datasets prepared with one tokenizer and n_ctx, drawn at random by weight.
    train_steps: the step to stop at (counting steps of earlier runs in model_dir).
    batch_size: sequences per step (all microbatches together).
    optimizer: e.g. @Adam() or @Adafactor().
    mesh: the device mesh, e.g. @mesh().
    precision: "float32", or "bfloat16" activations with float32 master weights.
    microbatches_per_batch: gradient accumulation; must divide batch_size.
    clip_norm: clip gradients to this global norm (0 or None: no clipping).
    seed: seeds weights, data order and dropout; same seed, same run.
    steps_per_checkpoint: save a checkpoint every this many steps (and at the end).
    keep_checkpoints: how many recent checkpoints to keep.
    log_every_n_steps: log and write summaries every this many steps; the loss logged is
      the mean over the steps since the previous log.
    eval_batches: validation batches averaged for the loss printed at the end (0: none).
    eval_every_n_steps: every this many steps, write validation loss, perplexity, bits per
      byte and accuracy to TensorBoard (eval/...) and eval.jsonl (0: never).
    eval_steps: validation batches per periodic evaluation (the stream cycles on).
    init_from: a model dir (e.g. from bin/import_hf) whose latest weights start a new run:
      fine-tuning, with fresh optimizer state; unused once model_dir has a checkpoint.
    steps_per_loop: with mesh.implementation = "simd" (TPU): steps per session.run, looped on
      the TPU; a loop also ends at each log, checkpoint and the last step.
    sampling: how training windows are cut from the packed token stream: "fixed" (the
      stored windows), "random_chunk" (at a random offset, so a token is not always at the
      same position) or "document" (starting after a window's first end of document).
      Evaluation always reads the stored windows.

  Returns:
    dict with the final training loss and validation loss (None without a validation split
    and on a TPU, which has no evaluation loop yet).
  """
  if mesh.cluster:
    server = runtime.start_server(mesh)  # noqa: F841  (serves this task's devices while alive)
    if mesh.task_index:  # task 0 drives the whole mesh
      runtime.serve_until_released(mesh)
      return None
  remote_dir, model_dir = model_dir, storage.working_copy(model_dir)
  init_from = init_from and storage.local_copy(init_from)
  if init_from and not tf.train.latest_checkpoint(init_from):
    raise UserError(f"train.init_from = {init_from!r} has no checkpoint; point it at a model "
                    f"dir that bin/train or bin/import_hf wrote")
  graph = _validated_graph(model, optimizer, mesh, dataset_dir, batch_size, train_steps, seed,
                           precision, microbatches_per_batch, clip_norm,
                           eval_batches or (eval_steps if eval_every_n_steps else 0),
                           model_dir, keep_checkpoints, steps_per_loop, eval_every_n_steps,
                           sampling)
  with graph.graph.as_default():  # a resume that can't work fails before anything is written
    graph.checkpoints.check(init_from)
  gin_utils.write_run_files(model_dir)
  _copy_tokenizer(dataset_dir, model_dir)
  with graph.graph.as_default():
    release_peers = runtime.release_ops(mesh) + tpu.shutdown_ops(mesh)
  if mesh.cluster:
    runtime.wait_for_peers(mesh)
  with (graph.graph.as_default(),
        tf.Session(mesh.target, config=mesh.session_config()) as session,
        runtime.peers_guard(mesh)):
    restored = graph.checkpoints.restore_or_initialize(session, graph.init_ops, init_from)
    start = session.run(graph.step)
    logging.info("%s at step %d", f"resumed from {restored}" if restored else "started", start)
    loss = _train_steps(session, graph, model_dir, start, train_steps, batch_size * model.n_ctx,
                        steps_per_checkpoint, log_every_n_steps, eval_every_n_steps, eval_steps,
                        lambda: storage.sync_up(model_dir, remote_dir))
    eval_loss = _evaluate(session, graph, eval_batches)
    session.run(release_peers)
  storage.sync_up(model_dir, remote_dir)  # what was written after the last checkpoint
  if eval_loss is not None:
    logging.info("validation loss %.4f after step %d", eval_loss, train_steps)
  elif mesh.implementation == "simd" and eval_batches:
    logging.info("no validation loss: the TPU loop has no evaluation yet; run bin/eval")
  return {"loss": loss, "validation_loss": eval_loss}


def _validated_graph(model, optimizer, spec, dataset_dir, batch_size, train_steps, seed,
                     precision, microbatches, clip_norm, eval_batches, model_dir, keep,
                     steps_per_loop=1, eval_every_n_steps=0, sampling="fixed"):
  """Checks the config, then builds the graph (on "simd": after connecting to the TPU)."""
  check_dataset(model, inputs.read_dataset_info(dataset_dir), dataset_dir)
  if batch_size % microbatches:
    raise UserError(f"train.microbatches_per_batch = {microbatches} does not divide "
                    f"train.batch_size = {batch_size}")
  spec.validate(model.dims(batch_size // microbatches).sizes())
  runtime.variable_dtype(precision)
  check_loop(spec, steps_per_loop, eval_every_n_steps)
  if spec.implementation == "simd":
    if spec.device_assignment is None:
      tpu.connect(spec)
    return build_tpu_graph(model, optimizer, spec, dataset_dir, batch_size, train_steps, seed,
                           precision, microbatches, clip_norm, model_dir, keep, steps_per_loop,
                           sampling)
  return build_graph(model, optimizer, spec, dataset_dir, batch_size, train_steps, seed,
                     precision, microbatches, clip_norm, eval_batches, model_dir, keep, sampling)


def check_loop(spec, steps_per_loop, eval_every_n_steps):
  """Loops on the device exist on the TPU only, and have no periodic evaluation yet."""
  if not isinstance(steps_per_loop, int) or steps_per_loop < 1:
    raise UserError(f"train.steps_per_loop = {steps_per_loop!r}; use a positive integer")
  if spec.implementation != "simd" and steps_per_loop != 1:
    raise UserError(f"train.steps_per_loop = {steps_per_loop} loops on a TPU only; drop it or "
                    f"set mesh.implementation = 'simd' (docs/tpu.md)")
  if spec.implementation == "simd" and eval_every_n_steps:
    raise UserError(f"train.eval_every_n_steps = {eval_every_n_steps}: the TPU loop has no "
                    f"periodic evaluation yet; set it to 0 and run bin/eval on the checkpoints")


def _copy_tokenizer(dataset_dir, model_dir):
  """The model dir carries its tokenizer, so sampling needs nothing else."""
  tf.io.gfile.copy(inputs.tokenizer_path(dataset_dir), os.path.join(model_dir, "tokenizer.json"),
                   overwrite=True)


def _train_steps(session, graph, model_dir, start, train_steps, tokens_per_step,
                 steps_per_checkpoint, log_every_n_steps, eval_every_n_steps=0, eval_steps=0,
                 after_checkpoint=lambda: None):
  progress = Progress(model_dir, train_steps, tokens_per_step, start)
  loss, step, since_log = None, start, []
  while step < train_steps:
    steps = steps_this_run(step, start, train_steps, graph.steps_per_run,
                           (log_every_n_steps, steps_per_checkpoint, eval_every_n_steps))
    step_loss, learning_rate, norm, aux_losses = graph.run(session, steps)
    step += steps
    since_log.extend([step_loss] * steps)  # a device loop reports its steps' mean loss
    if step % log_every_n_steps == 0 or step in (start + 1, train_steps):
      # One batch's loss is noisy; the mean since the last log shows the trend.
      loss, since_log = float(np.mean(since_log)), []
      progress.log(step, loss, learning_rate, norm, aux_losses)
    if step % steps_per_checkpoint == 0 or step == train_steps:
      logging.info("saved checkpoint %s", graph.checkpoints.save(session, step))
      after_checkpoint()
    if eval_every_n_steps and step % eval_every_n_steps == 0 and graph.eval_loss is not None:
      _periodic_eval(session, graph, model_dir, step, eval_steps, progress)
  return loss


def steps_this_run(step, start, train_steps, steps_per_run, every):
  """Up to `steps_per_run` steps, stopping at the next log, checkpoint or eval step."""
  stops = [train_steps, start + 1] + [(step // n + 1) * n for n in every if n]
  return max(1, min([steps_per_run] + [stop - step for stop in stops if stop > step]))


def _periodic_eval(session, graph, model_dir, step, eval_steps, progress):
  """Validation metrics to TensorBoard (eval/...) and to model_dir/eval.jsonl."""
  byte_lengths = evaluate_lib.token_byte_lengths(
      tokenizer_lib.load_tokenizer(os.path.join(model_dir, "tokenizer.json")))
  metrics = evaluate_lib.metrics_of_batches(
      session, {"loss": graph.eval_loss, **graph.eval_metrics}, eval_steps, byte_lengths)
  progress.scalars(step, {f"eval/{name}": metrics[name]
                          for name in ("loss", "perplexity", "bits_per_byte", "accuracy")})
  evaluate_lib.append_result(model_dir, {"step": int(step), "task": "lm", "split": "validation",
                                         **metrics})
  logging.info("step %d  validation loss %.4f  bits/byte %.4f  accuracy %.4f", step,
               metrics["loss"], metrics["bits_per_byte"], metrics["accuracy"])


def _evaluate(session, graph, eval_batches):
  if graph.eval_loss is None or not eval_batches:
    return None
  return sum(session.run(graph.eval_loss) for _ in range(eval_batches)) / eval_batches
