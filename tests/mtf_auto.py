"""mtf.auto_mtf with a single-worker CP-SAT solver: the one place that patches it.

Only the tests use it (nothing in gptneo calls mtf's own layout search), so it lives here; it
shows mtf's solver runs next to TensorFlow once it has one worker, as gptneo's search does.

mtf's LayoutOptimizer.solve() makes a bare `cp_model.CpSolver()`, whose default several
search workers segfault inside CP-SAT in a process that has loaded TensorFlow. While a
call below runs, the `cp_model` module as mtf's layout_optimizer sees it is a proxy whose
CpSolver() has `num_workers = 1` (and a time limit); the patch is undone on return.
"""
import contextlib

# search first: it loads OR-Tools before TensorFlow, the order in which CP-SAT can run at all.
from gptneo.layout_search import search  # pylint: disable=g-bad-import-order
from gptneo.compat import mtf  # noqa: F401  (before mesh_tensorflow: makes it importable)
from mesh_tensorflow import auto_mtf  # pylint: disable=g-bad-import-order
from mesh_tensorflow.auto_mtf import layout_optimizer  # pylint: disable=g-bad-import-order


class _SingleWorkerCpModel:
  """Everything of `ortools.sat.python.cp_model`, but CpSolver() has one worker."""

  def __init__(self, module, time_limit):
    self._module, self._time_limit = module, time_limit

  def __getattr__(self, name):
    return getattr(self._module, name)

  def CpSolver(self):  # noqa: N802  (the name mtf calls)
    return search.single_worker_solver(self._time_limit)


@contextlib.contextmanager
def _single_worker(time_limit):
  original = layout_optimizer.cp_model
  layout_optimizer.cp_model = _SingleWorkerCpModel(original, time_limit)
  try:
    yield
  finally:
    layout_optimizer.cp_model = original


def layout(mtf_graph, mesh_shape, mtf_outputs=(), time_limit=60.0):
  """mtf.auto_mtf.layout, safe to call next to TensorFlow; returns mtf.LayoutRules."""
  with _single_worker(time_limit):
    return auto_mtf.layout(mtf_graph, mesh_shape, mtf_outputs)


def layout_and_mesh_shape(mtf_graph, num_machines, mtf_outputs=(), time_limit=60.0):
  """mtf.auto_mtf.layout_and_mesh_shape, single-worker; returns (LayoutRules, Shape)."""
  with _single_worker(time_limit):
    return auto_mtf.layout_and_mesh_shape(mtf_graph, num_machines, mtf_outputs)
