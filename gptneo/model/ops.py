"""Small mtf building blocks the GPT is written with: activations, layer norm, dropout, dense."""
import math

import gin
from tensorflow import nn as tf_nn  # TF2's nn: tf.compat.v1.nn lacks gelu

from gptneo import mesh as mesh_lib
from gptneo.compat import mtf, tf
from gptneo.errors import UserError


# Activations, picked in gin by reference: `gpt.activation = @gelu_tanh`.
@gin.register
def gelu(x):
  """Exact GELU, x * Phi(x)."""
  return mtf.cwise(lambda t: tf_nn.gelu(t, approximate=False), [x], name="gelu")


@gin.register
def gelu_tanh(x):
  """GELU with the tanh approximation (GPT-2's and GPT-Neo's `gelu_new`)."""
  return mtf.cwise(lambda t: tf_nn.gelu(t, approximate=True), [x], name="gelu_tanh")


@gin.register
def relu(x):
  """max(x, 0)."""
  return mtf.relu(x)


@gin.register
def selu(x):
  """Scaled ELU (Klambauer et al. 2017): scale * (x if x > 0 else alpha * (exp(x) - 1))."""
  return mtf.cwise(tf_nn.selu, [x], name="selu")


@gin.register
def silu(x):
  """x * sigmoid(x), also called swish."""
  return mtf.cwise(tf_nn.silu, [x], name="silu")


gin.register("swish")(silu)


def weight(mesh, name, dims, dtype, initializer, lr_multiplier=1.0):
  """A trainable weight of `dims`, made the one way every weight of the model is.

  The variable is stored with the mesh's sharding (mesh.Sharding.stored_dims: under an
  `fsdp:x` layout rule one dimension is renamed "<d>_fsdp" and so split over x) and returned
  under the model's own dimensions: mtf lowers that rename as an all-gather over x, and the
  gradient's way back as a slice of its sum. The checkpoint holds the whole tensor under the
  same name either way, so it restores on any mesh.

  Args:
    mesh: the mtf mesh (runtime.new_mesh's, which carries the sharding; any other: unsharded).
    name: the variable's name in the current variable scope.
    dims: its mtf.Dimensions, as the model uses it.
    dtype: an mtf.VariableDType.
    initializer: a tf initializer of the whole tensor.
    lr_multiplier: what the optimizer multiplies its learning rate by for this weight
      (muP's per-layer rates, GPT.parametrization); carried by the mtf.Variable, read back
      with lr_multiplier(variable).
  """
  sharding = getattr(mesh, "sharding", None)
  stored = sharding.stored_dims(dims, "fsdp") if sharding else list(dims)
  value = mtf.get_variable(mesh, name, stored, dtype=dtype, initializer=initializer)
  if lr_multiplier != 1.0:
    value.operation.lr_multiplier = lr_multiplier
  return mesh_lib.renamed(value, dims)


def lr_multiplier(variable) -> float:
  """The learning-rate multiplier `weight` gave the mtf.Variable `variable` (1 by default)."""
  return getattr(variable, "lr_multiplier", 1.0)


def layer_norm(x, dim, epsilon, dtype, name):
  """Normalizes `x` over `dim`, then applies a learned gain `g` and bias `b`."""
  with tf.variable_scope(name):
    gain = weight(x.mesh, "g", [dim], dtype, tf.ones_initializer())
    bias = weight(x.mesh, "b", [dim], dtype, tf.zeros_initializer())
  centered = x - mtf.reduce_mean(x, reduced_dim=dim)
  variance = mtf.reduce_mean(mtf.square(centered), reduced_dim=dim)
  return centered * mtf.rsqrt(variance + epsilon) * gain + bias


def dense(x, reduced_dims, new_dims, std, dtype, name, use_bias=True, lr_multiplier=1.0):
  """x @ w (+ b), with `w` of shape reduced_dims + new_dims drawn from N(0, std); `w`'s
  learning rate multiplied by lr_multiplier (the bias's is not: see `weight`)."""
  with tf.variable_scope(name):
    w = weight(x.mesh, "w", reduced_dims + new_dims, dtype,
               tf.random_normal_initializer(stddev=std), lr_multiplier)
    b = weight(x.mesh, "b", new_dims, dtype, tf.zeros_initializer()) if use_bias else None
  return matmul(x, w, reduced_dims, b)


def matmul(x, w, reduced_dims, bias=None):
  """x [..., *reduced_dims] times w [*reduced_dims, *new] (or [*new, *reduced_dims]), + bias.

  The dense layers' and the tied unembedding's product, as one 2-D tf.matmul per slice with
  the bias added in the same oneDNN kernel: TF's einsum kernel costs about twice as much per
  call, which dominates a one-token decoding step, and copies a [vocab, embd] table
  transposed before using it. Other shapes go to mtf.einsum.

  Returns:
    [..., *new].
  """
  n = len(reduced_dims)
  trailing = x.shape.dims[-n:] == reduced_dims
  if trailing and w.shape.dims[:n] == reduced_dims:
    return _MatMul(x, w, bias, reduced_dims, w.shape.dims[n:], transpose_b=False).outputs[0]
  if trailing and w.shape.dims[-n:] == reduced_dims:
    return _MatMul(x, w, bias, reduced_dims, w.shape.dims[:-n], transpose_b=True).outputs[0]
  new_dims = [d for d in w.shape.dims if d not in reduced_dims]
  y = mtf.einsum([x, w], output_shape=x.shape.dims[:-n] + new_dims)
  return y if bias is None else y + bias


class _MatMul(mtf.Operation):
  """x @ w (or w^T) + bias per slice; all-reduced where the layout splits a reduced dim."""

  def __init__(self, x, w, bias, reduced_dims, new_dims, transpose_b):
    super().__init__([x, w] + ([bias] if bias is not None else []), name="matmul")
    self._reduced_dims, self._transpose_b = reduced_dims, transpose_b
    shape = mtf.Shape(x.shape.dims[:-len(reduced_dims)] + new_dims)
    self._outputs = [mtf.Tensor(self, shape, x.dtype)]

  def gradient(self, grad_ys):
    dy, (x, w, *bias) = grad_ys[0], self.inputs
    return [mtf.einsum([dy, w], x.shape), mtf.einsum([x, dy], w.shape),
            *[mtf.reduce_sum(dy, output_shape=b.shape) for b in bias]]

  def lower(self, lowering):
    mesh_impl = lowering.mesh_impl(self)
    output_slice = mesh_impl.slice_shape(self.outputs[0].shape)
    n = len(self._reduced_dims)
    split = [a for a in map(mesh_impl.tensor_dimension_to_mesh_axis, self._reduced_dims)
             if a is not None]
    x, w, *bias = [lowering.tensors[t] for t in self.inputs]

    def product(x, w, *bias):
      depth = math.prod(x.shape.as_list()[-n:])
      w = tf.reshape(w, [-1, depth] if self._transpose_b else [depth, -1])
      y = tf.matmul(tf.reshape(x, [-1, depth]), w, transpose_b=self._transpose_b)
      for b in bias:
        y = tf.nn.bias_add(y, tf.reshape(b, [-1]))
      return tf.reshape(y, output_slice)

    if not split:
      y = mesh_impl.slicewise(product, x, w, *bias)
    else:  # partial sums per slice: the bias goes on once, after their sum
      y = mesh_impl.allreduce(mesh_impl.slicewise(product, x, w), split, "SUM")
      for b in bias:
        y = mesh_impl.slicewise(tf.add, y, b)
    lowering.set_tensor_lowering(self.outputs[0], y)


class _StatelessDropoutMask(mtf.Operation):
  """A keep-mask that is a pure function of (seed, step, op, slice).

  mtf's own dropout seeds each op from Python's `random`, so a resumed run would draw other
  masks than an uninterrupted one. Here the draw depends only on the run seed, the global
  step and the op's position in the graph, which makes resume bit-exact.
  """

  def __init__(self, mesh, shape, rate, seed, step, op_index):
    super().__init__([], mesh=mesh, name="stateless_dropout_mask")
    self._outputs = [mtf.Tensor(self, mtf.convert_to_shape(shape), tf.float32)]
    self._rate, self._seed, self._step, self._op_index = rate, seed, step, op_index

  def lower(self, lowering):
    mesh_impl = lowering.mesh_impl(self)
    shape = self.outputs[0].shape
    slice_shape = mesh_impl.slice_shape(shape)

    def slice_mask(pnum):
      begin = mesh_impl.slice_begin(shape, pnum)
      slice_id = tf.add_n([tf.cast(b, tf.int64) * (1 << 20) ** i for i, b in enumerate(begin)]
                          or [tf.constant(0, tf.int64)])
      seed = tf.stack([tf.constant(self._seed * 1000003 + self._op_index, tf.int64),
                       tf.cast(self._step, tf.int64) * 7919 + slice_id])
      noise = tf.random.stateless_uniform(slice_shape, seed=seed)
      return tf.cast(noise >= self._rate, tf.float32) / (1.0 - self._rate)

    lowering.set_tensor_lowering(
        self.outputs[0], mesh_impl.slicewise(slice_mask, mesh_impl.laid_out_pnum()))


class Dropout:
  """Deterministic dropout: numbered sites, each drawing from (seed, step, site)."""

  def __init__(self, is_training, seed, step):
    self._enabled, self._seed, self._step, self._count = is_training, seed, step, 0

  @property
  def is_training(self):
    return self._enabled

  def __call__(self, x, rate):
    if not self._enabled or rate == 0.0:
      return x
    self._count += 1
    mask = _StatelessDropoutMask(x.mesh, x.shape, rate, self._seed, self._step,
                                 self._count).outputs[0]
    return x * mtf.cast(mask, x.dtype)


def scaled_init_std(init_std, n_layer, scale_by_depth):
  """GPT-2's init: residual projections get std / sqrt(2 * n_layer)."""
  return init_std / math.sqrt(2 * n_layer) if scale_by_depth else init_std


class _GradOfSlices(mtf.GenericGradOperation):
  """mtf's GenericGradOperation (TF's gradient per slice), incoming gradients reduced first.

  mtf's own reads each incoming gradient's slices directly, which a pending all-reduce does
  not have: the gradient of an einsum that reduces a split dimension (q·k with `kv` split).
  """

  def lower(self, lowering):
    for dy in self._grad_ys:
      lowering.tensors[dy] = lowering.tensors[dy].to_laid_out_tensor()
    super().lower(lowering)


def _grad_of_slices(forward_op, *grad_ys):
  return _GradOfSlices(forward_op, list(grad_ys)).outputs


def cumsum(x, dim, exclusive=False):
  """Running sum along `dim` in O(n) (mtf.cumsum builds an n x n mask); `dim` stays whole."""
  axis = x.shape.dims.index(dim)
  return mtf.slicewise(lambda t: tf.math.cumsum(t, axis=axis, exclusive=exclusive), [x],
                       splittable_dims=[d for d in x.shape.dims if d != dim],
                       grad_function=_grad_of_slices, name="cumsum")


# Single-kernel replacements for three mtf composites that dominated a CPU training step's
# non-matmul time (bench/RESULTS.md, "Where the time goes"): the token embedding, the loss
# and the attention softmax. Each computes what the mtf op it replaces computes, also with the
# vocabulary split over the mesh (tests/test_ops.py).


def _mesh_axis(mesh_impl, dim):
  return mesh_impl.tensor_dimension_to_mesh_axis(dim)


def _split_axes(mesh_impl, shape):
  return [a for a in mesh_impl.tensor_layout(shape).tensor_axis_to_mesh_axis if a is not None]


def _vocab_offset(mesh_impl, vocab_dim):
  """Each slice's first vocabulary id (a LaidOutTensor of int32 scalars); 0 if unsplit."""
  axis = _mesh_axis(mesh_impl, vocab_dim)
  if axis is None:
    return mesh_impl.slicewise(lambda _: tf.constant(0, tf.int32), mesh_impl.laid_out_pnum())
  local = vocab_dim.size // mesh_impl.shape[axis].size
  return mesh_impl.slicewise(lambda c: tf.cast(c, tf.int32) * local,
                             mesh_impl.laid_out_pcoord(axis))


def _local_ids(ids, start, local_size):
  """(ids - start, or 0 where outside [0, local_size): a safe index; which ids are inside)."""
  local = ids - start
  inside = tf.logical_and(local >= 0, local < local_size)
  return tf.where(inside, local, tf.zeros_like(local)), inside


def _check_vocab_not_shared(mesh_impl, ids, vocab_dim, op_name):
  """A slice's allreduce over the vocab axis must not mix different ids' slices."""
  axis = _mesh_axis(mesh_impl, vocab_dim)
  if axis is not None and axis in _split_axes(mesh_impl, ids.shape):
    raise UserError(f"{op_name}: the layout puts {vocab_dim.name} on the same mesh axis as a "
                    f"dimension of {ids.shape}; split them over different mesh axes")


class _EmbeddingLookup(mtf.Operation):
  """weights[ids] by tf.gather; the gradient is an unsorted_segment_sum of the output's."""

  def __init__(self, weights, ids, vocab_dim):
    super().__init__([weights, ids], name="embedding_lookup")
    if weights.shape.dims[0] != vocab_dim or not ids.dtype.is_integer:
      raise ValueError(f"embedding_lookup wants weights [{vocab_dim.name}, ...] and integer "
                       f"ids; got {weights.shape} and {ids.dtype.name} ids")
    self._vocab_dim = vocab_dim
    self._outputs = [mtf.Tensor(self, mtf.Shape(ids.shape.dims + weights.shape.dims[1:]),
                                weights.dtype)]

  def gradient(self, grad_ys):
    weights, ids = self.inputs
    return [_EmbeddingGrad(grad_ys[0], ids, weights.shape, self._vocab_dim).outputs[0], None]

  def lower(self, lowering):
    mesh_impl = lowering.mesh_impl(self)
    weights, ids = self.inputs
    _check_vocab_not_shared(mesh_impl, ids, self._vocab_dim, "embedding_lookup")

    def lookup(w, i, start):
      # A dense read first: tf.gather straight on a resource variable (a one-device slice)
      # would switch it to copy-on-read, and every later read of it (the tied unembedding)
      # would copy the whole table.
      w = tf.convert_to_tensor(w)
      # rows outside this slice (or the vocabulary) are zero, as in mtf.gather's one-hot
      local, inside = _local_ids(i, start, tf.shape(w)[0])
      return tf.gather(w, local) * tf.cast(inside, w.dtype)[..., None]

    y = mesh_impl.slicewise(lookup, lowering.tensors[weights], lowering.tensors[ids],
                            _vocab_offset(mesh_impl, self._vocab_dim))
    axis = _mesh_axis(mesh_impl, self._vocab_dim)
    if axis is not None:  # each id's row lives in one slice, zeros in the others
      y = mesh_impl.allreduce(y, [axis], "SUM")
    lowering.set_tensor_lowering(self.outputs[0], y)


class _EmbeddingGrad(mtf.Operation):
  """d weights: the output gradient's rows summed into the rows of their ids."""

  def __init__(self, dy, ids, weights_shape, vocab_dim):
    super().__init__([dy, ids], name="embedding_lookup_grad")
    self._vocab_dim = vocab_dim
    self._outputs = [mtf.Tensor(self, weights_shape, dy.dtype)]

  def lower(self, lowering):
    mesh_impl = lowering.mesh_impl(self)
    dy, ids = self.inputs
    local_vocab = mesh_impl.slice_shape(self.outputs[0].shape)[0]

    def segment_sum(d, i, start):
      local, inside = _local_ids(tf.reshape(i, [-1]), start, local_vocab)
      segments = tf.where(inside, local, -tf.ones_like(local))  # -1: dropped by the sum
      rows = tf.reshape(d, [-1] + d.shape.as_list()[i.shape.ndims:])
      return tf.math.unsorted_segment_sum(rows, segments, local_vocab)

    grad = mesh_impl.slicewise(segment_sum, lowering.tensors[dy], lowering.tensors[ids],
                               _vocab_offset(mesh_impl, self._vocab_dim))
    batch_axes = _split_axes(mesh_impl, ids.shape)  # each slice saw part of the ids: sum them
    if batch_axes:
      grad = mesh_impl.allreduce(grad, batch_axes, "SUM")
    lowering.set_tensor_lowering(self.outputs[0], grad)


def embedding_lookup(weights, ids, vocab_dim):
  """Rows of `weights` [vocab, ...] at integer `ids`: [*ids.shape, ...], = mtf.gather.

  An id outside [0, vocab) gets a zero row and passes no gradient (mtf.gather's one-hot
  of it is all zeros), on every layout.
  """
  return _EmbeddingLookup(weights, ids, vocab_dim).outputs[0]


_TINY = 1e-37  # -log of it caps the loss of a target whose probability underflows at ~85


class _SoftmaxCrossEntropy(mtf.Operation):
  """-log softmax(logits)[targets] over `vocab_dim`; the softmax is kept for the backward."""

  def __init__(self, logits, targets, vocab_dim):
    super().__init__([logits, targets], name="softmax_cross_entropy")
    if (logits.shape.dims[-1] != vocab_dim or targets.shape.dims != logits.shape.dims[:-1]
        or not targets.dtype.is_integer):
      raise ValueError(f"softmax_cross_entropy wants logits [..., {vocab_dim.name}] and integer "
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
    axis = _mesh_axis(mesh_impl, self._vocab_dim)
    laid_logits, laid_targets = lowering.tensors[logits], lowering.tensors[targets]
    if axis is None:
      probs = mesh_impl.slicewise(tf.nn.softmax, laid_logits)  # one oneDNN kernel
    else:
      probs = self._split_softmax(mesh_impl, laid_logits, axis)

    def target_prob(p, t, start):
      local, inside = _local_ids(t, start, tf.shape(p)[-1])
      got = tf.gather(p, local[..., None], batch_dims=t.shape.ndims)[..., 0]
      return got * tf.cast(inside, p.dtype)

    p_target = mesh_impl.slicewise(target_prob, probs, laid_targets,
                                   _vocab_offset(mesh_impl, self._vocab_dim))
    if axis is not None:  # the target's probability is in one slice, zeros in the others
      p_target = mesh_impl.allreduce(p_target, [axis], "SUM")
    vocab_size = self._vocab_dim.size

    def nll(p, t):  # 0 for a target outside the vocabulary, as mtf's all-zero one-hot gives
      valid = tf.logical_and(t >= 0, t < vocab_size)
      return tf.where(valid, -tf.math.log(tf.maximum(p, _TINY)), tf.zeros_like(p))

    lowering.set_tensor_lowering(self.outputs[0], mesh_impl.slicewise(nll, p_target,
                                                                      laid_targets))
    lowering.set_tensor_lowering(self.outputs[1], probs)

  @staticmethod
  def _split_softmax(mesh_impl, laid_logits, axis):
    """Softmax over a vocabulary split along mesh `axis`: global max and sum by allreduce."""
    m = mesh_impl.allreduce(mesh_impl.slicewise(
        lambda x: tf.stop_gradient(tf.reduce_max(x, -1)), laid_logits), [axis], "MAX")
    e = mesh_impl.slicewise(lambda x, mx: tf.exp(x - mx[..., None]), laid_logits, m)
    s = mesh_impl.allreduce(mesh_impl.slicewise(lambda x: tf.reduce_sum(x, -1), e), [axis],
                            "SUM")
    return mesh_impl.slicewise(lambda x, sx: x / sx[..., None], e, s)


class _SoftmaxCrossEntropyGrad(mtf.Operation):
  """(softmax - one_hot(targets)) * dy, without materializing the one-hot."""

  def __init__(self, probs, targets, dy, vocab_dim):
    super().__init__([probs, targets, dy], name="softmax_cross_entropy_grad")
    self._vocab_dim = vocab_dim
    self._outputs = [mtf.Tensor(self, probs.shape, probs.dtype)]

  def lower(self, lowering):
    mesh_impl = lowering.mesh_impl(self)
    vocab_size = self._vocab_dim.size

    def fn(p, t, d, start):
      d = d * tf.cast(tf.logical_and(t >= 0, t < vocab_size), d.dtype)  # no loss, no gradient
      v = p.shape.as_list()[-1]
      g = tf.reshape(p * d[..., None], [-1, v])
      local, inside = _local_ids(tf.reshape(t, [-1]), start, v)
      index = tf.stack([tf.range(tf.shape(g)[0]), local], 1)
      g = tf.tensor_scatter_nd_sub(g, index, tf.reshape(d, [-1]) * tf.cast(inside, g.dtype))
      return tf.reshape(g, tf.shape(p))

    inputs = [lowering.tensors[x] for x in self.inputs]
    lowering.set_tensor_lowering(self.outputs[0], mesh_impl.slicewise(
        fn, *inputs, _vocab_offset(mesh_impl, self._vocab_dim)))


def softmax_cross_entropy(logits, targets, vocab_dim):
  """Per-position -log softmax(logits)[targets], = mtf.layers.softmax_cross_entropy_with_logits.

  `vocab_dim` must be the last dimension of `logits`; it may be split over the mesh. A target
  outside [0, vocab) gives loss 0 and no gradient (mtf's one-hot of it is all zeros). A loss
  is capped at -log(1e-37) ~ 85 where the target's probability underflows.
  """
  return _SoftmaxCrossEntropy(logits, targets, vocab_dim).outputs[0]


class _Softmax(mtf.SlicewiseOperation):
  """tf.nn.softmax on each slice; TF's own gradient (through _GradOfSlices)."""

  def __init__(self, x, dim):
    axis = x.shape.dims.index(dim)
    super().__init__(lambda t: tf.nn.softmax(t, axis=axis), [x], [x.shape], [x.dtype],
                     [d for d in x.shape.dims if d != dim], grad_function=_grad_of_slices,
                     name="softmax")
    self._dim = dim

  def lower(self, lowering):
    # mtf's own check of this fails formatting its message (a TypeError): say it plainly
    if lowering.mesh_impl(self).tensor_dimension_to_mesh_axis(self._dim) is not None:
      raise UserError(f"softmax over {self._dim.name}, which the layout splits over the "
                      f"mesh; keep {self._dim.name} out of the layout")
    super().lower(lowering)


def softmax(x, dim):
  """mtf.softmax(x, dim) as one TF (oneDNN) kernel; `dim` must not be split over the mesh."""
  return _Softmax(x, dim).outputs[0]
