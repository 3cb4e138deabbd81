"""What every loop shares: precision, the mtf mesh, lowering, checkpoints of mesh variables."""
import os

from gptneo.compat import mtf, tf
from gptneo.mesh import MESH_NAME

PRECISIONS = ("float32", "bfloat16")


def variable_dtype(precision):
  """float32 everywhere, or bfloat16 activations over float32 master weights."""
  if precision not in PRECISIONS:
    raise ValueError(f"precision = {precision!r}; use one of {PRECISIONS}")
  activation = tf.float32 if precision == "float32" else tf.bfloat16
  return mtf.VariableDType(master_dtype=tf.float32, slice_dtype=tf.float32,
                           activation_dtype=activation)


def new_mesh():
  graph = mtf.Graph()
  return graph, mtf.Mesh(graph, MESH_NAME)


def lower(mtf_graph, mtf_mesh, spec):
  """Lowers the mtf graph onto `spec`'s devices (autostack off: checkpoint names stay stable)."""
  verbosity = tf.logging.get_verbosity()
  tf.logging.set_verbosity(tf.logging.WARN)  # mtf logs a page of per-op statistics at INFO
  try:
    return mtf.Lowering(mtf_graph, {mtf_mesh: spec.mesh_impl()}, autostack=False)
  finally:
    tf.logging.set_verbosity(verbosity)


class Checkpoints:
  """Saves and restores mesh variables (their masters) plus any extra saveables.

  mtf keeps one slice variable per device; checkpoints hold the full master copies, so a
  checkpoint written on one mesh restores onto any other.
  """

  def __init__(self, lowering, model_dir, keep=5, extra_saveables=()):
    self.model_dir = model_dir
    self._to_masters = lowering.copy_slices_to_masters()
    self._to_slices = lowering.copy_masters_to_slices()
    self._saver = tf.train.Saver(tf.global_variables() + list(extra_saveables),
                                 max_to_keep=keep, sharded=False)

  def latest(self):
    return tf.train.latest_checkpoint(self.model_dir) if self.model_dir else None

  def restore_or_initialize(self, session, init_ops=()):
    """Restores the latest checkpoint if any, else initializes; returns the restored path."""
    session.run([tf.global_variables_initializer(), *init_ops])
    path = self.latest()
    if path:
      self._restore(session, path)
    session.run(self._to_slices)
    return path

  def _restore(self, session, path):
    self._saver.restore(session, path)
    # Without this the Saver forgets older checkpoints, and `keep` stops pruning after a resume.
    state = tf.train.get_checkpoint_state(self.model_dir)
    self._saver.recover_last_checkpoints(list(state.all_model_checkpoint_paths))

  def restore(self, session, path=None):
    path = path or self.latest()
    if not path:
      raise ValueError(f"model dir {self.model_dir!r} has no checkpoint; train one with "
                       f"bin/train --model_dir={self.model_dir} first")
    self._restore(session, path)
    session.run(self._to_slices)
    return path

  def save(self, session, step):
    session.run(self._to_masters)
    return self._saver.save(session, os.path.join(self.model_dir, "model.ckpt"),
                            global_step=step, write_meta_graph=False)
