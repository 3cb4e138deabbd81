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
  """
  def slices(tensors):
    return mtf.transpose_list_of_lists(
        [lowering.tensors[t].to_laid_out_tensor().tensor_list for t in tensors])

  all_ys, all_xs = slices(self._forward_op.outputs), slices(self._forward_op.inputs)
  all_grad_ys = slices(self._grad_ys)
  all_grad_xs = [tf.gradients(ys=ys, xs=xs, grad_ys=grad_ys,
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
                 for ys, xs, grad_ys in zip(all_ys, all_xs, all_grad_ys)]
  mesh_impl = lowering.mesh_impl(self)
  for out, grad_x in zip(self.outputs, mtf.transpose_list_of_lists(all_grad_xs)):
    lowering.set_tensor_lowering(out, mesh_impl.LaidOutTensor.from_tensor_list(grad_x))


mtf.GenericGradOperation.lower = _generic_grad_lower

__all__ = ["mtf", "tf"]
