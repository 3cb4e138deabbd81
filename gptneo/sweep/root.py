"""The sweep's folder: sweep.json, one run dir per point, each point's state, the driver's lock.

  ROOT/sweep.json          the spec, the points (with their checked facts), git commit, command
  ROOT/<point name>/       bin/train's model dir, plus point.gin (what the point binds),
                           sweep_state.json (status, attempts) and train.log (its output)

A gs:// root keeps the points' model dirs in the bucket (ROOT/<point name>, bin/train's own,
so checkpoints land there and any machine resumes them) and the driver's files under
ROOT/_sweep/ (DRIVER_PREFIX: sweep.json, the report, and per point its point.gin, state and
log). Not at ROOT itself: a mirror of ROOT would hold every checkpoint and nest the points'
own mirrors. The driver works in the mirror of ROOT/_sweep (storage.working_copy) and syncs
it up whenever a point's status changes and after the report; a lease object there
(storage.Lease) keeps one driver per sweep across machines.

Every file is written whole (a temporary, then a rename), so a driver killed at any moment
leaves each file as it was before or after.
"""
import dataclasses
import json
import pathlib
import socket
import subprocess
import time

from gptneo import errors
from gptneo import gin_utils
from gptneo import model_dir as model_dir_lib
from gptneo import storage
from gptneo.errors import UserError
from gptneo.sweep import spec as spec_lib

SWEEP_JSON = "sweep.json"
STATE_JSON = "sweep_state.json"
POINT_GIN = "point.gin"
TRAIN_LOG = "train.log"
FINAL = ("done", "diverged", "pruned")  # never run again (pruned: unless --resume_pruned)
DRIVER_PREFIX = "_sweep"  # a gs:// root's driver files: ROOT/_sweep/
TRIAL_JSON = "trial.json"  # in a search's run dir: its point and facts (sweep.json has none)


@dataclasses.dataclass(frozen=True)
class Facts:
  """What the driver and the report need to know of a checked point."""
  train_steps: int
  tokens_per_step: int
  parameters: int  # all weights, as the layout search counts them
  embedding_parameters: int  # the token and position tables
  eval_every_n_steps: int
  device_type: str
  devices: int

  @property
  def validates_at_end(self) -> bool:
    """Whether a periodic validation falls on the last step: the report's final validation
    loss is the trained model's (eval.jsonl holds periodic validations only)."""
    return bool(self.eval_every_n_steps) and self.train_steps % self.eval_every_n_steps == 0


def write_json(path, value):
  def write(temporary):
    with open(temporary, "w") as f:
      json.dump(value, f, indent=1, allow_nan=True)
  storage.atomic_write(str(path), write)


def read_json(path, fix="move it away and run the sweep's command again"):
  """The JSON object in `path` (ours, written whole by write_json); a damaged one (another
  program's, a disk fault) is a one-line UserError ending in `fix`."""
  value = errors.read_json(path, fix, problem="is damaged")
  if not isinstance(value, dict):
    raise UserError(f"{path} is damaged (a JSON {type(value).__name__}, not an object); {fix}")
  return value


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
  """A sweep's root: a local folder, or a gs:// prefix worked on in a local mirror.

  Attributes:
    path: the local folder of the driver's files (a gs:// root's mirror of ROOT/_sweep).
    uri: the gs:// root without a trailing slash, or None for a local root.
    display: the root as messages name it (the URI, or the absolute folder).
    name: its last part.
  """

  def __init__(self, path):
    if storage.is_remote(path):
      self.uri = str(path).rstrip("/")
      storage.split_uri(self.uri)  # refuses 'gs://' without a bucket
      self.path = pathlib.Path(storage.working_copy(self._driver_uri()))
    else:
      self.uri, self.path = None, pathlib.Path(path).absolute()
    self.display = self.uri or str(self.path)
    self.name = pathlib.PurePosixPath(self.display).name  # the sweep's name in titles, jobs

  def _driver_uri(self):
    return f"{self.uri}/{DRIVER_PREFIX}"

  def run_dir(self, point):
    """The local folder of the point's point.gin, state and log (a local root: its model dir)."""
    return self.path / point.name

  def model_dir(self, point):
    """The point's --model_dir: ROOT/<name>, a gs:// URI for a gs:// root."""
    return f"{self.uri}/{point.name}" if self.uri else str(self.run_dir(point))

  def live_dir(self, point):
    """Where bin/train writes the point's logs on this machine (a gs:// run: its mirror)."""
    model_dir = self.model_dir(point)
    return storage.mirror_folder(model_dir) if self.uri else model_dir

  def log_sources(self, point):
    """Where the point's train_metrics.jsonl/eval.jsonl are read from, later ones winning a step:
    for gs://, the bucket, then this machine's mirror (newer while a run goes on here)."""
    return [self.model_dir(point), self.live_dir(point)] if self.uri else [self.live_dir(point)]

  def sync(self):
    """Sends the driver's files up to a gs:// root (a local root: nothing to do)."""
    if self.uri:
      storage.sync_up(str(self.path), self._driver_uri())

  def read(self):
    """sweep.json as a dict, or None if this root holds no sweep."""
    path = self.path / SWEEP_JSON
    if not path.is_file():
      return None
    record = read_json(path)
    if not isinstance(record.get("spec"), dict) or not isinstance(record.get("points"), list):
      raise UserError(f"{path} is damaged (it lacks spec or points); move it away and run "
                      f"the sweep's command again")
    return record

  def points(self):
    """(points, facts) recorded in sweep.json."""
    record = self.read()
    if record is None:
      raise UserError(f"--root={self.display} holds no sweep ({SWEEP_JSON}); start one there "
                      f"first")
    if record["spec"].get("search"):  # a search's points are its trials' run dirs
      return self._trial_points()
    return ([spec_lib.Point.from_json(p) for p in record["points"]],
            [Facts(**p["facts"]) for p in record["points"]])

  def _trial_points(self):
    """(points, facts) of a search's run dirs (their trial.json), in trial order."""
    found = []
    for path in sorted(self.path.glob(f"*/{TRIAL_JSON}")):
      record = read_json(path, "delete its run dir to run that point again")
      found.append((spec_lib.Point.from_json(record["point"]), Facts(**record["facts"])))
    found.sort(key=lambda pair: pair[0].index)
    return [p for p, _ in found], [f for _, f in found]

  def check_same(self, spec, update):
    """Refuses a root that holds another sweep, unless `update`."""
    old = self.read()
    if old is None or update or old["spec"] == spec.to_json():
      return
    field = next(k for k, v in spec.to_json().items() if old["spec"].get(k) != v)
    raise UserError(f"--root={self.display} holds a different sweep (its {field} differ); use "
                    f"another --root, or --update to make it this sweep (points already run "
                    f"that it still has are kept)")

  def create(self, spec, points, facts, command, extra=None):
    """Writes the run dirs (point.gin) and sweep.json; points already there keep their runs.

    Args:
      spec, points, facts: the sweep (a search's points come later, with its trials).
      command: the driver's command line.
      extra: more of sweep.json (a search: its storage).
    """
    for point in points:
      if self.uri and point.name == DRIVER_PREFIX:
        raise UserError(f"point {point.index} is named {DRIVER_PREFIX!r}, the folder of a "
                        f"gs:// root's own files; add an axis or use a local --root")
      run_dir = self.run_dir(point)
      run_dir.mkdir(parents=True, exist_ok=True)
      _write_text(run_dir / POINT_GIN, point_gin(point, self, run_dir))
    write_json(self.path / SWEEP_JSON, {
        "spec": spec.to_json(), "git_commit": git_commit(), "command": command,
        "created": time.time(), **(extra or {}),
        "points": [{**p.to_json(), "facts": dataclasses.asdict(f)}
                   for p, f in zip(points, facts, strict=True)]})
    self.sync()

  def state(self, point):
    path = self.run_dir(point) / STATE_JSON
    if not path.is_file():
      return {"status": "pending", "attempts": []}
    return read_json(path, "delete it to run this point again")

  def write_state(self, point, state, sync=True):
    """Writes the point's state; sync=False for a heartbeat (a status change syncs anyway)."""
    write_json(self.run_dir(point) / STATE_JSON, state)
    if sync:
      self.sync()

  def lock(self, force=False, shared=False):
    """Held by the one driver running this sweep (model_dir.lock of the driver's folder: the
    kernel frees it when that one dies; a gs:// root also takes the lease of ROOT/_sweep, as
    machines share no kernel). `force` takes over a lease another machine's driver left (one
    that crashed there). `shared`: the drivers of a search, which its study's database keeps
    apart, hold it together.

    Returns:
      the model_dir.Writer: a context manager that releases it.
    """
    return model_dir_lib.lock(
        self._driver_uri() if self.uri else str(self.path), force, shared, what="sweep",
        fix=f"wait for it (gptneo-sweep --status --root={self.display})")

  def driver_running(self):
    """Whether a driver holds this sweep now: the lock on this machine, or for a gs:// root
    a live lease of ROOT/_sweep, which a driver on another machine renews while it runs."""
    if model_dir_lib.is_locked(str(self.path)):
      return True
    if not self.uri:
      return False
    record = storage.Lease(self._driver_uri(), {}).holder_alive()
    # A lease of this machine's mirror, its lock free: a driver here that died.
    return record is not None and [record.get("host"), record.get("mirror")] != [
        socket.gethostname(), str(self.path)]


def _write_text(path, text):
  """Writes text unless the file holds it already: an unchanged file is not synced again."""
  if not path.is_file() or path.read_text() != text:
    path.write_text(text)


def point_gin(point, root, run_dir):
  """The point as one gin file: `bin/train --gin_file=point.gin --model_dir=<model dir>`."""
  literal = gin_utils.gin_literal  # a newline in a folder's name can't end a comment
  lines = [f"# Point {point.index} of the sweep in {literal(root.display)}: {point.name}",
           f"# bin/train --gin_file={literal(str(run_dir / POINT_GIN))} "
           f"--model_dir={literal(root.model_dir(point))} reruns it.",
           *[f"include {literal(f)}" for f in point.gin_files], *point.gin_params]
  return "\n".join(lines) + "\n"
