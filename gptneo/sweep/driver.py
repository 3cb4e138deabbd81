"""What bin/sweep does: validate every point, then run, print or write a launcher, report."""
import resource

from absl import logging

from gptneo import storage as storage_lib
from gptneo.errors import UserError
from gptneo.sweep import report as report_lib
from gptneo.sweep import root as root_lib
from gptneo.sweep import runner
from gptneo.sweep import validate


def prepare(spec, root_path, command, update=False):
  """Checks every point and the root, then writes the run dirs and sweep.json.

  Args:
    spec: the spec.Spec.
    root_path: --root.
    command: the driver's command line, recorded in sweep.json.
    update: make a root that holds another sweep this one.

  Returns:
    (root_lib.Root, points, facts). Nothing is created if a point or the root is refused.
  """
  points = spec.expand()
  facts = validate.check_all(points)
  for point, fact in zip(points, facts, strict=True):
    if not isinstance(fact.train_steps, int) or fact.train_steps < 1:
      raise UserError(f"point {point.index} ({point.name}): train.train_steps = "
                      f"{fact.train_steps!r}; bind it to a positive integer")
  late = [p.name for p, f in zip(points, facts, strict=True) if not f.validates_at_end]
  if late:
    logging.warning("%d of %d points (e.g. %s) validate no last step (train.eval_every_n_steps "
                    "is 0 or does not divide train.train_steps): the report's validation loss "
                    "of those is an earlier step's, or none; bind it to a divisor of "
                    "train.train_steps to compare points by it", len(late), len(points), late[0])
  root = root_lib.Root(root_path)
  root.check_same(spec, update)
  return root, points, facts


def run_search(spec, root_path, parallel, max_retries, command, storage=None, update=False,
               resume_pruned=False, stale_seconds=60):
  """Runs (or joins, or resumes) a search, then writes its report; returns ({trial state:
  count}, the report's markdown table).

  Args:
    spec: a spec.Spec with a search.
    root_path: --root (a local folder; drivers on other machines share it over a file system).
    parallel, max_retries, command: as `run`.
    storage: the study's database URL; None: ROOT/study.db (SQLite).
    update: make a root and study of another sweep this one.
    resume_pruned: take the pruned points up again, run to the end.
    stale_seconds: a trial whose driver's heartbeat is older is taken up by another driver.
  """
  from gptneo.sweep import search  # pylint: disable=g-import-not-at-top  (optuna: slow)
  runner.core_slots(parallel)
  if storage_lib.is_remote(root_path):
    raise UserError(f"--root={root_path}: a search keeps its run dirs in a local folder (one "
                    f"a file system shares between machines); give a local --root")
  if stale_seconds < 1:
    raise UserError(f"--stale_seconds={stale_seconds}; use 1 or more (seconds without a "
                    f"heartbeat before another driver takes a trial up)")
  params = search.space(spec)
  first = search.first_point(spec, params)
  (facts,) = validate.check_all([first])
  search.pruner(spec, facts)  # a pruner without evaluations is refused before anything is made
  root = root_lib.Root(root_path)
  root.check_same(spec, update)
  if storage is None:
    root.path.mkdir(parents=True, exist_ok=True)  # our own database, in the root
  url = storage or search.default_storage(root)
  opened = search.open_storage(url, stale_seconds)  # a URL that doesn't connect: nothing made
  study = search.open_study(spec, params, facts, root, opened, update)
  with root.lock(shared=True):
    root.check_same(spec, update)
    root.create(spec, [], [], command, {"storage": url, "stale_seconds": stale_seconds})
    worker = search.SearchDriver(root, spec, params, study, facts, parallel, max_retries,
                                 logging.info)
    if resume_pruned:
      worker.resume_pruned()
    counts = worker.run()
  table = report_lib.write(root)
  logging.info("trials: %s; the report is in %s",
               ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), root.display)
  return counts, table


def write_root(spec, root_path, command, update=False, force=False):
  """prepare, then the run dirs and sweep.json, for points another launcher runs."""
  root, points, facts = prepare(spec, root_path, command, update)
  with root.lock(force):
    root.check_same(spec, update)
    root.create(spec, points, facts, command)
  return root, points, facts


def run(spec, root_path, parallel, max_retries, command, update=False, force=False):
  """Runs (or resumes) the sweep, then writes its report; returns ({status: count}, the
  report's markdown table)."""
  runner.core_slots(parallel)  # a bad --parallel is refused before anything is created
  root, points, facts = prepare(spec, root_path, command, update)
  with root.lock(force):
    root.check_same(spec, update)  # another driver may have written it meanwhile
    root.create(spec, points, facts, command)
    counts = runner.Driver(root, points, facts, parallel, max_retries, logging.info).run()
  table = report_lib.write(root)
  own = resource.getrusage(resource.RUSAGE_SELF)  # not the children: the driver's own cost
  logging.info("%s; the report is in %s; the driver itself used %.1f s of CPU",
               ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), root.display,
               own.ru_utime + own.ru_stime)
  return counts, table
