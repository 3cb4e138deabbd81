"""For clusters: a bin/train command line per point, or an `sbatch --array` script.

Both name the points' run dirs under the root, so `bin/sweep --report` reads what they did.
"""
import shlex
import sys

from gptneo import programs
from gptneo.errors import UserError
from gptneo.sweep import root as root_lib
from gptneo.sweep import runner

SBATCH = "sweep.sbatch"


def _line(root, point):
  return shlex.join(runner.train_command(point, root.model_dir(point)))


def commands(root, points):
  """One runnable bin/train command per point not done, in point order."""
  return "\n".join(_line(root, p) for p in points
                   if root.state(p)["status"] not in root_lib.FINAL)


def slurm_script(root, points, sbatch_options=(), parallel=None):
  """An sbatch script whose array task i runs point i's bin/train (done points left out)."""
  todo = [p for p in points if root.state(p)["status"] not in root_lib.FINAL]
  if not todo:
    raise UserError(f"every point of the sweep in {root.display} is done or diverged; nothing "
                    f"to submit")
  throttle = f"%{parallel}" if parallel and parallel > 1 else ""
  lines = ["#!/bin/bash", f"#SBATCH --job-name=sweep-{root.name}",
           f"#SBATCH --array={','.join(str(p.index) for p in todo)}{throttle}",
           f"#SBATCH --output={root.path}/%a.slurm.out",
           *[f"#SBATCH {option}" for option in sbatch_options],
           "# Written by bin/sweep --launcher=slurm: submit with `sbatch " + SBATCH + "`;",
           "# `bin/sweep --report --root=" + root.display + "` reads the results.",
           "set -euo pipefail", 'case "$SLURM_ARRAY_TASK_ID" in']
  lines += [f"  {p.index}) exec {_line(root, p)} ;;" for p in todo]
  lines += ['  *) echo "no point $SLURM_ARRAY_TASK_ID in this sweep" >&2; exit 2 ;;', "esac"]
  return "\n".join(lines) + "\n"


def write_slurm(root, points, sbatch_options=(), parallel=None):
  path = root.path / SBATCH
  path.write_text(slurm_script(root, points, sbatch_options, parallel))
  path.chmod(0o755)
  root.sync()
  return path


_DRIVER_ONLY = ("--launcher", "--sbatch", "--parallel")  # flags of this command, not a worker's


def worker_command(command):
  """The bin/sweep command a search's Slurm task runs: `command` as one driver, one point."""
  args, skip = [], False
  for arg in command[1:]:
    if skip:
      skip = False
    elif arg in _DRIVER_ONLY:
      skip = True  # `--flag value`: the value goes too
    elif not arg.startswith(tuple(f + "=" for f in _DRIVER_ONLY)):
      args.append(arg)
  return [sys.executable, str(programs.bin_dir() / "sweep"), *args, "--parallel=1"]


def write_search_slurm(root_path, command, sbatch_options=(), workers=1):
  """An sbatch script of `workers` array tasks, each a search driver on the shared study.

  Args:
    root_path: --root (a folder every node sees).
    command: this bin/sweep command line (argv).
    sbatch_options: #SBATCH options.
    workers: array tasks (--parallel): drivers working on the study at once.
  """
  root = root_lib.Root(root_path)
  root.path.mkdir(parents=True, exist_ok=True)
  lines = ["#!/bin/bash", f"#SBATCH --job-name=search-{root.name}",
           f"#SBATCH --array=0-{max(1, workers) - 1}", f"#SBATCH --output={root.path}/%a.slurm.out",
           *[f"#SBATCH {option}" for option in sbatch_options],
           "# Written by bin/sweep --launcher=slurm: each task is a driver of the one study;",
           "# together they run its trials, each once. Submit with `sbatch " + SBATCH + "`.",
           "set -euo pipefail", f"exec {shlex.join(worker_command(command))}"]
  path = root.path / SBATCH
  path.write_text("\n".join(lines) + "\n")
  path.chmod(0o755)
  return path
