"""Every split of the mesh computes the same model: losses, gradients and weights match one device.

Each case builds the training graph by hand (fixed tokens, dropout off, plain SGD so a
gradient's rounding noise is not amplified by Adam's normalisation), lowers it onto a CPU
mesh of 2, 4 or 8 devices and compares it with the single-device run. Every write waits for
the loss and every gradient (train_graph.lower_step, as the trainer), so each run is
bitwise reproducible, also under load; what differs between meshes is only the order in
which float32 sums are taken (all-reduces, sliced matmuls). So the bounds are relative to
the arithmetic (seen on all 13 cases: at most 1 rounding of the loss, 1.2e-6 of a
gradient's scale, 2.8e-8 on a weight):
- the loss at each step: rtol n * 2^-24 = 7.6e-6, n = 128 the positions averaged;
- each gradient at each step: 4n roundings (3.1e-5) of that tensor's largest |element| at
  that step, as the positions' terms may cancel (the former fixed atol of 1e-5 let the
  layer norms' gradients, 3e-4 to 1e-3, be 1-3% wrong);
- each weight after the 3 steps: what those gradient bounds allow through the updates,
  lr * (sum over the steps of each step's gradient bound), plus one rounding of each
  subtraction on either side.
A gradient that skips its all-reduce, a gradient 0.1% off or a weight a tenth of an update
off is caught on every tensor (the tests after test_split_equals_single_device).

The sharded forms (fsdp, zero) and embd splits also run 10 steps of the trainer's own step
(train_graph.mtf_step: 2 microbatches, clipping that acts, fused AdamW, the non-finite guard)
against one device: each step's loss to the same rtol, the weights to a tenth of one Adam
step (long_mismatches says why), and checkpoints written on one sharding resume on another.
"""
import functools
import json
import os
import types

import gin
import numpy as np
import pytest

from gptneo import checkpoints as checkpoints_lib
from gptneo import gin_utils
from gptneo import inference
from gptneo import mesh as mesh_lib
from gptneo import runtime
from gptneo import tpu
from gptneo import train as train_lib
from gptneo import train_graph
from gptneo.compat import mtf, tf
from gptneo.errors import UserError
from gptneo.model import gpt as gpt_lib
from gptneo.model import ops
from gptneo.model import positions as positions_lib
from gptneo.optim import optimizers
from tests.conftest import TINY_TEST_BINDINGS, run_binary
from tests.test_errors import assert_one_line_error

STEPS = 3
LEARNING_RATE = 0.5  # large, so the weights move enough for a wrong split to show
ADAM_LEARNING_RATE = 0.01  # Adam's steps are ~lr per weight whatever the gradient's size
BATCH, N_CTX, VOCAB = 8, 16, 64
# Every split dimension divides by 8: heads 8, mlp 4 * 32 = 128, vocab 64, batch 8.
MODEL = dict(n_layer=2, n_embd=32, n_head=8, n_ctx=N_CTX, n_vocab=VOCAB)

LAYOUTS = {  # case -> (mesh_shape, layout)
    "2 data": ("x:2", "batch:x"),
    "2 heads": ("x:2", "heads:x"),
    "2 mlp": ("x:2", "mlp:x"),
    "2 vocab": ("x:2", "vocab:x"),
    "2 heads,mlp,vocab": ("x:2", "heads:x,mlp:x,vocab:x"),
    "2 kv": ("x:2", "kv:x"),  # q·k reduces a split dim: its gradient arrives all-reduced
    "4 data": ("x:4", "batch:x"),
    "4 heads,mlp,vocab": ("x:4", "heads:x,mlp:x,vocab:x"),
    "4 data x model": ("x:2,y:2", "batch:x,heads:y,mlp:y,vocab:y"),
    "8 data": ("x:8", "batch:x"),
    "8 heads,mlp,vocab": ("x:8", "heads:x,mlp:x,vocab:x"),
    "8 data x model": ("x:2,y:4", "batch:x,heads:y,mlp:y,vocab:y"),
    "8 model x data": ("x:4,y:2", "heads:x,mlp:x,vocab:x,batch:y"),
    # Weights stored split over x (fsdp: gathered where used, gradients sliced), and embd
    # split (its backward pass lowers through compat's GenericGradOperation fix).
    "2 fsdp": ("x:2", "batch:x,fsdp:x"),
    "2 embd": ("x:2", "embd:x"),
    "4 data x embd": ("x:2,y:2", "batch:x,embd:y"),
    "4 data x model, fsdp": ("x:2,y:2", "batch:x,heads:y,mlp:y,fsdp:x"),
    "8 data 2 x model 4, fsdp": ("x:2,y:4", "batch:x,heads:y,mlp:y,fsdp:x"),
}
# The shipped CPU layout files: each must be one of the cases above.
LAYOUT_FILES = ["cpu2_data.gin", "cpu2_heads.gin", "cpu4_data.gin", "cpu4_model.gin",
                "cpu4_data_model.gin", "cpu8_data.gin", "cpu8_model.gin", "cpu8_data_model.gin"]


def train_steps(spec, update="sgd", variant=()):
  """Losses and gradients of every step, and the weights after the last, as numpy.

  `update`: "sgd" (the default, see the module docstring), "adam" (mtf's element-wise Adam)
  or "fused adam" (optimizers.FusedAdamUpdate's one kernel per slice). `variant`: GPT knobs
  beyond MODEL, as (name, value) pairs.
  """
  graph = tf.Graph()
  with graph.as_default():
    tf.set_random_seed(7)
    adam_step = tf.Variable(1.0, trainable=False)
    mtf_graph, mtf_mesh = runtime.new_mesh(spec=spec)
    model = gpt_lib.GPT(**MODEL, **dict(variant))
    dims = model.dims(BATCH)
    windows = np.random.RandomState(0).randint(0, VOCAB, size=(BATCH, N_CTX + 1))
    import_tokens = lambda t, name: mtf.import_tf_tensor(  # noqa: E731
        mtf_mesh, tf.constant(t, tf.int32), [dims.batch, dims.sequence], name=name)
    tokens, targets = import_tokens(windows[:, :-1], "tokens"), import_tokens(windows[:, 1:], "t")
    logits, _ = model(tokens, runtime.variable_dtype("float32"),
                      ops.Dropout(is_training=False, seed=0, step=0))
    loss = gpt_lib.loss(logits, targets, dims.vocab)
    variables = mtf_graph.trainable_variables
    grads = mtf.gradients([loss], [v.outputs[0] for v in variables])
    norm = optimizers.global_norm(grads)  # lower_step exports it: built before the lowering
    if update == "sgd":
      updates = [mtf.assign_sub(v, g * LEARNING_RATE) for v, g in zip(variables, grads, strict=True)]
    else:
      adam = optimizers.Adam(weight_decay=0.1, fused=update == "fused adam")
      updates = adam.apply_grads(
          grads, variables, mtf.constant(mtf_mesh, ADAM_LEARNING_RATE),
          mtf.import_fully_replicated(mtf_mesh, adam_step.read_value(), [], "step"))
    lowering = runtime.lower(mtf_graph, mtf_mesh, spec)
    # The trainer's own ordering: every write waits for the loss and every gradient slice.
    # mtf reads a weight again in the backward pass; an assign that ran before such a read
    # gave the layers below gradients from the updated weight, at random under load (seen:
    # wte, wpe and h0 off by up to 1.6e-4 between two runs of "8 model x data").
    step = train_graph.lower_step(lowering, train_graph.MtfStep(
        {"loss": loss}, norm, None, updates, grads))
    tf_loss = step.loss
    tf_grads = {v.name: lowering.export_to_tf_tensor(g) for v, g in zip(variables, grads, strict=True)}
    tf_weights = {v.name: lowering.export_to_tf_tensor(v.outputs[0]) for v in variables}
    with tf.control_dependencies([step.updates]):
      update_op = adam_step.assign_add(1.0).op
    with tf.Session(config=spec.session_config()) as session:
      session.run(tf.global_variables_initializer())
      session.run(lowering.copy_masters_to_slices())
      history = []
      for _ in range(STEPS):
        history.append(session.run((tf_loss, tf_grads)))
        session.run(update_op)
      return history, session.run(tf_weights)


def spec_of(mesh_shape, layout):
  spec = mesh_lib.mesh(mesh_shape=mesh_shape, layout=layout)
  spec.validate(gpt_lib.GPT(**MODEL).dims(BATCH).sizes())
  return spec


@pytest.fixture(scope="module")
def single_device():
  return train_steps(spec_of("", ""))


# Tolerances (module docstring): a split sums the same float32 terms in another order, and a
# reordered sum of the n = BATCH * N_CTX positions' terms may differ by ~n roundings of it.
ROUNDING = 2.0 ** -24  # float32's unit roundoff
LOSS_RTOL = BATCH * N_CTX * ROUNDING  # 7.6e-6; seen: 1.1e-7 (one rounding of ~4.2)
GRAD_RTOL = 4 * BATCH * N_CTX * ROUNDING  # 3.1e-5 of each gradient's largest |element| at
# that step, as its terms may cancel; seen: 1.2e-6
# 1e-4 of the most Adam moves a weight in STEPS steps (~lr each); seen: 1.9e-7 (6e-6 of it)
ADAM_WEIGHT_ATOL = 1e-4 * ADAM_LEARNING_RATE * STEPS


def training_mismatches(split, single):
  """What differs between two train_steps results beyond the bounds above, as messages.

  The weight bound follows from the compared gradients: each of the STEPS updates subtracts
  LEARNING_RATE * gradient, so the weights may differ by LEARNING_RATE times the sum of the
  steps' gradient tolerances, plus a rounding of each subtraction on either side.
  """
  (split_history, split_weights), (single_history, single_weights) = split, single
  mismatches, weight_bounds = [], dict.fromkeys(single_weights, 0.0)
  for step, ((split_loss, split_grads), (loss, grads)) in enumerate(
      zip(split_history, single_history, strict=True)):
    if abs(split_loss - loss) > LOSS_RTOL * abs(loss):
      mismatches.append(f"loss at step {step}: {split_loss} != {loss}")
    assert split_grads.keys() == grads.keys() == single_weights.keys()
    for name, grad in grads.items():
      bound = GRAD_RTOL * np.abs(grad).max()
      weight_bounds[name] += LEARNING_RATE * bound
      mismatches += _beyond(f"gradient of {name} at step {step}", split_grads[name], grad, bound)
  for name, weight in single_weights.items():
    bound = weight_bounds[name] + 2 * STEPS * ROUNDING * np.abs(weight).max()
    mismatches += _beyond(f"{name} after {STEPS} steps", split_weights[name], weight, bound)
  return mismatches


def _beyond(what, actual, expected, bound):
  difference = np.abs(actual - expected).max()
  return [f"{what}: differs by {difference:.3g} > {bound:.3g}"] if difference > bound else []


def assert_same_training(split, single):
  mismatches = training_mismatches(split, single)
  assert not mismatches, f"{len(mismatches)} mismatches, first: " + "; ".join(mismatches[:5])


def test_single_device_training_moves(single_device):
  history, _ = single_device
  losses = [loss for loss, _ in history]
  assert losses[-1] < losses[0] - 0.05, losses  # the comparison is not of a frozen model


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_split_equals_single_device(case, single_device):
  assert_same_training(train_steps(spec_of(*LAYOUTS[case])), single_device)


# The imported families' features (issue 25), each on the splits that cut what it touches:
# kv (GPT-J's rotated pairs, over whole heads: a partial rotation slices kv, which mtf
# can't do on a split dimension), heads (q/k/v biases), vocab (the output bias), data.
FAMILY_VARIANTS = {
    "GPT-J": (("positions", positions_lib.RotaryPositions(interleaved=True)),
              ("parallel_residual", True), ("shared_layer_norm", True),
              ("tie_embeddings", False), ("lm_head_bias", True)),
    "Pythia": (("positions", positions_lib.RotaryPositions(fraction=0.5)), ("qkv_bias", True),
               ("parallel_residual", True), ("tie_embeddings", False)),
}
FAMILY_SPLITS = ["2 heads,mlp,vocab", "4 data x model"]


@pytest.fixture(scope="module")
def family_single_device():
  return {family: train_steps(spec_of("", ""), variant=variant)
          for family, variant in FAMILY_VARIANTS.items()}


@pytest.mark.parametrize("family, case", [(family, case) for family in FAMILY_VARIANTS
                                          for case in FAMILY_SPLITS] + [("GPT-J", "2 kv")])
def test_imported_families_split_equals_single_device(family, case, family_single_device):
  single = family_single_device[family]
  losses = [loss for loss, _ in single[0]]
  assert losses[-1] < losses[0] - 0.05, losses
  assert_same_training(train_steps(spec_of(*LAYOUTS[case]), variant=FAMILY_VARIANTS[family]),
                       single)


# The sharded forms (fsdp, zero) and embd splits, over 10 steps of the trainer's own step
# (train_graph.mtf_step: microbatches, clipping, fused Adam, lower_step's ordering).
SHARDED = {  # case -> (mesh_shape, layout): LAYOUTS' fsdp and embd cases, and zero's
    **{case: LAYOUTS[case] for case in ("2 fsdp", "2 embd", "4 data x embd",
                                        "4 data x model, fsdp", "8 data 2 x model 4, fsdp")},
    "4 fsdp": ("x:4", "batch:x,fsdp:x"),
    "2 zero": ("x:2", "batch:x,zero:x"),
    "4 zero": ("x:4", "batch:x,zero:x"),
    "8 data 4 x model 2, zero": ("x:4,y:2", "batch:x,heads:y,mlp:y,zero:x"),
}
# Resumed on (test_checkpoint_moves_between_shardings), not run 10 steps: 4-way fsdp in 2-D.
FSDP_4_BY_2 = ("x:4,y:2", "batch:x,heads:y,mlp:y,fsdp:x")
ONE_DEVICE = ("", "")
ONE_DEVICE_BINDINGS = ('mesh.mesh_shape = ""', 'mesh.layout = ""')
LONG_STEPS, MICROBATCHES = 10, 2
LONG_WEIGHT_ATOL = 0.1 * ADAM_LEARNING_RATE
CLIP_NORM = 0.5  # below the gradients' norm at every step (asserted): the clip acts


def trainer_steps(spec, steps, model_dir=None, precision="float32", optimizer=None,
                  on_nonfinite="skip", **model_knobs):
  """`steps` steps of train_graph.mtf_step on `spec`: (losses, gradient norms, weights).

  `optimizer`: default AdamW (weight decay 0.1). `model_knobs` override MODEL's (e.g.
  recompute_grad=True).

  With `model_dir`, the run restores its newest checkpoint if any (checkpoints.Checkpoints, as
  the trainer) and saves one after its last step: a run split in two continues the first.
  """
  built = trainer_graph(spec, precision, optimizer, on_nonfinite, **model_knobs)
  with built.graph.as_default():
    saver = checkpoints_lib.Checkpoints(built.lowering, model_dir and str(model_dir))
    with tf.Session(config=spec.session_config()) as session:
      saver.restore_or_initialize(session)
      history = [session.run([built.lowered.loss, built.lowered.grad_norm, built.train_op])[:2]
                 for _ in range(steps)]
      if model_dir:
        saver.save(session, session.run(built.step))
      return history, session.run(built.weights)


def trainer_graph(spec, precision="float32", optimizer=None, on_nonfinite="skip",
                  **model_knobs):
  """The graph trainer_steps runs (a namespace of graph, lowering, lowered step, train_op,
  step, weights and the MtfStep)."""
  settings = types.SimpleNamespace(
      model=gpt_lib.GPT(**{**MODEL, **model_knobs}), batch_size=BATCH, seed=7,
      precision=precision,
      microbatches_per_batch=MICROBATCHES, clip_norm=CLIP_NORM, train_steps=LONG_STEPS,
      optimizer=optimizer or optimizers.Adam(weight_decay=0.1), on_nonfinite=on_nonfinite)
  graph = tf.Graph()
  with graph.as_default():
    gin.bind_parameter("learning_rate_schedule.learning_rate", ADAM_LEARNING_RATE)
    tf.set_random_seed(7)
    step = tf.train.get_or_create_global_step()
    mtf_graph, mtf_mesh = runtime.new_mesh(spec=spec)
    dims = settings.model.dims(BATCH)
    windows = np.random.RandomState(0).randint(0, VOCAB, size=(BATCH, N_CTX + 1))
    features = {name: mtf.import_tf_tensor(mtf_mesh, tf.constant(t, tf.int32),
                                           [dims.batch, dims.sequence], name=name)
                for name, t in (("tokens", windows[:, :-1]), ("targets", windows[:, 1:]))}
    step_graph = train_graph.mtf_step(settings, features, step)
    lowering = runtime.lower(mtf_graph, mtf_mesh, spec)
    lowered = train_graph.lower_step(lowering, step_graph)
    with tf.control_dependencies([lowered.updates]):
      train_op = tf.assign_add(step, 1).op
    weights = {v.name: lowering.export_to_tf_tensor(v.outputs[0])
               for v in mtf_graph.trainable_variables}
  return types.SimpleNamespace(graph=graph, lowering=lowering, lowered=lowered,
                               train_op=train_op, step=step, weights=weights,
                               mtf_step=step_graph)


@pytest.fixture(scope="module")
def single_device_long():
  return trainer_steps(spec_of("", ""), LONG_STEPS)


def long_mismatches(split, single):
  """What differs between two trainer_steps results beyond float32 rounding, as messages.

  Each step's loss to LOSS_RTOL (module docstring; seen: 3.1e-7). Weights to a tenth of one
  Adam step, LONG_WEIGHT_ATOL: Adam's update is ~lr whatever the gradient's size, so over 10
  steps the rounding of near-zero gradients moves weights by a part of lr (seen: 4.9e-5 on
  "2 heads,mlp,vocab", 2e-5 on "2 data", no sharding at all), while a shard updated with
  another's moments or gradient, or not gathered, is off by ~lr at once.
  """
  (split_history, split_weights), (history, weights) = split, single
  mismatches = [f"loss at step {step}: {a} != {b}"
                for step, ((a, _), (b, _)) in enumerate(zip(split_history, history, strict=True))
                if abs(a - b) > LOSS_RTOL * abs(b)]
  for name, weight in weights.items():
    mismatches += _beyond(f"{name} after {len(history)} steps", split_weights[name], weight,
                          LONG_WEIGHT_ATOL)
  return mismatches


def test_long_single_device_run_learns_and_clips(single_device_long):
  history, _ = single_device_long
  losses, norms = [loss for loss, _ in history], [norm for _, norm in history]
  assert losses[-1] < losses[0] - 0.3, losses
  assert min(norms) > CLIP_NORM, norms  # every step was clipped


@pytest.mark.parametrize("case", list(SHARDED))
def test_sharded_form_trains_as_one_device_for_10_steps(case, single_device_long):
  mismatches = long_mismatches(trainer_steps(spec_of(*SHARDED[case]), LONG_STEPS),
                               single_device_long)
  assert not mismatches, f"{len(mismatches)} mismatches, first: " + "; ".join(mismatches[:5])


def test_a_gather_that_is_not_one_is_caught(monkeypatch, single_device):
  """fsdp's weights are whole only through the all-gather of their shards: each device
  concatenating copies of its own shard instead (right shapes, wrong values) is caught."""
  impl = mtf.placement_mesh_impl.PlacementMeshImpl

  def own_shard_only(self, x, mesh_axis, concat_axis):
    ways = self.shape[mesh_axis].size
    return self.slicewise(lambda t: tf.concat([t] * ways, concat_axis), x)

  monkeypatch.setattr(impl, "allconcat", own_shard_only)
  mismatches = training_mismatches(train_steps(spec_of(*LAYOUTS["2 fsdp"])), single_device)
  assert "loss at step 0" in mismatches[0], mismatches[:3]


def stored_slices(mesh_shape, layout, names=("gpt/h0/mlp/fc/w", "gpt/h0/mlp/fc/w/adam_m"),
                  optimizer=None):
  """{variable name: its slice's shape on the first device} after one update is built
  (`optimizer`: default Adam)."""
  spec = spec_of(mesh_shape, layout)
  with tf.Graph().as_default():
    mtf_graph, mtf_mesh = runtime.new_mesh(spec=spec)
    _, _, loss, grads = gpt_graph(mesh=(mtf_graph, mtf_mesh))
    (optimizer or optimizers.Adam()).apply_grads(
        grads, mtf_graph.trainable_variables, mtf.constant(mtf_mesh, 0.01),
        mtf.constant(mtf_mesh, 1.0))
    lowering = runtime.lower(mtf_graph, mtf_mesh, spec)
    return {v.name: lowering.variables[v].laid_out_tensor.slice_shape
            for v in mtf_graph.all_variables if v.name in names}


# Adafactor with all its state: factored second moments (the tiny model's matrices, [32, 128]
# and [64, 32], factor from 16) and a first moment. Its steps are ~lr per weight, as Adam's,
# so long_mismatches' bounds apply.
ADAFACTOR = dict(beta1=0.9, min_dim_size_to_factor=16)


@pytest.fixture(scope="module")
def single_device_adafactor():
  single = trainer_steps(spec_of(*ONE_DEVICE), LONG_STEPS,
                         optimizer=optimizers.Adafactor(**ADAFACTOR))
  assert single[0][-1][0] < single[0][0][0] - 0.05, single[0]  # it learns
  return single


@pytest.mark.parametrize("case", ["2 fsdp", "2 zero", "4 zero"])
def test_adafactor_sharded_trains_as_one_device_for_10_steps(case, single_device_adafactor):
  """Adafactor's slots (row and column means, first moment) under fsdp (made with the
  weight's stored shape) and zero (made from the slots' shard, the update computed on it and
  gathered back): the trainer's step with microbatches, clipping and the non-finite guard."""
  mismatches = long_mismatches(trainer_steps(spec_of(*SHARDED[case]), LONG_STEPS,
                                             optimizer=optimizers.Adafactor(**ADAFACTOR)),
                               single_device_adafactor)
  assert not mismatches, mismatches[:5]


@pytest.mark.parametrize("first, second", [("2 zero", "1 device"), ("1 device", "2 zero")])
def test_adafactor_checkpoint_moves_between_zero_and_one_device(first, second, tmp_path,
                                                                 single_device_adafactor):
  """Adafactor's slots saved whole from a zero mesh resume on one device, and the reverse:
  the run goes on as the uninterrupted one-device run."""
  meshes = {**SHARDED, "1 device": ONE_DEVICE}
  halves = [trainer_steps(spec_of(*meshes[case]), LONG_STEPS // 2, tmp_path,
                          optimizer=optimizers.Adafactor(**ADAFACTOR)) for case in (first, second)]
  mismatches = long_mismatches((halves[0][0] + halves[1][0], halves[1][1]),
                               single_device_adafactor)
  assert not mismatches, mismatches[:5]


ADAFACTOR_SLOTS = ("gpt/h0/mlp/fc/w", "gpt/h0/mlp/fc/w_slot_vr", "gpt/h0/mlp/fc/w_slot_vc",
                   "gpt/h0/mlp/fc/w_slot_m")


@pytest.mark.parametrize("layout, weight, slot", [
    ("batch:x", [32, 128], [32, 128]),  # data parallel: everything replicated
    ("batch:x,zero:x", [32, 128], [8, 128]),  # zero: the slots' embd over x, the weight whole
    ("batch:x,fsdp:x", [8, 128], [8, 128]),  # fsdp: weight and slots alike
])
def test_sharded_forms_store_what_they_promise(layout, weight, slot):
  """The equality tests can't tell a rule that shards nothing from one that works: here the
  stored slices of mlp/fc/w [embd 32, mlp 128] and its Adam moment on a 4-device mesh, and
  its Adafactor slots: the row means [embd] split as the moment's embd, the column means
  [mlp] (reduced over embd) whole, the first moment as Adam's."""
  assert stored_slices("x:4", layout) == {"gpt/h0/mlp/fc/w": weight,
                                          "gpt/h0/mlp/fc/w/adam_m": slot}
  assert stored_slices("x:4", layout, ADAFACTOR_SLOTS, optimizers.Adafactor(**ADAFACTOR)) == {
      "gpt/h0/mlp/fc/w": weight, "gpt/h0/mlp/fc/w_slot_vr": slot[:1],
      "gpt/h0/mlp/fc/w_slot_vc": [128], "gpt/h0/mlp/fc/w_slot_m": slot}


@pytest.mark.parametrize("layout, all_reduced", [("batch:x", True), ("batch:x,fsdp:x", False)])
def test_fsdp_gradients_are_reduce_scattered(layout, all_reduced, monkeypatch):
  """A sharded weight's gradient is summed over the batch's devices by a reduce-scatter
  (compat._scattered_rename): no device all-reduces the whole [embd, mlp] gradient of
  mlp/fc/w, as data parallelism does (and mtf's own lowering, all-reduce then slice, did)."""
  impl, reduced = mtf.placement_mesh_impl.PlacementMeshImpl, []
  allreduce = impl.allreduce

  def recording(self, x, mesh_axes, reduction_fn_string):
    reduced.append(x.to_laid_out_tensor().tensor_list[0].shape.as_list())
    return allreduce(self, x, mesh_axes, reduction_fn_string)

  monkeypatch.setattr(impl, "allreduce", recording)
  spec = spec_of("x:4", layout)
  with tf.Graph().as_default():
    mtf_graph, mtf_mesh, _, grads = gpt_graph(mesh=runtime.new_mesh(spec=spec))
    for variable, grad in zip(mtf_graph.trainable_variables, grads, strict=True):
      mtf.assign_sub(variable, grad)  # the gradients' reduction happens where they are read
    runtime.lower(mtf_graph, mtf_mesh, spec)
  assert ([MODEL["n_embd"], 4 * MODEL["n_embd"]] in reduced) == all_reduced


@pytest.mark.parametrize("mesh_shape, layout, fragment", [
    ("x:2", "batch:x,fsdp:q", "'fsdp:q' names mesh dimension 'q'"),
    ("x:2", "batch:x,fsdp:x,zero:x", "use one of fsdp"),
    ("x:3", "fsdp:x", "'fsdp:x' can't split any weight"),
    ("x:2,y:2", "batch:x,memory_length:y,embd:y", "is 'batch:x,embd:y' here"),
])
def test_bad_sharding_rule_is_one_line(mesh_shape, layout, fragment):
  with pytest.raises(UserError) as error:
    spec_of(mesh_shape, layout)
  assert fragment in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_fsdp_with_recompute_and_bfloat16_trains_as_one_device():
  """The gathered weights are gathered again in the recomputed forward pass, in bfloat16
  activations: each step's loss within one bfloat16 rounding (2^-8) of one device's with the
  same knobs (seen: 2.4e-4 over 4 steps; a gather that isn't one is off by ~1e-1)."""
  knobs = dict(precision="bfloat16", recompute_grad=True)
  split, _ = trainer_steps(spec_of(*SHARDED["2 fsdp"]), 4, **knobs)
  single, _ = trainer_steps(spec_of(*ONE_DEVICE), 4, **knobs)
  for step, ((split_loss, _), (loss, _)) in enumerate(zip(split, single, strict=True)):
    assert abs(split_loss - loss) <= 2.0 ** -8 * abs(loss), (step, split_loss, loss)




MUP = dict(parametrization="mup", mup_base_width=MODEL["n_embd"] // 2)  # hidden rates / 2


def test_mup_trains_and_resumes_across_shardings_as_one_device(tmp_path, single_device_long):
  """muP's per-weight rates ride with the weights through the fused Adam (fsdp, model-split
  heads and mlp), the element-wise one on zero's split slots, microbatches and a checkpoint
  moved between them: 5 + 5 steps equal one device's 10 muP steps, which differ from the
  standard run's."""
  single = trainer_steps(spec_of(*ONE_DEVICE), LONG_STEPS, **MUP)
  halves = [trainer_steps(spec_of(*SHARDED[case]), LONG_STEPS // 2, tmp_path, **MUP)
            for case in ("4 data x model, fsdp", "2 zero")]
  mismatches = long_mismatches((halves[0][0] + halves[1][0], halves[1][1]), single)
  assert not mismatches, f"{len(mismatches)} mismatches, first: " + "; ".join(mismatches[:5])
  assert long_mismatches(single, single_device_long)  # muP is not the standard model


@pytest.mark.parametrize("first, second", [("4 data x model, fsdp", "1 device"),
                                           ("1 device", "8 data 4 x model 2, fsdp"),
                                           ("2 zero", "4 fsdp")])
def test_checkpoint_moves_between_shardings(first, second, tmp_path, single_device_long):
  """Written after 5 steps on one mesh, restored on another, the run goes on as the
  uninterrupted one-device run: checkpoints hold whole tensors under the same names,
  whatever stores them split (weights, Adam's slots, the step)."""
  meshes = {**SHARDED, "1 device": ONE_DEVICE, "8 data 4 x model 2, fsdp": FSDP_4_BY_2}
  halves = [trainer_steps(spec_of(*meshes[case]), LONG_STEPS // 2, tmp_path)
            for case in (first, second)]
  resumed = (halves[0][0] + halves[1][0], halves[1][1])
  mismatches = long_mismatches(resumed, single_device_long)
  assert not mismatches, f"{len(mismatches)} mismatches, first: " + "; ".join(mismatches[:5])


def test_a_sharded_model_dir_resumes_evaluates_and_samples_on_any_mesh(tmp_path, small_dataset):
  """bin/train's own run on "batch:x,fsdp:x" (weights and Adam's slots stored split): its
  checkpoint resumes on one device, and scores and decodes (the key/value cache) there as
  on the sharded mesh."""
  model_dir, fsdp = str(tmp_path / "run"), ('mesh.mesh_shape = "x:2"',
                                            'mesh.layout = "batch:x,fsdp:x"')
  for steps, mesh in ((2, fsdp), (3, ONE_DEVICE_BINDINGS)):
    gin_utils.parse(["tiny.gin"], TINY_TEST_BINDINGS + [
        f"DATASET_DIR = {small_dataset!r}", f"train.train_steps = {steps}", *mesh])
    train_lib.train(model_dir)
  with open(os.path.join(model_dir, "train_metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3]  # resumed after step 2
  windows = [[1, 2, 3], [4, 5, 6, 7, 8]]
  outputs = []
  for mesh in (ONE_DEVICE_BINDINGS, fsdp):
    gin_utils.parse([os.path.join(model_dir, "operative_config.gin")], list(mesh))
    restored = inference.RestoredModel(gpt_lib.GPT(), runtime.Runtime(mesh_lib.mesh()),
                                       model_dir, 2, decode=True)
    restored.restore()
    outputs.append((restored.next_logits(windows), restored.start(windows)))
  for one_device, sharded in zip(*outputs, strict=True):
    np.testing.assert_allclose(sharded, one_device, rtol=0, atol=1e-5)


QKV_SHAPE = [MODEL["n_embd"], 3, MODEL["n_head"], MODEL["n_embd"] // MODEL["n_head"]]


def test_a_gradient_missing_its_all_reduce_is_caught_at_its_first_step(monkeypatch,
                                                                       single_device):
  """A broken split fails the comparison, named: on 2 data-parallel devices the qkv weights'
  gradients skip their all-reduce (each device keeps its half batch's sum)."""
  impl = mtf.placement_mesh_impl.PlacementMeshImpl
  allreduce = impl.allreduce

  def allreduce_but_qkv(self, x, mesh_axes, reduction_fn_string):
    if x.tensor_list[0].shape.as_list() == QKV_SHAPE:
      return x
    return allreduce(self, x, mesh_axes, reduction_fn_string)

  monkeypatch.setattr(impl, "allreduce", allreduce_but_qkv)
  mismatches = training_mismatches(train_steps(spec_of("x:2", "batch:x")), single_device)
  assert [m.split(":")[0] for m in mismatches if "step 0" in m] == [
      "gradient of gpt/h0/attn/qkv/w at step 0", "gradient of gpt/h1/attn/qkv/w at step 0"]


def test_every_gradient_and_weight_is_compared_tighter_than_a_small_error(single_device):
  """Scale-relative bounds: one gradient 0.1% off at one step, or one weight off by a tenth
  of its last update, is caught on every tensor (atol=1e-5 missed the first on 16 of the 26:
  those whose gradients stay below 1e-2, the layer norms, qkv and mlp/fc)."""
  history, weights = single_device
  for name in weights:
    (loss, grads), *later = history
    off_gradient = [(loss, dict(grads, **{name: grads[name] * 1.001})), *later]
    mismatches = training_mismatches((off_gradient, weights), single_device)
    assert [m.split(":")[0] for m in mismatches] == [f"gradient of {name} at step 0"]
    last_update = LEARNING_RATE * history[-1][1][name]
    off_weight = dict(weights, **{name: weights[name] - 0.1 * last_update})
    mismatches = training_mismatches((history, off_weight), single_device)
    assert [m.split(":")[0] for m in mismatches] == [f"{name} after {STEPS} steps"]


@pytest.mark.parametrize("case", ["1 device", "2 data", "2 heads,mlp,vocab", "4 data x model",
                                  "8 model x data"])
def test_fused_adam_equals_mtf_adam_on_each_mesh(case):
  """One ResourceApplyAdam per slice updates each slice as mtf's element-wise Adam does.

  Same mesh on both sides, so the gradients are the same and only the update differs: the
  fused kernel must find each slice's own m, v and gradient, decay only the matrices and
  bias-correct as Adam.assigns does, and update only after the gradient (a decay that ran
  before the backward pass read the weight made the losses differ by 1e-5 and vary from run
  to run). Losses to LOSS_RTOL; weights to ADAM_WEIGHT_ATOL, not to a rounding: from the
  second step the two updates' roundings reach the gradients, and Adam's normalised update
  (~lr whatever the gradient's size) amplifies them in near-zero gradients (seen: 1.9e-7);
  a slice updated with another's moments or gradient is off by ~lr = 1e-2.
  """
  spec = spec_of(*LAYOUTS[case]) if case in LAYOUTS else spec_of("", "")
  (fused_history, fused), (plain_history, plain) = (train_steps(spec, "fused adam"),
                                                    train_steps(spec, "adam"))
  losses = [loss for loss, _ in plain_history]
  assert losses[-1] < losses[0] - 0.05, losses  # Adam moved the weights
  for step, ((fused_loss, _), (plain_loss, _)) in enumerate(
      zip(fused_history, plain_history, strict=True)):
    np.testing.assert_allclose(fused_loss, plain_loss, rtol=LOSS_RTOL, err_msg=f"loss {step}")
  for name in plain:
    np.testing.assert_allclose(fused[name], plain[name], rtol=0, atol=ADAM_WEIGHT_ATOL,
                               err_msg=f"{name} after {STEPS} steps")


@pytest.mark.parametrize("layout_file", LAYOUT_FILES)
def test_shipped_cpu_layout_file_is_a_tested_case(layout_file):
  gin_utils.parse([f"layouts/{layout_file}"], [])
  spec = mesh_lib.mesh()
  assert (spec.shape, spec.layout) in [(spec_of(*case).shape, spec_of(*case).layout)
                                       for case in LAYOUTS.values()], layout_file


TPU_LAYOUTS = ["tpu_v3_8.gin", "tpu_v3_32.gin", "tpu_v3_128.gin", "tpu_v3_256.gin",
               "tpu_v3_512.gin", "tpu_v4_8.gin", "tpu_v4_32.gin", "tpu_v4_128.gin",
               "tpu_v4_256.gin", "tpu_v4_512.gin", "tpu_v5e_8.gin", "tpu_v5p_8.gin",
               "tpu_v6e_8.gin"]
# A slice's name counts TensorCores (v3, v4, v5p) or chips (v5e, v6e); a device is a core
# (v3), a megacore chip of 2 cores (v4, v5p) or a chip of one core (v5e, v6e).
DEVICES = {"v3": lambda cores: cores, "v4": lambda cores: cores // 2,
           "v5p": lambda cores: cores // 2, "v5e": lambda chips: chips,
           "v6e": lambda chips: chips}


@pytest.mark.parametrize("layout_file", TPU_LAYOUTS + ["gpu8.gin", "gpu8_data.gin"])
def test_accelerator_layout_fits_its_slice_and_gpt3_xl(layout_file):
  gin_utils.parse(["gpt3_xl.gin", f"layouts/{layout_file}"],
                  ['DATASET_DIR = "unused"', "mesh.tpu = 'local'"])
  if layout_file.startswith("gpu"):
    spec = mesh_lib.MeshSpec(mesh_lib.parse_mesh_shape(
        gin_utils.gin.query_parameter("mesh.mesh_shape")), [], [])
    assert spec.size == 8
  else:
    spec = mesh_lib.mesh()
    _, generation, cores = layout_file[:-4].split("_")
    cores = int(cores)
    assert (spec.implementation, spec.size) == ("simd", DEVICES[generation](cores))
    spec.validate(gpt_lib.GPT().dims(512).sizes())
    assert spec.devices == [""] * spec.size


@pytest.mark.parametrize("layout", ["batch:x,heads:y,mlp:y,vocab:y",
                                    "batch:x,heads:y,mlp:y,fsdp:x"])
def test_simd_mesh_builds_a_training_step_over_all_tpu_cores(layout):
  """The SIMD lowering of loss, gradients and an update, inside one TPU program of 8 cores
  (with fsdp: the gathers and the gradients' slices of sharded weights too)."""
  spec = mesh_lib.mesh(mesh_shape="x:4,y:2", layout=layout, implementation="simd", tpu="local")
  assignment = tpu.synthetic_device_assignment(num_chips=4)
  graph = tf.Graph()
  with graph.as_default():
    mtf_graph, mtf_mesh, loss, grads = gpt_graph("bfloat16", mesh=runtime.new_mesh(spec=spec))
    updates = [mtf.assign_sub(v, g * LEARNING_RATE)
               for v, g in zip(mtf_graph.trainable_variables, grads, strict=True)]

    def step():
      lowering = runtime.lower(mtf_graph, mtf_mesh, spec, assignment)
      with tf.control_dependencies([lowering.lowered_operation(op) for op in updates]):
        return [tf.identity(lowering.export_to_tf_tensor(loss))]

    outputs = tf.tpu.replicate(step, inputs=[[]] * spec.size,
                               device_assignment=assignment)
  assert len(outputs) == 8  # one loss per core
  devices = {op.device for op in graph.get_operations()}
  assert {f"/task:0/device:TPU:{core}" for core in range(8)} <= devices


@pytest.mark.parametrize("optimizer", [optimizers.Adam, optimizers.Adafactor])
def test_the_update_starts_after_the_backward_pass(optimizer):
  """A zero step's update reads its slots and slices its weight shards only after the loss
  and all gradients (train_graph._after_backward): otherwise they run when the step starts
  and are held through the backward pass (bench/RESULTS.md, per-device memory)."""
  built = trainer_graph(spec_of(*SHARDED["2 zero"]), optimizer=optimizer())
  graph = built.graph
  barrier = graph.get_operation_by_name("backward_done")
  kept = train_graph.ancestors([barrier, built.mtf_step.learning_rate.op])
  update_only = train_graph.ancestors([built.lowered.updates], stop=kept)
  after, todo = set(), [barrier]
  while todo:
    op = todo.pop()
    if op not in after:
      after.add(op)
      todo.extend([*(c for t in op.outputs for c in t.consumers()), *op._control_outputs])  # pylint: disable=protected-access
  starts = [op for op in update_only if op.type in ("ReadVariableOp", "Slice", "Split")]
  assert {op.type for op in starts} == {"ReadVariableOp", "Slice"}  # the slots' reads, shards
  early = sorted(op.name for op in starts if op not in after)
  assert not early, early[:5]


def test_a_tpu_zero_update_keeps_every_op_xla_compiles():
  """On a placement mesh a zero update copies each gradient shard into buffers of its own
  (optimizers._owned, tf DeepCopy); inside a TPU program, which XLA compiles and whose
  buffers XLA assigns, it must not: XLA has no DeepCopy kernel."""
  spec = mesh_lib.mesh(mesh_shape="x:8", layout="batch:x,zero:x", implementation="simd",
                       tpu="local")
  assignment = tpu.synthetic_device_assignment(num_chips=4)
  graph = tf.Graph()
  with graph.as_default():
    mtf_graph, mtf_mesh, loss, grads = gpt_graph(mesh=runtime.new_mesh(spec=spec))
    scalar = functools.partial(mtf.import_fully_replicated, mtf_mesh, shape=[])
    updates = optimizers.Adam().apply_grads(grads, mtf_graph.trainable_variables,
                                            scalar(tf.constant(1e-3)), scalar(tf.constant(1.0)))

    def step():
      lowering = runtime.lower(mtf_graph, mtf_mesh, spec, assignment)
      with tf.control_dependencies([lowering.lowered_operation(op) for op in updates]):
        return [tf.identity(lowering.export_to_tf_tensor(loss))]

    tf.tpu.replicate(step, inputs=[[]] * spec.size, device_assignment=assignment)
  types_built = {op.type for op in graph.get_operations()}
  assert "Rsqrt" in types_built or "Sqrt" in types_built  # Adam's update was built
  assert "DeepCopy" not in types_built
  placement = trainer_graph(spec_of(*SHARDED["2 zero"])).graph
  assert "DeepCopy" in {op.type for op in placement.get_operations()}


@pytest.mark.parametrize("bindings, fragment", [
    ({"implementation": "simd"}, "set mesh.tpu"),
    ({"implementation": "mpi"}, "mesh.implementation = 'mpi'"),
])
def test_bad_mesh_implementation(bindings, fragment):
  with pytest.raises(ValueError, match=fragment):
    mesh_lib.mesh(mesh_shape="x:2", **bindings)


def test_simd_without_a_device_assignment_says_how_to_get_one():
  spec = mesh_lib.mesh(mesh_shape="x:2", implementation="simd", tpu="local")
  with pytest.raises(ValueError, match="tpu.connect"):
    spec.mesh_impl()


def gpt_graph(precision="float32", mesh=None):
  """A GPT's forward and backward mtf graph (not lowered): (graph, mesh, loss, gradients).

  `mesh`: the (mtf graph, mtf mesh) to build on (runtime.new_mesh(spec=...) for a sharded
  layout); a new unsharded one by default.
  """
  mtf_graph, mtf_mesh = mesh or runtime.new_mesh()
  model = gpt_lib.GPT(**MODEL)
  dims = model.dims(BATCH)
  tokens = mtf.import_tf_tensor(mtf_mesh, tf.zeros([BATCH, N_CTX], tf.int32),
                                [dims.batch, dims.sequence])
  logits, _ = model(tokens, runtime.variable_dtype(precision),
                    ops.Dropout(is_training=False, seed=0, step=0))
  loss = gpt_lib.loss(logits, tokens, dims.vocab)
  grads = mtf.gradients([loss], [v.outputs[0] for v in mtf_graph.trainable_variables])
  return mtf_graph, mtf_mesh, loss, grads


@pytest.mark.parametrize("layout, pair", [("heads:x,kv:x", ("heads", "kv")),
                                          ("batch:x,embd:x", ("batch", "embd")),
                                          ("mlp:x,embd:x", ("embd", "mlp"))])
def test_two_dimensions_of_one_tensor_on_one_mesh_dimension_is_one_line(layout, pair):
  """What mtf's LayoutRules reject, MeshSpec.validate names first: both dims and a tensor."""
  spec = spec_of("x:2", layout)  # each rule divides its dimension: the old check passed
  with tf.Graph().as_default(), pytest.raises(ValueError, match="Two Tensor Dimensions may"):
    mtf_graph, mtf_mesh, _, _ = gpt_graph()
    mtf.Lowering(mtf_graph, {mtf_mesh: spec.mesh_impl()}, autostack=False)  # mtf's, unchecked
  with tf.Graph().as_default(), pytest.raises(ValueError) as error:
    runtime.lower(*gpt_graph()[:2], spec)
  message = str(error.value)
  assert "\n" not in message and "both on mesh dimension 'x'" in message
  assert all(f"'{dim}'" in message for dim in pair), message


def test_dimensions_of_different_tensors_may_share_a_mesh_dimension():
  spec = spec_of("x:2", "heads:x,mlp:x,vocab:x")  # no tensor has two of these
  with tf.Graph().as_default():
    mtf_graph = gpt_graph()[0]
    spec.validate(MODEL_DIMS, runtime.tensor_shapes(mtf_graph))


MODEL_DIMS = gpt_lib.GPT(**MODEL).dims(BATCH).sizes()


def test_bin_train_names_both_dimensions_and_touches_nothing(tmp_path, small_dataset):
  params = TINY_TEST_BINDINGS + [f'DATASET_DIR = "{small_dataset}"', "train.train_steps = 1",
                                 "mesh.mesh_shape = 'x:2'", "mesh.layout = 'heads:x,kv:x'"]
  result = run_binary("train", "--gin_file=tiny.gin", f"--model_dir={tmp_path / 'run'}",
                      *[f"--gin_param={p}" for p in params])
  assert_one_line_error(result, "train", "'heads' and 'kv' both on mesh dimension 'x'")
  assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_bin_train_refuses_gpt_neo_xl_layout_and_touches_nothing(tmp_path, small_dataset):
  """GPT-Neo XL's layout as written (its memory_length split): one line saying what to write
  instead, before the model dir exists."""
  params = TINY_TEST_BINDINGS + [f'DATASET_DIR = "{small_dataset}"', "train.train_steps = 1",
                                 "mesh.mesh_shape = 'x:2,y:2'",
                                 "mesh.layout = 'batch:x,memory_length:y,embd:y'"]
  result = run_binary("train", "--gin_file=tiny.gin", f"--model_dir={tmp_path / 'run'}",
                      *[f"--gin_param={p}" for p in params])
  assert_one_line_error(result, "train", "is 'batch:x,embd:y' here")
  assert not (tmp_path / "run").exists()
