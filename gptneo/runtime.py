"""What every loop shares: precision, the mtf mesh, lowering, and the runtime of a mesh
(`with started(spec) as rt:`): this process's server, TPU system, peers and session.
Checkpoints of mesh variables are checkpoints.py's."""
import contextlib
import dataclasses
import os
import socket
import sys
import time

from gptneo import tpu as tpu_lib
from gptneo.compat import mtf, tf
from gptneo.errors import UserError
from gptneo.mesh import MESH_NAME, Sharding

PRECISIONS = ("float32", "bfloat16")


def variable_dtype(precision):
  """float32 everywhere, or bfloat16 activations over float32 master weights."""
  if precision not in PRECISIONS:
    raise UserError(f"precision = {precision!r}; use one of {PRECISIONS}")
  activation = tf.float32 if precision == "float32" else tf.bfloat16
  return mtf.VariableDType(master_dtype=tf.float32, slice_dtype=tf.float32,
                           activation_dtype=activation)


def cpu_has_native_bfloat16(cpuinfo="/proc/cpuinfo"):
  """Whether this CPU multiplies bfloat16 in hardware (AVX512_BF16 or AMX); None if unknown.

  oneDNN runs bfloat16 matmuls at about twice the float32 rate there, and emulates them,
  slower than float32, elsewhere (e.g. on AVX2-only CPUs).
  """
  try:
    with open(cpuinfo) as f:
      flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")),
                   None)
  except OSError:
    return None
  return None if flags is None else bool({"avx512_bf16", "amx_bf16"} & set(flags))


class Mesh(mtf.Mesh):
  """An mtf mesh that knows how the layout shards weights and optimizer slots (fsdp, zero)."""

  def __init__(self, graph, name, variable_placer=None, sharding=None):
    super().__init__(graph, name, variable_placer)
    self._sharding = sharding or Sharding()

  @property
  def sharding(self):
    """The mesh.Sharding of the layout's fsdp / zero rules (one of neither without them)."""
    return self._sharding


def new_mesh(variable_placer=None, spec=None):
  """An mtf graph and its mesh; `variable_placer` puts master weights (TPU: tpu.py).

  With `spec` (a MeshSpec) the mesh carries its layout's Sharding: the model then stores its
  weights, and the optimizer its slots, as the fsdp / zero rules say.
  """
  graph = mtf.Graph()
  return graph, Mesh(graph, MESH_NAME, variable_placer, spec.sharding() if spec else None)


def lower(mtf_graph, mtf_mesh, spec, device_assignment=None):
  """Lowers the mtf graph onto `spec`'s devices (autostack off: checkpoint names stay stable).

  First checks every tensor against the layout, so a layout mtf can't apply is one line.
  A "simd" mesh needs its TPU's `device_assignment` (Runtime.lower passes it).
  """
  spec.validate(tensor_shapes=tensor_shapes(mtf_graph))
  verbosity = tf.logging.get_verbosity()
  tf.logging.set_verbosity(tf.logging.WARN)  # mtf logs a page of per-op statistics at INFO
  try:
    return mtf.Lowering(mtf_graph, {mtf_mesh: spec.mesh_impl(device_assignment)},
                        autostack=False)
  finally:
    tf.logging.set_verbosity(verbosity)


def tensor_shapes(mtf_graph):
  """(name, dimension names) of every tensor of an mtf graph."""
  return [(t.name, tuple(d.name for d in t.shape.dims))
          for op in mtf_graph.operations for t in op.outputs]


@dataclasses.dataclass(frozen=True)
class Runtime:
  """What this process holds while it runs a mesh: its session target and TPU system.

  Made by `started`; Runtime(spec) alone is a single process's placement mesh.
  """
  spec: object  # the MeshSpec
  target: str = ""  # "" in-process; this task's server in a cluster; the TPU's master
  tpu: tpu_lib.TpuSystem = None  # with mesh.implementation = "simd"

  @property
  def device_assignment(self):
    return self.tpu.device_assignment if self.tpu else None

  def mesh_impl(self):
    return self.spec.mesh_impl(self.device_assignment)

  def lower(self, mtf_graph, mtf_mesh):
    return lower(mtf_graph, mtf_mesh, self.spec, self.device_assignment)

  def session_config(self):
    config = self.spec.session_config()
    if self.tpu and self.tpu.cluster_def:
      config.cluster_def.CopyFrom(self.tpu.cluster_def)
    return config

  def new_session(self, graph):
    return tf.Session(self.target, graph=graph, config=self.session_config())

  @contextlib.contextmanager
  def session(self, graph):
    """A session on `graph` that, once its work is done, releases the peers and the TPU.

    Task 0 of a cluster first waits for every peer's server; a peer lost mid-step ends the
    process with one line (peers_guard).
    """
    with graph.as_default():
      release = _release_ops(self.spec) + (tpu_lib.shutdown_ops(self.tpu) if self.tpu else [])
    if self.spec.cluster:
      _wait_for_peers(self.spec)
    with graph.as_default(), self.new_session(graph) as session, peers_guard(self.spec):
      yield session
      session.run(release)

  def serve_until_released(self, poll_seconds=1.0):
    """A peer: serves this task's devices until task 0 releases it; fails once task 0 is gone."""
    _serve_until_released(self.spec, self.target, poll_seconds)


@contextlib.contextmanager
def started(spec):
  """The Runtime of `spec` for this process: a cluster task's gRPC server (kept alive for the
  block), an initialized TPU for "simd"."""
  server = _start_server(spec) if spec.cluster else None
  system = tpu_lib.connect(spec) if spec.implementation == "simd" else None
  target = system.target if system else (server.target if server else "")
  yield Runtime(spec, target, system)


# Several processes, one mesh: task 0 builds the graph and drives the session through its own
# server (in-graph replication); the other tasks only serve their devices until it is done.
PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
               tf.errors.AbortedError, tf.errors.CancelledError)


def _start_server(spec):
  return tf.distribute.Server(tf.train.ClusterSpec(spec.cluster), job_name="worker",
                              task_index=spec.task_index, config=spec.session_config())


def _done_queue(task):
  """A queue on `task` that task 0 fills when training is over."""
  with tf.device(f"/job:worker/task:{task}/cpu:0"):
    return tf.queue.FIFOQueue(1, [tf.int32], shapes=[[]], shared_name=f"gptneo_done_{task}")


def _release_ops(spec):
  """Task 0 runs these last: each other task's server may then stop."""
  return [_done_queue(task).enqueue(1) for task in range(1, spec.num_tasks)]


def _serve_until_released(spec, target, poll_seconds):
  graph = tf.Graph()
  with graph.as_default():
    released = _done_queue(spec.task_index).dequeue()
  config = spec.session_config()
  # Only this task: a session over the whole cluster would wait for task 0 forever.
  config.device_filters.append(f"/job:worker/task:{spec.task_index}")
  options = tf.RunOptions(timeout_in_ms=int(poll_seconds * 1000))
  last_seen = time.monotonic()
  with tf.Session(target, graph=graph, config=config) as session:
    while True:
      try:
        session.run(released, options=options)
        return
      except tf.errors.DeadlineExceededError:
        pass
      if _reachable(spec.cluster["worker"][0], poll_seconds):
        last_seen = time.monotonic()
      elif time.monotonic() - last_seen > spec.operation_timeout:
        raise UserError(f"task {spec.task_index}: task 0 at {spec.cluster['worker'][0]} has "
                        f"been unreachable for {spec.operation_timeout:.0f}s "
                        f"(mesh.operation_timeout); restart every task")


def _wait_for_peers(spec):
  """Task 0, before its session: every task's server must answer within the timeout."""
  deadline = time.monotonic() + spec.operation_timeout
  for task, address in enumerate(spec.cluster["worker"]):
    while not _reachable(address, 1.0):
      if time.monotonic() > deadline:
        raise UserError(f"task {task} of mesh.cluster at {address} did not come up within "
                        f"{spec.operation_timeout:.0f}s; start it with --task_index={task}")
      time.sleep(0.2)  # polling a port that is not open yet; nothing to wait on instead


def _reachable(address, timeout):
  host, _, port = address.rpartition(":")
  try:
    with socket.create_connection((host, int(port)), timeout=timeout):
      return True
  except OSError:
    return False


@contextlib.contextmanager
def peers_guard(spec):
  """A peer lost mid-step ends this process with one line and exit code 2, at once.

  Not an exception: unwinding would close the session, and closing a session whose peer is
  dead blocks for 30 seconds and then logs an error of TensorFlow's own.
  """
  try:
    yield
  except PEER_ERRORS as error:
    if not spec.cluster:
      raise
    program = os.path.basename(sys.argv[0])
    print(f"{program}: error: {lost_peer_error(spec, error)}", file=sys.stderr, flush=True)
    os._exit(2)  # pylint: disable=protected-access


def lost_peer_error(spec, error):
  lines = [line.strip() for line in str(error.message).splitlines()
           if any(c.isalpha() for c in line) and "Graph execution error" not in line]
  detail = f"{type(error).__name__}: {lines[0][:160]}" if lines else type(error).__name__
  return UserError(f"task {spec.task_index} lost a peer of mesh.cluster ({detail}); restart "
                   f"every task from the last checkpoint")
