"""Training on TPUs without TPUEstimator: the SIMD mesh, infeed and a loop on the device.

The pieces, each used by gptneo/train_graph.py's SIMD graph:
- `connect(spec)`: the TPU cluster resolver's master, `tf.tpu.initialize_system()`, and a
  DeviceAssignment of one core per mesh position (mesh larger than the TPU: a one-line error),
  as a `TpuSystem` that runtime.started holds for the process.
- `Infeed`: every host runs the training pipeline (the same dataset, so the same global
  batches a single host reads), keeps the rows its own cores hold, cuts them into each core's
  slice of [batch, sequence] as the layout says and enqueues them; on the cores, `dequeue`
  turns them back into mtf tensors with `mtf.import_laid_out_tensor`. One loop per host feeds
  all of a session.run's steps; `IteratorsPosition` saves the hosts' common data position.
- `device_loop`: `tf.tpu.replicate` of a `tf.while_loop` that builds one training step (mtf
  graph + SIMD lowering) and runs it `loop_steps` times per session.run.
- `device_call`: `tf.tpu.replicate` of a computation run once per session.run (validation:
  one batch, fed by an `Infeed` without a host loop).

None of this has run on a real TPU; tests/test_tpu.py builds the whole graph over synthetic
device assignments (one host of 8 cores, 4 hosts of 8 cores). docs/tpu.md has the commands.
"""
import contextlib
import dataclasses

import numpy as np

from gptneo.compat import mtf, tf
from gptneo.errors import UserError
from mesh_tensorflow.experimental import input_reader  # pylint: disable=g-bad-import-order
from tensorflow.python.tpu import tpu_feed  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.training.saving import saveable_object  # pylint: disable=g-direct-tensorflow-import

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


def synthetic_topology(num_chips, cores_per_chip=2, num_hosts=1):
  """The topology of a made-up TPU of `num_hosts` hosts with `num_chips` chips each in a row,
  so SIMD graphs build without one."""
  coordinates = [[[x, 0, 0, core] for x in range(host * num_chips, (host + 1) * num_chips)
                  for core in range(cores_per_chip)] for host in range(num_hosts)]
  return tf.tpu.experimental.Topology(
      mesh_shape=[num_hosts * num_chips, 1, 1, cores_per_chip],
      device_coordinates=np.array(coordinates, dtype=np.int32))


def synthetic_device_assignment(num_chips, cores_per_chip=2, num_hosts=1):
  """A DeviceAssignment of every core of `synthetic_topology`."""
  return tf.tpu.experimental.DeviceAssignment.build(
      synthetic_topology(num_chips, cores_per_chip, num_hosts),
      num_replicas=num_hosts * num_chips * cores_per_chip)


def synthetic_system(num_chips, cores_per_chip=2, num_hosts=1):
  """A TpuSystem of `synthetic_device_assignment`: SIMD graphs build on it, never run."""
  return TpuSystem("", None, None,
                   synthetic_device_assignment(num_chips, cores_per_chip, num_hosts))


def host_devices(rt):
  """The CPU devices of the hosts whose cores runtime `rt`'s mesh uses, in order, each once."""
  assignment = rt.tpu.device_assignment
  return list(dict.fromkeys(assignment.host_device(replica=p) for p in range(rt.spec.size)))


def variable_placer(rt):
  """Master weights on the TPU hosts' CPUs, balanced by size (as GPT-Neo placed them)."""
  return mtf.utils.BalancedVariablePlacer(host_devices(rt))


class Infeed:
  """Feeds each step's [batch, n_ctx + 1] windows to the cores, sliced as the layout says.

  Every host reads its cores' input itself: each runs the training pipeline (its own iterator
  of the same dataset, so the same global batches, in the same order, as one host would read),
  keeps the batch's rows its own cores hold, slices them per core and enqueues them from that
  host. Nothing of the input crosses hosts.

  Args:
    rt: a runtime.Runtime of a "simd" mesh, with its TpuSystem.
    make_iterator: a function returning a new initializable iterator of a pipeline whose
      elements hold [batch, n_ctx + 1] int32 windows (the training batches; validation's
      (windows, weights)); called once per host, under that host's device.
    shape: the mtf.Shape of tokens and targets, [batch, sequence].
    loop_steps: int32 tf scalar, the batches one session.run enqueues (a loop on each host);
      None: one batch per session.run, its elements kept in `elements` (one per host, the same
      batch) for that session.run to fetch.
    windows_of: an element's [batch, n_ctx + 1] windows.
  """

  def __init__(self, rt, make_iterator, shape, loop_steps=None, windows_of=lambda x: x):
    self._impl, self._shape = rt.mesh_impl(), shape
    self._devices = input_reader.ProcessDevices(self._impl)
    self.hosts = list(dict.fromkeys(self._devices.ordered_hosts))
    # The cores' queue, as each host's enqueues and the cores' dequeue see it (an InfeedQueue
    # object generates one set of enqueue ops: one object per host, one for the dequeue).
    self._queues = {key: self._new_queue() for key in [*self.hosts, "cores"]}
    self.iterators, self.elements, enqueues = [], [], []
    for host in self.hosts:
      with tf.device(host):
        iterator = make_iterator()
        self.iterators.append(iterator)
        if loop_steps is None:
          self.elements.append(iterator.get_next())
          enqueues.append(tf.group(self._enqueue(host, windows_of(self.elements[-1]))))
        else:
          enqueues.append(tf.while_loop(
              lambda i: i < loop_steps,
              lambda i, host=host, iterator=iterator: self._enqueue_one(
                  host, windows_of(iterator.get_next()), i),
              [tf.constant(0)], parallel_iterations=1, name="infeed_loop"))
    self.enqueue = tf.group(enqueues)

  def _new_queue(self):
    slice_shape = self._impl.slice_shape(self._shape)
    return tpu_feed.InfeedQueue(number_of_tuple_elements=2, tuple_types=[tf.int32, tf.int32],
                                tuple_shapes=[slice_shape, slice_shape])

  def host_pnums(self, host):
    """The mesh positions (pnums) whose cores are on `host`, in order."""
    return [p for p in range(self._impl.size) if self._devices.ordered_hosts[p] == host]

  def host_rows(self, host):
    """The rows of the global batch that `host`'s cores hold, in order."""
    rows_per_slice = self._impl.slice_shape(self._shape)[0]
    starts = sorted({self._impl.slice_begin(self._shape, p)[0] for p in self.host_pnums(host)})
    return [row for start in starts for row in range(start, start + rows_per_slice)]

  def host_slices(self, host, batch):
    """{pnum: [tokens, targets]} of each of `host`'s cores, from the global `batch` (only its
    rows are read: the others never leave the host's pipeline)."""
    rows = self.host_rows(host)
    mine = tf.gather(batch, rows)
    slices = {}
    for pnum in self.host_pnums(host):
      begin = self._impl.slice_begin(self._shape, pnum)
      local = [rows.index(begin[0]), begin[1]]
      size = self._impl.slice_shape(self._shape)
      slices[pnum] = [tf.slice(mine[:, :-1], local, size), tf.slice(mine[:, 1:], local, size)]
    return slices

  def _enqueue(self, host, batch):
    """The ops enqueueing one global batch's slices on the host's cores."""
    slices = self.host_slices(host, batch)
    pnums = sorted(slices)
    return self._queues[host].generate_enqueue_ops(
        [slices[p] for p in pnums],
        tpu_ordinal_function=lambda k: self._devices.ordered_ordinals[pnums[k]],
        placement_function=lambda k: host)

  def _enqueue_one(self, host, batch, i):
    """Enqueues one batch's slices on the host's cores; returns i + 1 once they are enqueued."""
    with tf.control_dependencies(self._enqueue(host, batch)):
      return i + 1

  def dequeue(self, mtf_mesh):
    """On a core: this step's tokens and targets as mtf tensors of `shape`."""
    tokens, targets = self._queues["cores"].generate_dequeue_op()
    laid_out = mtf.simd_mesh_impl.SimdMeshImpl.LaidOutTensor
    return (mtf.import_laid_out_tensor(mtf_mesh, laid_out([tokens]), self._shape, "tokens"),
            mtf.import_laid_out_tensor(mtf_mesh, laid_out([targets]), self._shape, "targets"))


class IteratorsPosition(saveable_object.SaveableObject):
  """The data position of several hosts' iterators of one pipeline, all in the same state:
  saved from the first (under the name a single iterator's position has), restored into all.

  Args:
    iterators: initializable iterators of the same dataset, the first saved.
    external_state_policy: as tf.data.experimental.make_saveable_from_iterator's.
  """

  def __init__(self, iterators, external_state_policy):
    self._each = [tf.data.experimental.make_saveable_from_iterator(
        iterator, external_state_policy=external_state_policy) for iterator in iterators]
    first = self._each[0]
    super().__init__(first.op, first.specs, first.name)

  def restore(self, restored_tensors, restored_shapes):
    return tf.group([each.restore(restored_tensors, restored_shapes) for each in self._each])


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


def device_call(rt, computation):
  """Runs `computation` once on every core, as one TPU program per session.run.

  Args:
    rt: a runtime.Runtime of a "simd" mesh, with its TpuSystem.
    computation: () -> [tf tensors]; builds and lowers an mtf graph on the cores, returning
      tensors every core holds whole (e.g. lowering.export_to_tf_tensor's).

  Returns:
    The computation's tensors, of the first core (every core holds the same).
  """
  return tf.tpu.replicate(computation, inputs=[[]] * rt.spec.size,
                          device_assignment=rt.tpu.device_assignment)[0]


def shutdown_ops(system):
  """Run last on a TPU session: releases the TPU system."""
  return [tf.tpu.shutdown_system(job=system.job)]
