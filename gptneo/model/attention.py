"""Causal self-attention kernels, picked per layer by name: global, local and linear.

Each kernel maps projected queries, keys and values [batch, sequence, heads, kv] to the
attended values of the same shape; the GPT owns the projections, so the kernels add no
weights and any layer can use any kernel.

ATTENTION_TYPES is the one place a type is defined: how it trains, how the key/value cache
decodes it and what HF export calls it. Training, decoding and export all look a layer's type
up there, so a type missing from it, or lacking a part, is refused rather than run as global.
"""
import dataclasses
import functools
from collections.abc import Callable

from gptneo.compat import mtf, tf
from gptneo.errors import UserError
from gptneo.model import ops

MASKED = -1e9  # the score bias of a position a query must not see
DECODE_MODES = ("softmax", "linear")  # what cache.DecodeCache.attend knows how to run


@dataclasses.dataclass(frozen=True)
class AttentionType:
  """Everything the code needs to know about one attention type.

  Args:
    name: the name GPT.attention_layers uses.
    train_kernel: function(window_size, scale) -> the kernel(q, k, v, dims, drop_probs).
    decode: how the key/value cache decodes it, one of DECODE_MODES ("softmax": cached keys
      and values, "linear": running sums), or None if it cannot be decoded with the cache.
    windowed: whether a query sees only the last GPT.window_size positions.
    hf_name: its name in HF GPT-Neo's attention_types, or None if HF does not compute it.
  """
  name: str
  train_kernel: Callable
  decode: str | None = None
  windowed: bool = False
  hf_name: str | None = None

  def __post_init__(self):
    if self.decode is not None and self.decode not in DECODE_MODES:
      raise ValueError(f"attention type {self.name!r} decodes as {self.decode!r}, which "
                       f"cache.DecodeCache does not know; use one of {DECODE_MODES} or None")


def _registry(*types):
  return {kind.name: kind for kind in types}


# Kernels are looked up when a layer is built, so the lambdas may name functions defined below.
ATTENTION_TYPES = _registry(
    AttentionType("global", lambda window_size, scale: functools.partial(
        global_attention, scale=scale), decode="softmax", hf_name="global"),
    AttentionType("local", lambda window_size, scale: functools.partial(
        local_attention, window_size=window_size, scale=scale), decode="softmax",
                  windowed=True, hf_name="local"),
    AttentionType("linear", lambda window_size, scale: linear_attention, decode="linear"))


def lookup(attention_type):
  """The ATTENTION_TYPES entry of a type name; a one-line UserError if there is none."""
  if attention_type not in ATTENTION_TYPES:
    raise UserError(f"GPT.attention_layers names unknown attention type {attention_type!r}; "
                    f"use one of {list(ATTENTION_TYPES)}")
  return ATTENTION_TYPES[attention_type]


def expand_pattern(attention_layers, n_layer):
  """The attention type of each layer, from `GPT.attention_layers`.

  Args:
    attention_layers: None (every layer global), or a list whose entries are a type name
      (one layer) or a pair [types, count] repeating `types` (a name or a list of names)
      `count` times: GPT-Neo's [[["global", "local"], 6]] is 12 alternating layers.
    n_layer: how many layers the pattern must describe.

  Returns:
    a list of n_layer type names.
  """
  if attention_layers is None:
    return ["global"] * n_layer
  layers = []
  for entry in attention_layers:
    if isinstance(entry, str):
      layers.append(entry)
    elif len(entry) == 2 and isinstance(entry[1], int):
      types = [entry[0]] if isinstance(entry[0], str) else list(entry[0])
      layers.extend(types * entry[1])
    else:
      raise UserError(f"GPT.attention_layers entry {entry!r} is neither a type name nor a "
                      f"[types, count] pair; write e.g. [[\"global\", \"local\"], 6]")
  return layers


def validate_pattern(layers, n_layer, window_size, n_ctx):
  """Raises ValueError (one line) on an unknown type, a wrong length or a bad window."""
  unknown = sorted(set(layers) - set(ATTENTION_TYPES))
  if unknown:
    raise UserError(f"GPT.attention_layers names unknown attention type(s) {unknown}; "
                    f"use {list(ATTENTION_TYPES)}")
  if len(layers) != n_layer:
    raise UserError(f"GPT.attention_layers describes {len(layers)} layers but GPT.n_layer = "
                    f"{n_layer}; change the repeat count or n_layer so they agree")
  if not any(ATTENTION_TYPES[kind].windowed for kind in layers):
    return
  if not isinstance(window_size, int) or window_size < 1:
    raise UserError(f"GPT.window_size = {window_size!r}; it must be a positive integer")
  if window_size < n_ctx and n_ctx % window_size:
    raise UserError(f"GPT.window_size = {window_size} does not divide GPT.n_ctx = {n_ctx}; "
                    f"local attention works in blocks of window_size tokens, pick a divisor")


def kernel(attention_type, window_size, scale):
  """The kernel function(q, k, v, dims, drop_probs) for one attention type.

  `scale` multiplies the softmax layers' scores: kv**-0.5 in GPT-2/3, 1.0 in GPT-Neo.
  """
  return lookup(attention_type).train_kernel(window_size, scale)


def global_attention(q, k, v, dims, drop_probs, scale):
  """Full causal softmax attention: O(n^2) scores."""
  k = mtf.rename_dimension(k, dims.sequence.name, dims.memory.name)
  v = mtf.rename_dimension(v, dims.sequence.name, dims.memory.name)
  scores = mtf.einsum([q, k], [dims.batch, dims.heads, dims.sequence, dims.memory])
  scores = scores * scale + _causal_bias(q.mesh, dims.sequence, dims.memory, scores.dtype)
  probs = drop_probs(ops.softmax(scores, dims.memory))
  return mtf.einsum([probs, v], [dims.batch, dims.sequence, dims.heads, dims.kv])


def _causal_bias(mesh, sequence, memory, dtype):
  """0 where memory position m is at or before the query's position, -1e9 after it."""
  hidden = mtf.greater(mtf.mtf_range(mesh, memory, tf.int32),
                       mtf.mtf_range(mesh, sequence, tf.int32))
  return mtf.cast(hidden, dtype) * MASKED


def local_attention(q, k, v, dims, drop_probs, window_size, scale):
  """Causal sliding-window attention: position i sees i - window_size + 1 .. i.

  The sequence is cut into blocks of window_size queries; each block attends to its own
  keys and the previous block's, so scores cost O(n * window) instead of O(n^2).
  """
  if window_size >= dims.sequence.size:
    return global_attention(q, k, v, dims, drop_probs, scale)
  blocks = mtf.Dimension("blocks", dims.sequence.size // window_size)
  block = mtf.Dimension("block", window_size)
  memory = mtf.Dimension("block_memory", 2 * window_size)
  q = _split_blocks(q, dims.sequence, blocks, block)
  k = _with_previous_block(_split_blocks(k, dims.sequence, blocks, block), blocks, block)
  v = _with_previous_block(_split_blocks(v, dims.sequence, blocks, block), blocks, block)
  scores = mtf.einsum([q, k], [dims.batch, dims.heads, blocks, block, memory])
  scores = scores * scale + _local_bias(q.mesh, blocks, block, memory, scores.dtype)
  probs = drop_probs(ops.softmax(scores, memory))
  out = mtf.einsum([probs, v], [dims.batch, blocks, block, dims.heads, dims.kv])
  return mtf.reshape(out, [dims.batch, dims.sequence, dims.heads, dims.kv])


def _split_blocks(x, sequence, blocks, block):
  """[..., sequence, ...] -> [..., blocks, block, ...] (position = blocks * w + block)."""
  index = x.shape.dims.index(sequence)
  return mtf.reshape(x, x.shape.dims[:index] + [blocks, block] + x.shape.dims[index + 1:])


def _with_previous_block(x, blocks, block):
  """Keys of each block preceded by the previous block's: `block` becomes `block_memory`."""
  current = mtf.rename_dimension(x, block.name, "block_memory")
  previous = mtf.shift(current, 1, blocks, wrap=False)
  return mtf.concat([previous, current], "block_memory")


def _local_bias(mesh, blocks, block, memory, dtype):
  """0 where the key is within the window before (or at) the query, -1e9 elsewhere."""
  w = block.size
  block_start = mtf.mtf_range(mesh, blocks, tf.float32) * w
  query = block_start + mtf.mtf_range(mesh, block, tf.float32)
  key = block_start - w + mtf.mtf_range(mesh, memory, tf.float32)
  allowed = (mtf.cast(mtf.less_equal(key, query), tf.float32)
             * mtf.cast(mtf.greater(key, query - w), tf.float32)
             * mtf.cast(mtf.greater_equal(key, 0.0), tf.float32))
  return mtf.cast((1.0 - allowed) * MASKED, dtype)


def linear_attention(q, k, v, dims, drop_probs):
  """Causal linear attention with the elu + 1 feature map (Katharopoulos et al. 2020).

  Running sums over the sequence replace the softmax, so cost is O(n * kv^2). There are no
  attention probabilities, so `drop_probs` (attn_dropout) does not apply.
  """
  del drop_probs
  return linear_attention_from(q, k, v, dims, state=None, normalizer=None)[0]


def linear_attention_from(q, k, v, dims, state, normalizer, real=None):
  """Linear attention continuing running sums: the output, and the sums after the sequence.

  Args:
    q, k, v: [batch, sequence, heads, kv], before the feature map.
    state: None (start from zero) or the sums of phi(k) v^T so far, [batch, heads, kv, kv_out].
    normalizer: None or the sums of phi(k) so far, [batch, heads, kv].
    real: None, or [batch, sequence]: 1 for a real token, 0 for padding (left out of the sums).

  Returns:
    (output [batch, sequence, heads, kv], states, normalizers): the running sums after
    each position, [batch, sequence, heads, kv, kv_out] and [batch, sequence, heads, kv].
  """
  q, k = linear_features(q), linear_features(k)
  if real is not None:
    k *= real
  kv_out = mtf.Dimension("kv_out", dims.kv.size)
  v = mtf.rename_dimension(v, dims.kv.name, kv_out.name)
  states = ops.cumsum(mtf.einsum([k, v], [dims.batch, dims.sequence, dims.heads, dims.kv,
                                          kv_out]), dims.sequence)
  normalizers = ops.cumsum(k, dims.sequence)
  if state is not None:
    states, normalizers = states + state, normalizers + normalizer
  numerator = mtf.einsum([q, states], [dims.batch, dims.sequence, dims.heads, kv_out])
  denominator = mtf.einsum([q, normalizers], [dims.batch, dims.sequence, dims.heads])
  output = mtf.rename_dimension(numerator / denominator, kv_out.name, dims.kv.name)
  return output, states, normalizers


def linear_features(x):
  """The feature map phi(x) = elu(x) + 1 (positive, so the normalizer never vanishes)."""
  return mtf.elu(x) + 1.0
