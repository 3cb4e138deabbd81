"""The TPU training loop, as far as it can be checked without a TPU: the whole graph (infeed,
replicated device loop, validation program, checkpoint saver) builds over synthetic device
assignments (one host of 8 cores; a pod of 4 hosts of 8 cores, each reading its own cores'
input), and bad TPU configs are one-line errors before the model dir is touched."""
import importlib.util
import numpy as np
import pytest

from gptneo import evaluate as evaluate_lib
from gptneo import hardware_check
from gptneo import loop as loop_lib
from gptneo import mesh as mesh_lib
from gptneo import runtime
from gptneo import tpu
from gptneo import train as train_lib
from gptneo import train_graph
from gptneo.harness import run as harness_run
from gptneo.compat import mtf, tf
from gptneo.data import inputs
from gptneo.model import gpt as gpt_lib
from gptneo.optim import optimizers
from tests.conftest import N_CTX, TINY_TEST_BINDINGS, VOCAB, run_binary
from tests.test_errors import assert_one_line_error

MODEL = dict(n_layer=2, n_embd=32, n_head=4, n_ctx=N_CTX, n_vocab=VOCAB)
BATCH = 8


def simd_spec(mesh_shape="x:4,y:2", layout="batch:x,heads:y,mlp:y,vocab:y"):
  return mesh_lib.mesh(mesh_shape=mesh_shape, layout=layout, implementation="simd", tpu="local")


def settings(model, spec, dataset_dir, **knobs):
  """The knobs both loops are built with here (eval_batches 0: no validation unless asked)."""
  knobs = {"batch_size": BATCH, "eval_batches": 0, **knobs}
  return train_lib.settings(model=model, optimizer=optimizers.Adam(), mesh=spec,
                            dataset_dir=dataset_dir, train_steps=100, seed=1,
                            precision="bfloat16", microbatches_per_batch=2, clip_norm=1.0,
                            keep_checkpoints=3, **knobs)


@pytest.fixture(scope="module")
def tpu_graph(small_dataset, tmp_path_factory):
  model = gpt_lib.GPT(**MODEL, z_loss=1e-4)  # an auxiliary loss, reported like the placement's
  rt = runtime.Runtime(simd_spec(), tpu=tpu.synthetic_system(num_chips=4))
  return train_graph.build(settings(model, rt.spec, small_dataset, steps_per_loop=10),
                           str(tmp_path_factory.mktemp("tpu_run")), rt)


def op_types(graph):
  return [op.type for op in graph.graph.get_operations()]


def test_training_graph_feeds_every_core_and_loops_on_the_device(tpu_graph):
  types = op_types(tpu_graph)
  assert types.count("InfeedEnqueueTuple") == 8  # one per core, each its slice of the batch
  assert types.count("InfeedDequeueTuple") == 1  # in the replicated step, on every core
  assert "TPUReplicateMetadata" in types and types.count("TPUReplicatedInput") >= 2
  enqueues = [op for op in tpu_graph.graph.get_operations() if op.type == "InfeedEnqueueTuple"]
  assert sorted(op.get_attr("device_ordinal") for op in enqueues) == list(range(8))
  shapes = {tuple(dim.size for dim in shape.dim)
            for op in enqueues for shape in op.get_attr("shapes")}
  assert shapes == {(BATCH // 4, N_CTX)}  # batch split 4-way over x, sequence whole
  assert tpu_graph.steps_per_run == 10 and tpu_graph.enqueue is not None


def test_slice_variables_live_on_the_cores_and_masters_on_the_host(tpu_graph):
  ops = tpu_graph.graph.get_operations()
  slices = [op for op in ops if op.type == "VarHandleOp" and "_slice_" in op.name]
  assert {op.device for op in slices} == {f"/task:0/device:TPU:{core}" for core in range(8)}
  masters = tpu_graph.graph.get_collection(tf.GraphKeys.GLOBAL_VARIABLES)
  assert masters and all("CPU" in v.device for v in masters), {v.device for v in masters}


def saved_names(graph):
  """The names the graph's checkpoint saver writes (the SaveV2 op's tensor_names)."""
  save = [op for op in graph.get_operations() if op.type == "SaveV2"]
  assert len(save) == 1
  return set(tf.make_ndarray(save[0].inputs[1].op.get_attr("value")).astype(str))


def test_checkpoint_holds_what_the_placement_loop_restores(tpu_graph, small_dataset, tmp_path):
  """Masters, optimizer slots, step and data position, by the placement graph's names."""
  spec = mesh_lib.mesh()
  placement = train_graph.build(settings(gpt_lib.GPT(**MODEL, z_loss=1e-4), spec, small_dataset),
                                str(tmp_path), runtime.Runtime(spec))
  names = saved_names(tpu_graph.graph)
  assert names == saved_names(placement.graph)
  assert {"global_step", "gpt/wte", "gpt/wte/adam_m"} <= names
  assert not any("_slice_" in name for name in names)


def test_step_reports_the_placement_loops_metrics(tpu_graph):
  assert tpu_graph.loss.dtype == tf.float32 and tpu_graph.loss.shape == []
  assert set(tpu_graph.aux_losses) == {"z_loss"}
  assert tpu_graph.eval_loss is None and tpu_graph.train_op.type == "AssignAddVariableOp"


def test_loop_lengths_stop_at_logs_and_checkpoints():
  runs, step = [], 0
  while step < 45:
    steps = loop_lib.steps_this_run(step, 0, 45, 16, (10, 20, 0))
    runs.append(steps)
    step += steps
  assert runs == [1, 9, 10, 10, 10, 5]  # step 1 is logged alone, then every 10, end at 45
  assert loop_lib.steps_this_run(7, 7, 100, 1, (10, 20, 0)) == 1  # placement: always one


def test_mesh_larger_than_the_tpu_is_a_one_line_error():
  spec = mesh_lib.mesh(mesh_shape="x:16", layout="batch:x", implementation="simd", tpu="v3-8")
  with pytest.raises(ValueError, match="16 positions but TPU 'v3-8' has 8 cores"):
    tpu.device_assignment(spec, tpu.synthetic_topology(num_chips=4))
  assert tpu.device_assignment(simd_spec(), tpu.synthetic_topology(num_chips=4)).num_replicas == 8


# The harness's lm-eval is installed by the cpu profile (requirements-interop.txt), not yet by
# the tpu one: these run in the cpu job.
NEEDS_LM_EVAL = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval is not installed (the tpu profile)")


@pytest.mark.parametrize("bindings, fragments", [
    (["mesh.implementation = 'simd'"], ["set mesh.tpu"]),
    # periodic evaluation and the harness are accepted on the TPU: only the TPU is missing
    (["mesh.implementation = 'simd'", "mesh.tpu = 'local'", "train.eval_every_n_steps = 5"],
     ["mesh.tpu = 'local'", "no TPU to initialize"]),
    pytest.param(["mesh.implementation = 'simd'", "mesh.tpu = 'local'",
                  "train.harness_tasks = ['gptneo_lambada']"],
                 ["mesh.tpu = 'local'", "no TPU to initialize"], marks=NEEDS_LM_EVAL),
    (["train.steps_per_loop = 4"], ["train.steps_per_loop = 4", "TPU only"]),
    (["mesh.implementation = 'simd'", "mesh.tpu = 'local'"],  # this machine has no TPU
     ["mesh.tpu = 'local'", "no TPU to initialize"]),
    (["mesh.implementation = 'simd'", "mesh.tpu = 'local'", "train.steps_per_loop = 0"],
     ["train.steps_per_loop = 0", "positive integer"]),
])
def test_bad_tpu_config_stops_before_touching_the_model_dir(bindings, fragments, tmp_path, small_dataset):
  params = TINY_TEST_BINDINGS + [f'DATASET_DIR = "{small_dataset}"', "train.train_steps = 2",
                                 "mesh.mesh_shape = 'x:2'", "mesh.layout = 'batch:x'", *bindings]
  model_dir = tmp_path / "run"
  result = run_binary("train", "--gin_file=tiny.gin", f"--model_dir={model_dir}",
                      *[f"--gin_param={p}" for p in params])
  assert_one_line_error(result, "train", *fragments)
  assert not model_dir.exists() or not any(model_dir.iterdir())


@pytest.mark.parametrize("layout, fragments", [
    ("layouts/tpu_v3_8.gin", ["mesh.tpu = 'local'", "no TPU to initialize"]),  # none here
    ("layouts/cpu2_data.gin", ["--layout=layouts/cpu2_data.gin", "not a TPU layout"]),
])
def test_first_run_check_without_a_tpu_stops_in_one_line(layout, fragments, tmp_path):
  work_dir = tmp_path / "check"
  result = run_binary("tpu_check", "--tpu=local", f"--layout={layout}",
                      f"--work_dir={work_dir}")
  assert_one_line_error(result, "tpu_check", *fragments)
  assert not work_dir.exists()


@NEEDS_LM_EVAL
def test_a_tpu_run_scores_the_harness_on_its_hosts_cpu(small_dataset, tmp_path):
  """The harness's restored model runs on a placement mesh only: between device loops, on the
  host's CPU, a one-device placement mesh (the numbers of gptneo-lm-eval on CPU)."""
  rt = runtime.Runtime(simd_spec(), tpu=tpu.synthetic_system(num_chips=4))
  s = settings(gpt_lib.GPT(**MODEL), rt.spec, small_dataset, harness_tasks=["gptneo_lambada"])
  scorer = harness_run.training_scorer(s, rt, str(tmp_path))
  assert scorer.rt.spec == mesh_lib.MeshSpec([], [], ["/cpu:0"]) and scorer.rt.tpu is None
  placement = runtime.Runtime(mesh_lib.mesh())
  assert harness_run.training_scorer(s, placement, str(tmp_path)).rt is placement


def test_gpu_first_run_check_without_a_gpu_stops_in_one_line(tmp_path):
  work_dir = tmp_path / "check"
  result = run_binary("gpu_check", f"--work_dir={work_dir}")
  assert_one_line_error(result, "gpu_check", "no GPU visible to TensorFlow",
                        "make install PROFILE=gpu")
  assert not work_dir.exists()


def test_first_run_report_is_one_for_both_accelerators_and_fails_a_loss_that_does_not_fall():
  options = hardware_check.Options("runs/check", 300, "")
  curves = {"accelerator": [8.3, 7.9], "cpu": [8.3, 3.1]}
  for accelerator in (hardware_check.gpu(), hardware_check.tpu("local", "layouts/x.gin")):
    name = accelerator.name
    report = hardware_check._report(accelerator, f"one {name}", options, curves,  # pylint: disable=protected-access
                                    {"accelerator": 3.1, "cpu": 3.1}, {"tokens_per_sec": 9e3})
    assert not report.passed
    assert report.text.startswith(f"# gptneo-{name.lower()}-check\n\none {name}; tiny.gin")
    assert f"| the loss falls on the {name} | 8.3000 -> 7.9000 | FAIL |" in report.text
    assert f"| one step from the {name} checkpoint, {name} vs CPU | 3.10000 vs 3.10000 | pass |" \
        in report.text
    assert f"{name} throughput: 9000 tokens/s (MFU: give --peak_flops)" in report.text


# A pod: 4 hosts of 4 chips x 2 cores. The batch is split 8-way over x, heads 4-way over y.
POD = dict(num_chips=4, cores_per_chip=2, num_hosts=4)
POD_BATCH = 16


@pytest.fixture(scope="module")
def pod(small_dataset, tmp_path_factory):
  """The training graph over the 4-host pod, and its runtime."""
  rt = runtime.Runtime(simd_spec("x:8,y:4"), tpu=tpu.synthetic_system(**POD))
  knobs = dict(steps_per_loop=10, batch_size=POD_BATCH)
  built = train_graph.build(settings(gpt_lib.GPT(**MODEL), rt.spec, small_dataset, **knobs),
                            str(tmp_path_factory.mktemp("pod_run")), rt)
  return built, rt


def data_inputs(op, stop):
  """The ops `op` reads data from (not control), transitively, short of `stop` ops' types."""
  seen, todo = set(), [t.op for t in op.inputs]
  while todo:
    current = todo.pop()
    if current not in seen:
      seen.add(current)
      if current.type not in stop:
        todo.extend(t.op for t in current.inputs)
  return seen


def test_every_host_reads_and_enqueues_only_its_own_cores_input(pod):
  built, rt = pod
  ops = built.graph.get_operations()
  hosts = [f"/task:{task}/device:CPU:0" for task in range(4)]
  readers = [op for op in ops if op.type == "IteratorGetNext"]
  assert sorted(op.device for op in readers) == hosts  # one pipeline per host, on it
  enqueues = [op for op in ops if op.type == "InfeedEnqueueTuple"]
  assert len(enqueues) == 32
  assignment = rt.tpu.device_assignment
  for op in enqueues:
    host = op.device
    # every tensor the enqueue's data comes from was made on its own host: none crossed
    assert {x.device for x in data_inputs(op, stop={"IteratorV2"})} == {host}, op.name
    ordinal = op.get_attr("device_ordinal")
    cores = [p for p in range(32) if assignment.host_device(replica=p) == host and
             assignment.tpu_ordinal(replica=p) == ordinal]
    assert len(cores) == 1  # the enqueue feeds a core of its own host
    shapes = [tuple(dim.size for dim in shape.dim) for shape in op.get_attr("shapes")]
    assert shapes == [(POD_BATCH // 8, N_CTX)] * 2


def batches(dataset_dir, steps):
  """The first `steps` global batches of the training pipeline, as a single host reads them."""
  with tf.Graph().as_default(), tf.Session() as session:
    iterator = tf.data.make_initializable_iterator(inputs.make_dataset(
        dataset_dir, "train", POD_BATCH, seed=1))
    session.run(iterator.initializer)
    batch = iterator.get_next()
    return [session.run(batch) for _ in range(steps)]


def test_each_core_gets_the_layouts_slice_of_a_one_host_runs_batches(pod, small_dataset):
  """Each host's pipeline gives the global batches of a one-host run, in its order, and from
  them every core gets exactly the [batch, sequence] slice the layout assigns it."""
  _, rt = pod
  expected = batches(small_dataset, steps=3)

  def pipeline():
    return tf.data.make_initializable_iterator(
        inputs.make_dataset(small_dataset, "train", POD_BATCH, seed=1))

  assert_cores_get_their_slices(rt, pipeline, expected)


def pod_shape():
  dims = gpt_lib.GPT(**MODEL).dims(POD_BATCH)
  return mtf.Shape([dims.batch, dims.sequence])


def assert_cores_get_their_slices(rt, pipeline, expected, windows_of=lambda x: x, ends=False):
  """Runs each host's pipeline and slicing of the pod's Infeed here; every core's slice of
  each batch must be the layout's slice of `expected`'s windows (and with `ends`, the pipeline
  ends after them). Returns host 0's elements."""
  shape = pod_shape()
  with tf.Graph().as_default():  # the pod's Infeed: its enqueues can't run here
    infeed = tpu.Infeed(rt, pipeline, shape, windows_of=windows_of)
  # Each host's pipeline and slicing, as its own loop runs them, here on this machine.
  with tf.Graph().as_default(), tf.Session() as session:
    per_host, first = {}, None
    for host in infeed.hosts:
      iterator = pipeline()
      session.run(iterator.initializer)
      element = iterator.get_next()
      first = element if first is None else first
      per_host[host] = infeed.host_slices(host, windows_of(element))
    impl, firsts = rt.mesh_impl(), []
    for batch in expected:
      hosts_slices, host_0 = session.run([list(per_host.values()), first])
      firsts.append(host_0)
      fed = {pnum: pair for slices in hosts_slices for pnum, pair in slices.items()}
      assert sorted(fed) == list(range(32)) == sorted(p for s in hosts_slices for p in s)
      for pnum, (tokens, targets) in fed.items():
        (row, column), (rows, columns) = impl.slice_begin(shape, pnum), impl.slice_shape(shape)
        window = windows_of(batch)[row:row + rows]
        np.testing.assert_array_equal(tokens, window[:, column:column + columns])
        np.testing.assert_array_equal(targets, window[:, column + 1:column + columns + 1])
    if ends:
      with pytest.raises(tf.errors.OutOfRangeError):
        session.run(first)
  return firsts


def test_each_core_gets_its_slice_of_the_batches_gptneo_eval_scores(pod_with_validation,
                                                                    small_dataset):
  """The validation program's input: every host reads the batches bin/eval reads (the split
  once, in stored order, the last padded), every core gets its slice of them, and the weights
  and targets the host sums with (LmTotals, as bin/eval) are bin/eval's; the loop runs as many
  batches as there are."""
  built, rt = pod_with_validation
  evals = list(evaluate_lib._windows(small_dataset, "validation", POD_BATCH, 0))  # bin/eval's
  assert len(evals) == built.eval_batches(0) > 1

  def pipeline():
    return tf.data.make_initializable_iterator(
        inputs.evaluation_batches(small_dataset, "validation", POD_BATCH, 0))

  fetched = assert_cores_get_their_slices(rt, pipeline, evals, windows_of=lambda x: x[0],
                                          ends=True)
  for (windows, weights), (eval_windows, eval_weights) in zip(fetched, evals, strict=True):
    np.testing.assert_array_equal(windows, eval_windows)
    np.testing.assert_array_equal(weights, eval_weights)


def test_the_pods_data_position_is_saved_as_one_hosts_and_restored_on_every_host(
    pod, tpu_graph):
  built, _ = pod
  assert saved_names(built.graph) == saved_names(tpu_graph.graph)
  restores = [op for op in built.graph.get_operations() if op.type == "DeserializeIterator"]
  assert sorted(op.device for op in restores) == [f"/task:{t}/device:CPU:0" for t in range(4)]


@pytest.fixture(scope="module")
def pod_with_validation(small_dataset, tmp_path_factory):
  """The pod's training graph with periodic validation, and its runtime."""
  rt = runtime.Runtime(simd_spec("x:8,y:4"), tpu=tpu.synthetic_system(**POD))
  knobs = dict(steps_per_loop=10, batch_size=POD_BATCH, eval_every_n_steps=10, eval_batches=None)
  built = train_graph.build(settings(gpt_lib.GPT(**MODEL), rt.spec, small_dataset, **knobs),
                            str(tmp_path_factory.mktemp("pod_eval_run")), rt)
  return built, rt


def test_the_validation_program_reads_the_training_steps_variables_and_saves_nothing_new(
    pod_with_validation, pod):
  built, _ = pod_with_validation
  ops = built.graph.get_operations()
  variables = sorted(op.name for op in ops if op.type == "VarHandleOp")
  assert variables == sorted(op.name for op in pod[0].graph.get_operations()
                             if op.type == "VarHandleOp")  # the slices and masters, once each
  assert saved_names(built.graph) == saved_names(pod[0].graph)
  # Two TPU programs: the training loop and the validation batch, each with its dequeue.
  assert [op.type for op in ops].count("TPUReplicateMetadata") == 2
  assert [op.type for op in ops].count("InfeedDequeueTuple") == 2
  fetches = built.eval_fetches
  assert fetches["token_nll"].shape == fetches["targets"].shape == (POD_BATCH, N_CTX)
  assert fetches["argmax"].shape == (POD_BATCH, N_CTX) and fetches["weights"].shape[0] == POD_BATCH


def test_every_host_reads_and_enqueues_only_its_own_cores_validation_input(
    pod_with_validation, small_dataset):
  built, rt = pod_with_validation
  feeding = train_graph.ancestors([built.eval_fetches["enqueue"]])
  readers = [op for op in feeding if op.type == "IteratorGetNext"]
  assert sorted(op.device for op in readers) == [f"/task:{t}/device:CPU:0" for t in range(4)]
  enqueues = [op for op in feeding if op.type == "InfeedEnqueueTuple"]
  assert len(enqueues) == 32
  assignment = rt.tpu.device_assignment
  for op in enqueues:
    assert {x.device for x in data_inputs(op, stop={"IteratorV2"})} == {op.device}, op.name
    ordinal = op.get_attr("device_ordinal")
    assert len([p for p in range(32) if assignment.host_device(replica=p) == op.device and
                assignment.tpu_ordinal(replica=p) == ordinal]) == 1
    shapes = [tuple(dim.size for dim in shape.dim) for shape in op.get_attr("shapes")]
    assert shapes == [(POD_BATCH // 8, N_CTX)] * 2
  # A pass is counted from dataset.json: the TPU program never waits on an infeed that ended.
  windows = inputs.read_dataset_info(small_dataset)["splits"]["validation"]["windows"]
  assert built.eval_batches(0) == -(-windows // POD_BATCH) and built.eval_batches(1) == 1
