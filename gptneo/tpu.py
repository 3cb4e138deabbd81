"""Training on TPUs without TPUEstimator: the SIMD mesh, infeed and a loop on the device.

The pieces, each used by gptneo/train_graph.py's SIMD graph:
- `connect(spec)`: the TPU cluster resolver's master, `tf.tpu.initialize_system()`, and a
  DeviceAssignment of one core per mesh position (mesh larger than the TPU: a one-line error),
  as a `TpuSystem` that runtime.started holds for the process.
- `Infeed`: the host's tf.data iterator (the same saveable one the placement loop uses) gives
  each step's batch; the host cuts it into every core's slice of [batch, sequence] as the
  layout says and enqueues the slices; on the cores, `dequeue` turns them back into mtf
  tensors with `mtf.import_laid_out_tensor`. One host loop feeds all of a session.run's steps.
- `device_loop`: `tf.tpu.replicate` of a `tf.while_loop` that builds one training step (mtf
  graph + SIMD lowering) and runs it `loop_steps` times per session.run.

None of this has run on a real TPU; tests/test_tpu.py builds the whole graph over a synthetic
8-core device assignment. docs/tpu.md has the commands.
"""
import contextlib
import dataclasses

import numpy as np

from gptneo.compat import mtf, tf
from gptneo.errors import UserError
from mesh_tensorflow.experimental import input_reader  # pylint: disable=g-bad-import-order
from tensorflow.python.tpu import tpu_feed  # pylint: disable=g-direct-tensorflow-import

MAX_METRICS = 16  # scalars a step may report (loss, learning rate, norm, auxiliary losses)


@contextlib.contextmanager
def v1_control_flow():
  """TF1 while loops while the TPU graph is built, as TPUEstimator built it.

  mtf creates its slice variables while lowering, inside the loop's body; a TF2 while loop's
  body is a function graph that can't hold new variables, a TF1 loop lifts them out.
  """
  enabled = tf.control_flow_v2_enabled()
  tf.disable_control_flow_v2()
  try:
    yield
  finally:
    if enabled:
      tf.enable_control_flow_v2()


@dataclasses.dataclass(frozen=True)
class TpuSystem:
  """An initialized TPU, as `connect` leaves it: what sessions and lowering need of it."""
  target: str  # the session target: the TPU's master ("" on a TPU VM)
  cluster_def: object  # tf ClusterDef of the TPU's workers, or None
  job: str  # the TPU workers' job name, None on a TPU VM
  device_assignment: object  # tf.tpu.experimental.DeviceAssignment, one core per position


def connect(spec):
  """Resolves and initializes `spec.tpu`; returns its TpuSystem."""
  try:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=spec.tpu)
    target, cluster = resolver.master(), resolver.cluster_spec()
  except (ValueError, RuntimeError, OSError) as error:
    raise UserError(f"mesh.tpu = {spec.tpu!r} does not resolve to a TPU "
                    f"({str(error).splitlines()[0][:160]}); check the name and zone, or use "
                    f"'local' on a TPU VM") from None
  cluster_def = cluster.as_cluster_def() if cluster and cluster.jobs else None
  job = resolver.get_job_name() if target else None  # a TPU VM's own: no job
  config = spec.session_config()
  if cluster_def:
    config.cluster_def.CopyFrom(cluster_def)
  try:
    with tf.Graph().as_default(), tf.Session(target, config=config) as session:
      serialized = session.run(tf.tpu.initialize_system(job=job))
  except tf.errors.OpError as error:
    detail = _error_line(error)
    raise UserError(f"mesh.tpu = {spec.tpu!r}: no TPU to initialize ({detail}); run on a TPU "
                    f"VM with 'local' or name a TPU this machine reaches (docs/tpu.md)") from None
  topology = tf.tpu.experimental.Topology(serialized=serialized)
  return TpuSystem(target, cluster_def, job, device_assignment(spec, topology))


def _error_line(error):
  """The line of a TF error that says what went wrong, without TF's traceback of the node."""
  lines = [line.strip() for line in str(error.message).splitlines() if line.strip()]
  skip = ("Graph execution error", "Detected at node", "File ", "Node:")
  lines = [line for line in lines if not line.startswith(skip)]
  return lines[0][:160] if lines else type(error).__name__


def device_assignment(spec, topology):
  """One core per mesh position, in the lexicographic order mtf's SIMD mesh expects."""
  cores = topology.num_tasks * topology.num_tpus_per_task
  if spec.size > cores:
    raise UserError(f"mesh_shape has {spec.size} positions but TPU {spec.tpu!r} has {cores} "
                    f"cores; pick its layout from gin/layouts/tpu_*.gin")
  return tf.tpu.experimental.DeviceAssignment.build(topology, num_replicas=spec.size)


def synthetic_topology(num_chips, cores_per_chip=2):
  """The topology of a made-up single-host TPU, so SIMD graphs build without one."""
  coordinates = [[x, 0, 0, core] for x in range(num_chips) for core in range(cores_per_chip)]
  return tf.tpu.experimental.Topology(
      mesh_shape=[num_chips, 1, 1, cores_per_chip],
      device_coordinates=np.array([coordinates], dtype=np.int32))


def synthetic_device_assignment(num_chips, cores_per_chip=2):
  """A DeviceAssignment of every core of `synthetic_topology`."""
  return tf.tpu.experimental.DeviceAssignment.build(
      synthetic_topology(num_chips, cores_per_chip), num_replicas=num_chips * cores_per_chip)


def synthetic_system(num_chips, cores_per_chip=2):
  """A TpuSystem of `synthetic_device_assignment`: SIMD graphs build on it, never run."""
  return TpuSystem("", None, None, synthetic_device_assignment(num_chips, cores_per_chip))


def host_devices(rt):
  """The CPU devices of the hosts whose cores runtime `rt`'s mesh uses, in order, each once."""
  assignment = rt.tpu.device_assignment
  return list(dict.fromkeys(assignment.host_device(replica=p) for p in range(rt.spec.size)))


def variable_placer(rt):
  """Master weights on the TPU hosts' CPUs, balanced by size (as GPT-Neo placed them)."""
  return mtf.utils.BalancedVariablePlacer(host_devices(rt))


class Infeed:
  """Feeds each step's [batch, n_ctx + 1] windows to the cores, sliced as the layout says.

  Args:
    rt: a runtime.Runtime of a "simd" mesh, with its TpuSystem.
    next_batch: a function returning the host's next [batch, n_ctx + 1] int32 tensor.
    shape: the mtf.Shape of tokens and targets, [batch, sequence].
    loop_steps: int32 tf scalar, the batches one session.run enqueues.
  """

  def __init__(self, rt, next_batch, shape, loop_steps):
    self._impl, self._shape = rt.mesh_impl(), shape
    self._devices = input_reader.ProcessDevices(self._impl)
    slice_shape = self._impl.slice_shape(shape)
    self._queue = tpu_feed.InfeedQueue(number_of_tuple_elements=2,
                                       tuple_types=[tf.int32, tf.int32],
                                       tuple_shapes=[slice_shape, slice_shape])
    with tf.device(host_devices(rt)[0]):
      self.enqueue = tf.while_loop(
          lambda i: i < loop_steps, lambda i: self._enqueue_one(next_batch(), i),
          [tf.constant(0)], parallel_iterations=1, name="infeed_loop")

  def _enqueue_one(self, batch, i):
    """Enqueues one batch's slices on every core; returns i + 1 once they are enqueued."""
    tokens, targets = batch[:, :-1], batch[:, 1:]
    per_core = [[self._slice(tokens, p), self._slice(targets, p)] for p in range(self._impl.size)]
    enqueue_ops = self._queue.generate_enqueue_ops(
        per_core, tpu_ordinal_function=lambda p: self._devices.ordered_ordinals[p],
        placement_function=lambda p: self._devices.ordered_hosts[p])
    with tf.control_dependencies(enqueue_ops):
      return i + 1

  def _slice(self, tensor, pnum):
    begin = self._impl.slice_begin(self._shape, pnum)
    return tf.slice(tensor, begin, self._impl.slice_shape(self._shape))

  def dequeue(self, mtf_mesh):
    """On a core: this step's tokens and targets as mtf tensors of `shape`."""
    tokens, targets = self._queue.generate_dequeue_op()
    laid_out = mtf.simd_mesh_impl.SimdMeshImpl.LaidOutTensor
    return (mtf.import_laid_out_tensor(mtf_mesh, laid_out([tokens]), self._shape, "tokens"),
            mtf.import_laid_out_tensor(mtf_mesh, laid_out([targets]), self._shape, "targets"))


def device_loop(rt, body, start, loop_steps):
  """Runs `body` `loop_steps` times on every core, as one TPU program per session.run.

  Args:
    rt: a runtime.Runtime of a "simd" mesh, with its TpuSystem.
    body: step (int64 tf scalar) -> (update op, [float scalars]); builds and lowers one step.
    start: int64 host scalar, the step the loop starts at.
    loop_steps: int32 host scalar, the steps this session.run takes.

  Returns:
    The body's scalars as host tensors: the first averaged over the loop, the others of its
    last step.
  """
  count = []

  def step_fn(first, steps, i, metrics):
    updates, values = body(first + tf.cast(i, first.dtype))
    if len(values) > MAX_METRICS:
      raise ValueError(f"a TPU step reports {len(values)} scalars, more than {MAX_METRICS}")
    count.append(len(values))
    vector = tf.pad(tf.stack([tf.cast(v, tf.float32) for v in values]),
                    [[0, MAX_METRICS - len(values)]])
    with tf.control_dependencies([updates]):
      return first, steps, i + 1, tf.concat([metrics[:1] + vector[:1], vector[1:]], 0)

  def computation(first, steps):
    outputs = tf.while_loop(lambda f, s, i, m: i < s, step_fn,
                            [first, steps, tf.constant(0), tf.zeros([MAX_METRICS])],
                            parallel_iterations=1, name="train_loop")
    return [outputs[-1]]

  metrics = tf.tpu.replicate(computation, inputs=[[start, loop_steps]] * rt.spec.size,
                             device_assignment=rt.tpu.device_assignment)[0][0]
  mean = metrics[0] / tf.cast(loop_steps, tf.float32)
  return [mean] + [metrics[k] for k in range(1, count[0])]


def shutdown_ops(system):
  """Run last on a TPU session: releases the TPU system."""
  return [tf.tpu.shutdown_system(job=system.job)]
