"""Optimizers, schedule, clipping, accumulation and bf16 do what they promise."""
import math

import numpy as np
import pytest

from gptneo import gin_utils
from gptneo import mesh as mesh_lib
from gptneo import runtime
from gptneo import train_graph
from gptneo.compat import mtf, tf
from gptneo.model import gpt as gpt_lib
from gptneo.optim import optimizers
from tests import test_tpu
from tests.test_layout_search import build_graph
from tests.test_train import logged_losses, train_in_process


def schedule_values(steps, **kwargs):
  with tf.Graph().as_default():
    step = tf.placeholder(tf.int64, [])
    lr = optimizers.learning_rate_schedule(step, total_steps=100, learning_rate=1.0, **kwargs)
    with tf.Session() as session:
      return [session.run(lr, {step: s}) for s in steps]


def test_warmup_then_cosine_to_the_floor():
  values = schedule_values([0, 9, 10, 55, 100, 150], warmup_steps=10, min_ratio=0.1)
  np.testing.assert_allclose(values, [0.1, 1.0, 1.0, 0.55, 0.1, 0.1], atol=1e-6)


def test_linear_decay():
  values = schedule_values([0, 50, 100], decay="linear", min_ratio=0.0)
  np.testing.assert_allclose(values, [1.0, 0.5, 0.0], atol=1e-6)


def run_mtf(build):
  """Builds with `build(mesh)` -> dict of mtf tensors/ops, lowers on one CPU, runs once."""
  with tf.Graph().as_default():
    mtf_graph, mesh = runtime.new_mesh()
    return lower_and_run(mtf_graph, mesh, build(mesh))


def lower_and_run(mtf_graph, mesh, outputs):
  """Lowers `mtf_graph` (built in the default graph) on one CPU; runs `outputs` once."""
  impl = mtf.placement_mesh_impl.PlacementMeshImpl(mtf.Shape([]), mtf.LayoutRules([]),
                                                   ["/cpu:0"])
  lowering = mtf.Lowering(mtf_graph, {mesh: impl})
  fetches = {k: lowering.export_to_tf_tensor(v) for k, v in outputs.items()}
  with tf.Session() as session:
    session.run(tf.global_variables_initializer())
    session.run(lowering.copy_masters_to_slices())
    return session.run(fetches)


def test_clip_by_global_norm():
  def build(mesh):
    dim = mtf.Dimension("d", 2)
    grads = [mtf.constant(mesh, np.array([3.0, 0.0], np.float32), [dim]),
             mtf.constant(mesh, np.array([0.0, 4.0], np.float32), [dim])]
    norm = optimizers.global_norm(grads)
    clipped = optimizers.clip_by_global_norm(grads, norm, clip_norm=1.0)
    return {"norm": norm, "a": clipped[0], "b": clipped[1]}
  result = run_mtf(build)
  assert result["norm"] == pytest.approx(5.0)
  np.testing.assert_allclose(result["a"] + result["b"], [0.6, 0.8], rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_adam_weight_decay_skips_norms_and_biases(fused):
  def build(mesh):
    rows, cols = mtf.Dimension("rows", 2), mtf.Dimension("cols", 3)
    matrix = mtf.get_variable(mesh, "w", [rows, cols], initializer=tf.ones_initializer())
    bias = mtf.get_variable(mesh, "b", [cols], initializer=tf.ones_initializer())
    variables = mesh.graph.trainable_variables
    adam = optimizers.Adam(weight_decay=0.5, fused=fused)
    zero_grads = [mtf.zeros_like(v.outputs[0]) for v in variables]
    updates = adam.apply_grads(zero_grads, variables, mtf.constant(mesh, 0.1),
                               mtf.constant(mesh, 1.0))
    return {"matrix": mtf.depend(matrix, updates), "bias": mtf.depend(bias, updates)}
  result = run_mtf(build)
  np.testing.assert_allclose(result["matrix"], np.full([2, 3], 1 - 0.1 * 0.5), rtol=1e-6)
  np.testing.assert_allclose(result["bias"], np.ones([3]), rtol=1e-6)


@pytest.mark.parametrize("optimizer", [
    optimizers.Adam(), optimizers.Adafactor(), optimizers.Adafactor(beta1=0.9),
    optimizers.Adafactor(factored=False)], ids=["adam", "adafactor", "beta1", "unfactored"])
def test_slot_shapes_are_the_slots_apply_grad_makes(optimizer):
  """What the layout search costs as optimizer state is what the optimizer allocates."""
  shapes = [(("rows", 256), ("cols", 512)), (("cols", 512),),
            (("embd", 256), ("heads", 4), ("kv", 128)), (("embd", 256), ("heads", 4), ("kv", 8))]
  with tf.Graph().as_default():
    _, mesh = runtime.new_mesh()
    for index, shape in enumerate(shapes):
      dims = [mtf.Dimension(name, size) for name, size in shape]
      var = mtf.get_variable(mesh, f"w{index}", dims, initializer=tf.ones_initializer())
      before = set(mesh.graph.all_variables)
      optimizer.apply_grads([mtf.zeros_like(var)], [mesh.graph.trainable_variables[-1]],
                            mtf.constant(mesh, 0.1), mtf.constant(mesh, 1.0))
      made = [v for v in mesh.graph.all_variables if v not in before]
      assert sorted(tuple((d.name, d.size) for d in v.shape.dims) for v in made) == sorted(
          optimizer.slot_shapes(shape)), shape


@pytest.mark.parametrize("optimizer", [
    optimizers.Adam(weight_decay=0.0), optimizers.Adam(weight_decay=0.0, fused=False),
    optimizers.Adafactor()], ids=["fused-adam", "adam", "adafactor"])
def test_one_optimizer_serves_two_graphs_each_with_its_own_learning_rate(optimizer):
  """The gin-built object keeps no graph's tensors: both graphs are built before either is
  lowered, and each update moves the weight by its own learning rate (a first step of Adam,
  or of Adafactor, moves every weight by the learning rate times the gradient's sign)."""
  def build(learning_rate):
    graph = tf.Graph()
    with graph.as_default():
      mtf_graph, mesh = runtime.new_mesh()
      dims = [mtf.Dimension("rows", 2), mtf.Dimension("cols", 3)]
      weight = mtf.get_variable(mesh, "w", dims, initializer=tf.ones_initializer())
      updates = optimizer.apply_grads([mtf.constant(mesh, 1.0, dims)],
                                      mtf_graph.trainable_variables,
                                      mtf.constant(mesh, learning_rate), mtf.constant(mesh, 1.0))
      return graph, mtf_graph, mesh, {"w": mtf.depend(weight, updates)}

  def run(graph, mtf_graph, mesh, outputs):
    with graph.as_default():
      return lower_and_run(mtf_graph, mesh, outputs)["w"]

  first, second = build(0.1), build(0.5)
  assert not [name for name, value in vars(optimizer).items() if isinstance(value, mtf.Tensor)]
  np.testing.assert_allclose(run(*second), np.full([2, 3], 0.5), rtol=1e-5)
  np.testing.assert_allclose(run(*first), np.full([2, 3], 0.9), rtol=1e-5)


@pytest.mark.parametrize("optimizer", [
    optimizers.Adam(), optimizers.Adam(fused=False), optimizers.Adafactor(beta1=0.9)],
    ids=["fused-adam", "adam", "adafactor"])
def test_skip_guard_keeps_weights_and_slots_on_a_nonfinite_step(optimizer):
  """train.on_nonfinite = "skip" guards every optimizer's writes (Adafactor's weight update is
  an mtf.assign_sub, Adam's assigns or a fused kernel): a step whose loss is NaN leaves the
  weight and every slot bit for bit, a finite one moves them all."""
  with tf.Graph().as_default():
    mtf_graph, mesh = runtime.new_mesh()
    dims = [mtf.Dimension("rows", 2), mtf.Dimension("cols", 3)]
    mtf.get_variable(mesh, "w", dims, initializer=tf.ones_initializer())
    loss = tf.placeholder(tf.float32, [])
    updates = train_graph.skip_unless_finite(optimizer.apply_grads(
        [mtf.constant(mesh, 1.0, dims)], mtf_graph.trainable_variables, mtf.constant(mesh, 0.1),
        mtf.constant(mesh, 1.0)), [mtf.import_fully_replicated(mesh, loss, [], "loss")])
    impl = mtf.placement_mesh_impl.PlacementMeshImpl(mtf.Shape([]), mtf.LayoutRules([]),
                                                     ["/cpu:0"])
    lowering = mtf.Lowering(mtf_graph, {mesh: impl})
    update = tf.group([lowering.lowered_operation(op) for op in updates])
    values = {v.name: lowering.export_to_tf_tensor(v.outputs[0])
              for v in mtf_graph.all_variables}
    with tf.Session() as session:
      session.run(tf.global_variables_initializer())
      session.run(lowering.copy_masters_to_slices())
      history = [session.run(values)]
      for step_loss in (1.0, float("nan")):
        session.run(update, {loss: step_loss})
        history.append(session.run(values))
  assert len(history[0]) > 1  # the weight and its slots
  for name, before in history[0].items():
    assert not np.array_equal(history[1][name], before), f"{name}: the finite step kept it"
    np.testing.assert_array_equal(history[2][name], history[1][name], err_msg=name)


def test_microbatches_give_the_full_batch_losses(tmp_path, small_dataset):
  train_in_process(tmp_path / "one", small_dataset, 4)
  train_in_process(tmp_path / "two", small_dataset, 4, "train.microbatches_per_batch = 2")
  one, two = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "two")
  np.testing.assert_allclose([two[s] for s in range(1, 5)], [one[s] for s in range(1, 5)],
                             atol=1e-5)


@pytest.mark.parametrize("bindings", [
    ["train.optimizer = @Adafactor()", "learning_rate_schedule.learning_rate = 1e-2"],
    ['train.precision = "bfloat16"'],
    ["GPT.activation = @relu", "GPT.tie_embeddings = False"],
], ids=["adafactor", "bfloat16", "relu-untied"])
def test_variant_trains_with_falling_loss(tmp_path, small_dataset, bindings):
  train_in_process(tmp_path / "run", small_dataset, 30, *bindings)
  losses = logged_losses(tmp_path / "run")
  assert all(math.isfinite(v) for v in losses.values())
  assert np.mean([losses[s] for s in range(26, 31)]) < losses[1] - 0.7


WRITES = ("Assign", "ResourceApply")  # AssignVariableOp, AssignAddVariableOp, ResourceApplyAdam


def ancestors(ops):
  """Every op that runs before all of `ops` (data and control inputs, transitively), and them."""
  seen, todo = set(), list(ops)
  while todo:
    op = todo.pop()
    if op not in seen:
      seen.add(op)
      todo.extend([t.op for t in op.inputs] + list(op.control_inputs))
  return seen


@pytest.mark.parametrize("clip_norm", [0.0, 1.0], ids=["no clip", "clip"])
@pytest.mark.parametrize("mesh_shape, layout, fused", [
    ("", "", True), ("x:2", "heads:x,mlp:x,vocab:x", True), ("x:2", "batch:x", False)],
    ids=["1 device", "2 heads,mlp,vocab", "2 data, mtf adam"])
def test_every_update_runs_after_every_read_of_its_variable_and_the_loss(
    tmp_path, small_dataset, clip_norm, mesh_shape, layout, fused):
  """Each write of a step (an assign, ResourceApplyAdam, the step's increment) depends on the
  loss and on every ReadVariableOp of its variable in the step, with or without clipping.

  mtf reads a weight again in the backward pass (each einsum's gradient converts the variable
  anew), a read no gradient of the weight itself waits for: an update that ran first would give
  other weights' gradients from the updated weight. Structural: TF's executor runs those reads
  at the start of the step, so no run has been seen to differ (clip 0 against a clip of 1e30,
  10 steps on 2 devices, 3 runs: equal losses), but without clipping nothing ordered them
  (train_graph.lower_step; the clip's norm waits for every gradient).
  """
  gin_utils.parse([], [f"train.clip_norm = {clip_norm}", f"Adam.fused = {fused}"])
  built = build_graph(gpt_lib.GPT(**test_tpu.MODEL), mesh_lib.mesh(mesh_shape=mesh_shape,
                                                                   layout=layout),
                      small_dataset, str(tmp_path))
  step = ancestors([built.train_op])
  writes = sorted((op for op in step if op.type.startswith(WRITES)), key=lambda op: op.name)
  assert {op.type for op in writes} == (
      {"ResourceApplyAdam", "AssignVariableOp", "AssignAddVariableOp"} if fused else
      {"AssignVariableOp", "AssignAddVariableOp"})
  unordered, before_loss, backward_reads = [], [], 0
  for write in writes:
    before = ancestors([write])
    for handle in [t for t in write.inputs if t.dtype == tf.resource]:
      reads = [op for op in handle.consumers() if op.type == "ReadVariableOp" and op in step]
      unordered += [(write.name, op.name) for op in reads if op not in before]
      backward_reads += sum("gradients" in op.name for op in reads)
    if built.loss.op not in before:
      before_loss.append(write.name)
  assert backward_reads  # the backward pass's own reads were among those checked
  assert not unordered, (f"{len(dict(unordered))} of {len(writes)} writes may run before a read "
                         f"of their variable: {unordered[:3]}")
  assert not before_loss, f"{len(before_loss)} of {len(writes)} writes may run before the loss"
