"""Mixture of experts: the feed-forward of chosen blocks becomes `num_experts` MLPs.

A Switch-Transformer (Fedus et al. 2021) top-1 router, written like mtf's
`transformer_moe_layer_v1` (dispatch and combine tensors over an `experts` dimension, each
sequence a routing group). mtf's own layer lives in mesh_tensorflow.transformer, which
cannot be imported without tensorflow_datasets. `experts` is a named dimension, so a layout
such as `experts:x` puts each expert's weights on its own devices.
"""
import math

import gin

from gptneo.compat import mtf, tf
from gptneo.errors import UserError
from gptneo.model import ops


@gin.configurable
class MoE:
  """Routes each token to one of `num_experts` MLPs in the blocks listed in `layers`.

  Args:
    layers: indices (0-based) of the blocks whose feed-forward is a mixture of experts.
    num_experts: experts per mixture layer.
    capacity_factor: each expert takes at most capacity_factor * sequence / num_experts
      tokens of a sequence; the overflow skips the layer (residual only).
    loss_coef: weight of the load-balancing loss added to the training loss (logged as
      `moe_loss`, already multiplied by this coefficient).
  """

  def __init__(self, layers=(), num_experts=8, capacity_factor=1.25, loss_coef=0.01):
    if not isinstance(num_experts, int) or num_experts < 1:
      raise UserError(f"MoE.num_experts = {num_experts!r}; it must be a positive integer")
    if capacity_factor <= 0:
      raise UserError(f"MoE.capacity_factor = {capacity_factor}; it must be > 0")
    self.layers, self.num_experts = tuple(layers), num_experts
    self.capacity_factor, self.loss_coef = capacity_factor, loss_coef

  def validate(self, n_layer):
    bad = [i for i in self.layers if not isinstance(i, int) or not 0 <= i < n_layer]
    if bad:
      raise UserError(f"MoE.layers = {list(self.layers)} has {bad} outside 0..{n_layer - 1} "
                      f"(GPT.n_layer = {n_layer}); list block indices below n_layer")

  def experts_dim(self):
    return mtf.Dimension("experts", self.num_experts)

  def num_parameters(self, n_embd, hidden):
    return n_embd * self.num_experts + self.num_experts * 2 * n_embd * hidden

  def __call__(self, x, dims, activation, std, out_std, dtype):
    """Returns the mixed output [batch, sequence, embd] and the weighted balancing loss."""
    experts = self.experts_dim()
    capacity = mtf.Dimension("expert_capacity", self._capacity(dims.sequence.size))
    router = ops.dense(x, [dims.embd], [experts], std, dtype, "router", use_bias=False)
    probs = mtf.softmax(mtf.cast(router, tf.float32), experts)
    gate, choice = mtf.top_1(probs, experts)
    chosen = mtf.one_hot(choice, experts, dtype=tf.float32)
    slot = mtf.reduce_sum(ops.cumsum(chosen, dims.sequence, exclusive=True) * chosen,
                          reduced_dim=experts)
    dispatch = chosen * mtf.one_hot(mtf.cast(slot, tf.int32), capacity, dtype=tf.float32)
    expert_in = mtf.einsum([x, mtf.cast(dispatch, x.dtype)],
                           [experts, dims.batch, capacity, dims.embd])
    expert_out = self._experts(expert_in, dims, experts, activation, std, out_std, dtype)
    combine = mtf.cast(dispatch * gate, x.dtype)
    y = mtf.einsum([expert_out, combine], [dims.batch, dims.sequence, dims.embd])
    return y, self.loss_coef * self._balance_loss(chosen, probs, dims, experts)

  def _capacity(self, length):
    return min(length, math.ceil(self.capacity_factor * length / self.num_experts))

  def _experts(self, x, dims, experts, activation, std, out_std, dtype):
    """Each expert's MLP (no biases) on its own tokens."""
    w_in = ops.weight(x.mesh, "wi", [experts, dims.embd, dims.mlp], dtype,
                      tf.random_normal_initializer(stddev=std))
    w_out = ops.weight(x.mesh, "wo", [experts, dims.mlp, dims.embd], dtype,
                       tf.random_normal_initializer(stddev=out_std))
    hidden_shape = [d for d in x.shape.dims if d != dims.embd] + [dims.mlp]
    h = activation(mtf.einsum([x, w_in], hidden_shape))
    return mtf.einsum([h, w_out], x.shape)

  def _balance_loss(self, chosen, probs, dims, experts):
    """Switch's loss: num_experts * sum over experts of (share routed * mean router prob).

    It is 1 when routing is uniform and grows as tokens crowd onto few experts.
    """
    routed = mtf.reduce_mean(chosen, output_shape=[experts])
    mean_prob = mtf.reduce_mean(probs, output_shape=[experts])
    return mtf.reduce_sum(routed * mean_prob) * float(self.num_experts)
