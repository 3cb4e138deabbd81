"""What bin/sweep does: validate every point, then run, print or write a launcher, report."""
import resource

from absl import logging

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
  if not any(f.eval_every_n_steps for f in facts):
    logging.warning("train.eval_every_n_steps is 0: the report has no validation loss; set "
                    "it (a divisor of train.train_steps) to compare points by it")
  root = root_lib.Root(root_path)
  root.check_same(spec, update)
  return root, points, facts


def write_root(spec, root_path, command, update=False, force=False):
  """prepare, then the run dirs and sweep.json, for points another launcher runs."""
  root, points, facts = prepare(spec, root_path, command, update)
  with root.lock(force):
    root.check_same(spec, update)
    root.create(spec, points, facts, command)
  return root, points, facts


def run(spec, root_path, parallel, max_retries, command, update=False, force=False):
  """Runs (or resumes) the sweep, then writes its report; returns {status: count}."""
  runner.core_slots(parallel)  # a bad --parallel is refused before anything is created
  root, points, facts = prepare(spec, root_path, command, update)
  with root.lock(force):
    root.check_same(spec, update)  # another driver may have written it meanwhile
    root.create(spec, points, facts, command)
    counts = runner.Driver(root, points, facts, parallel, max_retries, logging.info).run()
  report_lib.write(root)
  own = resource.getrusage(resource.RUSAGE_SELF)  # not the children: the driver's own cost
  logging.info("%s; the report is in %s; the driver itself used %.1f s of CPU",
               ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), root.display,
               own.ru_utime + own.ru_stime)
  return counts
