"""Feed-forward sublayers, picked in gin by reference: `GPT.feed_forward = @glu`.

Both take the block's normalized input [batch, sequence, embd] and the GPT's activation
(`GPT.activation`), and return [batch, sequence, embd]; their matrices' learning rates are
multiplied by `lr_multiplier` (muP's, GPT.hidden_lr_multiplier).
"""
import functools

import gin

from gptneo.model import ops


@gin.register
def mlp(x, dims, activation, std, out_std, dtype, lr_multiplier=1.0):
  """GPT-2's MLP: activation(x W_fc + b) W_proj + b."""
  h = activation(ops.dense(x, [dims.embd], [dims.mlp], std, dtype, "fc",
                           lr_multiplier=lr_multiplier))
  return ops.dense(h, [dims.mlp], [dims.embd], out_std, dtype, "proj",
                   lr_multiplier=lr_multiplier)


@gin.register
def glu(x, dims, activation, std, out_std, dtype, lr_multiplier=1.0):
  """Gated linear unit (Shazeer 2020): (activation(x W_gate) * x W_fc) W_proj.

  GEGLU with `GPT.activation = @gelu`, SwiGLU with `@silu`; the gate adds one
  n_embd x mlp matrix, so SwiGLU models often lower mlp_ratio to keep the parameter count.
  """
  dense = functools.partial(ops.dense, dtype=dtype, lr_multiplier=lr_multiplier)
  gate = activation(dense(x, [dims.embd], [dims.mlp], std, name="gate"))
  h = gate * dense(x, [dims.embd], [dims.mlp], std, name="fc")
  return dense(h, [dims.mlp], [dims.embd], out_std, name="proj")


# Input projections (embd x mlp, with bias) of each feed-forward, for parameter counts.
INPUT_PROJECTIONS = {"mlp": 1, "glu": 2}


def num_parameters(feed_forward, n_embd, hidden):
  projections = INPUT_PROJECTIONS[feed_forward.__name__]
  return projections * (n_embd * hidden + hidden) + hidden * n_embd + n_embd
