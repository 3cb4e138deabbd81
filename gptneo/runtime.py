"""What every loop shares: precision, the mtf mesh, lowering, checkpoints of mesh variables,
and the runtime of a mesh (`with started(spec) as rt:`): this process's server, TPU system,
peers and session."""
import contextlib
import dataclasses
import os
import socket
import sys
import time

from gptneo import tpu as tpu_lib
from gptneo.compat import mtf, tf
from gptneo.errors import UserError
from gptneo.mesh import MESH_NAME

PRECISIONS = ("float32", "bfloat16")


def variable_dtype(precision):
  """float32 everywhere, or bfloat16 activations over float32 master weights."""
  if precision not in PRECISIONS:
    raise UserError(f"precision = {precision!r}; use one of {PRECISIONS}")
  activation = tf.float32 if precision == "float32" else tf.bfloat16
  return mtf.VariableDType(master_dtype=tf.float32, slice_dtype=tf.float32,
                           activation_dtype=activation)


def new_mesh(variable_placer=None):
  """An mtf graph and its mesh; `variable_placer` puts master weights (TPU: tpu.py)."""
  graph = mtf.Graph()
  return graph, mtf.Mesh(graph, MESH_NAME, variable_placer)


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


class Checkpoints:
  """Saves and restores mesh variables (their masters) plus any extra saveables.

  mtf keeps one slice variable per device; checkpoints hold the full master copies, so a
  checkpoint written on one mesh restores onto any other.
  """

  def __init__(self, lowering, model_dir, keep=5, extra_saveables=()):
    self.model_dir = model_dir
    self._to_masters = lowering.copy_slices_to_masters()
    self._to_slices = lowering.copy_masters_to_slices()
    self._variables = tf.global_variables()
    # Relative paths in the `checkpoint` index: a model dir still resumes once moved,
    # mirrored from gs:// into another machine's cache included.
    self._saver = tf.train.Saver(self._variables + list(extra_saveables), max_to_keep=keep,
                                 sharded=False, save_relative_paths=True)

  def check(self, warm_start_from=None):
    """Raises ValueError (one line) unless the checkpoint a run would start from fits."""
    path = self.latest()
    if path:
      check_fits(path, self._variables, "checkpoint")
    elif warm_start_from:
      check_fits(tf.train.latest_checkpoint(warm_start_from), _weights(),
                 "train.init_from checkpoint")

  def latest(self):
    return tf.train.latest_checkpoint(self.model_dir) if self.model_dir else None

  def restore_or_initialize(self, session, init_ops=(), warm_start_from=None):
    """Restores the latest checkpoint if any, else initializes; returns the restored path.

    With no checkpoint of its own, the weights of `warm_start_from` (a model dir) replace the
    fresh ones; optimizer state, step and data position start anew (fine-tuning).
    """
    session.run([tf.global_variables_initializer(), *init_ops])
    path = self.latest()
    if path:
      self._restore(session, path)
    elif warm_start_from:
      _warm_start(session, warm_start_from)
    session.run(self._to_slices)
    return path

  def _restore(self, session, path):
    check_fits(path, self._variables, "checkpoint")
    self._saver.restore(session, path)
    # Without this the Saver forgets older checkpoints, and `keep` stops pruning after a resume.
    state = tf.train.get_checkpoint_state(self.model_dir)
    self._saver.recover_last_checkpoints(list(state.all_model_checkpoint_paths))

  def restore(self, session, path=None):
    path = path or self.latest()
    if not path:
      raise UserError(f"model dir {self.model_dir!r} has no checkpoint; train one with "
                      f"bin/train --model_dir={self.model_dir} first")
    self._restore(session, path)
    session.run(self._to_slices)
    return path

  def save(self, session, step):
    session.run(self._to_masters)
    return self._saver.save(session, os.path.join(self.model_dir, "model.ckpt"),
                            global_step=step, write_meta_graph=False)


def _warm_start(session, model_dir):
  """Copies every trainable weight that `model_dir`'s latest checkpoint holds, same shape."""
  source = tf.train.latest_checkpoint(model_dir)
  check_fits(source, _weights(), "train.init_from checkpoint")
  tf.train.Saver(_weights()).restore(session, source)


def _weights():
  """The trainable master variables (mtf's per-device slices are trainable but not global)."""
  masters = set(tf.global_variables())
  return [v for v in tf.trainable_variables() if v in masters]


def check_fits(path, variables, what):
  """One line naming the first of `variables` the checkpoint lacks or holds in another shape."""
  stored = tf.train.load_checkpoint(path).get_variable_to_shape_map()
  for variable in variables:
    name, shape = variable.op.name, variable.shape.as_list()
    if stored.get(name) == shape:
      continue
    held = f"{name} of shape {stored[name]}" if name in stored else f"no {name}"
    hint = "use the gin config that wrote it (its model dir's operative_config.gin)"
    if name.endswith("/attn/qkv/w") and name.replace("/qkv/", "/q/") in stored:
      hint = ("it predates the fused attn/qkv weight (gptneo before 2026-11-30): train or "
              "import it again")
    raise UserError(f"{what} {path} has {held}, the model needs {shape}; {hint}")


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
