"""The GPT: token + position embeddings, pre-LayerNorm blocks, an output projection (tied or not).

Every tensor has named dimensions (`batch`, `sequence`, `memory`, `embd`, `heads`, `kv`,
`mlp`, `vocab`, and `experts` with a mixture of experts): a layout in gin/layouts/ maps
those names onto the device mesh, so the same code runs data- and model-parallel.

The variants live in their own modules and are picked in gin: attention kernels per layer
(attention.py), position encodings (positions.py), feed-forwards (feedforward.py) and
mixtures of experts (moe.py).
"""
import dataclasses
import functools
import math

import gin

from gptneo.compat import mtf, tf
from gptneo.errors import UserError
from gptneo.model import attention
from gptneo.model import feedforward
from gptneo.model import ops
from gptneo.model import positions as positions_lib


QKV = mtf.Dimension("qkv", 3)  # queries, keys, values: stacked in one projection


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
  experts: mtf.Dimension = None  # only with a mixture of experts

  def sizes(self):
    return {d.name: d.size for d in dataclasses.astuple(self) if d is not None}


@gin.configurable(denylist=["name"])
class GPT:
  """A GPT-2/GPT-3/GPT-Neo-style decoder.

  Args:
    n_layer: number of transformer blocks.
    n_embd: width of the residual stream.
    n_head: attention heads; must divide n_embd.
    n_ctx: context length (tokens per training sequence).
    n_vocab: vocabulary size; must be at least the dataset's.
    mlp_ratio: the feed-forward's hidden width is mlp_ratio * n_embd.
    activation: the feed-forward's activation, a gin reference: @gelu, @gelu_tanh, @relu,
      @selu, @silu.
    feed_forward: @mlp (GPT-2) or @glu (GEGLU with @gelu, SwiGLU with @silu).
    attention_layers: attention type per block: "global" (full causal), "local" (sliding
      window of window_size) or "linear"; a list of names, or [types, count] pairs such as
      GPT-Neo's [[["global", "local"], 6]]. None: every block global.
    window_size: tokens a "local" layer sees (itself included); divides n_ctx.
    scale_attention: scale the softmax layers' scores by 1/sqrt(n_embd / n_head) (GPT-2/3);
      False matches GPT-Neo's released models, which do not scale.
    positions: the position encoding: @LearnedPositions() (None means this),
      @RotaryPositions(), @AxialPositions() or @NoPositions().
    moe: None, or @MoE() to replace the feed-forward of MoE.layers with experts.
    recompute_grad: recompute each block's activations on the backward pass instead of
      keeping them (less memory, about a third more compute).
    z_loss: weight of the mean squared log-partition of the logits (PaLM's z-loss), added
      to the training loss and logged as `z_loss`; 0 disables it.
    embed_dropout: dropout rate on the summed embeddings.
    attn_dropout: dropout rate on the attention probabilities (global and local layers).
    res_dropout: dropout rate on each block's attention and feed-forward outputs.
    init_std: standard deviation of the normal init of every weight matrix.
    scale_by_depth: divide the init std of residual projections by sqrt(2 * n_layer).
    scale_by_in: also divide the init std of every projection by sqrt(its fan-in).
    tie_embeddings: reuse the token embedding as the output projection.
    lm_head_bias: a bias on the untied output projection (GPT-J's lm_head); needs
      tie_embeddings = False.
    qkv_bias: a bias on the query/key/value projection (GPT-2, GPT-NeoX and Pythia have
      one; GPT-Neo and GPT-J do not).
    parallel_residual: attention and feed-forward read the same block input and both add to
      the residual (x + attn(ln_1(x)) + mlp(ln_2(x)): GPT-J, GPT-NeoX, Pythia), instead of
      the feed-forward reading the residual after attention (GPT-2, GPT-Neo).
    shared_layer_norm: with parallel_residual, one LayerNorm (ln_1) feeds both attention and
      the feed-forward (GPT-J); False gives each its own (GPT-NeoX, Pythia).
    layer_norm_epsilon: added to the variance in every LayerNorm.
    parametrization: "standard", or "mup", the maximal update parametrization (Yang et al.,
      Tensor Programs V): as width grows past mup_base_width the hidden matrices' init std
      shrinks as sqrt(base / width) and their learning rate as base / width, the logits are
      multiplied by base / width and q·k by sqrt(base / width) (1/d_head in all), so the best
      learning rate and init of a small model carry over to a wide one (docs/mup.md). At
      n_embd = mup_base_width (and mup_output_multiplier 1) the two are the same model.
    mup_base_width: with "mup", the width (n_embd) the hyperparameters were tuned at: it must
      divide n_embd and be divisible by n_head (the base model has the same heads).
    mup_output_multiplier: with "mup", what the logits are multiplied by at the base width
      (mup's MuReadout output_mult; base / width times it at n_embd): a hyperparameter to
      tune at the base width with the learning rate, then kept (docs/mup.md). 1 is the
      standard model's; with tied 0.02-std embeddings a larger one (8 on the transfer bench)
      trains the output faster. Ignored under "standard".
    name: variable scope of the model's weights.
  """

  def __init__(self, n_layer=12, n_embd=768, n_head=12, n_ctx=1024, n_vocab=50257,
               mlp_ratio=4, activation=ops.gelu_tanh, feed_forward=feedforward.mlp,
               attention_layers=None, window_size=256, scale_attention=True, positions=None,
               moe=None, recompute_grad=False, z_loss=0.0, embed_dropout=0.0,
               attn_dropout=0.0, res_dropout=0.0, init_std=0.02, scale_by_depth=True,
               scale_by_in=False,
               tie_embeddings=True, lm_head_bias=False, qkv_bias=False,
               parallel_residual=False, shared_layer_norm=False, layer_norm_epsilon=1e-5,
               parametrization="standard", mup_base_width=None, mup_output_multiplier=1.0,
               name="gpt"):
    self.n_layer, self.n_embd, self.n_head = n_layer, n_embd, n_head
    self.n_ctx, self.n_vocab, self.mlp_ratio = n_ctx, n_vocab, mlp_ratio
    self.activation, self.feed_forward = activation, feed_forward
    self.attention_layers, self.window_size = attention_layers, window_size
    self.scale_attention = scale_attention
    self.positions = positions or positions_lib.LearnedPositions()
    self.moe, self.recompute_grad, self.z_loss = moe, recompute_grad, z_loss
    self.embed_dropout, self.attn_dropout, self.res_dropout = (
        embed_dropout, attn_dropout, res_dropout)
    self.init_std, self.scale_by_depth, self.scale_by_in = (
        init_std, scale_by_depth, scale_by_in)
    self.tie_embeddings, self.lm_head_bias, self.qkv_bias = (
        tie_embeddings, lm_head_bias, qkv_bias)
    self.parallel_residual, self.shared_layer_norm = parallel_residual, shared_layer_norm
    self.layer_norm_epsilon, self.name = layer_norm_epsilon, name
    self.parametrization, self.mup_base_width = parametrization, mup_base_width
    self.mup_output_multiplier = mup_output_multiplier
    self.validate()

  def validate(self):
    """Checks the shape knobs before any graph exists."""
    for knob in ("n_layer", "n_embd", "n_head", "n_ctx", "n_vocab", "mlp_ratio"):
      if not isinstance(getattr(self, knob), int) or getattr(self, knob) < 1:
        raise UserError(f"GPT.{knob} = {getattr(self, knob)!r}; it must be a positive integer")
    if self.n_embd % self.n_head:
      raise UserError(f"GPT.n_embd = {self.n_embd} is not divisible by GPT.n_head = "
                      f"{self.n_head}; pick n_head among the divisors of n_embd")
    for knob in ("embed_dropout", "attn_dropout", "res_dropout"):
      if not 0.0 <= getattr(self, knob) < 1.0:
        raise UserError(f"GPT.{knob} = {getattr(self, knob)}; it must be in [0, 1)")
    for knob in ("tie_embeddings", "lm_head_bias", "qkv_bias", "parallel_residual",
                 "shared_layer_norm"):
      if type(getattr(self, knob)) is not bool:
        raise UserError(f"GPT.{knob} = {getattr(self, knob)!r}; it must be True or False")
    if self.lm_head_bias and self.tie_embeddings:
      raise UserError("GPT.lm_head_bias = True needs GPT.tie_embeddings = False (the bias "
                      "belongs to an untied output projection); set both or neither")
    if self.shared_layer_norm and not self.parallel_residual:
      raise UserError("GPT.shared_layer_norm = True needs GPT.parallel_residual = True (one "
                      "LayerNorm feeding both branches); set both or neither")
    self.layer_types = attention.expand_pattern(self.attention_layers, self.n_layer)
    attention.validate_pattern(self.layer_types, self.n_layer, self.window_size, self.n_ctx)
    self.positions.validate(self.n_ctx, self.n_embd // self.n_head)
    if self.moe is not None:
      self.moe.validate(self.n_layer)
    self._validate_parametrization()

  def _validate_parametrization(self):
    if self.parametrization not in ("standard", "mup"):
      raise UserError(f"GPT.parametrization = {self.parametrization!r}; use \"standard\" or "
                      f"\"mup\"")
    if self.parametrization == "standard":
      return
    base = self.mup_base_width
    if not isinstance(base, int) or base < 1 or self.n_embd % base or base % self.n_head:
      raise UserError(f"GPT.mup_base_width = {base!r} with GPT.n_embd = {self.n_embd} and "
                      f"GPT.n_head = {self.n_head}; it must divide n_embd and be divisible by "
                      f"n_head (e.g. the width of the model you tuned on)")
    if not isinstance(self.mup_output_multiplier, (int, float)) or not (
        self.mup_output_multiplier > 0):
      raise UserError(f"GPT.mup_output_multiplier = {self.mup_output_multiplier!r}; it must "
                      f"be a number > 0 (1 is the standard model's logits)")
    if self.moe is not None:
      raise UserError("GPT.parametrization = \"mup\" with GPT.moe: the router's muP "
                      "multiplier is not defined here; use \"standard\" or no experts")

  @property
  def width_multiplier(self):
    """n_embd / mup_base_width under muP; 1 under the standard parametrization."""
    return self.n_embd / self.mup_base_width if self.parametrization == "mup" else 1.0

  def hidden_lr_multiplier(self):
    """muP's Adam learning-rate multiplier of the hidden matrices (q/k/v, attention out, the
    feed-forward's): base / width; vectors, biases, norms and embeddings keep 1."""
    return 1.0 / self.width_multiplier

  def attention_scale(self):
    """The q·k scale: 1/sqrt(d_head) (or 1 without scale_attention); under muP that at the
    base width times base / width, which is 1/d_head as n_head stays and d_head grows."""
    if not self.scale_attention:
      return 1.0 / self.width_multiplier
    return (self.n_embd // self.n_head) ** -0.5 * self.width_multiplier ** -0.5

  def output_multiplier(self):
    """What the logits are multiplied by: mup_output_multiplier * base / width under muP
    (mup's MuReadout: output_mult / width_mult), else 1."""
    if self.parametrization != "mup":
      return 1.0
    return self.mup_output_multiplier / self.width_multiplier

  def dims(self, batch_size, sequence_length=None, memory_length=None):
    length = sequence_length or self.n_ctx
    return Dims(batch=mtf.Dimension("batch", batch_size),
                sequence=mtf.Dimension("sequence", length),
                memory=mtf.Dimension("memory", memory_length or length),
                embd=mtf.Dimension("embd", self.n_embd),
                heads=mtf.Dimension("heads", self.n_head),
                kv=mtf.Dimension("kv", self.n_embd // self.n_head),
                mlp=mtf.Dimension("mlp", self.n_embd * self.mlp_ratio),
                vocab=mtf.Dimension("vocab", self.n_vocab),
                experts=self.moe.experts_dim() if self.moe else None)

  def window_fits(self, length):
    """Whether a window of `length` tokens from position 0 can run (without a cache): at most
    n_ctx, and with local layers at most window_size or a multiple of it (its blocks)."""
    windowed = any(attention.lookup(kind).windowed for kind in self.layer_types)
    blocks = length <= self.window_size or length % self.window_size == 0
    return 1 <= length <= self.n_ctx and (blocks or not windowed)

  def num_parameters(self):
    """Trainable parameters, counted analytically (the embedding counted once if tied)."""
    e, m = self.n_embd, self.n_embd * self.mlp_ratio
    norms = 1 if self.shared_layer_norm else 2
    per_block = 2 * e * norms + (3 * e * e + 3 * e * self.qkv_bias) + (e * e + e)
    dense = feedforward.num_parameters(self.feed_forward, e, m)
    experts = self.moe.num_parameters(e, m) if self.moe else 0
    moe_layers = len(self.moe.layers) if self.moe else 0
    blocks = self.n_layer * per_block + (self.n_layer - moe_layers) * dense + moe_layers * experts
    embeddings = self.n_vocab * e + self.positions.num_parameters(self.n_ctx, e)
    output = 0 if self.tie_embeddings else self.n_vocab * (e + self.lm_head_bias)
    return blocks + embeddings + 2 * e + output

  def __call__(self, tokens, dtype, dropout, cache=None):
    """Logits for every position, and the auxiliary losses of the training objective.

    Args:
      tokens: int32 mtf.Tensor [batch, sequence]: sequence = n_ctx in training; inference
        may run a shorter window (positions 0 .. sequence - 1, see window_fits), whose
        logits are those of the first `sequence` positions of an n_ctx window.
      dtype: an mtf.VariableDType (float32, or bfloat16 activations over float32 weights).
      dropout: an ops.Dropout (disabled outside training).
      cache: None, or a cache.DecodeCache to decode with: each row's new tokens sit at
        cache.positions and attend to what the cache holds before them.

    Returns:
      (logits, aux_losses): float32 mtf.Tensor [batch, sequence, vocab] ([batch, 1, vocab]
      with a cache), and a dict name -> weighted mtf scalar ("moe_loss", "z_loss"), empty
      when the model has none.
    """
    dims = self.dims(*tokens.shape.to_integer_list, memory_length=self.n_ctx if cache else None)
    if not cache and not self.window_fits(dims.sequence.size):
      raise ValueError(f"a window of {dims.sequence.size} tokens does not fit this model; "
                       f"see GPT.window_fits")
    positions = cache.positions if cache else None  # None: 0 .. sequence - 1
    moe_losses = []
    with tf.variable_scope(self.name):
      wte = ops.weight(tokens.mesh, "wte", [dims.vocab, dims.embd], dtype,
                       tf.random_normal_initializer(stddev=self.init_std))
      wpe = self.positions.embed(tokens.mesh, dims, self.n_ctx, dtype, self.init_std,
                                 positions)
      x = ops.embedding_lookup(wte, tokens, dims.vocab)
      x = x + wpe if wpe is not None else x
      x = dropout(x, self.embed_dropout)
      for layer in range(self.n_layer):
        with tf.variable_scope(f"h{layer}"):
          x = self._layer(x, layer, dims, dtype, dropout, moe_losses, cache)
      x = ops.layer_norm(x, dims.embd, self.layer_norm_epsilon, dtype, "ln_f")
      if cache:  # decoding samples after each row's last new token only
        x = cache.last_rows(x, dims.sequence)
      logits = mtf.cast(self._unembed(x, wte, dims, dtype), tf.float32)
    return logits, self._aux_losses(logits, dims, moe_losses)

  def _layer(self, x, layer, dims, dtype, dropout, moe_losses, cache):
    """One block, rematerialized on the backward pass if recompute_grad."""
    block = functools.partial(self._block, layer=layer, dims=dims, dtype=dtype,
                              dropout=dropout, cache=cache)
    recompute = self.recompute_grad and cache is None  # decoding has no backward pass
    outputs = mtf.recompute_grad(block, [x]) if recompute else block(x)
    x, *moe_loss = outputs
    moe_losses.extend(moe_loss)
    return x

  def _block(self, x, layer, dims, dtype, dropout, cache):
    """Returns (x,) or, in a mixture-of-experts block, (x, balancing loss)."""
    eps = self.layer_norm_epsilon
    normed = ops.layer_norm(x, dims.embd, eps, dtype, "ln_1")
    attended = dropout(self._attention(normed, layer, dims, dtype, dropout, cache),
                       self.res_dropout)
    if self.parallel_residual:  # both branches read the block's input (GPT-J, GPT-NeoX)
      ff_input = normed if self.shared_layer_norm else ops.layer_norm(x, dims.embd, eps,
                                                                      dtype, "ln_2")
    else:
      x = x + attended
      ff_input = ops.layer_norm(x, dims.embd, eps, dtype, "ln_2")
    h, *moe_loss = self._feed_forward(ff_input, layer, dims, dtype)
    h = dropout(h, self.res_dropout)
    return (x + attended + h if self.parallel_residual else x + h, *moe_loss)

  def _feed_forward(self, x, layer, dims, dtype):
    """(output,) of the feed-forward, or (output, balancing loss) of the experts."""
    args = (dims, self.activation, self._std(dims.embd.size),
            self._std(dims.mlp.size, residual=True), dtype)
    if self.moe is not None and layer in self.moe.layers:
      with tf.variable_scope("moe"):
        return self.moe(x, *args)
    with tf.variable_scope("mlp"):
      return (self.feed_forward(x, *args, lr_multiplier=self.hidden_lr_multiplier()),)

  def _attention(self, x, layer, dims, dtype, dropout, cache):
    """Causal multi-head self-attention with this layer's kernel (through the cache if any)."""
    std = self._std(dims.embd.size)
    with tf.variable_scope("attn"):
      # One [embd, 3, heads, kv] weight (GPT-2's c_attn): one matmul instead of three, which
      # a one-token decoding step, bound by reading weights, runs ~15% faster.
      qkv = ops.dense(x, [dims.embd], [QKV, dims.heads, dims.kv], std, dtype, "qkv",
                      use_bias=self.qkv_bias, lr_multiplier=self.hidden_lr_multiplier())
      q, k, v = mtf.unstack(qkv, QKV)
      positions = cache.positions if cache else None
      q, k = self.positions.rotate(q, dims, positions), self.positions.rotate(k, dims, positions)
      scale = self.attention_scale()
      kind = self.layer_types[layer]
      if cache:
        heads = cache.attend(kind, q, k, v, dims, self.window_size, scale)
      else:
        attend = attention.kernel(kind, self.window_size, scale)
        heads = attend(q, k, v, dims, lambda probs: dropout(probs, self.attn_dropout))
      out_std = self._std(dims.embd.size, residual=True)
      return ops.dense(heads, [dims.heads, dims.kv], [dims.embd], out_std, dtype, "out",
                       lr_multiplier=self.hidden_lr_multiplier())

  def _std(self, fan_in, residual=False, hidden=True):
    """Init std of a projection: scaled by depth on residual outputs, by fan-in if asked;
    under muP a hidden matrix's (not the output projection's) also by sqrt(base / width)
    (variance ~ 1/fan_in: scale_by_in already gives that)."""
    std = ops.scaled_init_std(self.init_std, self.n_layer, self.scale_by_depth and residual)
    if self.scale_by_in:
      return std / math.sqrt(fan_in)
    return std * self.width_multiplier ** -0.5 if hidden else std

  def _unembed(self, x, wte, dims, dtype):
    if self.tie_embeddings:
      logits = ops.matmul(x, wte, [dims.embd])
    else:
      logits = ops.dense(x, [dims.embd], [dims.vocab], self._std(dims.embd.size, hidden=False),
                         dtype, "lm_head", use_bias=self.lm_head_bias)
    multiplier = self.output_multiplier()
    return logits if multiplier == 1.0 else logits * multiplier

  def _aux_losses(self, logits, dims, moe_losses):
    """Weighted auxiliary losses for the training objective, by the name they are logged as."""
    losses = {}
    if moe_losses:
      losses["moe_loss"] = mtf.add_n(moe_losses) / len(moe_losses)
    if self.z_loss:
      log_z = mtf.reduce_logsumexp(logits, dims.vocab)
      losses["z_loss"] = self.z_loss * mtf.reduce_mean(mtf.square(log_z))
    return losses


def loss(logits, targets, vocab_dim):
  """Mean next-token cross-entropy over all positions (float32)."""
  per_token = ops.softmax_cross_entropy(logits, targets, vocab_dim)
  return mtf.reduce_mean(per_token)
