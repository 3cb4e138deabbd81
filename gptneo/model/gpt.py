"""The GPT: token + position embeddings, pre-LayerNorm blocks, tied output projection.

Every tensor has named dimensions (`batch`, `sequence`, `memory`, `embd`, `heads`, `kv`,
`mlp`, `vocab`): a layout in gin/layouts/ maps those names onto the device mesh, so the
same code runs data- and model-parallel.
"""
import dataclasses

import gin

from gptneo.compat import mtf, tf
from gptneo.model import ops


@dataclasses.dataclass(frozen=True)
class Dims:
  """The named dimensions of one model at one batch size."""
  batch: mtf.Dimension
  sequence: mtf.Dimension
  memory: mtf.Dimension  # keys/values length; its own name so q·k can reduce `kv` only
  embd: mtf.Dimension
  heads: mtf.Dimension
  kv: mtf.Dimension
  mlp: mtf.Dimension
  vocab: mtf.Dimension

  def sizes(self):
    return {d.name: d.size for d in dataclasses.astuple(self)}


@gin.configurable(denylist=["name"])
class GPT:
  """A GPT-2/GPT-3-style decoder.

  Args:
    n_layer: number of transformer blocks.
    n_embd: width of the residual stream.
    n_head: attention heads; must divide n_embd.
    n_ctx: context length (tokens per training sequence).
    n_vocab: vocabulary size; must be at least the dataset's.
    mlp_ratio: the MLP's hidden width is mlp_ratio * n_embd.
    activation: the MLP's activation, a gin reference: @gelu, @gelu_tanh, @relu, @selu, @silu.
    embed_dropout: dropout rate on the summed embeddings.
    attn_dropout: dropout rate on the attention probabilities.
    res_dropout: dropout rate on each block's attention and MLP outputs.
    init_std: standard deviation of the normal init of every weight matrix.
    scale_by_depth: divide the init std of residual projections by sqrt(2 * n_layer).
    tie_embeddings: reuse the token embedding as the output projection.
    layer_norm_epsilon: added to the variance in every LayerNorm.
    name: variable scope of the model's weights.
  """

  def __init__(self, n_layer=12, n_embd=768, n_head=12, n_ctx=1024, n_vocab=50257,
               mlp_ratio=4, activation=ops.gelu_tanh, embed_dropout=0.0, attn_dropout=0.0,
               res_dropout=0.0, init_std=0.02, scale_by_depth=True, tie_embeddings=True,
               layer_norm_epsilon=1e-5, name="gpt"):
    self.n_layer, self.n_embd, self.n_head = n_layer, n_embd, n_head
    self.n_ctx, self.n_vocab, self.mlp_ratio = n_ctx, n_vocab, mlp_ratio
    self.activation = activation
    self.embed_dropout, self.attn_dropout, self.res_dropout = (
        embed_dropout, attn_dropout, res_dropout)
    self.init_std, self.scale_by_depth = init_std, scale_by_depth
    self.tie_embeddings, self.layer_norm_epsilon, self.name = (
        tie_embeddings, layer_norm_epsilon, name)
    self.validate()

  def validate(self):
    """Checks the shape knobs before any graph exists."""
    for knob in ("n_layer", "n_embd", "n_head", "n_ctx", "n_vocab", "mlp_ratio"):
      if not isinstance(getattr(self, knob), int) or getattr(self, knob) < 1:
        raise ValueError(f"GPT.{knob} = {getattr(self, knob)!r}; it must be a positive integer")
    if self.n_embd % self.n_head:
      raise ValueError(f"GPT.n_embd = {self.n_embd} is not divisible by GPT.n_head = "
                       f"{self.n_head}; pick n_head among the divisors of n_embd")
    for knob in ("embed_dropout", "attn_dropout", "res_dropout"):
      if not 0.0 <= getattr(self, knob) < 1.0:
        raise ValueError(f"GPT.{knob} = {getattr(self, knob)}; it must be in [0, 1)")

  def dims(self, batch_size, sequence_length=None):
    length = sequence_length or self.n_ctx
    return Dims(batch=mtf.Dimension("batch", batch_size),
                sequence=mtf.Dimension("sequence", length),
                memory=mtf.Dimension("memory", length),
                embd=mtf.Dimension("embd", self.n_embd),
                heads=mtf.Dimension("heads", self.n_head),
                kv=mtf.Dimension("kv", self.n_embd // self.n_head),
                mlp=mtf.Dimension("mlp", self.n_embd * self.mlp_ratio),
                vocab=mtf.Dimension("vocab", self.n_vocab))

  def num_parameters(self):
    """Trainable parameters, counted analytically (the embedding counted once if tied)."""
    e, m = self.n_embd, self.n_embd * self.mlp_ratio
    per_block = 4 * e + (3 * e * e) + (e * e + e) + (e * m + m) + (m * e + e)
    embeddings = self.n_vocab * e + self.n_ctx * e
    output = 0 if self.tie_embeddings else self.n_vocab * e
    return self.n_layer * per_block + embeddings + 2 * e + output

  def __call__(self, tokens, dtype, dropout):
    """Logits for every position.

    Args:
      tokens: int32 mtf.Tensor [batch, sequence].
      dtype: an mtf.VariableDType (float32, or bfloat16 activations over float32 weights).
      dropout: an ops.Dropout (disabled outside training).

    Returns:
      float32 mtf.Tensor [batch, sequence, vocab].
    """
    dims = self.dims(*tokens.shape.to_integer_list)
    with tf.variable_scope(self.name):
      wte = mtf.get_variable(tokens.mesh, "wte", [dims.vocab, dims.embd], dtype=dtype,
                             initializer=tf.random_normal_initializer(stddev=self.init_std))
      wpe = mtf.get_variable(tokens.mesh, "wpe", [dims.sequence, dims.embd], dtype=dtype,
                             initializer=tf.random_normal_initializer(stddev=self.init_std / 2))
      x = mtf.gather(wte, tokens, dims.vocab) + wpe
      x = dropout(x, self.embed_dropout)
      for layer in range(self.n_layer):
        with tf.variable_scope(f"h{layer}"):
          x = self._block(x, dims, dtype, dropout)
      x = ops.layer_norm(x, dims.embd, self.layer_norm_epsilon, dtype, "ln_f")
      return mtf.cast(self._unembed(x, wte, dims, dtype), tf.float32)

  def _block(self, x, dims, dtype, dropout):
    eps = self.layer_norm_epsilon
    x += dropout(self._attention(ops.layer_norm(x, dims.embd, eps, dtype, "ln_1"), dims, dtype,
                                 dropout), self.res_dropout)
    x += dropout(self._mlp(ops.layer_norm(x, dims.embd, eps, dtype, "ln_2"), dims, dtype),
                 self.res_dropout)
    return x

  def _attention(self, x, dims, dtype, dropout):
    """Causal multi-head self-attention."""
    std = self.init_std
    with tf.variable_scope("attn"):
      q = ops.dense(x, [dims.embd], [dims.heads, dims.kv], std, dtype, "q", use_bias=False)
      k = ops.dense(x, [dims.embd], [dims.heads, dims.kv], std, dtype, "k", use_bias=False)
      v = ops.dense(x, [dims.embd], [dims.heads, dims.kv], std, dtype, "v", use_bias=False)
      k = mtf.rename_dimension(k, dims.sequence.name, dims.memory.name)
      v = mtf.rename_dimension(v, dims.sequence.name, dims.memory.name)
      scores = mtf.einsum([q, k], [dims.batch, dims.heads, dims.sequence, dims.memory])
      scores = scores * (dims.kv.size ** -0.5) + causal_bias(x.mesh, dims, scores.dtype)
      probs = dropout(mtf.softmax(scores, dims.memory), self.attn_dropout)
      heads = mtf.einsum([probs, v], [dims.batch, dims.sequence, dims.heads, dims.kv])
      out_std = ops.scaled_init_std(std, self.n_layer, self.scale_by_depth)
      return ops.dense(heads, [dims.heads, dims.kv], [dims.embd], out_std, dtype, "out")

  def _mlp(self, x, dims, dtype):
    with tf.variable_scope("mlp"):
      h = self.activation(ops.dense(x, [dims.embd], [dims.mlp], self.init_std, dtype, "fc"))
      out_std = ops.scaled_init_std(self.init_std, self.n_layer, self.scale_by_depth)
      return ops.dense(h, [dims.mlp], [dims.embd], out_std, dtype, "proj")

  def _unembed(self, x, wte, dims, dtype):
    if self.tie_embeddings:
      return mtf.einsum([x, wte], [dims.batch, dims.sequence, dims.vocab])
    return ops.dense(x, [dims.embd], [dims.vocab], self.init_std, dtype, "lm_head",
                     use_bias=False)


def causal_bias(mesh, dims, dtype):
  """0 where memory position <= query position, -1e9 after it."""
  query = mtf.mtf_range(mesh, dims.sequence, tf.int32)
  key = mtf.mtf_range(mesh, dims.memory, tf.int32)
  return mtf.cast(mtf.greater(key, query), dtype) * -1e9


def loss(logits, targets, vocab_dim):
  """Mean next-token cross-entropy over all positions (float32)."""
  per_token = mtf.layers.softmax_cross_entropy_with_logits(logits, targets, vocab_dim)
  return mtf.reduce_mean(per_token)
