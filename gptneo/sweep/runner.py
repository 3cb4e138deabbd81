"""Running the points: bin/train processes, N at once, each on its own share of the cores.

The driver knows nothing of graphs: it starts `bin/train` per point (the very command
--print_commands prints), watches its train_metrics.jsonl and exit code, and records each
attempt in the point's sweep_state.json. What a point's run dir holds is the truth: bin/train
resumes from its latest checkpoint, exactly, so a point cut short (by a crash, or by the driver
dying: the children die with it) goes on where it stopped when it is run again.
"""
import collections
import ctypes
import dataclasses
import math
import os
import signal
import subprocess
import sys
import time

from gptneo import errors
from gptneo import programs
from gptneo.errors import UserError
from gptneo.sweep import hparams
from gptneo.sweep import metrics
from gptneo.sweep import root as root_lib

_PR_SET_PDEATHSIG = 1
_HEARTBEAT_SECONDS = 10.0
_WATCH_SECONDS = 2.0  # how often a running point's log is read for a non-finite loss


def train_command(point, model_dir):
  """The bin/train command line of a point (argv); model_dir may be a gs:// URI."""
  return [sys.executable, str(programs.bin_dir() / "train"),
          *[f"--gin_file={f}" for f in point.gin_files],
          *[f"--gin_param={p}" for p in point.gin_params], f"--model_dir={model_dir}"]


def core_slots(parallel):
  """This process's cores split into `parallel` disjoint, near-equal groups."""
  cores = sorted(os.sched_getaffinity(0))
  if not 1 <= parallel <= len(cores):
    raise UserError(f"--parallel={parallel} but this machine gives us {len(cores)} cores; "
                    f"use 1 .. {len(cores)} (each point gets its own cores)")
  return [cores[i * len(cores) // parallel:(i + 1) * len(cores) // parallel]
          for i in range(parallel)]


def gpu_slots(parallel, facts):
  """Per slot, the GPU ids its points see (CUDA_VISIBLE_DEVICES), or Nones without GPU points."""
  per_point = max([f.devices for f in facts if f.device_type == "gpu"], default=0)
  if not per_point:
    return [None] * parallel
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  gpus = visible.split(",") if visible else [str(i) for i in range(_gpu_count())]
  if parallel * per_point > len(gpus):
    raise UserError(f"--parallel={parallel} points of {per_point} GPUs each need "
                    f"{parallel * per_point} GPUs but {len(gpus)} are visible; lower --parallel")
  return [",".join(gpus[i * per_point:(i + 1) * per_point]) for i in range(parallel)]


def _gpu_count():
  from gptneo.compat import tf  # pylint: disable=g-import-not-at-top
  return len(tf.config.list_physical_devices("GPU"))


def _child_setup(cores):
  """Runs in the child before exec: its cores, and death with the driver (no orphan trains
  on while a restarted driver resumes the same point)."""
  prctl = ctypes.CDLL(None, use_errno=True).prctl

  def setup():
    os.sched_setaffinity(0, cores)  # TF sizes its thread pools from this mask
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
  return setup


@dataclasses.dataclass
class _Attempt:
  point: object
  facts: object
  slot: int
  process: subprocess.Popen
  start: float
  log: object
  watched: float = 0.0
  beat: float = 0.0


def outcome(exit_code, records, train_steps):
  """done, diverged or failed, from a finished bin/train's exit code and its log."""
  if exit_code == errors.EXIT_DIVERGED or metrics.first_non_finite(records) is not None:
    return "diverged"
  if exit_code == 0 and records and records[-1]["step"] >= train_steps:
    return "done"
  return "failed"


def failures(state):
  return sum(a.get("outcome") == "failed" for a in state["attempts"])


def recover(root, points):
  """States a killed driver left "running": that attempt was interrupted, the point waits."""
  for point in points:
    state = root.state(point)
    if state["status"] == "running":
      last = state["attempts"][-1]
      last.update(end=state.get("heartbeat", last["start"]), outcome="interrupted")
      root.write_state(point, {**state, "status": "pending"})


def to_run(root, points, max_retries):
  """Indices of the points to run: not finished, and failed at most max_retries times."""
  return [i for i, p in enumerate(points) if root.state(p)["status"] not in root_lib.FINAL
          and failures(root.state(p)) <= max_retries]


class Driver:
  """Runs a sweep's points, `parallel` at once, until each is done, diverged or out of retries.

  Args:
    root: the sweep's root_lib.Root (its lock held).
    points, facts: the points and their root_lib.Facts.
    parallel: points at once, each on its own cores (and GPUs).
    max_retries: runs of a failed point after its first (counted over restarts).
    log: called with one line per event.
    poll_seconds: how often the children are looked at.
  """

  def __init__(self, root, points, facts, parallel, max_retries, log, poll_seconds=0.5):
    self.root, self.points, self.facts = root, points, facts
    self.cores, self.gpus = core_slots(parallel), gpu_slots(parallel, facts)
    self.max_retries, self.log, self.poll_seconds = max_retries, log, poll_seconds
    self.running = {}

  def run(self):
    """Returns {status: count} over all points when nothing is left to run."""
    recover(self.root, self.points)
    queue = collections.deque(to_run(self.root, self.points, self.max_retries))
    self.log(f"{len(queue)} of {len(self.points)} points to run, {len(self.cores)} at once")
    try:
      while queue or self.running:
        self._fill(queue)
        time.sleep(self.poll_seconds)
        for slot in list(self.running):
          self._look(slot, queue)
    finally:
      self._stop_all()
    return collections.Counter(self.root.state(p)["status"] for p in self.points)

  def _fill(self, queue):
    for slot in range(len(self.cores)):
      if slot not in self.running and queue:
        self._start(slot, queue.popleft())

  def _start(self, slot, index):
    point, run_dir = self.points[index], self.root.run_dir(self.points[index])
    state, now = self.root.state(point), time.time()
    state["attempts"].append({"start": now, "cores": self.cores[slot], "gpus": self.gpus[slot]})
    self.root.write_state(point, {**state, "status": "running", "heartbeat": now})
    log = open(run_dir / root_lib.TRAIN_LOG, "a")
    log.write(f"--- bin/sweep: attempt {len(state['attempts'])}, cores {self.cores[slot]}\n")
    log.flush()
    hparams.write_session(self.root.live_dir(point), point, self.facts[index].parameters)
    env = dict(os.environ)
    if self.gpus[slot] is not None:
      env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot]
    process = subprocess.Popen(train_command(point, self.root.model_dir(point)), stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                               preexec_fn=_child_setup(self.cores[slot]))
    self.running[slot] = _Attempt(point, self.facts[index], slot, process, now, log, now, now)
    self.log(f"{point.name}: started (attempt {len(state['attempts'])}, cores "
             f"{self.cores[slot]})")

  def _look(self, slot, queue):
    attempt, now = self.running[slot], time.time()
    exit_code = attempt.process.poll()
    if exit_code is None and now - attempt.watched >= _WATCH_SECONDS:
      attempt.watched = now
      if metrics.first_non_finite(metrics.train(self.root.live_dir(attempt.point))) is not None:
        attempt.process.kill()  # a NaN stays NaN: the rest of its steps are wasted
        exit_code = attempt.process.wait()
    if exit_code is None:
      if now - attempt.beat >= _HEARTBEAT_SECONDS:
        attempt.beat = now
        self.root.write_state(attempt.point, {**self.root.state(attempt.point), "heartbeat": now},
                              sync=False)  # a status change syncs; a beat every 10 s needn't
      return
    del self.running[slot]
    self._finish(attempt, exit_code, queue)

  def _finish(self, attempt, exit_code, queue):
    attempt.log.close()
    point, now = attempt.point, time.time()
    records = metrics.train(self.root.live_dir(point))  # this machine just ran it
    result = outcome(exit_code, records, attempt.facts.train_steps)
    state = self.root.state(point)
    state["attempts"][-1].update(end=now, exit_code=exit_code, outcome=result)
    retry = result == "failed" and failures(state) <= self.max_retries
    self.root.write_state(point, {**state, "status": "pending" if retry else result})
    if retry:
      queue.append(self.points.index(point))
    step = records[-1]["step"] if records else 0
    loss = records[-1]["loss"] if records else math.nan
    self.log(f"{point.name}: {result}{' (will retry)' if retry else ''}, exit code "
             f"{exit_code}, step {step}, loss {loss:.4f}, {now - attempt.start:.0f} s")

  def _stop_all(self):
    """On the way out (an exception, Ctrl-C): the children stop with the driver."""
    for attempt in self.running.values():
      attempt.process.kill()
      attempt.process.wait()
      attempt.log.close()
