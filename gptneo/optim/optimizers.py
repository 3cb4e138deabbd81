"""Optimizers (Adam with decoupled weight decay, Adafactor), the learning-rate schedule, clipping.

Each optimizer is a gin configurable returning an `mtf.optimize.Optimizer`; the trainer gives
it the learning rate and step as mtf scalars, so every update is part of the lowered graph.
Each also says what state it keeps (`slot_shapes`): the layout search's memory estimate asks
it, so a new optimizer is costed as what it is or refused, never as another one.
"""
import math

import gin

from gptneo.compat import mtf, tf
from gptneo.errors import UserError


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
  """An mtf optimizer whose learning rate and step are mtf scalars set by the trainer."""
  learning_rate = None
  step = None  # float32 mtf scalar, 1-based, for Adam's bias correction


@gin.configurable
class Adam(_ScheduledOptimizer):
  """Adam with bias correction and decoupled weight decay (AdamW).

  Weight decay applies to matrices only: norms' gains and biases (rank < 2) are skipped.

  Args:
    beta1: decay of the first-moment estimate.
    beta2: decay of the second-moment estimate.
    epsilon: added to the root of the second moment.
    weight_decay: decoupled decay rate, multiplied by the learning rate.
  """

  def __init__(self, beta1=0.9, beta2=0.95, epsilon=1e-8, weight_decay=0.1):
    self.beta1, self.beta2, self.epsilon, self.weight_decay = beta1, beta2, epsilon, weight_decay

  def slot_shapes(self, shape):
    """The slot variables apply_grad makes for a variable of `shape` ((dim name, size), ...):
    the moments m and v, each of the variable's shape."""
    return [tuple(shape), tuple(shape)]

  def apply_grad(self, grad, var):
    grad = mtf.cast(grad, var.master_dtype) if grad.dtype != var.master_dtype else grad
    value = var.value if var.value.dtype == var.master_dtype else mtf.cast(var.value,
                                                                           var.master_dtype)
    m = mtf.get_variable(var.mesh, var.name + "/adam_m", var.shape,
                         initializer=tf.zeros_initializer(), trainable=False)
    v = mtf.get_variable(var.mesh, var.name + "/adam_v", var.shape,
                         initializer=tf.zeros_initializer(), trainable=False)
    new_m = m * self.beta1 + grad * (1.0 - self.beta1)
    new_v = v * self.beta2 + mtf.square(grad) * (1.0 - self.beta2)
    m_hat = new_m / (1.0 - mtf.exp(self.step * math.log(self.beta1)))
    v_hat = new_v / (1.0 - mtf.exp(self.step * math.log(self.beta2)))
    update = m_hat / (mtf.sqrt(v_hat) + self.epsilon)
    if self.weight_decay and var.shape.ndims >= 2:
      update += value * self.weight_decay
    return [mtf.assign(var, value - update * self.learning_rate),
            mtf.assign(m, new_m), mtf.assign(v, new_v)]


@gin.configurable
class Adafactor(_ScheduledOptimizer, mtf.optimize.AdafactorOptimizer):
  """mtf's Adafactor (factored second moments), driven by our learning-rate schedule.

  Args:
    beta1: first-moment decay; 0 keeps no first moment (Adafactor's memory saving).
    decay_rate: second-moment decay; None uses Adafactor's 1 - step^-0.8.
    clipping_threshold: Adafactor's update clipping (RMS of the update).
    multiply_by_parameter_scale: scale updates by the parameter's RMS (relative step).
    factored: factor second moments of matrices into row and column statistics.
  """

  def __init__(self, beta1=0.0, decay_rate=None, clipping_threshold=1.0,
               multiply_by_parameter_scale=False, factored=True):
    mtf.optimize.AdafactorOptimizer.__init__(
        self, multiply_by_parameter_scale=multiply_by_parameter_scale, learning_rate=None,
        decay_rate=decay_rate, beta1=beta1, clipping_threshold=clipping_threshold,
        factored=factored)
    self._fixed_decay_rate = decay_rate

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

  def _decay_rate_default(self):
    return None  # mtf's default reads a global step of whatever graph exists at construction

  def apply_grad(self, grad, var):
    # mtf's Adafactor reads its own attributes; ours come from the trainer's step and schedule.
    self._learning_rate = self.learning_rate
    self._decay_rate = self._fixed_decay_rate
    if self._decay_rate is None:  # Adafactor's default, 1 - step^-0.8
      self._decay_rate = 1.0 - mtf.exp(mtf.log(self.step) * -0.8)
    return mtf.optimize.AdafactorOptimizer.apply_grad(self, grad, var)


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
