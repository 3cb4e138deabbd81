"""Feed-forward sublayers, picked in gin by reference: `GPT.feed_forward = @glu`.

Both take the block's normalized input [batch, sequence, embd] and the GPT's activation
(`GPT.activation`), and return [batch, sequence, embd].
"""
import gin

from gptneo.model import ops


@gin.register
def mlp(x, dims, activation, std, out_std, dtype):
  """GPT-2's MLP: activation(x W_fc + b) W_proj + b."""
  h = activation(ops.dense(x, [dims.embd], [dims.mlp], std, dtype, "fc"))
  return ops.dense(h, [dims.mlp], [dims.embd], out_std, dtype, "proj")


@gin.register
def glu(x, dims, activation, std, out_std, dtype):
  """Gated linear unit (Shazeer 2020): (activation(x W_gate) * x W_fc) W_proj.

  GEGLU with `GPT.activation = @gelu`, SwiGLU with `@silu`; the gate adds one
  n_embd x mlp matrix, so SwiGLU models often lower mlp_ratio to keep the parameter count.
  """
  gate = activation(ops.dense(x, [dims.embd], [dims.mlp], std, dtype, "gate"))
  h = gate * ops.dense(x, [dims.embd], [dims.mlp], std, dtype, "fc")
  return ops.dense(h, [dims.mlp], [dims.embd], out_std, dtype, "proj")


# Input projections (embd x mlp, with bias) of each feed-forward, for parameter counts.
INPUT_PROJECTIONS = {"mlp": 1, "glu": 2}


def num_parameters(feed_forward, n_embd, hidden):
  projections = INPUT_PROJECTIONS[feed_forward.__name__]
  return projections * (n_embd * hidden + hidden) + hidden * n_embd + n_embd
