"""The layout search: finds fitting layouts fast, agrees with brute force and with the lowered
graph's allocations, and turns bad input into one-line errors."""
import dataclasses
import itertools
import json
import os
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from gptneo import gin_utils
from gptneo import mesh as mesh_lib
from gptneo import runtime
from gptneo import train as train_lib
from gptneo import train_graph
from gptneo.compat import mtf, tf
from gptneo.layout_search import configured
from gptneo.layout_search import cost_model
from gptneo.layout_search import search
from gptneo.model import gpt as gpt_lib
from gptneo.model import moe as moe_lib
from gptneo.model import ops
from gptneo.optim import optimizers
from tests.conftest import REPO, TINY_TEST_BINDINGS, run_binary
from tests.test_errors import assert_one_line_error
from tests.test_train import logged_losses

GIB = 2 ** 30
ADAM = optimizers.Adam()
XL = cost_model.Workload(n_layer=24, n_embd=2048, n_head=16, n_ctx=2048, n_vocab=50257,
                         mlp=8192, batch=512).with_optimizer(ADAM)
NEVER_SPLIT = {"sequence", "memory", "kv"}


def test_mesh_shapes_are_the_factorizations():
  assert search.mesh_shapes(8) == [(("x", 2), ("y", 2), ("z", 2)), (("x", 4), ("y", 2)),
                                   (("x", 8),)]
  shapes = search.mesh_shapes(256)
  assert len(shapes) == 10 and all(np.prod([s for _, s in shape]) == 256 for shape in shapes)


@pytest.mark.parametrize("shape", [(("x", 4), ("y", 2)), (("x", 2), ("y", 2), ("z", 2))])
def test_solver_finds_the_brute_force_optimum(shape):
  hardware = cost_model.Hardware(16 * GIB)
  best = search.search(XL, hardware, mesh_shape=shape, time_limit=20, forms=("",)).candidates[0]
  work = cost_model.Workload(**{**XL.__dict__, "microbatches": best.microbatches,
                                "n_vocab": best.n_vocab, "recompute": best.recompute})
  fitting = [e for e in (cost_model.estimate(work, hardware, shape, layout)
                         for layout in all_layouts(work, shape, splittable_of(best)))
             if e.memory_bytes <= hardware.device_memory]
  assert best.step_seconds == pytest.approx(min(e.step_seconds for e in fitting), rel=1e-6)
  assert best.memory_bytes <= hardware.device_memory


def all_layouts(work, mesh_shape, splittable=cost_model.SPLITTABLE):
  """Every valid layout of one mesh shape, by brute force: the check on the solver."""
  sizes, dims = dict(mesh_shape), work.dim_sizes()
  splittable = tuple(d for d in splittable if d in dims)
  conflicting = set(cost_model.conflicts(work))
  options = [[None] + [m for m in sizes if dims[d] % sizes[m] == 0]
             for d in splittable]
  for choice in itertools.product(*options):
    layout = tuple((d, m) for d, m in zip(splittable, choice, strict=True) if m)
    if not any((min(a, b), max(a, b)) in conflicting
               for (a, ma), (b, mb) in itertools.combinations(layout, 2) if ma == mb):
      yield layout


def splittable_of(estimate):
  """The first tiers of tensor dimensions that cover the estimate's layout."""
  used, splittable = {d for d, _ in estimate.layout}, ()
  for tier in cost_model.TIERS:
    splittable += tier
    if used <= set(splittable):
      return splittable
  raise AssertionError(f"{estimate.layout} splits a dimension of no tier")


def test_fewer_microbatches_never_fit_where_the_search_needed_more():
  hardware = cost_model.Hardware(16 * GIB)
  best = search.search(XL, hardware, devices=8, time_limit=20, forms=("",)).candidates[0]
  fewer = cost_model.Workload(**{**XL.__dict__, "microbatches": best.microbatches // 2})
  assert all(cost_model.estimate(fewer, hardware, best.mesh_shape, layout).memory_bytes
             > hardware.device_memory
             for layout in all_layouts(fewer, best.mesh_shape, splittable_of(best)))


def test_gpt3_13b_on_256_devices_fits_in_16gib_within_a_minute(tmp_path):
  output = tmp_path / "layout.gin"
  start = time.monotonic()
  result = run_binary("search_layout", "--gin_file=gpt3_13b.gin", "--devices=256",
                      "--device_memory=16GiB", f"--output={output}", check=True)
  assert time.monotonic() - start < 60
  assert "chosen: splits" in result.stdout and "data parallel alone would hold" in result.stdout
  gin_utils.parse(["gpt3_13b.gin", str(output)], ['DATASET_DIR = "unused"'])
  spec = mesh_lib.mesh(cpu_devices=256)
  assert spec.size == 256
  batch = 1024 // gin_utils.gin.query_parameter("train.microbatches_per_batch")
  model_rules = [rule for rule in spec.layout if rule[0] not in cost_model.SHARDED_FORMS]
  dataclasses.replace(spec, layout=model_rules).validate(  # a layout train would accept
      gpt_lib.GPT().dims(batch).sizes())
  if NEVER_SPLIT & {tensor_dim for tensor_dim, _ in spec.layout}:  # only if nothing else fits
    assert "split only because no layout of batch/heads/mlp/vocab fits" in result.stdout
    assert not any(_fits_without_fallback_dims(shape) for shape in search.mesh_shapes(256))
  estimated = float(output.read_text().split("Estimated per device: ")[1].split(" GiB")[0])
  assert estimated <= 16


def _fits_without_fallback_dims(shape):
  """Brute force with the most microbatches (the least activation memory): does any fit?"""
  hardware = cost_model.Hardware(16 * GIB)
  for n_vocab in (50257, 50304):
    work = cost_model.Workload(40, 5120, 40, 2048, n_vocab, 4 * 5120, 1024,
                               microbatches=1024).with_optimizer(ADAM)
    if any(cost_model.estimate(work, hardware, shape, layout).memory_bytes <= 16 * GIB
           for layout in all_layouts(work, shape)):
      return True
  return False


def test_gpt3_xl_on_8_devices_never_splits_sequence():
  result = search.search(XL, cost_model.Hardware(16 * GIB), devices=8, time_limit=20)
  for candidate in result.candidates:
    assert not NEVER_SPLIT & {tensor_dim for tensor_dim, _ in candidate.layout}
  assert {"batch", "heads"} & {tensor_dim for tensor_dim, _ in result.candidates[0].layout}


B13 = cost_model.Workload(40, 5120, 40, 2048, 50257, 4 * 5120, 1024).with_optimizer(ADAM)


def test_the_solver_process_start_up_counts_against_the_time_limit(monkeypatch):
  """This process loaded TensorFlow, so the search runs in a child: its start-up counts.

  The parent fixes the wall-clock deadline before it starts the child, and a child that starts
  past it (a slow start-up on a loaded machine, played here by moving the deadline back) stops
  at once and says it was cut short, instead of searching for another full time limit.
  """
  assert not search.SOLVER_SAFE_IN_PROCESS
  sent, real_run = [], subprocess.run

  def start_late(args, input, **kwargs):  # noqa: A002 (subprocess.run's own name)
    request = json.loads(input)
    sent.append(dict(request))
    request["deadline"] = time.time() - 1.0
    return real_run(args, input=json.dumps(request), **kwargs)

  monkeypatch.setattr(search.subprocess, "run", start_late)
  limit, called = 600.0, time.time()
  with pytest.raises(search.NothingFits, match="was cut short.*raise --time_limit"):
    search.search(B13, cost_model.Hardware(16 * GIB), devices=256, time_limit=limit)
  assert called + limit <= sent[0]["deadline"] <= time.time() + limit  # set at the call


def test_a_search_cut_short_says_so_instead_of_nothing_fits():
  with pytest.raises(search.NothingFits) as error:  # fits in 16 GiB, given the time
    search.search(B13, cost_model.Hardware(16 * GIB), devices=256, time_limit=0.3)
  assert "--time_limit=0.3s" in str(error.value) and "nothing fits" not in str(error.value)


def test_search_weighs_recompute_by_the_step_time():
  """Recompute costs a third more FLOPs but may free the memory for a faster layout: on 8
  devices XL's fastest layout (batch:x,heads:y,mlp:y) fits only recomputed, and beats the
  best that fits without (which the search used to take because it fit)."""
  hardware = cost_model.Hardware(16 * GIB)
  candidates = search.search(XL, hardware, devices=8, time_limit=20, forms=("",)).candidates
  assert candidates == sorted(candidates, key=lambda c: c.step_seconds)
  kept = [c for c in candidates if not c.recompute]
  assert candidates[0].recompute and kept and kept[0].step_seconds > candidates[0].step_seconds
  assert dict(candidates[0].layout)["batch"] == "x"  # 4-way: at most 128 microbatches of 4
  no_recompute = dataclasses.replace(XL, microbatches=128)
  assert cost_model.estimate(no_recompute, hardware, candidates[0].mesh_shape,
                             candidates[0].layout).memory_bytes > hardware.device_memory
  best = search.search(B13, hardware, devices=256, time_limit=30, forms=("",)).candidates[0]
  assert best.recompute and best.memory_bytes <= hardware.device_memory
  kept = cost_model.Workload(**{**B13.__dict__, "n_vocab": best.n_vocab,
                                "microbatches": search.microbatch_counts(B13.batch)[-1]})
  assert all(cost_model.estimate(kept, hardware, best.mesh_shape, layout).memory_bytes
             > hardware.device_memory
             for layout in all_layouts(kept, best.mesh_shape, splittable_of(best)))
  fixed = search.search(B13, hardware, devices=256, time_limit=30, recompute=False,
                        forms=("",))
  assert not any(c.recompute for c in fixed.candidates)


def test_a_layout_that_needs_recompute_turns_it_on(tmp_path):
  output = tmp_path / "layout.gin"
  result = run_binary("search_layout", "--gin_file=gpt3_13b.gin", "--devices=256",
                      f"--output={output}", check=True)
  assert "recomputed per layer" in result.stdout
  assert "GPT.recompute_grad = True" in output.read_text()
  gin_utils.parse(["gpt3_13b.gin"], ['DATASET_DIR = "unused"'])
  assert not gpt_lib.GPT().recompute_grad
  best = search.search(B13, cost_model.Hardware(16 * GIB), devices=256,
                       time_limit=30).candidates[0]
  configured.bind(best)  # what bin/train --auto_layout_and_mesh_shape does
  assert gpt_lib.GPT().recompute_grad


MOE = cost_model.Workload(n_layer=12, n_embd=768, n_head=12, n_ctx=2048, n_vocab=50304,
                          mlp=3072, batch=256, num_experts=64,
                          moe_layers=6).with_optimizer(ADAM)


def test_moe_workload_counts_the_models_parameters():
  gin_utils.parse(["gpt3_small_moe.gin"], ['DATASET_DIR = "unused"', "MoE.num_experts = 64"])
  work = configured.workload_from_gin()
  assert (work.num_experts, work.moe_layers) == (64, 6)
  assert work.num_parameters() == gpt_lib.GPT().num_parameters()
  assert work.dim_sizes()["experts"] == 64 and "experts" not in XL.dim_sizes()


def test_splitting_experts_divides_their_weights_and_the_search_uses_it():
  hardware = cost_model.Hardware(8 * GIB)
  shape = (("x", 8),)
  whole = cost_model.estimate(MOE, hardware, shape, ())
  split = cost_model.estimate(MOE, hardware, shape, (("experts", "x"),))
  expert_bytes = 4 * 4 * MOE.moe_layers * MOE.num_experts * 2 * MOE.n_embd * MOE.mlp
  assert whole.param_bytes - split.param_bytes == pytest.approx(expert_bytes * 7 / 8, rel=1e-3)
  best = search.search(MOE, hardware, devices=8, time_limit=20).candidates[0]
  assert "experts" in {d for d, _ in best.layout}  # 64 experts x Adam don't fit replicated
  assert ("batch", "experts") in cost_model.conflicts(MOE)  # both in the dispatched tokens
  assert ("experts", "heads") not in cost_model.conflicts(MOE)


@pytest.mark.parametrize("shape", [(("x", 4), ("y", 2)), (("x", 2), ("y", 2), ("z", 2))])
def test_solver_finds_the_brute_force_optimum_with_experts(shape):
  hardware = cost_model.Hardware(12 * GIB)
  best = search.search(MOE, hardware, mesh_shape=shape, time_limit=20,
                       recompute=False, forms=("",)).candidates[0]
  work = cost_model.Workload(**{**MOE.__dict__, "microbatches": best.microbatches})
  fitting = [e for e in (cost_model.estimate(work, hardware, shape, layout)
                         for layout in all_layouts(work, shape, splittable_of(best)))
             if e.memory_bytes <= hardware.device_memory]
  assert best.step_seconds == pytest.approx(min(e.step_seconds for e in fitting), rel=1e-6)
  assert any("experts" in dict(e.layout) for e in fitting)  # experts were in the running


def test_predicted_variable_memory_matches_the_lowered_graph(small_dataset, tmp_path):
  """Weight slices + Adam slots per device, summed from the placement mesh's slice variables."""
  model = gpt_lib.GPT(n_layer=2, n_embd=64, n_head=8, n_ctx=32, n_vocab=512)
  work = cost_model.Workload(model.n_layer, model.n_embd, model.n_head, model.n_ctx,
                             model.n_vocab, 4 * model.n_embd, batch=8).with_optimizer(ADAM)
  for mesh_shape, layout in [("x:2,y:2", "batch:x,heads:y,mlp:y"),
                             ("x:4", "heads:x,mlp:x,vocab:x")]:
    spec = mesh_lib.mesh(mesh_shape=mesh_shape, layout=layout)
    graph = build_graph(model, spec, small_dataset, str(tmp_path))
    allocated = _slice_bytes_per_device(graph.graph, spec)
    predicted = variable_bytes(work, cost_model.splits(spec.shape, spec.layout))
    for device_bytes in allocated:
      assert device_bytes == pytest.approx(predicted, rel=0.10), (mesh_shape, layout)


def test_predicted_expert_memory_matches_the_lowered_graph(small_dataset, tmp_path):
  """The same check for a mixture of experts, with `experts` split."""
  model = gpt_lib.GPT(n_layer=2, n_embd=64, n_head=8, n_ctx=32, n_vocab=512,
                      moe=moe_lib.MoE(layers=[1], num_experts=8))
  work = cost_model.Workload(model.n_layer, model.n_embd, model.n_head, model.n_ctx,
                             model.n_vocab, 4 * model.n_embd, batch=8, num_experts=8,
                             moe_layers=1).with_optimizer(ADAM)
  assert work.num_parameters() == model.num_parameters()
  for mesh_shape, layout in [("x:4", "experts:x"), ("x:2,y:2", "batch:x,experts:y,heads:y")]:
    spec = mesh_lib.mesh(mesh_shape=mesh_shape, layout=layout)
    graph = build_graph(model, spec, small_dataset, str(tmp_path / layout))
    allocated = _slice_bytes_per_device(graph.graph, spec)
    predicted = variable_bytes(work, cost_model.splits(spec.shape, spec.layout))
    for device_bytes in allocated:
      assert device_bytes == pytest.approx(predicted, rel=0.10), (mesh_shape, layout)


def build_graph(model, spec, dataset_dir, model_dir):
  """The placement training graph with Adam, batch 8 (no validation)."""
  settings = train_lib.settings(model=model, optimizer=optimizers.Adam(), mesh=spec,
                                dataset_dir=dataset_dir, batch_size=8, train_steps=10, seed=1,
                                eval_batches=0, keep_checkpoints=1)
  return train_graph.build(settings, model_dir, runtime.Runtime(spec))


def variable_bytes(work, split):
  """Per-device bytes of the variables mtf allocates: weight slices and optimizer slots."""
  weights = [cost_model.Term("params", cost_model.BYTES * count, dims)
             for count, dims in work.parameters()]
  return sum(term.value(split) for term in weights + cost_model.optimizer_terms(work))


def _slice_bytes_per_device(graph, spec):
  """Slice variables live outside every collection: sum their VarHandleOps per device."""
  totals = dict.fromkeys(spec.devices, 0)
  for op in graph.get_operations():
    if op.type == "VarHandleOp" and "_slice_" in op.name:
      device = op.device.lower().replace("/device:", "/")
      totals[device] += 4 * int(np.prod(tf.TensorShape(op.get_attr("shape")).as_list()))
  return list(totals.values())


def test_auto_layout_trains_the_tiny_model(tmp_path, small_dataset):
  params = TINY_TEST_BINDINGS + [f'DATASET_DIR = "{small_dataset}"', "train.train_steps = 3"]
  result = run_binary("train", "--gin_file=tiny.gin", f"--model_dir={tmp_path}",
                      "--auto_layout_and_mesh_shape", "--devices=4",
                      *[f"--gin_param={p}" for p in params])
  assert result.returncode == 0, result.stderr[-3000:]
  assert "auto layout" in result.stderr
  operative = (tmp_path / "operative_config.gin").read_text()
  assert "mesh.mesh_shape = 'x:" in operative or 'mesh.mesh_shape = "x:' in operative
  assert sorted(logged_losses(tmp_path)) == [1, 2, 3]


BAD_SEARCHES = {
    "nothing fits": (["--gin_file=gpt3_13b.gin", "--devices=8", "--device_memory=1GiB"],
                     ["nothing fits 1.00 GiB", "smallest need found is", "--device_memory"]),
    "mesh not the device count": (["--gin_file=gpt3_xl.gin", "--devices=8", "--mesh_shape=x:3"],
                                  ["'x:3'", "--devices=8"]),
    "bad memory size": (["--gin_file=gpt3_xl.gin", "--devices=8", "--device_memory=lots"],
                        ["--device_memory='lots'", "16GiB"]),
    "no devices": (["--gin_file=gpt3_xl.gin"], ["--devices=None", "--mesh_shape"]),
    "infinite memory": (["--gin_file=tiny.gin", "--devices=2", "--device_memory=1e999"],
                        ["--device_memory='1e999' is not a finite size"]),
    "no FLOP/s": (["--gin_file=tiny.gin", "--devices=2", "--device_flops=0"],
                  ["--device_flops=0.0; give a positive, finite rate"]),
    "NaN bandwidth": (["--gin_file=tiny.gin", "--devices=2", "--link_bandwidth=nan"],
                      ["--link_bandwidth=nan; give a positive, finite rate"]),
    "mesh dimension of size 0": (["--gin_file=tiny.gin", "--mesh_shape=x:0"],
                                 ["--mesh_shape='x:0'", "positive size"]),
    "mesh dimension named twice": (["--gin_file=tiny.gin", "--mesh_shape=x:2,x:2"],
                                   ["--mesh_shape='x:2,x:2'", "its own name"]),
    "unknown optimizer": (["--gin_file=tiny.gin", "--devices=2", "--optimizers=adam,lion"],
                          ["--optimizers='adam,lion'", "adam, adafactor"]),
    "batch of 0": (["--gin_file=tiny.gin", "--devices=2", "--gin_param=train.batch_size = 0"],
                   ["train.batch_size = 0; it must be a positive integer"]),
    "optimizer that can't say its state": (
        ["--gin_file=gpt3_xl.gin", "--devices=8", "--gin_param=train.optimizer = @SgdOptimizer()",
         "--gin_param=SgdOptimizer.learning_rate = 0.1"], ["@SgdOptimizer()", "slot_shapes"]),
}


@pytest.mark.parametrize("case", sorted(BAD_SEARCHES))
def test_bad_search_input(case, tmp_path):
  args, fragments = BAD_SEARCHES[case]
  result = run_binary("search_layout", *args, f"--output={tmp_path / 'out.gin'}")
  assert_one_line_error(result, "search_layout", *fragments)
  assert not (tmp_path / "out.gin").exists()


def test_search_keeps_an_existing_output_unless_overwrite(tmp_path):
  """The user's file is not lost to a search: refused before searching, replaced only with
  --overwrite."""
  output = tmp_path / "mine.gin"
  output.write_text("# my layout\n")
  args = ["--gin_file=tiny.gin", "--devices=2", f"--output={output}"]
  result = run_binary("search_layout", *args)
  assert_one_line_error(result, "search_layout", f"--output={output} exists", "--overwrite")
  assert output.read_text() == "# my layout\n"
  run_binary("search_layout", *args, "--overwrite", check=True)
  assert "mesh.mesh_shape = 'x:2'" in output.read_text()
  assert os.listdir(tmp_path) == ["mine.gin"]  # no temporary left


def test_the_workload_costs_the_configured_optimizers_state():
  def weights_state_and_gradients(*bindings):
    gin_utils.parse(["gpt3_xl.gin"], ['DATASET_DIR = "unused"', *bindings])
    work = configured.workload_from_gin()
    return work, cost_model.estimate(work, cost_model.Hardware(1), (), ()).param_bytes
  adam, adam_bytes = weights_state_and_gradients()
  weights = cost_model.BYTES * adam.num_parameters()
  assert adam.optimizer == "adam" and adam_bytes == pytest.approx(4 * weights)
  adafactor, factored = weights_state_and_gradients("train.optimizer = @Adafactor()")
  assert adafactor.optimizer == "adafactor"  # beta1 0: row and column means of the matrices
  assert 2 * weights < factored < 2.01 * weights
  _, whole = weights_state_and_gradients("train.optimizer = @Adafactor()",
                                         "Adafactor.factored = False")
  assert whole == pytest.approx(3 * weights)
  _, both = weights_state_and_gradients("train.optimizer = @Adafactor()",
                                        "Adafactor.factored = False", "Adafactor.beta1 = 0.9")
  assert both == pytest.approx(4 * weights)


def test_parse_bytes():
  assert configured.parse_bytes("16GiB") == 16 * GIB
  assert configured.parse_bytes("80GB") == 80e9
  assert configured.parse_bytes("1.5e9") == 1.5e9


MTF_AUTO_SCRIPT = """
from tests import mtf_auto  # first: OR-Tools before TensorFlow
from gptneo import runtime
from gptneo.compat import mtf, tf
from gptneo.model import gpt as gpt_lib, ops
with tf.Graph().as_default():
  mtf_graph, mesh = runtime.new_mesh()
  model = gpt_lib.GPT(n_layer=1, n_embd=64, n_head=8, n_ctx=16, n_vocab=128)
  dims = model.dims(8)
  tokens = mtf.import_tf_tensor(mesh, tf.zeros([8, 16], tf.int32), [dims.batch, dims.sequence])
  logits, _ = model(tokens, runtime.variable_dtype("float32"), ops.Dropout(False, 0, 0))
  loss = gpt_lib.loss(logits, tokens, dims.vocab)
  grads = mtf.gradients([loss], [v.outputs[0] for v in mtf_graph.trainable_variables])
  rules = mtf_auto.layout(mtf_graph, mtf.convert_to_shape("x:4;y:2"), [loss] + grads, 60)
  print(sorted(rules.tensor_dimension_to_mesh_axis(mtf.Dimension(d, 8), mtf.convert_to_shape(
      "x:4;y:2")) is not None for d in ("batch", "heads")))
"""


def test_mtf_auto_layout_solves_with_one_worker_instead_of_segfaulting():
  result = subprocess.run([sys.executable, "-c", MTF_AUTO_SCRIPT], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), check=False)
  assert result.returncode == 0, result.stderr[-3000:]  # -11 would be CP-SAT's segfault
  assert result.stdout.strip().startswith("[")


def test_search_never_proposes_what_mtf_rejects():
  """Every pair of searchable dimensions some tensor of the real graph has is a conflict."""
  model = gpt_lib.GPT(n_layer=2, n_embd=64, n_head=8, n_ctx=32, n_vocab=512,
                      moe=moe_lib.MoE(layers=[1], num_experts=4))
  work = cost_model.Workload(2, 64, 8, 32, 512, 256, batch=8, num_experts=4,
                             moe_layers=1).with_optimizer(ADAM)
  searchable = {d for tier in cost_model.TIERS for d in tier}
  with tf.Graph().as_default():
    mtf_graph, mtf_mesh = runtime.new_mesh()
    dims = model.dims(8)
    tokens = mtf.import_tf_tensor(mtf_mesh, tf.zeros([8, 32], tf.int32),
                                  [dims.batch, dims.sequence])
    logits, _ = model(tokens, runtime.variable_dtype("float32"),
                      ops.Dropout(is_training=False, seed=0, step=0))
    loss = gpt_lib.loss(logits, tokens, dims.vocab)
    mtf.gradients([loss], [v.outputs[0] for v in mtf_graph.trainable_variables])
    shapes = runtime.tensor_shapes(mtf_graph)
  together = {tuple(sorted((a, b))) for _, names in shapes for a in names for b in names
              if a < b and {a, b} <= searchable}
  assert ("batch", "experts") in together  # the graph does have such pairs
  assert together <= set(cost_model.conflicts(work)), together - set(cost_model.conflicts(work))


def test_the_layout_file_writes_the_command_and_names_as_gin_strings():
  best = types.SimpleNamespace(mesh_shape=[("x", 2)], layout=[("batch", "x")], memory_bytes=GIB,
                               param_bytes=GIB, step_seconds=1.0, microbatches=2, n_vocab=64,
                               recompute=False)
  work = types.SimpleNamespace(n_vocab=64, recompute=False)
  command = "bin/search_layout --output='x\nimport os\n'"  # newlines in an argument
  text = configured.gin_text(work, best, command)
  assert "import os" not in text.splitlines()
  found_by = text.splitlines()[0].removeprefix("# Found by: ")
  assert gin_utils.statements(f"X = {found_by}", "test")[0].value == command
  assert [(s.selector, s.arg_name, s.value) for s in gin_utils.statements(text, "test")] == [
      ("mesh", "mesh_shape", "x:2"), ("mesh", "layout", "batch:x"),
      ("train", "microbatches_per_batch", 2)]


# The sharded forms (fsdp:x, zero:x; cost_model's docstring) and what the search does with them.
B13_RECOMPUTE = dataclasses.replace(B13, microbatches=4, recompute=True)
EIGHT = (("x", 8),)


def _kinds(work, layout, shape=EIGHT):
  return cost_model.totals(work, shape, tuple(tuple(rule.split(":")) for rule in layout))


def test_fsdp_divides_weights_gradients_and_state_and_adds_the_gathers():
  plain, fsdp = (_kinds(B13_RECOMPUTE, layout) for layout in (["batch:x"], ["batch:x", "fsdp:x"]))
  for kind in ("weights", "gradients", "slots"):  # 5120 and 20480 both divide by 8
    assert fsdp[kind] == pytest.approx(plain[kind] / 8)
  assert fsdp["activations"] == plain["activations"] and plain["gathered"] == 0
  weights, k, m = plain["weights"], 8, 4
  # Per microbatch: an all-gather in the forward, another in the backward (recompute), a
  # reduce-scatter of the gradients, each N(k-1)/k; instead of one allreduce a step, 2N(k-1)/k.
  assert fsdp["comm"] - plain["comm"] == pytest.approx((3 * m - 2) * weights * (k - 1) / k)
  embeddings = (B13.n_vocab + B13.n_ctx) * B13.n_embd
  one_block = (B13.num_parameters() - embeddings) / B13.n_layer
  assert fsdp["gathered"] == pytest.approx(  # x2: regathered beside the forward's
      cost_model.BYTES * (2 * one_block + embeddings), rel=0.001)
  kept = _kinds(dataclasses.replace(B13_RECOMPUTE, recompute=False), ["batch:x", "fsdp:x"])
  assert kept["gathered"] == pytest.approx(weights)  # every gathered weight, for the backward


def test_zero_divides_state_and_gradients_and_gathers_the_update_once():
  plain, zero = (_kinds(B13_RECOMPUTE, layout) for layout in (["batch:x"], ["batch:x", "zero:x"]))
  assert zero["weights"] == plain["weights"] and zero["gathered"] == 0
  assert zero["slots"] == pytest.approx(plain["slots"] / 8)
  assert zero["gradients"] == pytest.approx(plain["gradients"] / 8)
  weights, k, m = plain["weights"], 8, 4  # reduce-scatter per microbatch, all-gather once
  assert zero["comm"] - plain["comm"] == pytest.approx((m + 1 - 2) * weights * (k - 1) / k)


def test_fsdp_and_zero_together_are_refused():
  with pytest.raises(cost_model.UserError, match="exclusive"):
    _kinds(B13, ["batch:x", "fsdp:x", "zero:x"])


def test_a_13b_model_that_fits_only_sharded_is_placed_sharded_and_faster():
  hardware = cost_model.Hardware(16 * GIB)
  replicated = search.search(B13, hardware, devices=256, time_limit=30, forms=("",))
  best = search.search(B13, hardware, devices=256, time_limit=30).candidates[0]
  assert {"fsdp", "zero"} & dict(best.layout).keys()
  assert dict(best.layout)["fsdp" if "fsdp" in dict(best.layout) else "zero"] == (
      dict(best.layout)["batch"])  # on the data axis
  assert best.memory_bytes <= hardware.device_memory
  assert best.utilization > 0.45 > 0.05 > replicated.candidates[0].utilization
  assert best.utilization == pytest.approx(
      6 * B13.num_parameters() * B13.batch * B13.n_ctx / (256 * 50e12) / best.step_seconds)


def test_every_candidate_line_has_its_step_and_utilization(tmp_path):
  output = tmp_path / "layout.gin"
  result = run_binary("search_layout", "--gin_file=gpt3_13b.gin", "--devices=256",
                      f"--output={output}", check=True)
  lines = result.stdout.splitlines()
  header = next(i for i, line in enumerate(lines) if line.startswith("mesh "))
  candidates = lines[header + 1:lines.index(next(x for x in lines if x.startswith("chosen")))]
  assert len(candidates) > 1 and "util." in lines[header]
  for line in candidates:
    step, utilization = line.split()[-2:]
    assert step.endswith("s") and float(step[:-1]) > 0
    assert utilization.endswith("%") and 0 < float(utilization[:-1]) <= 100
  layout = gin_utils.statements(output.read_text(), "test")
  assert "fsdp:x" in [s.value for s in layout if s.arg_name == "layout"][0]


def test_the_search_weighs_adafactor_when_allowed():
  gin_utils.parse(["gpt3_13b.gin"], ['DATASET_DIR = "unused"'])
  work, both = configured.run(256, None, 16 * GIB, 50e9, 50e12, 30, optimizers="adam,adafactor")
  assert work.optimizer == "adam"
  assert {c.optimizer for c in both.candidates} == {"adam", "adafactor"}
  _, adam = configured.run(256, None, 16 * GIB, 50e9, 50e12, 30)
  assert {c.optimizer for c in adam.candidates} == {"adam"}


def test_bfloat16_costs_activations_at_2_bytes_and_gathers_float32_masters():
  shape, layout = (("x", 4), ("y", 2)), ["batch:x", "heads:y", "mlp:y", "fsdp:x"]
  f32, bf16 = (_kinds(dataclasses.replace(B13_RECOMPUTE, activation_bytes=size), layout, shape)
               for size in (4, 2))
  for kind in ("weights", "gradients", "slots"):
    assert bf16[kind] == f32[kind]  # the masters, their gradients and state stay float32
  assert f32["activations"] / 2 < bf16["activations"] < f32["activations"]  # softmax: float32
  assert bf16["gathered"] == pytest.approx(1.5 * f32["gathered"])  # + a bfloat16 copy
  assert bf16["comm"] < f32["comm"]  # the activation allreduces halve, the gathers don't
  gin_utils.parse(["gpt3_1t.gin"], ['DATASET_DIR = "unused"'])
  assert configured.workload_from_gin().activation_bytes == 2


def test_the_default_output_is_in_the_working_directory_not_the_checkouts_gin():
  from gptneo.layout_search import configured  # pylint: disable=g-import-not-at-top
  assert configured.default_output(["gin/gpt3_xl.gin"], 8, "") == "search_gpt3_xl_8.gin"
  assert configured.default_output([], None, "x:2,y:4") == "search_model_x2_y4.gin"


def test_the_cost_models_sharded_forms_are_the_meshs_sharding_rules():
  from gptneo import mesh  # pylint: disable=g-import-not-at-top  (cost_model can't: no TF there)
  assert cost_model.SHARDED_FORMS == mesh.SHARDING_RULES
