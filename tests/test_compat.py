"""mesh-tensorflow imports and runs on current TF through gptneo.compat."""
import numpy as np

from gptneo.compat import mtf, tf


def test_estimator_shim_has_what_mtf_needs():
  assert tf.estimator.SessionRunHook is tf.train.SessionRunHook
  assert tf.estimator.CheckpointSaverListener is tf.train.CheckpointSaverListener
  assert issubclass(mtf.MtfRestoreHook, tf.train.SessionRunHook)


def test_mtf_einsum_on_a_two_device_placement_mesh():
  graph = tf.Graph()
  with graph.as_default():
    mtf_graph = mtf.Graph()
    mesh = mtf.Mesh(mtf_graph, "mesh")
    rows, inner, cols = mtf.Dimension("rows", 4), mtf.Dimension("inner", 6), mtf.Dimension(
        "cols", 2)
    a_value = np.arange(24, dtype=np.float32).reshape(4, 6)
    b_value = np.ones([6, 2], np.float32)
    a = mtf.import_tf_tensor(mesh, tf.constant(a_value), [rows, inner])
    b = mtf.import_tf_tensor(mesh, tf.constant(b_value), [inner, cols])
    product = mtf.einsum([a, b], [rows, cols])
    impl = mtf.placement_mesh_impl.PlacementMeshImpl(
        mtf.Shape([mtf.Dimension("x", 2)]), mtf.LayoutRules([("inner", "x")]),
        ["/cpu:0", "/cpu:1"])
    lowering = mtf.Lowering(mtf_graph, {mesh: impl})
    result = lowering.export_to_tf_tensor(product)
    with tf.Session(config=tf.ConfigProto(device_count={"CPU": 2})) as session:
      np.testing.assert_allclose(session.run(result), a_value @ b_value)


def test_generic_gradients_run_on_their_slices_device():
  """The backward of an mtf.cwise (gelu's) runs where its slice is: mtf placed it nowhere, so
  every slice's ran on the first device, which kept all of their inputs (bench/RESULTS.md)."""
  from gptneo.model import ops  # pylint: disable=g-import-not-at-top
  graph = tf.Graph()
  with graph.as_default():
    mtf_graph = mtf.Graph()
    mesh = mtf.Mesh(mtf_graph, "mesh")
    rows, cols = mtf.Dimension("rows", 4), mtf.Dimension("cols", 3)
    x = mtf.import_tf_tensor(mesh, tf.ones([4, 3]), [rows, cols])
    [grad] = mtf.gradients([mtf.reduce_sum(ops.gelu_tanh(x))], [x])
    impl = mtf.placement_mesh_impl.PlacementMeshImpl(
        mtf.Shape([mtf.Dimension("x", 2)]), mtf.LayoutRules([("rows", "x")]),
        ["/cpu:0", "/cpu:1"])
    lowering = mtf.Lowering(mtf_graph, {mesh: impl})
    lowering.export_to_tf_tensor(grad)
  placed = {op.name: op.device for op in graph.get_operations() if "/generic_grad/" in op.name}
  for slice_index in (0, 1):
    scope = "/generic_grad/gradients/" if slice_index == 0 else "/generic_grad/gradients_1/"
    devices = {device for name, device in placed.items() if scope in name}
    assert devices == {f"/device:CPU:{slice_index}"}, (scope, devices)
