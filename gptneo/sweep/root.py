"""The sweep's folder: sweep.json, one run dir per point, each point's state, the driver's lock.

  ROOT/sweep.json          the spec, the points (with their checked facts), git commit, command
  ROOT/<point name>/       bin/train's model dir, plus point.gin (what the point binds),
                           sweep_state.json (status, attempts) and train.log (its output)

Every file is written whole (a temporary, then a rename), so a driver killed at any moment
leaves each file as it was before or after.
"""
import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import pathlib
import subprocess
import time

from gptneo import storage
from gptneo.errors import UserError
from gptneo.sweep import spec as spec_lib
from gptneo.sweep import validate

SWEEP_JSON = "sweep.json"
STATE_JSON = "sweep_state.json"
POINT_GIN = "point.gin"
TRAIN_LOG = "train.log"
LOCK = ".sweep.lock"
FINAL = ("done", "diverged")  # a point in one of these is never run again


def write_json(path, value):
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1, allow_nan=True)
  os.replace(tmp, path)


def read_json(path):
  with open(path) as f:
    return json.load(f)


def git_commit():
  """The commit of the checkout gptneo runs from ("+dirty" if changed), or None."""
  repo = pathlib.Path(__file__).resolve().parents[2]
  def git(*args):
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=False)
  head = git("rev-parse", "HEAD")
  if head.returncode:
    return None
  dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
  return head.stdout.strip() + ("+dirty" if dirty else "")


class Root:
  """A sweep's root folder (local; gs:// is refused, see the README)."""

  def __init__(self, path):
    if storage.is_remote(path):
      raise UserError(f"--root={path}: a gs:// sweep root is not supported yet; use a local "
                      f"folder (the points' runs may still read gs:// datasets)")
    self.path = pathlib.Path(path).absolute()

  def run_dir(self, point):
    return self.path / point.name

  def read(self):
    """sweep.json as a dict, or None if this root holds no sweep."""
    path = self.path / SWEEP_JSON
    return read_json(path) if path.is_file() else None

  def points(self):
    """(points, facts) recorded in sweep.json."""
    record = self.read()
    if record is None:
      raise UserError(f"--root={self.path} holds no sweep ({SWEEP_JSON}); start one there first")
    return ([spec_lib.Point.from_json(p) for p in record["points"]],
            [validate.Facts(**p["facts"]) for p in record["points"]])

  def check_same(self, spec, update):
    """Refuses a root that holds another sweep, unless `update`."""
    old = self.read()
    if old is None or update or old["spec"] == spec.to_json():
      return
    field = next(k for k, v in spec.to_json().items() if old["spec"].get(k) != v)
    raise UserError(f"--root={self.path} holds a different sweep (its {field} differ); use "
                    f"another --root, or --update to make it this sweep (points already run "
                    f"that it still has are kept)")

  def create(self, spec, points, facts, command):
    """Writes the run dirs (point.gin) and sweep.json; points already there keep their runs."""
    for point in points:
      run_dir = self.run_dir(point)
      run_dir.mkdir(parents=True, exist_ok=True)
      (run_dir / POINT_GIN).write_text(point_gin(point, run_dir))
    write_json(self.path / SWEEP_JSON, {
        "spec": spec.to_json(), "git_commit": git_commit(), "command": command,
        "created": time.time(),
        "points": [{**p.to_json(), "facts": dataclasses.asdict(f)}
                   for p, f in zip(points, facts, strict=True)]})

  def state(self, point):
    path = self.run_dir(point) / STATE_JSON
    return read_json(path) if path.is_file() else {"status": "pending", "attempts": []}

  def write_state(self, point, state):
    write_json(self.run_dir(point) / STATE_JSON, state)

  @contextlib.contextmanager
  def lock(self):
    """Held by the one driver running this sweep; the kernel frees it when that one dies."""
    self.path.mkdir(parents=True, exist_ok=True)
    with open(self.path / LOCK, "a+") as f:
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as error:
        if error.errno not in (errno.EAGAIN, errno.EACCES):
          raise
        raise UserError(f"another bin/sweep is running the sweep in {self.path}; wait for it "
                        f"(bin/sweep --status --root={self.path})") from None
      yield

  def driver_running(self):
    """Whether a driver holds the lock now."""
    if not (self.path / LOCK).is_file():
      return False
    with open(self.path / LOCK, "a+") as f:
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError:
        return True
      fcntl.flock(f, fcntl.LOCK_UN)
      return False


def point_gin(point, run_dir):
  """The point as one gin file: `bin/train --gin_file=point.gin --model_dir=<run dir>`."""
  lines = [f"# Point {point.index} of the sweep in {run_dir.parent}: {point.name}",
           f"# bin/train --gin_file={run_dir / POINT_GIN} --model_dir={run_dir} reruns it.",
           *[f"include {f!r}" for f in point.gin_files], *point.gin_params]
  return "\n".join(lines) + "\n"
