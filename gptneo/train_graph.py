"""The training graph: one step as an mtf graph, lowered onto a mesh, fed by tf.data.

Two strategies behind one interface, `build(settings, model_dir, rt) -> TrainGraph`:
- placement (CPU/GPU devices of this process): one step per session.run, and the validation
  fetches the loop evaluates with;
- simd (TPU cores): the same step (`mtf_step`, `lower_step`) built inside tpu.device_loop on
  every core, up to `steps_per_loop` steps per session.run, batches through tpu.Infeed.
Both read the same saveable iterator and save the same variables under the same names.
"""
import dataclasses

from gptneo import checkpoints as checkpoints_lib
from gptneo import evaluate as evaluate_lib
from gptneo import runtime
from gptneo import tpu
from gptneo.compat import mtf, tf
from gptneo.data import inputs
from gptneo.model import gpt as gpt_lib
from gptneo.model import ops
from gptneo.optim import optimizers


@dataclasses.dataclass
class TrainGraph:
  """What the loop runs: the step, its logged scalars, checkpoints, validation fetches."""
  graph: tf.Graph
  step: tf.Tensor
  loss: tf.Tensor
  learning_rate: tf.Tensor
  grad_norm: tf.Tensor
  train_op: tf.Operation
  init_ops: list
  checkpoints: checkpoints_lib.Checkpoints
  aux_losses: dict = dataclasses.field(default_factory=dict)  # name -> tf scalar, logged
  # {"token_nll", "argmax", "targets", "weights"} of one validation batch, or None
  eval_fetches: dict = None
  eval_reset: list = dataclasses.field(default_factory=list)  # restarts the validation pass
  eval_limit: tf.Tensor = None  # fed to eval_reset: the pass's batches (0: the whole split)
  eval_windows: int = 0  # the validation split's windows: a pass's batches are counted
  steps_per_run: int = 1  # > 1: a device loop takes that many steps per session.run (TPU)
  loop_steps: tf.Tensor = None  # with a device loop: the placeholder of its step count
  enqueue: tf.Operation = None  # with a device loop: feeds its batches (infeed)

  def eval_batches(self, limit):
    """How many batches a validation pass of `limit` batches (0: the whole split) reads: the
    loop runs exactly those (a TPU program waiting on an infeed that ends would hang)."""
    batches = -(-self.eval_windows // int(self.eval_fetches["weights"].shape[0]))
    return min(batches, limit) if limit else batches

  @property
  def eval_loss(self):
    """The per-token validation NLL [batch, n_ctx] of one batch, or None."""
    return self.eval_fetches["token_nll"] if self.eval_fetches else None

  def run(self, session, steps=1):
    """Takes `steps` steps; returns (loss, learning rate, gradient norm, auxiliary losses).

    With a device loop the loss is the mean over its steps, the rest are of its last step.
    """
    fetches = [self.train_op, self.loss, self.learning_rate, self.grad_norm, self.aux_losses]
    if self.loop_steps is None:
      return session.run(fetches)[1:]
    return session.run([self.enqueue] + fetches, {self.loop_steps: steps})[2:]


def build(settings, model_dir, rt):
  """The training graph of `settings` (train.Settings) on runtime `rt`'s mesh."""
  return STRATEGIES[rt.spec.implementation](settings, model_dir, rt)


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
    logits, aux_losses = model(f["tokens"], dtype, dropout)
    losses = {"loss": gpt_lib.loss(logits, f["targets"], dims.vocab), **aux_losses}
    for aux in aux_losses.values():
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
  grads: list  # the gradients (before clipping): every update waits for all of them


def mtf_step(settings, features, step):
  """Builds loss, gradients and the optimizer update of one step on `features`' mesh.

  Shared by both strategies; `step` is the tf scalar of the step being taken (it drives the
  schedule, Adam's bias correction and dropout).
  """
  s, mtf_mesh = settings, features["tokens"].mesh
  dims = s.model.dims(s.batch_size)
  dropout = ops.Dropout(is_training=True, seed=s.seed, step=step)
  losses, grads = _gradients(s.model, features, dims, runtime.variable_dtype(s.precision),
                             dropout, s.microbatches_per_batch)
  norm = optimizers.global_norm(grads)
  clipped = optimizers.clip_by_global_norm(grads, norm, s.clip_norm)
  learning_rate = optimizers.learning_rate_schedule(step, s.train_steps)
  update_ops = s.optimizer.apply_grads(
      clipped, mtf_mesh.graph.trainable_variables,
      mtf.import_fully_replicated(mtf_mesh, learning_rate, [], "lr"),
      mtf.import_fully_replicated(mtf_mesh, tf.cast(step + 1, tf.float32), [], "step"))
  if s.on_nonfinite == "skip":
    update_ops = skip_unless_finite(update_ops, [losses["loss"], norm])
  return MtfStep(losses, norm, learning_rate, update_ops, grads)


def skip_unless_finite(update_ops, scalars):
  """The optimizer's assignments, leaving every variable as it was unless all of `scalars`
  (mtf scalars: the loss, the gradient norm) are finite.

  mtf has no conditional, and an Assign can't be changed once built: each is built anew on
  its values, passed through exactly if finite and replaced by NaN if not, with an assign that
  keeps the variable's own value wherever the new one is NaN or infinite (a select: NaN times
  0 is NaN). The optimizer's Assigns leave the graph (as mtf's combine_assignments takes out
  those it replaces), so no lowering, no TPU program among them, holds an unguarded one.
  """
  finite = mtf.slicewise(lambda *xs: tf.reduce_all([tf.math.is_finite(x) for x in xs]),
                         [mtf.cast(x, tf.float32) for x in scalars], output_dtype=tf.bool,
                         splittable_dims=[], name="finite_step")
  guarded = []
  # A fused optimizer update (optimizers.FusedAdamUpdate) is guarded as its plain Assigns.
  update_ops = [a for op in update_ops for a in (op.assigns() if hasattr(op, "assigns") else [op])]
  for op in update_ops:
    if op.assign_fn not in _GUARDED:
      raise ValueError(f"train.on_nonfinite = 'skip' can't guard {op.name}: it assigns with "
                       f"{op.assign_fn.__name__}, which _GUARDED doesn't know")
    values = [mtf.slicewise(_nan_unless, [finite, value], output_shape=value.shape,
                            output_dtype=value.dtype, splittable_dims=value.shape.dims)
              for value in op.inputs]
    guarded.append(mtf.Assign(op.variables, values, _GUARDED[op.assign_fn]))
    op.graph.operations.remove(op)
  return guarded


def _nan_unless(finite, value):
  return tf.where_v2(finite, value, tf.constant(float("nan"), value.dtype))


def _assign_finite(new_value):
  """An mtf assign_fn that writes `new_value(slice, value)` (value cast to the slice's dtype)
  where it is finite and leaves the slice's own value elsewhere."""
  def assign(variable, slice_variable, value):
    new = new_value(slice_variable, tf.cast(value, variable.slice_dtype))
    return tf.assign(slice_variable, tf.where_v2(tf.math.is_finite(new), new, slice_variable))
  return assign


# Each mtf assign_fn an optimizer may use, guarded: mtf.assign (Adam), mtf.assign_sub (mtf's
# Adafactor subtracts its update from the weight, so bfloat16 slices aren't rounded twice).
_GUARDED = {mtf.assign_slice: _assign_finite(lambda old, value: value),
            mtf.assign_sub_slice: _assign_finite(lambda old, value: old - value),
            mtf.assign_add_slice: _assign_finite(lambda old, value: old + value)}


@dataclasses.dataclass
class LoweredStep:
  """An MtfStep's tf side, on whichever mesh it was lowered."""
  loss: tf.Tensor
  grad_norm: tf.Tensor
  aux_losses: dict
  updates: tf.Operation  # runs after loss and norm have read this step's weights


def lower_step(lowering, step):
  """The tf tensors of an MtfStep; every variable it writes is written after the loss and all
  gradients, so after every read of the weights in the step.

  mtf reads a weight again in the backward pass (each einsum's gradient converts the variable
  anew), a ReadVariableOp that the weight's own gradient doesn't wait for, and the Lowering has
  built the update ops (assigns, optimizers.FusedAdamUpdate's kernels) before they can be
  ordered: a control dependency around their tf.group orders only its NoOp. Only the clip's
  global norm, which every clipped gradient needs, kept an update from running before such a
  read (and giving other weights' gradients from the updated weight); without clipping nothing
  did. So each write gets one control input: the loss and every gradient slice, done.
  The update's own reads get it too (_after_backward), so nothing they make is held through
  the backward pass.
  """
  losses = dict(step.losses)
  tf_loss = lowering.export_to_tf_tensor(losses.pop("loss"))
  tf_norm = lowering.export_to_tf_tensor(step.grad_norm)
  update_ops = [lowering.lowered_operation(op) for op in step.update_ops]
  grads = [x for g in step.grads for x in lowering.tensors[g].to_laid_out_tensor().all_slices]
  rate = [step.learning_rate] if step.learning_rate is not None else []  # a test's SGD: None
  _write_after(update_ops, [tf_loss, *grads], also_fetched=rate)
  with tf.control_dependencies([tf_loss, tf_norm]):
    updates = tf.group(update_ops)
  return LoweredStep(tf_loss, tf_norm, {name: lowering.export_to_tf_tensor(value)
                                        for name, value in losses.items()}, updates)


# The ops that write a variable: (Resource)Assign*, AssignVariableOp, ResourceApply*, ...
_WRITES = ("Assign", "ResourceApply", "ResourceSparseApply", "ResourceScatter", "Apply")


def _write_after(update_ops, tensors, also_fetched=()):
  """Makes every op that writes a variable in `update_ops` (lowered ops, and what they run)
  wait for all of `tensors`, and every op that starts the update's own work (_after_backward);
  the writes stay unordered among themselves.

  The walk back from `update_ops` stops at what `tensors` (or `also_fetched`, tensors a run
  may fetch without the update) already wait for: no write there (a cycle) nor anywhere else in
  the graph (an initializer, a restore) gets the dependency.
  """
  done = ancestors([t.op for t in [*tensors, *also_fetched]])
  barrier = tf.group(tensors, name="backward_done")
  update_only = ancestors(update_ops, stop=done)
  for op in update_only:
    if op.type.startswith(_WRITES) or _after_backward(op, update_only):
      op._add_control_inputs([barrier])  # pylint: disable=protected-access


def _after_backward(op, update_only):
  """Whether `op` is where the update starts from values the step already has (a slot's
  read, a weight's shard sliced off the forward's read) and feeds nothing but the update.

  Nothing orders such an op, so it runs when the step starts, and its result is held through
  the whole backward pass: under a `zero` rule the weight shards Adam's decay reads (17 MiB per
  device of the 20m bench model on 2 devices, bench/RESULTS.md). Sources (a slot's
  VarHandleOp, a constant) are left alone: the saver and initializers use them too.
  """
  starts = op.inputs and not any(x.op in update_only and x.op.inputs for x in op.inputs)
  return bool(starts) and all(c in update_only for t in op.outputs for c in t.consumers())


def ancestors(ops, stop=frozenset()):
  """`ops` and every op they wait for (data and control inputs), short of `stop`."""
  seen, todo = set(), [op for op in ops if op not in stop]
  while todo:
    op = todo.pop()
    if op not in seen:
      seen.add(op)
      todo.extend(x for x in [*(t.op for t in op.inputs), *op.control_inputs] if x not in stop)
  return seen


def _train_iterator(settings):
  s = settings
  return tf.data.make_initializable_iterator(inputs.make_dataset(
      s.dataset_dir, "train", s.batch_size, seed=s.seed, sampling=s.sampling))


def _checkpoints(lowering, iterators, settings, model_dir):
  """Mesh variables plus the data position, so a resumed run sees the same batches.

  `iterators`: the training pipeline's, one per host that reads it (all in the same state:
  the first is saved, every one restored).
  """
  # The one external state a pipeline has is shard_cache's fetching of gs:// shards, which
  # a restored iterator does again for the shard it was reading.
  saveable = tpu.IteratorsPosition(iterators, external_state_policy="ignore")
  return checkpoints_lib.Checkpoints(lowering, model_dir, settings.keep_checkpoints, [saveable])


def build_placement(settings, model_dir, rt):
  """The placement mesh's training graph: one step per session.run."""
  s, graph = settings, tf.Graph()
  with graph.as_default():
    tf.set_random_seed(s.seed)
    step = tf.train.get_or_create_global_step()
    iterator = _train_iterator(s)
    mtf_graph, mtf_mesh = runtime.new_mesh(spec=rt.spec)
    tokens, targets = _import_batch(mtf_mesh, iterator.get_next(), s.model.dims(s.batch_size))
    step_graph = mtf_step(s, {"tokens": tokens, "targets": targets}, step)
    validation = _validation(s, mtf_mesh)
    lowering = rt.lower(mtf_graph, mtf_mesh)
    lowered = lower_step(lowering, step_graph)
    with tf.control_dependencies([lowered.updates]):
      train_op = tf.assign_add(step, 1).op
    graph_parts = TrainGraph(graph, step, lowered.loss, step_graph.learning_rate,
                             lowered.grad_norm, train_op, [iterator.initializer],
                             _checkpoints(lowering, [iterator], s, model_dir), lowered.aux_losses)
    if validation:
      graph_parts.eval_fetches = {**validation.tf_fetches, **{
          name: lowering.export_to_tf_tensor(value) for name, value in validation.mtf.items()}}
      graph_parts.eval_reset, graph_parts.eval_limit = [validation.reset], validation.limit
      graph_parts.eval_windows = validation.windows
    return graph_parts


@dataclasses.dataclass
class _Validation:
  """The validation pass of the training graph: inputs.evaluation_batches through the model."""
  mtf: dict  # "token_nll", "argmax": mtf tensors of one batch
  tf_fetches: dict  # "targets", "weights": the batch's tf tensors
  reset: tf.Operation  # starts the pass again, limit fed
  limit: tf.Tensor  # the pass's batches (0: the whole split)
  windows: int  # the split's


def _validation_windows(settings):
  """The validation split's windows if the run evaluates, else 0."""
  if not settings.evaluates:
    return 0
  info = inputs.read_dataset_info(settings.dataset_dir)
  return info["splits"].get("validation", {}).get("windows", 0)


def _validation_iterator(settings, limit):
  return tf.data.make_initializable_iterator(inputs.evaluation_batches(
      settings.dataset_dir, "validation", settings.batch_size, limit))


def _validation_outputs(settings, tokens, targets):
  """One validation batch's mtf per-token NLL and greedy ids (dropout off)."""
  s = settings
  no_dropout = ops.Dropout(is_training=False, seed=0, step=0)
  logits, _ = s.model(tokens, runtime.variable_dtype(s.precision), no_dropout)
  return evaluate_lib.batch_outputs(logits, targets, s.model.dims(s.batch_size).vocab)


def _validation(settings, mtf_mesh):
  """The placement graph's validation pass, in the training mtf graph, or None."""
  s, windows_in_split = settings, _validation_windows(settings)
  if not windows_in_split:
    return None
  limit = tf.placeholder_with_default(tf.constant(0, tf.int64), [], "eval_limit")
  iterator = _validation_iterator(s, limit)
  windows, weights = iterator.get_next()
  tokens, targets = _import_batch(mtf_mesh, windows, s.model.dims(s.batch_size))
  return _Validation(_validation_outputs(s, tokens, targets),
                     {"targets": windows[:, 1:], "weights": weights}, iterator.initializer,
                     limit, windows_in_split)


def _simd_validation(settings, rt, shape):
  """The SIMD graph's validation pass: a TPU program of its own, one batch per session.run.

  Every host reads the validation split (the same batches bin/eval reads) and enqueues its
  own cores' slices (tpu.Infeed); on the cores, the model without dropout, on the training
  program's variables (the same slice variables, found by name), gives every core the whole
  batch's per-token NLL and greedy ids, which the host sums as bin/eval does (LmTotals).
  Returns (the fetches of one batch, with the enqueue under "enqueue"; the iterators'
  initializers; the limit placeholder; the split's windows), or None.
  """
  s, windows_in_split = settings, _validation_windows(settings)
  if not windows_in_split:
    return None
  with tf.device(tpu.host_devices(rt)[0]):
    limit = tf.placeholder_with_default(tf.constant(0, tf.int64), [], "eval_limit")
  infeed = tpu.Infeed(rt, lambda: _validation_iterator(s, limit), shape,
                      windows_of=lambda element: element[0])

  def computation():
    with tf.variable_scope(tf.get_variable_scope(), reuse=tf.AUTO_REUSE):
      mtf_graph, mtf_mesh = runtime.new_mesh(tpu.variable_placer(rt), rt.spec)
      tokens, targets = infeed.dequeue(mtf_mesh)
      outputs = _validation_outputs(s, tokens, targets)
      # Dimensions no layout splits: every core gathers the batch's outputs whole (SimdMeshImpl
      # exports only those).
      whole = mtf.Shape([mtf.Dimension(f"whole_{dim.name}", dim.size) for dim in shape.dims])
      outputs = [mtf.reshape(outputs[name], whole) for name in ("token_nll", "argmax")]
      lowering = rt.lower(mtf_graph, mtf_mesh)
      return [lowering.export_to_tf_tensor(output) for output in outputs]

  variables = _variable_ops()
  token_nll, argmax = tpu.device_call(rt, computation)
  if _variable_ops() != variables:
    raise ValueError(f"the validation program made variables of its own: "
                     f"{sorted(_variable_ops() - variables)[:3]}")
  windows, weights = infeed.elements[0]  # host 0's batch: every host read the same
  fetches = {"token_nll": token_nll, "argmax": argmax, "targets": windows[:, 1:],
             "weights": weights, "enqueue": infeed.enqueue}
  return fetches, [iterator.initializer for iterator in infeed.iterators], limit, \
      windows_in_split


def _variable_ops():
  """The names of the default graph's variables (masters and slices alike)."""
  return {op.name for op in tf.get_default_graph().get_operations() if op.type == "VarHandleOp"}


def build_simd(settings, model_dir, rt):
  """The SIMD (TPU) mesh's training graph: up to `steps_per_loop` steps per session.run.

  The same step as build_placement (mtf_step, lower_step), built inside tpu.device_loop on
  every core; batches come from the same pipeline, read on every host, through tpu.Infeed.
  Needs rt.tpu (runtime.started, or tpu.synthetic_system to only build).
  """
  s, graph = settings, tf.Graph()
  with graph.as_default(), tpu.v1_control_flow():
    tf.set_random_seed(s.seed)
    with tf.device(tpu.host_devices(rt)[0]):
      step = tf.train.get_or_create_global_step()
      loop_steps = tf.placeholder_with_default(1, [], "loop_steps")
      start = tf.identity(step)
    dims = s.model.dims(s.batch_size)
    infeed = tpu.Infeed(rt, lambda: _train_iterator(s), mtf.Shape([dims.batch, dims.sequence]),
                        loop_steps)
    built = {}

    def body(current):
      # Slice variables by name (AUTO_REUSE): the validation program finds the same ones.
      with tf.variable_scope(tf.get_variable_scope(), reuse=tf.AUTO_REUSE):
        mtf_graph, mtf_mesh = runtime.new_mesh(tpu.variable_placer(rt), rt.spec)
        tokens, targets = infeed.dequeue(mtf_mesh)
        step_graph = mtf_step(s, {"tokens": tokens, "targets": targets}, current)
        built["lowering"] = rt.lower(mtf_graph, mtf_mesh)
        lowered = lower_step(built["lowering"], step_graph)
      built["aux"] = sorted(lowered.aux_losses)
      return lowered.updates, [lowered.loss, step_graph.learning_rate, lowered.grad_norm,
                               *[lowered.aux_losses[name] for name in built["aux"]]]

    loss, learning_rate, norm, *aux = tpu.device_loop(rt, body, start, loop_steps)
    with tf.control_dependencies([loss, learning_rate, norm, *aux]):
      train_op = tf.assign_add(step, tf.cast(loop_steps, step.dtype)).op
    graph_parts = TrainGraph(graph, step, loss, learning_rate, norm, train_op,
                             [iterator.initializer for iterator in infeed.iterators],
                             _checkpoints(built["lowering"], infeed.iterators, s, model_dir),
                             dict(zip(built["aux"], aux, strict=True)),
                             steps_per_run=s.steps_per_loop, loop_steps=loop_steps,
                             enqueue=infeed.enqueue)
    validation = _simd_validation(s, rt, mtf.Shape([dims.batch, dims.sequence]))
    if validation:
      (graph_parts.eval_fetches, graph_parts.eval_reset, graph_parts.eval_limit,
       graph_parts.eval_windows) = validation
    return graph_parts


STRATEGIES = {"placement": build_placement, "simd": build_simd}
