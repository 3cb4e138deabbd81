"""The key/value cache of incremental decoding: each new token costs one position.

Every attention layer keeps what later positions need from earlier ones, in mesh variables
(so a layout splits them like the activations): global and local layers their keys and
values [batch, memory, heads, kv] with memory = n_ctx, linear layers their running sums.

A model call with a `DecodeCache` either prefills (whole windows from position 0: the usual
kernels run and their keys, values or sums are stored) or steps (each row's new tokens sit at
that row's own positions, are written into the cache and attend to everything cached before
them). The cache variables are local: not in checkpoints, zero until a prefill.
"""
from gptneo.compat import mtf, tf
from gptneo.model import attention


class DecodeCache:
  """What one model call reads from and writes to the cache.

  Args:
    positions: None to prefill whole windows; else int32 mtf.Tensor [batch, sequence], the
      position of each new token (each row continues where its window ends, < n_ctx).
    lengths: when prefilling, int32 mtf.Tensor [batch]: ids in each window (the rest is
      padding; linear layers must not sum it).
  """

  def __init__(self, positions=None, lengths=None):
    self.positions, self.lengths = positions, lengths
    self.updates = []  # mtf Assign operations to run together with the logits

  def attend(self, attention_type, q, k, v, dims, window_size, scale):
    """The layer's attended values [batch, sequence, heads, kv]; queues the cache writes."""
    if attention_type == "linear":
      return self._linear(q, k, v, dims)
    window = window_size if attention_type == "local" else None
    shape = [dims.batch, dims.memory, dims.heads, dims.kv]
    keys, values = self._variable("keys", shape, k), self._variable("values", shape, v)
    if self.positions is None:
      self._store(keys, mtf.rename_dimension(k, dims.sequence.name, dims.memory.name))
      self._store(values, mtf.rename_dimension(v, dims.sequence.name, dims.memory.name))
      return attention.kernel(attention_type, window_size, scale)(q, k, v, dims, _no_dropout)
    keys = self._store(keys, self._write(keys, k, dims))
    values = self._store(values, self._write(values, v, dims))
    return attention.memory_attention(q, keys, values, dims, _no_dropout, scale,
                                      self.positions, window)

  def _linear(self, q, k, v, dims):
    """Linear attention from the cached running sums (zero sums when prefilling)."""
    kv_out = mtf.Dimension("kv_out", dims.kv.size)
    state = self._variable("state", [dims.batch, dims.heads, dims.kv, kv_out], k)
    normalizer = self._variable("normalizer", [dims.batch, dims.heads, dims.kv], k)
    prefill = self.positions is None
    output, states, normalizers = attention.linear_attention_from(
        q, k, v, dims, None if prefill else state, None if prefill else normalizer)
    self._store(state, self._after_last_token(states, dims))
    self._store(normalizer, self._after_last_token(normalizers, dims))
    return output

  def _after_last_token(self, running, dims):
    """Running sums [batch, sequence, ...] at each row's last real token."""
    if self.positions is None:  # prefill: the window's last id, then padding
      at_last = mtf.one_hot(self.lengths - 1, dims.sequence, dtype=running.dtype)
      return mtf.einsum([running, at_last], running.shape - dims.sequence)
    last = mtf.slice(running, dims.sequence.size - 1, 1, dims.sequence.name)
    return mtf.reduce_sum(last, reduced_dim=last.shape.get_dim_by_name(dims.sequence.name))

  def _write(self, cached, new, dims):
    """`cached` [batch, memory, ...] with the slots at `positions` replaced by `new`.

    A scatter, not a one-hot blend: under XLA the variable is then updated in place, so a
    step touches only its own rows instead of rewriting the whole cache.
    """
    def scatter(cache, rows, at):  # cache [b, m, ...], rows [b, s, ...], at [b, s]
      batch = tf.broadcast_to(tf.range(tf.shape(at)[0])[:, None], tf.shape(at))
      return tf.tensor_scatter_nd_update(cache, tf.stack([batch, at], axis=-1), rows)

    new = mtf.transpose(new, [dims.batch, dims.sequence] + cached.shape.dims[2:])
    at = mtf.transpose(self.positions, [dims.batch, dims.sequence])
    return mtf.slicewise(scatter, [cached, new, at], output_shape=cached.shape,
                         output_dtype=cached.dtype,
                         splittable_dims=[d for d in cached.shape.dims if d != dims.memory])

  def _variable(self, name, shape, like):
    """A zero local variable in the layer's scope (shared by prefill and step), like's dtype."""
    dtype = mtf.VariableDType(like.dtype, like.dtype, like.dtype)
    return mtf.get_variable(like.mesh, f"cache_{name}", shape, dtype=dtype,
                            initializer=tf.zeros_initializer(), trainable=False,
                            collections=[tf.GraphKeys.LOCAL_VARIABLES])

  def _store(self, variable, value):
    self.updates.append(mtf.assign(variable, value))
    return value


def _no_dropout(probs):
  return probs
