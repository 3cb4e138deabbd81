"""Optimizers (Adam with decoupled weight decay, Adafactor), the learning-rate schedule, clipping.

Each optimizer is a gin configurable returning an `mtf.optimize.Optimizer`; the trainer passes
the learning rate and step to `apply_grads` as mtf scalars, so every update is part of the
lowered graph and the gin-built object holds no graph's tensors (it serves any number of graphs).
Each also says what state it keeps (`slot_shapes`): the layout search's memory estimate asks
it, so a new optimizer is costed as what it is or refused, never as another one.
"""
import copy
import functools
import math

import gin

from gptneo import mesh as mesh_lib
from gptneo.compat import mtf, tf
from gptneo.errors import UserError
from gptneo.model import ops
from tensorflow.python.ops import control_flow_util  # pylint: disable=g-direct-tensorflow-import,g-bad-import-order


def unfolded_zeros(shape, dtype=tf.float32, partition_info=None):  # pylint: disable=unused-argument
  """tf.zeros_initializer's value, but not a constant Grappler can fold.

  Grappler folds tf.zeros(shape) into a Const; the initializer's AssignVariableOp then aliases
  the Const's buffer, which the session keeps for as long as it lives (releasing the init's
  executor doesn't free it), so the first update (ResourceApplyAdam) must copy the slot and
  both copies stay: Adam's m and v held twice (bench/RESULTS.md, memory section). Filling
  from a PlaceholderWithDefault leaves the zeros to be made at run time, owned by the slot.
  """
  dtype = tf.as_dtype(dtype or tf.float32)
  return tf.fill(shape, tf.placeholder_with_default(tf.zeros([], dtype), [], "zero"))


@gin.configurable
def learning_rate_schedule(step, total_steps, learning_rate=6e-4, warmup_steps=0,
                           decay="cosine", decay_steps=None, min_ratio=0.1):
  """Linear warmup to `learning_rate`, then cosine or linear decay to a floor.

  Args:
    step: int64 tf scalar, the global step.
    total_steps: the run's train_steps; default end of the decay.
    learning_rate: the peak learning rate.
    warmup_steps: steps of linear warmup from 0.
    decay: "cosine", "linear" or "constant".
    decay_steps: step at which the decay reaches the floor (default: total_steps).
    min_ratio: the floor, as a fraction of the peak learning rate.

  Returns:
    float32 tf scalar.
  """
  if decay not in ("cosine", "linear", "constant"):
    raise UserError(f"learning_rate_schedule.decay = {decay!r}; use cosine, linear or constant")
  step = tf.cast(step, tf.float32)
  end = float(decay_steps or total_steps)
  warmup = tf.minimum(1.0, (step + 1.0) / max(warmup_steps, 1))
  progress = tf.clip_by_value((step - warmup_steps) / max(end - warmup_steps, 1.0), 0.0, 1.0)
  if decay == "cosine":
    shape = 0.5 * (1.0 + tf.cos(math.pi * progress))
  elif decay == "linear":
    shape = 1.0 - progress
  else:
    shape = tf.constant(1.0)
  return learning_rate * warmup * (min_ratio + (1.0 - min_ratio) * shape)


class _ScheduledOptimizer(mtf.optimize.Optimizer):
  """An mtf optimizer given the learning rate and step of each update as arguments."""

  def apply_grads(self, grads, variables, learning_rate, step):
    """The update ops of `variables`.

    Args:
      grads: mtf.Tensors, one per variable.
      variables: the mtf.Variables to update.
      learning_rate: float32 mtf scalar.
      step: float32 mtf scalar, 1-based (Adam's bias correction, Adafactor's decay).
    """
    raise NotImplementedError


@gin.configurable
class Adam(_ScheduledOptimizer):
  """Adam with bias correction and decoupled weight decay (AdamW).

  Weight decay applies to matrices only: norms' gains and biases (rank < 2) are skipped.
  A weight's learning-rate multiplier (ops.lr_multiplier: muP's) scales its Adam step, not
  its decay per step, lr * weight_decay (as mup's MuAdamW).

  Args:
    beta1: decay of the first-moment estimate.
    beta2: decay of the second-moment estimate.
    epsilon: added to the root of the second moment.
    weight_decay: decoupled decay rate, multiplied by the learning rate.
    fused: update each variable slice with one `ResourceApplyAdam` kernel (after one decay
      kernel for matrices) instead of ~15 element-wise ops; the same update up to float
      rounding. False: mtf's element-wise ops and three mtf.Assigns per variable.
  """

  def __init__(self, beta1=0.9, beta2=0.95, epsilon=1e-8, weight_decay=0.1, fused=True):
    self.beta1, self.beta2, self.epsilon, self.weight_decay = beta1, beta2, epsilon, weight_decay
    self.fused = fused

  def slot_shapes(self, shape):
    """The slot variables apply_grad makes for a variable of `shape` ((dim name, size), ...):
    the moments m and v, each of the variable's shape."""
    return [tuple(shape), tuple(shape)]

  def apply_grads(self, grads, variables, learning_rate, step):
    """mtf's Assigns (combined as mtf's apply_grads does), or with `fused` one
    FusedAdamUpdate per variable (not an mtf.Assign)."""
    pairs = zip(grads, variables, strict=True)
    updates = [op for grad, var in pairs for op in self.apply_grad(grad, var, learning_rate, step)]
    if self.fused or not updates:
      return updates
    return variables[0].graph.combine_assignments(updates)

  per_layer_rates = True  # honours ops.lr_multiplier (GPT.parametrization = "mup")

  def apply_grad(self, grad, var, learning_rate, step):
    grad = mtf.cast(grad, var.master_dtype) if grad.dtype != var.master_dtype else grad
    learning_rate = _scaled_rate(learning_rate, var)
    shard = _zero_dims(var)
    m, v = (_slot(var, suffix, shard or var.shape) for suffix in ("/adam_m", "/adam_v"))
    if self.fused and not shard:
      return [FusedAdamUpdate(self, grad, var, m, v, learning_rate, step)]
    return self.assigns(grad, var, m, v, learning_rate, step)

  def assigns(self, grad, var, m, v, learning_rate, step):
    """The update as mtf element-wise ops: three mtf.Assigns (var, m, v).

    Under a `zero` layout rule m and v are stored split (_zero_dims): the gradient and the
    weight are sliced to their shape, the update computed on the shard and the new weight
    gathered back (mtf renames: a slice, and an all-gather over the rule's mesh dimension).
    """
    value = var.value if var.value.dtype == var.master_dtype else mtf.cast(var.value,
                                                                           var.master_dtype)
    shard_value, grad = mesh_lib.renamed(value, m.shape.dims), mesh_lib.renamed(grad,
                                                                               m.shape.dims)
    grad = _owned(grad) if m.shape != var.shape else grad
    # beta1 * m + (1 - beta1) * grad, and v's alike, in the form each product reads a
    # variable with the gradient. It was written so to keep beta1 * m, beta2 * v from being
    # computed when the step starts; train_graph._after_backward now orders every such read
    # after the backward pass, and the form stays so the update's rounding does.
    new_m = grad + (m - grad) * self.beta1
    grad_squared = mtf.square(grad)
    new_v = grad_squared + (v - grad_squared) * self.beta2
    m_hat = new_m / (1.0 - mtf.exp(step * math.log(self.beta1)))
    v_hat = new_v / (1.0 - mtf.exp(step * math.log(self.beta2)))
    update = m_hat / (mtf.sqrt(v_hat) + self.epsilon)
    if self.decay(var):
      update = (update / self.decay(var) + shard_value) * self.decay(var)
    new_value = mesh_lib.renamed(shard_value - update * learning_rate, var.shape.dims)
    return [mtf.assign(var, new_value), mtf.assign(m, new_m), mtf.assign(v, new_v)]


  def decay(self, var):
    """`var`'s weight decay per unit of its (multiplied) learning rate: 0 below rank 2."""
    return self.weight_decay / ops.lr_multiplier(var) if var.shape.ndims >= 2 else 0.0


def _scaled_rate(learning_rate, var):
  """The learning rate times `var`'s multiplier (ops.lr_multiplier), the same tensor at 1."""
  multiplier = ops.lr_multiplier(var)
  return learning_rate if multiplier == 1.0 else learning_rate * multiplier


def check_parametrization(optimizer, model):
  """Raises UserError (one line) if `optimizer` can't give `model` its per-layer rates.

  Args:
    optimizer: the gin-built optimizer (Adam, Adafactor).
    model: the GPT; its parametrization "mup" needs per-layer learning rates.
  """
  if model.parametrization != "mup" or getattr(optimizer, "per_layer_rates", False):
    return
  why = ("its relative step (multiply_by_parameter_scale) has no clean muP rule"
         if isinstance(optimizer, Adafactor) else "it has no per-layer learning rates")
  raise UserError(f'GPT.parametrization = "mup" with {type(optimizer).__name__}: {why}; use '
                  f"@Adam() or @Adafactor() with multiply_by_parameter_scale = False")


def _slot(var, suffix, shape):
  """An optimizer slot of `var` named var.name + suffix, of `shape`, zeros at first."""
  return mtf.get_variable(var.mesh, var.name + suffix, shape, initializer=unfolded_zeros,
                          trainable=False)


def _owned(x):
  """`x` (a gradient sliced to a `zero` shard) with buffers of its own, on CPU and GPU.

  A slice along a tensor's first dimension is a view of the whole all-reduced gradient. TF
  computes an element-wise op in place in an input buffer no other tensor holds, views
  included, and an assign adopts its value's buffer: a slot so updated keeps the whole
  gradient alive between steps, n times its shard (bench/RESULTS.md, per-device memory).
  Under XLA (a TPU step), which assigns buffers itself, `x` is left as it is.
  """
  def copy(slice_):
    context = tf.get_default_graph()._get_control_flow_context()  # pylint: disable=protected-access
    if control_flow_util.GetContainingXLAContext(context):
      return slice_
    return tf.raw_ops.DeepCopy(x=slice_)
  return mtf.slicewise(copy, [x], output_shape=x.shape, output_dtype=x.dtype,
                       splittable_dims=x.shape.dims, name="owned")


def _zero_dims(var):
  """The stored dims of `var`'s optimizer slots under a `zero` rule of its mesh's layout, or
  None where they are the variable's own (no rule, or no dimension to split)."""
  sharding = getattr(var.mesh, "sharding", None)
  dims = sharding.stored_dims(var.shape.dims, "zero") if sharding else var.shape.dims
  return mtf.Shape(dims) if dims != var.shape.dims else None


class FusedAdamUpdate(mtf.Operation):
  """Adam's update of one variable and its moments, lowered to one kernel per slice.

  Each slice runs `ResourceApplyAdam` on its variable, m and v slices (they share the
  variable's layout, so the gradient's slice matches them), preceded for matrices by the
  decoupled decay, var *= 1 - lr * wd (one multiply and assign). TF's kernel
  computes var -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps'); with
  eps' = eps * sqrt(1 - b2^t) that is exactly Adam.assigns' bias-corrected
  m_hat / (sqrt(v_hat) + eps), up to rounding.

  On a simd (TPU) mesh the slices get the element-wise update instead (XLA fuses it).
  Not an mtf.Assign: `assigns()` gives the equivalent Assigns for code that must rewrite
  them (train_graph.skip_unless_finite), taking this op out of the graph.
  """

  def __init__(self, adam, grad, var, m, v, learning_rate, step):
    super().__init__([grad, learning_rate, step], var.mesh, name="fused_adam")
    self._adam, self._variables, self._outputs = adam, [var, m.operation, v.operation], []

  def assigns(self):
    self.graph.operations.remove(self)
    var, m, v = self._variables
    return self._adam.assigns(self.inputs[0], var, m.outputs[0], v.outputs[0], *self.inputs[1:])

  def lower(self, lowering):
    mesh_impl = lowering.mesh_impl(self)
    grad, lr, step = (lowering.tensors[x].to_laid_out_tensor().all_slices for x in self.inputs)
    var, m, v = (lowering.variables[x].laid_out_tensor.all_slices for x in self._variables)
    decay = self._adam.decay(self._variables[0])
    if isinstance(mesh_impl, mtf.placement_mesh_impl.PlacementMeshImpl):
      update, devices = _apply_adam, mesh_impl.devices
    else:  # simd (TPU): XLA fuses the element-wise update itself; three assigns as mtf's
      update, devices = _assign_adam, [""] * len(grad)
    lowering.operations[self] = tf.group(mtf.parallel(
        devices, functools.partial(update, self._adam, decay), var, m, v, grad, lr, step))


def _apply_adam(adam, decay, var, m, v, grad, lr, step):
  """One slice's update: the decay (if any), then TF's fused Adam kernel."""
  b1_power = tf.exp(step * math.log(adam.beta1))  # as Adam.assigns computes them
  b2_power = tf.exp(step * math.log(adam.beta2))
  # A new buffer for the decayed matrix: an in-place update of a variable whose value is
  # still read elsewhere (as a delta would be) makes TF copy the whole variable first. After
  # the gradient, like every update: else the decay would run before the backward pass has
  # read the weight.
  with tf.control_dependencies([grad]):
    decayed = [tf.raw_ops.AssignVariableOp(resource=var.handle,
                                           value=var.read_value() * (1.0 - lr * decay))
               ] if decay else []
  with tf.control_dependencies(decayed):
    return tf.raw_ops.ResourceApplyAdam(
        var=var.handle, m=m.handle, v=v.handle, beta1_power=b1_power, beta2_power=b2_power,
        lr=lr, beta1=adam.beta1, beta2=adam.beta2, epsilon=adam.epsilon * tf.sqrt(1.0 - b2_power),
        grad=tf.cast(grad, var.dtype))


def _assign_adam(adam, decay, var, m, v, grad, lr, step):
  """One slice's update as Adam.assigns' element-wise ops, assigned as mtf.assign_slice does."""
  grad, value, m_value, v_value = (tf.cast(grad, var.dtype), tf.identity(var), tf.identity(m),
                                   tf.identity(v))  # simd slices: ReplicatedVariables
  new_m = m_value * adam.beta1 + grad * (1.0 - adam.beta1)
  new_v = v_value * adam.beta2 + tf.square(grad) * (1.0 - adam.beta2)
  m_hat = new_m / (1.0 - tf.exp(step * math.log(adam.beta1)))
  v_hat = new_v / (1.0 - tf.exp(step * math.log(adam.beta2)))
  update = m_hat / (tf.sqrt(v_hat) + adam.epsilon) + value * decay
  return tf.group(tf.assign(var, value - update * lr), tf.assign(m, new_m), tf.assign(v, new_v))


@gin.configurable
class Adafactor(_ScheduledOptimizer, mtf.optimize.AdafactorOptimizer):
  """mtf's Adafactor (factored second moments), driven by our learning-rate schedule.

  A weight's learning-rate multiplier (ops.lr_multiplier: muP's) scales its step, except with
  multiply_by_parameter_scale, which muP refuses (check_parametrization).

  Args:
    beta1: first-moment decay; 0 keeps no first moment (Adafactor's memory saving).
    decay_rate: second-moment decay; None uses Adafactor's 1 - step^-0.8.
    clipping_threshold: Adafactor's update clipping (RMS of the update).
    multiply_by_parameter_scale: scale updates by the parameter's RMS (relative step).
    factored: factor second moments of matrices into row and column statistics.
    min_dim_size_to_factor: factor only when the two largest dimensions are at least this.
  """

  def __init__(self, beta1=0.0, decay_rate=None, clipping_threshold=1.0,
               multiply_by_parameter_scale=False, factored=True, min_dim_size_to_factor=128):
    mtf.optimize.AdafactorOptimizer.__init__(
        self, multiply_by_parameter_scale=multiply_by_parameter_scale, learning_rate=None,
        decay_rate=decay_rate, beta1=beta1, clipping_threshold=clipping_threshold,
        factored=factored, min_dim_size_to_factor=min_dim_size_to_factor)

  def slot_shapes(self, shape):
    """The slot variables apply_grad makes for a variable of `shape` ((dim name, size), ...).

    mtf's rule: the second moment whole, or, factored over the two largest dims d0 and d1
    (both at least min_dim_size_to_factor), its means without d0 and without d1; and the first
    moment if beta1.
    """
    whole = mtf.Shape([mtf.Dimension(name, size) for name, size in shape])
    factored = self._factored_dims(whole)
    slots = [whole - factored[0], whole - factored[1]] if factored else [whole]
    slots += [whole] if self._beta1 else []
    return [tuple((d.name, d.size) for d in slot.dims) for slot in slots]

  @property
  def per_layer_rates(self):
    """Whether ops.lr_multiplier's rates are honoured: with a relative step (parameter-scale
    updates) a muP rate would also depend on the weight's scale, so not then."""
    return not self._multiply_by_parameter_scale

  def _decay_rate_default(self):
    return None  # mtf's default reads a global step of whatever graph exists at construction

  def apply_grad(self, grad, var):
    """mtf's Adafactor update of `var`, or under a `zero` layout rule the same update
    computed on the slots' shard (_zero_dims), as Adam.assigns does; either at `var`'s
    multiplied learning rate (ops.lr_multiplier)."""
    update = self
    if ops.lr_multiplier(var) != 1.0:
      update = copy.copy(self)
      update._learning_rate = _scaled_rate(self._learning_rate, var)  # pylint: disable=protected-access
    shard = _zero_dims(var)
    if not shard:
      return mtf.optimize.AdafactorOptimizer.apply_grad(update, grad, var)
    return update._sharded_update(grad, var, shard)  # pylint: disable=protected-access

  def _sharded_update(self, grad, var, shard):
    """mtf's Adafactor.apply_grad, step for step, on the gradient and weight sliced to
    `shard` (the weight's dims, its shard dimension renamed: mtf renames, lowered as a slice).

    The slots are made from `shard` as mtf makes them from the weight's shape, so a factored
    mean that keeps the shard dimension is stored split and one reduced over it is kept whole
    (the cost model's rule, and fsdp's). The means, clipping RMS and parameter scale reduce
    over the split (an all-reduce over the rule's mesh dimension); the update is gathered back
    to the weight's dims and subtracted (mtf.assign_sub, as mtf's: no bfloat16 rounding of
    the weight).
    """
    grad = _owned(mesh_lib.renamed(mtf.to_float(grad), shard.dims))
    slot = functools.partial(_slot, var)
    factored_dims = self._factored_dims(shard)
    if factored_dims:
      vr, vc = slot("_slot_vr", shard - factored_dims[0]), slot("_slot_vc", shard - factored_dims[1])
    else:
      v = slot("_slot_v", shard)
    m = slot("_slot_m", shard) if self._beta1 else None
    grad_squared = mtf.square(grad) + self._epsilon1
    decay_rate, mixing_rate = self._decay_rate, 1.0 - self._decay_rate
    update_scale = self._learning_rate
    if self._multiply_by_parameter_scale and not any(
        s in var.name for s in self._exclude_from_parameter_scale):
      old_value = mesh_lib.renamed(mtf.to_float(var.value), shard.dims)
      update_scale = self._parameter_scale(old_value) * self._learning_rate
    if factored_dims:
      new_vr = vr * decay_rate + mtf.reduce_mean(grad_squared, output_shape=vr.shape) * mixing_rate
      new_vc = vc * decay_rate + mtf.reduce_mean(grad_squared, output_shape=vc.shape) * mixing_rate
      updates = [mtf.assign(vr, new_vr), mtf.assign(vc, new_vc)]
      long_term_mean = mtf.reduce_mean(new_vr, reduced_dim=factored_dims[1])
      x = grad * mtf.rsqrt(new_vr / long_term_mean) * mtf.rsqrt(new_vc)
    else:
      new_v = v * decay_rate + grad_squared * mixing_rate
      updates = [mtf.assign(v, new_v)]
      x = grad * mtf.rsqrt(new_v)
    if self._clipping_threshold is not None:
      x /= mtf.maximum(1.0, mtf.optimize.reduce_rms(x) / self._clipping_threshold)
    subtrahend = x * update_scale
    if self._beta1:
      subtrahend = m * tf.constant(self._beta1) + subtrahend * tf.constant(1.0 - self._beta1)
      updates.append(mtf.assign(m, subtrahend))
    return updates + [mtf.assign_sub(var, mesh_lib.renamed(subtrahend, var.shape.dims))]

  def apply_grads(self, grads, variables, learning_rate, step):
    """mtf's Adafactor, which reads its rates from its own attributes: they are set on a copy,
    so this object keeps no graph's tensors."""
    update = copy.copy(self)
    update._learning_rate = learning_rate  # pylint: disable=protected-access
    if self._decay_rate is None:  # Adafactor's default, 1 - step^-0.8
      update._decay_rate = 1.0 - mtf.exp(mtf.log(step) * -0.8)  # pylint: disable=protected-access
    return mtf.optimize.AdafactorOptimizer.apply_grads(update, grads, variables)


def global_norm(grads):
  """The L2 norm of all gradients together, an mtf scalar."""
  return mtf.sqrt(mtf.add_n([mtf.reduce_sum(mtf.square(mtf.cast(g, tf.float32)))
                             for g in grads]))


def clip_by_global_norm(grads, norm, clip_norm):
  """Scales all gradients by min(1, clip_norm / norm); clip_norm None or 0 leaves them."""
  if not clip_norm:
    return grads
  scale = mtf.minimum(mtf.constant(norm.mesh, 1.0), clip_norm / (norm + 1e-6))
  return [g * mtf.cast(scale, g.dtype) for g in grads]
