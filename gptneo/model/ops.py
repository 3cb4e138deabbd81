"""Small mtf building blocks the GPT is written with: activations, layer norm, dropout, dense."""
import math

import gin
from tensorflow import nn as tf_nn  # TF2's nn: tf.compat.v1.nn lacks gelu

from gptneo.compat import mtf, tf


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
  return mtf.relu(x)


@gin.register
def selu(x):
  return mtf.cwise(tf_nn.selu, [x], name="selu")


@gin.register
def silu(x):
  """x * sigmoid(x), also called swish."""
  return mtf.cwise(tf_nn.silu, [x], name="silu")


gin.register(silu, "swish")


def layer_norm(x, dim, epsilon, dtype, name):
  """Normalizes `x` over `dim`, then applies a learned gain `g` and bias `b`."""
  with tf.variable_scope(name):
    gain = mtf.get_variable(x.mesh, "g", [dim], initializer=tf.ones_initializer(), dtype=dtype)
    bias = mtf.get_variable(x.mesh, "b", [dim], initializer=tf.zeros_initializer(), dtype=dtype)
  centered = x - mtf.reduce_mean(x, reduced_dim=dim)
  variance = mtf.reduce_mean(mtf.square(centered), reduced_dim=dim)
  return centered * mtf.rsqrt(variance + epsilon) * gain + bias


def dense(x, reduced_dims, new_dims, std, dtype, name, use_bias=True):
  """x @ w (+ b), with `w` of shape reduced_dims + new_dims drawn from N(0, std)."""
  with tf.variable_scope(name):
    w = mtf.get_variable(x.mesh, "w", reduced_dims + new_dims, dtype=dtype,
                         initializer=tf.random_normal_initializer(stddev=std))
    output_shape = [d for d in x.shape.dims if d not in reduced_dims] + new_dims
    y = mtf.einsum([x, w], output_shape=output_shape)
    if use_bias:
      y += mtf.get_variable(x.mesh, "b", new_dims, dtype=dtype,
                            initializer=tf.zeros_initializer())
  return y


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


def cumsum(x, dim, exclusive=False):
  """Running sum along `dim` in O(n) (mtf.cumsum builds an n x n mask); `dim` stays whole."""
  axis = x.shape.dims.index(dim)
  return mtf.slicewise(lambda t: tf.math.cumsum(t, axis=axis, exclusive=exclusive), [x],
                       splittable_dims=[d for d in x.shape.dims if d != dim], name="cumsum")
