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
from gptneo.compat import mtf, tf
from gptneo.data import inputs
from gptneo.data import tokenizer as tokenizer_lib
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


def check_dataset(model, info, dataset_dir):
  """The dataset must fit the model's vocabulary and context."""
  if info["n_vocab"] > model.n_vocab:
    raise ValueError(f"dataset {dataset_dir!r} has vocab size {info['n_vocab']} > "
                     f"GPT.n_vocab = {model.n_vocab}; raise GPT.n_vocab to at least "
                     f"{info['n_vocab']}")
  if info["n_ctx"] != model.n_ctx:
    raise ValueError(f"dataset {dataset_dir!r} has n_ctx {info['n_ctx']} but GPT.n_ctx = "
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


def build_graph(model, optimizer, spec, dataset_dir, batch_size, train_steps, seed,
                precision, microbatches, clip_norm, eval_batches, model_dir, keep):
  graph = tf.Graph()
  with graph.as_default():
    tf.set_random_seed(seed)
    step = tf.train.get_or_create_global_step()
    iterator = tf.data.make_initializable_iterator(
        inputs.make_dataset(dataset_dir, "train", batch_size, seed=seed))
    mtf_graph, mtf_mesh = runtime.new_mesh()
    dims = model.dims(batch_size)
    dtype = runtime.variable_dtype(precision)
    tokens, targets = _import_batch(mtf_mesh, iterator.get_next(), dims)
    dropout = ops.Dropout(is_training=True, seed=seed, step=step)
    losses, grads = _gradients(model, {"tokens": tokens, "targets": targets}, dims, dtype,
                               dropout, microbatches)
    loss = losses.pop("loss")
    norm = optimizers.global_norm(grads)
    grads = optimizers.clip_by_global_norm(grads, norm, clip_norm)
    learning_rate = optimizers.learning_rate_schedule(step, train_steps)
    optimizer.learning_rate = mtf.import_fully_replicated(mtf_mesh, learning_rate, [], "lr")
    optimizer.step = mtf.import_fully_replicated(
        mtf_mesh, tf.cast(step + 1, tf.float32), [], "step")
    update_ops = optimizer.apply_grads(grads, mtf_graph.trainable_variables)
    eval_loss, eval_init = _eval_loss(model, mtf_mesh, dataset_dir, batch_size, dims, dtype,
                                      eval_batches)
    lowering = runtime.lower(mtf_graph, mtf_mesh, spec)
    tf_loss = lowering.export_to_tf_tensor(loss)
    tf_norm = lowering.export_to_tf_tensor(norm)
    # The loss must read the weights before this step's update: order it explicitly.
    with tf.control_dependencies([tf_loss, tf_norm]):
      updates = tf.group([lowering.lowered_operation(op) for op in update_ops])
    with tf.control_dependencies([updates]):
      train_op = tf.assign_add(step, 1).op
    saveable = tf.data.experimental.make_saveable_from_iterator(iterator)
    checkpoints = runtime.Checkpoints(lowering, model_dir, keep, [saveable])
    tf_eval = {name: lowering.export_to_tf_tensor(value)
               for name, value in (eval_loss or {}).items()}
    tf_aux = {name: lowering.export_to_tf_tensor(value) for name, value in losses.items()}
    return TrainGraph(graph, step, tf_loss, learning_rate, tf_norm, train_op,
                      tf_eval.pop("loss", None), [iterator.initializer] + eval_init,
                      checkpoints, tf_aux, tf_eval)


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
          eval_steps=10, init_from=None):
  """Trains `model` on `dataset_dir` until `train_steps`, resuming from `model_dir`.

  Args:
    model_dir: where checkpoints, summaries and the operative config go (a flag).
    model: the model, e.g. @GPT().
    dataset_dir: a folder written by bin/prepare_data.
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

  Returns:
    dict with the final training loss and validation loss (None without a validation split).
  """
  if mesh.cluster:
    server = runtime.start_server(mesh)  # noqa: F841  (serves this task's devices while alive)
    if mesh.task_index:  # task 0 drives the whole mesh
      runtime.serve_until_released(mesh)
      return None
  if init_from and not tf.train.latest_checkpoint(init_from):
    raise ValueError(f"train.init_from = {init_from!r} has no checkpoint; point it at a model "
                     f"dir that bin/train or bin/import_hf wrote")
  graph = _validated_graph(model, optimizer, mesh, dataset_dir, batch_size, train_steps, seed,
                           precision, microbatches_per_batch, clip_norm,
                           eval_batches or (eval_steps if eval_every_n_steps else 0),
                           model_dir, keep_checkpoints)
  gin_utils.write_run_files(model_dir)
  _copy_tokenizer(dataset_dir, model_dir)
  with graph.graph.as_default():
    release_peers = runtime.release_ops(mesh)
  if mesh.cluster:
    runtime.wait_for_peers(mesh)
  with (graph.graph.as_default(),
        tf.Session(mesh.target, config=mesh.session_config()) as session,
        runtime.peers_guard(mesh)):
    restored = graph.checkpoints.restore_or_initialize(session, graph.init_ops, init_from)
    start = session.run(graph.step)
    logging.info("%s at step %d", f"resumed from {restored}" if restored else "started", start)
    loss = _train_steps(session, graph, model_dir, start, train_steps, batch_size * model.n_ctx,
                        steps_per_checkpoint, log_every_n_steps, eval_every_n_steps, eval_steps)
    eval_loss = _evaluate(session, graph, eval_batches)
    session.run(release_peers)
  if eval_loss is not None:
    logging.info("validation loss %.4f after step %d", eval_loss, train_steps)
  return {"loss": loss, "validation_loss": eval_loss}


def _validated_graph(model, optimizer, spec, dataset_dir, batch_size, train_steps, seed,
                     precision, microbatches, clip_norm, eval_batches, model_dir, keep):
  check_dataset(model, inputs.read_dataset_info(dataset_dir), dataset_dir)
  if batch_size % microbatches:
    raise ValueError(f"train.microbatches_per_batch = {microbatches} does not divide "
                     f"train.batch_size = {batch_size}")
  spec.validate(model.dims(batch_size // microbatches).sizes())
  if spec.implementation == "simd":  # the graph builds (tests/test_layouts.py); no loop yet
    raise ValueError("mesh.implementation = 'simd': bin/train has no TPU session loop yet; "
                     "see docs/tpu.md for what works today")
  runtime.variable_dtype(precision)
  return build_graph(model, optimizer, spec, dataset_dir, batch_size, train_steps, seed,
                     precision, microbatches, clip_norm, eval_batches, model_dir, keep)


def _copy_tokenizer(dataset_dir, model_dir):
  """The model dir carries its tokenizer, so sampling needs nothing else."""
  source = os.path.join(dataset_dir, inputs.read_dataset_info(dataset_dir)["tokenizer"])
  tf.io.gfile.copy(source, os.path.join(model_dir, "tokenizer.json"), overwrite=True)


def _train_steps(session, graph, model_dir, start, train_steps, tokens_per_step,
                 steps_per_checkpoint, log_every_n_steps, eval_every_n_steps=0, eval_steps=0):
  progress = Progress(model_dir, train_steps, tokens_per_step, start)
  loss, step, since_log = None, start, []
  while step < train_steps:
    _, step_loss, learning_rate, norm, aux_losses = session.run(
        [graph.train_op, graph.loss, graph.learning_rate, graph.grad_norm, graph.aux_losses])
    step += 1
    since_log.append(step_loss)
    if step % log_every_n_steps == 0 or step in (start + 1, train_steps):
      # One batch's loss is noisy; the mean since the last log shows the trend.
      loss, since_log = float(np.mean(since_log)), []
      progress.log(step, loss, learning_rate, norm, aux_losses)
    if step % steps_per_checkpoint == 0 or step == train_steps:
      logging.info("saved checkpoint %s", graph.checkpoints.save(session, step))
    if eval_every_n_steps and step % eval_every_n_steps == 0 and graph.eval_loss is not None:
      _periodic_eval(session, graph, model_dir, step, eval_steps, progress)
  return loss


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
