"""Proposed additions to gptneo/model/ops.py (bench only: gptneo/ is not changed here).

Three mtf ops that replace the slowest non-matmul work of a training step on CPU
(see bench/RESULTS.md, "Where the time goes"):

  embedding_lookup(wte, tokens, vocab)  instead of mtf.gather, which is a one-hot
      [batch, sequence, vocab] tensor einsum'ed with wte (two extra vocab-sized matmuls a
      step, forward and weight gradient): here tf.gather forward, unsorted_segment_sum back.
  softmax_cross_entropy(logits, targets, vocab)  instead of
      mtf.layers.softmax_cross_entropy_with_logits (max, exp, sum, log, one-hot, multiply,
      sum, and as many backward passes over [batch, sequence, vocab]): one oneDNN softmax
      forward, (softmax - one_hot) * dy in one multiply plus a scatter backward.
  softmax(x, dim)  instead of mtf.softmax = exp(log_softmax), two exps and five more passes
      over [batch, heads, sequence, memory]: one oneDNN softmax (TF's softmax gradient back).

All three give the same losses and gradient norms as the current code (checked by
bench/train_variants.py on the single, data-parallel and model-parallel layouts); the first two
work with the vocabulary split over the mesh (allreduces as mtf's einsum would do them).
"""
from gptneo.compat import mtf, tf


def _mesh_axis(mesh_impl, dim):
  return mesh_impl.tensor_dimension_to_mesh_axis(dim)


def _split_axes(mesh_impl, shape):
  return [a for a in mesh_impl.tensor_layout(shape).tensor_axis_to_mesh_axis if a is not None]


def _vocab_offset(mesh_impl, vocab_dim):
  """Per-slice first vocabulary id (a LaidOutTensor of int32 scalars), or 0 if unsplit."""
  axis = _mesh_axis(mesh_impl, vocab_dim)
  if axis is None:
    return None
  local = vocab_dim.size // mesh_impl.shape[axis].size
  return mesh_impl.slicewise(lambda c: tf.cast(c, tf.int32) * local,
                             mesh_impl.laid_out_pcoord(axis))


class _EmbeddingLookup(mtf.Operation):
  """weights[ids] with tf.gather; the gradient is an unsorted_segment_sum of the output's."""

  def __init__(self, weights, ids, vocab_dim):
    super().__init__([weights, ids], name="embedding_lookup")
    if weights.shape.dims[0] != vocab_dim:
      raise ValueError(f"embedding_lookup wants {vocab_dim} first in {weights.shape}")
    self._vocab_dim = vocab_dim
    self._outputs = [mtf.Tensor(self, mtf.Shape(ids.shape.dims + weights.shape.dims[1:]),
                                weights.dtype)]

  def gradient(self, grad_ys):
    weights, ids = self.inputs
    return [_EmbeddingGrad(grad_ys[0], ids, weights.shape, self._vocab_dim).outputs[0], None]

  def lower(self, lowering):
    mesh_impl = lowering.mesh_impl(self)
    weights, ids = self.inputs
    offset = _vocab_offset(mesh_impl, self._vocab_dim)
    if offset is None:
      y = mesh_impl.slicewise(tf.gather, lowering.tensors[weights], lowering.tensors[ids])
    else:  # each slice looks up the ids it holds, zeros elsewhere; the sum is the lookup
      def local_lookup(w, i, start):
        local = i - start
        inside = tf.logical_and(local >= 0, local < tf.shape(w)[0])
        rows = tf.gather(w, tf.where(inside, local, tf.zeros_like(local)))
        return rows * tf.cast(inside, w.dtype)[..., None]
      y = mesh_impl.slicewise(local_lookup, lowering.tensors[weights], lowering.tensors[ids],
                              offset)
      y = mesh_impl.allreduce(y, [_mesh_axis(mesh_impl, self._vocab_dim)], "SUM")
    lowering.set_tensor_lowering(self.outputs[0], y)


class _EmbeddingGrad(mtf.Operation):

  def __init__(self, dy, ids, weights_shape, vocab_dim):
    super().__init__([dy, ids], name="embedding_lookup_grad")
    self._vocab_dim = vocab_dim
    self._outputs = [mtf.Tensor(self, weights_shape, dy.dtype)]

  def lower(self, lowering):
    mesh_impl = lowering.mesh_impl(self)
    dy, ids = self.inputs
    local_vocab = mesh_impl.slice_shape(self.outputs[0].shape)[0]
    offset = _vocab_offset(mesh_impl, self._vocab_dim)

    def segment_sum(d, i, start=0):
      rest = d.shape.as_list()[i.shape.ndims:]
      local = tf.reshape(i, [-1]) - start
      # ids of other slices go to segment -1, which unsorted_segment_sum drops
      local = tf.where(tf.logical_and(local >= 0, local < local_vocab), local, -tf.ones_like(local))
      return tf.math.unsorted_segment_sum(tf.reshape(d, [-1] + rest), local, local_vocab)

    inputs = [lowering.tensors[dy], lowering.tensors[ids]] + ([offset] if offset is not None else [])
    grad = mesh_impl.slicewise(segment_sum, *inputs)
    batch_axes = _split_axes(mesh_impl, ids.shape)  # every slice saw part of the ids: sum them
    if batch_axes:
      grad = mesh_impl.allreduce(grad, batch_axes, "SUM")
    lowering.set_tensor_lowering(self.outputs[0], grad)


def embedding_lookup(weights, ids, vocab_dim):
  """Rows of `weights` [vocab, ...] at integer `ids`: [*ids.shape, ...]; = mtf.gather."""
  return _EmbeddingLookup(weights, ids, vocab_dim).outputs[0]


class _SoftmaxCrossEntropy(mtf.Operation):
  """-log softmax(logits)[targets] over `vocab_dim`, with softmax kept for the backward."""

  def __init__(self, logits, targets, vocab_dim):
    super().__init__([logits, targets], name="softmax_cross_entropy")
    if logits.shape.dims[-1] != vocab_dim or targets.shape.dims != logits.shape.dims[:-1]:
      raise ValueError(f"softmax_cross_entropy wants logits [..., {vocab_dim.name}] and "
                       f"targets [...]; got {logits.shape} and {targets.shape}")
    self._vocab_dim = vocab_dim
    self._outputs = [mtf.Tensor(self, targets.shape, logits.dtype),
                     mtf.Tensor(self, logits.shape, logits.dtype)]  # loss, softmax

  def gradient(self, grad_ys):
    probs, targets = self.outputs[1], self.inputs[1]
    return [_SoftmaxCrossEntropyGrad(probs, targets, grad_ys[0], self._vocab_dim).outputs[0],
            None]

  def lower(self, lowering):
    mesh_impl = lowering.mesh_impl(self)
    logits, targets = self.inputs
    offset = _vocab_offset(mesh_impl, self._vocab_dim)
    tiny = 1e-37  # -log of it caps the loss of a float32-underflowing target at ~85
    if offset is None:
      def fn(logit_slice, t):
        p = tf.nn.softmax(logit_slice)  # one oneDNN kernel
        p_target = tf.gather(p, t[..., None], batch_dims=t.shape.ndims)[..., 0]
        return -tf.math.log(tf.maximum(p_target, tiny)), p
      loss, probs = mesh_impl.slicewise(fn, lowering.tensors[logits], lowering.tensors[targets])
    else:
      axis = _mesh_axis(mesh_impl, self._vocab_dim)
      laid_logits = lowering.tensors[logits]
      m = mesh_impl.allreduce(mesh_impl.slicewise(
          lambda x: tf.stop_gradient(tf.reduce_max(x, -1)), laid_logits), [axis], "MAX")
      e = mesh_impl.slicewise(lambda x, mx: tf.exp(x - mx[..., None]), laid_logits, m)
      s = mesh_impl.allreduce(mesh_impl.slicewise(lambda x: tf.reduce_sum(x, -1), e), [axis],
                              "SUM")
      probs = mesh_impl.slicewise(lambda x, sx: x / sx[..., None], e, s)

      def target_prob(p, t, start):
        local = t - start
        inside = tf.logical_and(local >= 0, local < tf.shape(p)[-1])
        got = tf.gather(p, tf.where(inside, local, tf.zeros_like(local))[..., None],
                        batch_dims=t.shape.ndims)[..., 0]
        return got * tf.cast(inside, p.dtype)
      p_target = mesh_impl.allreduce(mesh_impl.slicewise(
          target_prob, probs, lowering.tensors[targets], offset), [axis], "SUM")
      loss = mesh_impl.slicewise(lambda x: -tf.math.log(tf.maximum(x, tiny)), p_target)
    lowering.set_tensor_lowering(self.outputs[0], loss)
    lowering.set_tensor_lowering(self.outputs[1], probs)


class _SoftmaxCrossEntropyGrad(mtf.Operation):
  """(softmax - one_hot(targets)) * dy, without materializing the one-hot."""

  def __init__(self, probs, targets, dy, vocab_dim):
    super().__init__([probs, targets, dy], name="softmax_cross_entropy_grad")
    self._vocab_dim = vocab_dim
    self._outputs = [mtf.Tensor(self, probs.shape, probs.dtype)]

  def lower(self, lowering):
    mesh_impl = lowering.mesh_impl(self)
    offset = _vocab_offset(mesh_impl, self._vocab_dim)

    def fn(p, t, d, start=0):
      v = p.shape.as_list()[-1]
      g = tf.reshape(p * d[..., None], [-1, v])
      local = tf.reshape(t, [-1]) - start
      inside = tf.logical_and(local >= 0, local < v)
      rows = tf.range(tf.shape(g)[0])
      index = tf.stack([rows, tf.where(inside, local, tf.zeros_like(local))], 1)
      g = tf.tensor_scatter_nd_sub(g, index, tf.reshape(d, [-1]) * tf.cast(inside, g.dtype))
      return tf.reshape(g, tf.shape(p))

    inputs = [lowering.tensors[x] for x in self.inputs] + ([offset] if offset is not None else [])
    lowering.set_tensor_lowering(self.outputs[0], mesh_impl.slicewise(fn, *inputs))


def softmax_cross_entropy(logits, targets, vocab_dim):
  """Per-position -log softmax(logits)[targets]; = mtf.layers.softmax_cross_entropy_with_logits."""
  return _SoftmaxCrossEntropy(logits, targets, vocab_dim).outputs[0]


def softmax(x, dim):
  """mtf.softmax as one TF (oneDNN) kernel: `dim` must be x's last dimension and unsplit."""
  if x.shape.dims[-1] != dim:
    raise ValueError(f"softmax over {dim.name} wants it last in {x.shape}")
  return mtf.slicewise(lambda t: tf.nn.softmax(t, axis=-1), [x],
                       splittable_dims=x.shape.dims[:-1], name="softmax")
