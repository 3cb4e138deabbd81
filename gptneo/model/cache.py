"""The key/value cache of incremental decoding: each new token costs one position.

A model call with a `DecodeCache` runs a few new tokens per row, each at its own position: a
chunk of a prompt, or the one token just sampled. Softmax layers (global and local) write the
new keys and values into their cache in place and attend to the cached span up to each
query's position, so a step costs the positions decoded so far, not n_ctx. Linear layers carry
their running sums. Cache memory is local to the process: not in checkpoints, never trained.

Padding (rows with fewer new tokens than the chunk, unused rows of the batch) sits at position
n_ctx: its keys and values go to a spare slot past the window that no query sees, and linear
layers leave it out of their sums. Stale slots from an earlier prompt are never seen either: a
query sees the slots up to its own position, and every one of those was written for this
prompt before it is read.
"""
from gptneo.compat import mtf, tf
from gptneo.errors import UserError
from gptneo.model import attention

# The attended span is rounded to this many slots, so TF's kernels see a few dozen shapes
# (each compiled once) instead of a new one every token.
_SPAN_ALIGN = 64


class DecodeCache:
  """What one decoding call of the model reads from and writes to the cache.

  Args:
    positions: int32 mtf.Tensor [batch, sequence]: the position of each new token (< n_ctx),
      or n_ctx for padding. A row at position 0 starts a new window.
    last: with more than one new token per row, int32 mtf.Tensor [batch]: the index among
      them of each row's last real one, the only one whose logits decoding needs.
  """

  def __init__(self, positions, last=None):
    self.positions, self.last = positions, last
    self.updates = []  # mtf Assign operations (linear layers) to run with the logits
    self._plans = {}  # (device, window) -> _Plan, shared by every layer

  def attend(self, attention_type, q, k, v, dims, window_size, scale):
    """The layer's attended values [batch, sequence, heads, kv], through its cache."""
    kind = attention.lookup(attention_type)
    if kind.decode == "linear":
      return self._linear(q, k, v, dims)
    if kind.decode == "softmax":
      window = window_size if kind.windowed else None
      return CachedAttention(self, q, k, v, dims, window, scale).outputs[0]
    if kind.decode is None:
      raise UserError(f"GPT.attention_layers uses {attention_type!r} attention, which the "
                      f"key/value cache cannot decode; set sample.cache = False")
    raise NotImplementedError(f"attention type {attention_type!r} decodes as {kind.decode!r}, "
                              f"a mode DecodeCache.attend lacks")

  def last_rows(self, x, sequence):
    """x [batch, sequence, ...] at each row's last new token, sequence cut to 1 position."""
    if self.last is None:
      return x
    picked = mtf.einsum([x, mtf.one_hot(self.last, sequence, dtype=x.dtype)],
                        x.shape - sequence)
    one = mtf.Dimension(sequence.name, 1)
    return mtf.reshape(picked, [one if d == sequence else d for d in x.shape.dims])

  def plan(self, pnum, positions, heads, n_ctx, window, dtype):
    """The _Plan of device `pnum` for layers with this window, made by the first such layer."""
    if (pnum, window) not in self._plans:
      self._plans[pnum, window] = _Plan(positions, heads, n_ctx, window, dtype)
    return self._plans[pnum, window]

  def _linear(self, q, k, v, dims):
    """Linear attention continuing the cached running sums (from zero for a new window)."""
    kv_out = mtf.Dimension("kv_out", dims.kv.size)
    state = self._variable("state", [dims.batch, dims.heads, dims.kv, kv_out], k)
    normalizer = self._variable("normalizer", [dims.batch, dims.heads, dims.kv], k)
    first = mtf.reduce_sum(mtf.slice(self.positions, 0, 1, dims.sequence.name),
                           reduced_dim=mtf.Dimension(dims.sequence.name, 1))
    carried = mtf.cast(mtf.not_equal(first, 0), k.dtype)  # [batch]: 0 starts a new window
    real = mtf.cast(mtf.less(self.positions, dims.memory.size), k.dtype)
    output, states, normalizers = attention.linear_attention_from(
        q, k, v, dims, state * carried, normalizer * carried, real)
    self._store(state, _last(states, dims.sequence))
    self._store(normalizer, _last(normalizers, dims.sequence))
    return output

  def _variable(self, name, shape, like):
    """A zero local variable in the layer's scope (shared by every decoding graph)."""
    dtype = mtf.VariableDType(like.dtype, like.dtype, like.dtype)
    return mtf.get_variable(like.mesh, f"cache_{name}", shape, dtype=dtype,
                            initializer=tf.zeros_initializer(), trainable=False,
                            collections=[tf.GraphKeys.LOCAL_VARIABLES])

  def _store(self, variable, value):
    self.updates.append(mtf.assign(variable, value))


def _last(running, sequence):
  """Running sums [batch, sequence, ...] after the last position (padding adds nothing)."""
  last = mtf.slice(running, sequence.size - 1, 1, sequence.name)
  return mtf.reduce_sum(last, reduced_dim=mtf.Dimension(sequence.name, 1))


class CachedAttention(mtf.Operation):
  """A decoding step of one softmax layer, on each device's own slice of the cache.

  The new keys and values are scattered into the layer's cache variables [batch, heads,
  n_ctx + 1, kv] in place (reference variables: a resource variable would copy itself on
  every read once scattered into); each query then attends to the slots from the start of
  its window (0, or position - window_size + 1 for a local layer) to its position, through two
  batched matmuls over that span only.
  """

  def __init__(self, cache, q, k, v, dims, window, scale):
    super().__init__([q, k, v, cache.positions], name="cached_attention")
    self._outputs = [mtf.Tensor(self, q.shape, q.dtype)]
    self._scope = tf.get_variable_scope().name  # the layer's: every decoding graph shares it
    self._cache, self._dims, self._window, self._scale = cache, dims, window, scale

  def lower(self, lowering):
    mesh_impl = lowering.mesh_impl(self)
    self._check_layout(mesh_impl)
    slices = [lowering.tensors[x].to_laid_out_tensor().all_slices for x in self.inputs]
    outputs = mtf.parallel(mesh_impl.devices, self._attend, list(range(mesh_impl.size)),
                           *slices)
    lowering.set_tensor_lowering(self.outputs[0], mesh_impl.LaidOutTensor(outputs))

  def _check_layout(self, mesh_impl):
    layout = mesh_impl.tensor_layout(self.inputs[0].shape).tensor_axis_to_mesh_axis
    for dim, axis in zip(self.inputs[0].shape.dims, layout, strict=True):
      if axis is not None and dim not in (self._dims.batch, self._dims.heads):
        raise UserError(f"the key/value cache splits only batch and heads, but mesh.layout "
                        f"splits {dim.name}; drop it from the layout or set sample.cache = "
                        f"False")

  def _attend(self, pnum, q, k, v, positions):
    """One device: q, k, v [batch, sequence, heads, kv], positions [batch, sequence]."""
    plan = self._cache.plan(pnum, positions, k.shape[2], self._dims.memory.size, self._window,
                            q.dtype)
    keys, values = self._variable(f"keys_{pnum}", k), self._variable(f"values_{pnum}", v)
    writes = [tf.scatter_nd_update(cache, plan.slots, _heads_first(new))
              for cache, new in ((keys, k), (values, v))]
    with tf.control_dependencies(writes):  # read what this step wrote
      keys, values = (cache.read_value()[:, :, plan.start:plan.end] for cache in (keys, values))
    q = _heads_first(q if self._scale == 1.0 else q * self._scale)
    scores = _batch_matmul(q, keys, adj_y=True) + plan.bias
    scores = tf.exp(scores - tf.reduce_max(scores, -1, keepdims=True))
    probs = scores / tf.reduce_sum(scores, -1, keepdims=True)
    return _heads_first(_batch_matmul(probs, values))

  def _variable(self, name, like):
    """This device's cache [batch, heads, n_ctx + 1, kv] (the last slot takes padding)."""
    batch, _, heads, kv = like.shape.as_list()
    with tf.variable_scope(self._scope, reuse=tf.AUTO_REUSE):
      return tf.get_variable(f"cache_{name}", [batch, heads, self._dims.memory.size + 1, kv],
                             like.dtype, tf.zeros_initializer(), trainable=False,
                             collections=[tf.GraphKeys.LOCAL_VARIABLES], use_resource=False)


class _Plan:
  """What every softmax layer of a step shares on one device, computed once from positions.

  slots: [batch, heads, sequence, 3] indices (row, head, position) of the new keys/values.
  start, end: the span of slots any query here may see, aligned to _SPAN_ALIGN.
  bias: [batch, 1, sequence, end - start]: 0 where a query sees the slot, -1e9 elsewhere.
  """

  def __init__(self, positions, heads, n_ctx, window, dtype):
    batch, length = positions.shape.as_list()
    shape = [batch, heads, length]
    self.slots = tf.stack([tf.broadcast_to(tf.range(batch)[:, None, None], shape),
                           tf.broadcast_to(tf.range(heads)[None, :, None], shape),
                           tf.broadcast_to(positions[:, None, :], shape)], axis=-1)
    real = positions < n_ctx
    last = tf.reduce_max(tf.where(real, positions, tf.zeros_like(positions)))
    self.end = tf.minimum((last // _SPAN_ALIGN + 1) * _SPAN_ALIGN, n_ctx)
    self.start = 0
    if window:
      first = tf.reduce_min(tf.where(real, positions, tf.fill(tf.shape(positions), n_ctx)))
      self.start = tf.maximum(tf.minimum(first, last) - window + 1, 0)
      self.start = self.start // _SPAN_ALIGN * _SPAN_ALIGN
    slot = tf.range(self.start, self.end)[None, None, None, :]
    query = positions[:, None, :, None]
    hidden = slot > query
    if window:
      hidden = tf.logical_or(hidden, slot <= query - window)
    self.bias = tf.cast(hidden, dtype) * attention.MASKED


def _batch_matmul(x, y, adj_y=False):
  """x @ y over leading batch dims, by TF's own kernel.

  On a few queries per step oneDNN's batched matmul and softmax cost ~50 us a call in fixed
  overhead, several times the work; BatchMatMulV3 is not rewritten to oneDNN, and the softmax
  above is plain exp / sum (bench/RESULTS.md, decoding).
  """
  return tf.raw_ops.BatchMatMulV3(x=x, y=y, Tout=x.dtype, adj_y=adj_y)


def _heads_first(x):
  """[batch, sequence, heads, kv] <-> [batch, heads, sequence, kv] (a reshape if sequence 1)."""
  shape = x.shape.as_list()
  if shape[1] == 1 or shape[2] == 1:
    return tf.reshape(x, [shape[0], shape[2], shape[1], shape[3]])
  return tf.transpose(x, [0, 2, 1, 3])
