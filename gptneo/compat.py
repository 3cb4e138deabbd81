"""The one place that knows mesh-tensorflow 0.1.21 needs help on current TensorFlow.

mesh-tensorflow was last released for TF 2.x with `tf.compat.v1.estimator`; on TF >= 2.16
that module is gone and `register_tensor_conversion_function` moved out of `framework.ops`.
mtf uses only `SessionRunHook` and `CheckpointSaverListener` from the estimator, both of
which live on in `tf.compat.v1.train`. Import mtf from here, never directly:

    from gptneo.compat import mtf, tf
"""
import sys
import types

import tensorflow.compat.v1 as tf
from tensorflow.python.framework import ops as _tf_ops
from tensorflow.python.framework import tensor_conversion_registry as _registry
from tensorflow.python.util import deprecation as _deprecation


def _install_estimator_shim():
  """Exposes the two estimator classes mtf imports as `tf.compat.v1.estimator`."""
  if "estimator" in vars(tf):
    return
  shim = types.ModuleType("tensorflow.compat.v1.estimator")
  shim.SessionRunHook = tf.train.SessionRunHook
  shim.CheckpointSaverListener = tf.train.CheckpointSaverListener
  sys.modules[shim.__name__] = shim
  tf.estimator = shim


def _install_conversion_registry_alias():
  if not hasattr(_tf_ops, "register_tensor_conversion_function"):
    _tf_ops.register_tensor_conversion_function = _registry.register_tensor_conversion_function


_install_estimator_shim()
_install_conversion_registry_alias()
# Graph mode and the tf.compat.v1 Saver are this project's choice; TF's reminders that they
# are deprecated would bury our own logs.
_deprecation._PRINT_DEPRECATION_WARNINGS = False  # pylint: disable=protected-access
# No tf.disable_eager_execution() here: importing gptneo leaves the user's process eager.
# Our entry points switch to graph mode themselves (gin_utils.graph_mode).

import mesh_tensorflow as mtf  # noqa: E402  pylint: disable=g-import-not-at-top


def _generic_grad_lower(self, lowering):
  """mtf's GenericGradOperation.lower, reading its inputs as laid-out tensors.

  mtf 0.1.21 reads `.tensor_list` of each lowered input, which a LazyAllreduceSum (an
  einsum's partial sums, all-reduced only when read) doesn't have: the backward pass of a
  model whose `embd` is split failed to lower ("'LazyAllreduceSum' object has no attribute
  'tensor_list'"). to_laid_out_tensor() does the pending all-reduce first.

  Each slice's gradient ops are colocated with its forward ops: mtf places them nowhere, so
  on a placement mesh every device's backward of an mtf.cwise (gelu's, softmax's) ran on the
  first device, which kept their inputs for all devices (bench/RESULTS.md, memory section).
  """
  def slices(tensors):
    return mtf.transpose_list_of_lists(
        [lowering.tensors[t].to_laid_out_tensor().tensor_list for t in tensors])

  all_ys, all_xs = slices(self._forward_op.outputs), slices(self._forward_op.inputs)
  all_grad_ys = slices(self._grad_ys)
  all_grad_xs = [tf.gradients(ys=ys, xs=xs, grad_ys=grad_ys, colocate_gradients_with_ops=True,
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
                 for ys, xs, grad_ys in zip(all_ys, all_xs, all_grad_ys, strict=True)]
  mesh_impl = lowering.mesh_impl(self)
  for out, grad_x in zip(self.outputs, mtf.transpose_list_of_lists(all_grad_xs),
                         strict=True):
    lowering.set_tensor_lowering(out, mesh_impl.LaidOutTensor.from_tensor_list(grad_x))


mtf.GenericGradOperation.lower = _generic_grad_lower


def _reduce_scatter(xs, devices, axis):
  """Each device's partial sums split in len(devices) pieces along `axis`; device i gets the
  sum of everyone's piece i. Each device receives n - 1 pieces of 1/n: half an all-reduce."""
  pieces = []
  for x, device in zip(xs, devices, strict=True):
    with tf.device(device):
      pieces.append(tf.split(x, len(devices), axis=axis))
  sums = []
  for i, device in enumerate(devices):
    with tf.device(device):
      sums.append(tf.add_n([piece[i] for piece in pieces]))
  return sums


def _scattered_rename(op, lowering):
  """The lowering of a rename that newly splits a dimension, of partial sums, as a
  reduce-scatter (then an all-reduce over the sums' other mesh axes), or None if `op` is
  not that (then mtf's lowering: all-reduce, then slice).

  An fsdp weight's gradient is this rename ("embd" -> "embd_fsdp", the gathered weight's
  gradient, still a LazyAllreduceSum over the batch's mesh axis, to its stored shard).
  """
  mesh_impl, x = lowering.mesh_impl(op), lowering.tensors[op.inputs[0]]
  old, new = op.inputs[0].shape, op.outputs[0].shape
  if (not isinstance(mesh_impl, mtf.placement_mesh_impl.PlacementMeshImpl)
      or not isinstance(x, mtf.LazyAllreduceSum) or old.to_integer_list != new.to_integer_list):
    return None
  split = []
  for axis, (before, after) in enumerate(zip(mesh_impl.mesh_axis_to_cumprod(old),
                                             mesh_impl.mesh_axis_to_cumprod(new),
                                             strict=True)):
    if before == after:
      continue
    if before is not None or axis not in x.mesh_axes:
      return None
    split.append((axis, new.cumprod_to_tensor_axis(after)))
  if not split:
    return None
  laid_out = x.laid_out_input
  for axis, tensor_axis in split:
    laid_out = mesh_impl._collective_with_groups(  # pylint: disable=protected-access
        laid_out, [axis], lambda xs, devices, t=tensor_axis: _reduce_scatter(xs, devices, t))
  rest = [axis for axis in x.mesh_axes if axis not in dict(split)]
  return mesh_impl.allreduce(laid_out, rest, "SUM") if rest else laid_out


_reshape_lower = mtf.ReshapeOperation.lower


def _reshape_lower_scattering(self, lowering):
  """mtf's ReshapeOperation.lower, but a reduce-scatter where _scattered_rename applies."""
  scattered = _scattered_rename(self, lowering)
  if scattered is None:
    _reshape_lower(self, lowering)
  else:
    lowering.set_tensor_lowering(self.outputs[0], scattered)


mtf.ReshapeOperation.lower = _reshape_lower_scattering

__all__ = ["mtf", "tf"]
