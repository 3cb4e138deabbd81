"""Faults a long run meets: preemption, kills mid-write, a diverging loss, bad knobs.

Each ends as promised: SIGTERM/SIGINT save and exit 0, a resumed run equals an uninterrupted
one step for step, a NaN never reaches a checkpoint (exit code 3), a bad knob is one line.
`make faults` runs the kill storm with FAULT_KILLS=20 and prints its figures.
"""
import concurrent.futures
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from gptneo import checkpoints
from gptneo import errors
from gptneo import loop as loop_lib
from gptneo import runtime
from gptneo import tpu
from gptneo import train_checks
from gptneo import train_graph
from gptneo.compat import tf
from gptneo.model import gpt as gpt_lib
from tests import test_tpu
from tests.conftest import REPO, TINY_TEST_BINDINGS
from tests.test_errors import assert_one_line_error, snapshot
from tests.test_train import DROPOUT, train_in_process

# decay_steps fixed: the schedule, and so every loss, does not depend on train.train_steps, so
# a run stopped early and resumed to fewer steps compares with one reference run.
FAULT_BINDINGS = DROPOUT + ["learning_rate_schedule.decay_steps = 100",
                            "train.keep_checkpoints = 1000"]
KILLS = int(os.environ.get("FAULT_KILLS", "5"))  # make faults: 20
STORM_STEPS = 3 * KILLS + 6  # each kill lands 1 to 3 steps past where its run resumed
REFERENCE_STEPS = max(40, STORM_STEPS)
TIMEOUT_SECS = 300  # a hung trainer fails its test instead of the whole suite


def train_command(model_dir, dataset, steps, *bindings):
  params = TINY_TEST_BINDINGS + FAULT_BINDINGS + [
      f'DATASET_DIR = "{dataset}"', f"train.train_steps = {steps}", *bindings]
  return [sys.executable, str(REPO / "bin" / "train"), "--gin_file=tiny.gin",
          f"--model_dir={model_dir}"] + [f"--gin_param={p}" for p in params]


def run_training(model_dir, dataset, steps, *bindings):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run(train_command(model_dir, dataset, steps, *bindings), env=env,
                        capture_output=True, text=True, timeout=TIMEOUT_SECS, check=False)


class Trainer:
  """bin/train (or `command`) in the background; `wait_for` reads its log until a line
  appears."""

  def __init__(self, model_dir=None, dataset=None, steps=None, *bindings, command=None):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = command or train_command(model_dir, dataset, steps, *bindings)
    self.process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    text=True)
    self.lines = []
    self._watchdog = threading.Timer(TIMEOUT_SECS, self.process.kill)
    self._watchdog.start()

  def wait_for(self, pattern):
    """Blocks on the trainer's own log (no sleeping) until a line matches `pattern` (a
    regular expression); returns the match."""
    for line in self.process.stderr:
      self.lines.append(line)
      match = re.search(pattern, line)
      if match:
        return match
    raise AssertionError(f"bin/train ended without logging {pattern!r}:\n"
                         + "".join(self.lines[-30:]))

  def finish(self):
    """Waits for the exit; returns (return code, the whole log)."""
    self.lines.extend(self.process.stderr)
    self.process.wait()
    self._watchdog.cancel()
    return self.process.returncode, "".join(self.lines)


def metrics_records(model_dir):
  """(step, record) of every line of train_metrics.jsonl, in file order."""
  with open(os.path.join(model_dir, "train_metrics.jsonl")) as f:
    return [(record["step"], record) for record in map(json.loads, f)]


def metrics_lines(model_dir):
  """(step, loss) of every line of train_metrics.jsonl, in file order."""
  return [(step, record["loss"]) for step, record in metrics_records(model_dir)]


def checkpoint_steps(model_dir):
  return sorted(int(name[len("model.ckpt-"):-len(".index")]) for name in os.listdir(model_dir)
                if name.startswith("model.ckpt-") and name.endswith(".index"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_dataset):
  """An uninterrupted run of REFERENCE_STEPS steps, a checkpoint at each: its model dir."""
  model_dir = tmp_path_factory.mktemp("reference") / "run"
  train_in_process(model_dir, small_dataset, REFERENCE_STEPS, *FAULT_BINDINGS,
                   "train.steps_per_checkpoint = 1")
  return model_dir


def assert_losses_equal(model_dir, reference_dir, steps):
  """Every step 1..steps logged exactly once, with the reference run's loss; returns the
  largest difference."""
  lines, expected = metrics_lines(model_dir), dict(metrics_lines(reference_dir))
  assert [step for step, _ in lines] == list(range(1, steps + 1))
  differences = [abs(loss - expected[step]) for step, loss in lines]
  assert max(differences) <= 1e-6, differences
  return max(differences)


PREEMPTED = "train: preempted ({}) at step "


def preempt(model_dir, dataset, signum):
  """bin/train stopped by `signum` after its 5th step; returns (exit code, log, step)."""
  trainer = Trainer(model_dir, dataset, 100_000, "train.steps_per_checkpoint = 1000")
  trainer.wait_for("step 5/")
  trainer.process.send_signal(signum)
  returncode, log = trainer.finish()
  lines = [line for line in log.splitlines() if PREEMPTED.format(signum.name) in line]
  assert len(lines) == 1, log[-3000:]
  step = int(lines[0].split(" at step ")[1].split(";")[0])
  assert f"checkpoint {model_dir}/model.ckpt-{step} saved" in lines[0], lines[0]
  assert "run the same command to resume" in lines[0]
  return returncode, log, step


def test_sigterm_saves_exits_0_and_resumes_exactly(tmp_path, small_dataset, reference):
  returncode, log, step = preempt(tmp_path / "run", small_dataset, signal.SIGTERM)
  assert returncode == 0, log[-3000:]
  assert 5 <= step < REFERENCE_STEPS
  assert checkpoint_steps(tmp_path / "run") == [step]
  resumed = run_training(tmp_path / "run", small_dataset, REFERENCE_STEPS)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"model.ckpt-{step}" in resumed.stderr
  assert_losses_equal(tmp_path / "run", reference, REFERENCE_STEPS)


def test_ctrl_c_saves_and_exits_0_without_a_traceback(tmp_path, small_dataset):
  returncode, log, step = preempt(tmp_path / "run", small_dataset, signal.SIGINT)
  assert returncode == 0, log[-3000:]
  assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
  assert checkpoint_steps(tmp_path / "run") == [step]


def test_a_signal_is_seen_at_once_and_handlers_come_back():
  before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  with loop_lib.Preemption() as preemption:
    os.kill(os.getpid(), signal.SIGTERM)
    assert preemption.signalled.wait(TIMEOUT_SECS)  # its thread saw it, not a bytecode check
    assert preemption.signal == signal.SIGTERM
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
  assert signal.set_wakeup_fd(-1) == -1  # none was set before: none is left behind


# bin/train whose saves after step 2 first hang inside a session.run (on a queue no one
# fills), as a long checkpoint write does: the main thread waits in C++, where Python runs no
# signal handler, and no system call is there for a signal to interrupt.
HANGING_SAVE = """
import sys
from gptneo import checkpoints, configurables, gin_utils, train
from gptneo.compat import tf
model_dir, params = sys.argv[1], sys.argv[2:]
gin_utils.graph_mode()
gin_utils.parse(["tiny.gin"], params)
save = checkpoints.Checkpoints.save
def hanging_save(self, session, step):
  if step > 2:
    print(f"saving checkpoint {step}", file=sys.stderr, flush=True)
    with tf.Graph().as_default() as graph, tf.Session(graph=graph) as hang:
      hang.run(tf.queue.FIFOQueue(1, tf.int32).dequeue())
  return save(self, session, step)
checkpoints.Checkpoints.save = hanging_save
train.train(model_dir)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_during_a_save_exits_at_once(tmp_path, small_dataset, signum):
  model_dir = tmp_path / "run"
  params = TINY_TEST_BINDINGS + FAULT_BINDINGS + [
      f'DATASET_DIR = "{small_dataset}"', "train.train_steps = 1000",
      "train.steps_per_checkpoint = 2", "train.eval_batches = 0"]
  trainer = Trainer(command=[sys.executable, "-c", HANGING_SAVE, str(model_dir), *params])
  trainer.wait_for("saving checkpoint 4")
  trainer.process.send_signal(signum)
  trainer.wait_for(f"train: {signum.name}: stopping after this step")  # seen mid-save
  trainer.process.send_signal(signum)
  returncode, log = trainer.finish()
  assert returncode == 128 + signum, log[-3000:]
  assert f"a second signal ({signum.name}): exiting at once with code {128 + signum}" in log
  assert "Traceback" not in log, log[-3000:]
  assert checkpoint_steps(model_dir) == [2]
  assert checkpoints.newest(str(model_dir)).path == f"{model_dir}/model.ckpt-2"  # verified


def test_checkpoint_every_secs_saves_on_time(tmp_path, small_dataset):
  train_in_process(tmp_path / "run", small_dataset, 3, *FAULT_BINDINGS,
                   "train.steps_per_checkpoint = 1000", "train.checkpoint_every_secs = 1e-9")
  assert checkpoint_steps(tmp_path / "run") == [1, 2, 3]


@pytest.fixture(scope="module")
def four_good_steps(tmp_path_factory, small_dataset):
  """A model dir trained 4 steps, checkpoints at 2 and 4, for a run to diverge from."""
  model_dir = tmp_path_factory.mktemp("good") / "run"
  train_in_process(model_dir, small_dataset, 4, *FAULT_BINDINGS, "train.steps_per_checkpoint = 2")
  return model_dir


DIVERGING = "learning_rate_schedule.learning_rate = 1e30"  # step 5's update blows up step 6


def checkpoint_values(model_dir, step):
  """name -> value of every float variable in model.ckpt-<step>, step and data position aside."""
  reader = tf.train.load_checkpoint(os.path.join(model_dir, f"model.ckpt-{step}"))
  return {name: reader.get_tensor(name) for name, dtype in
          reader.get_variable_to_dtype_map().items() if dtype.is_floating}


def assert_every_checkpoint_finite(model_dir):
  for step in checkpoint_steps(model_dir):
    for name, value in checkpoint_values(model_dir, step).items():
      assert np.all(np.isfinite(value)), f"model.ckpt-{step} {name}"


def test_nan_stops_with_one_line_exit_3_and_no_bad_checkpoint(tmp_path, small_dataset,
                                                              four_good_steps):
  shutil.copytree(four_good_steps, tmp_path / "run")
  result = run_training(tmp_path / "run", small_dataset, 20, "train.steps_per_checkpoint = 1",
                        DIVERGING)
  assert result.returncode == errors.EXIT_DIVERGED, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("train: diverged: the loss went non-finite at step 6 (loss nan"), last
  assert f"the last good checkpoint is {tmp_path / 'run'}/model.ckpt-5;" in last, last
  assert checkpoint_steps(tmp_path / "run") == [2, 4, 5]
  assert_every_checkpoint_finite(tmp_path / "run")


def test_skip_keeps_weights_and_optimizer_state_counts_and_stops(tmp_path, small_dataset,
                                                                  four_good_steps):
  shutil.copytree(four_good_steps, tmp_path / "run")
  with pytest.raises(errors.Diverged, match=r"at step 8 .*3 in a row.*model\.ckpt-7"):
    train_in_process(tmp_path / "run", small_dataset, 20, "train.steps_per_checkpoint = 1",
                     DIVERGING, 'train.on_nonfinite = "skip"', "train.max_nonfinite_steps = 3")
  skipped = {step: record.get("skipped_steps") for step, record in metrics_records(tmp_path / "run")}
  assert skipped == {1: None, 2: None, 3: None, 4: None, 5: 0, 6: 1, 7: 2}
  assert checkpoint_steps(tmp_path / "run") == [2, 4, 5, 6, 7]
  assert_every_checkpoint_finite(tmp_path / "run")
  after_5 = checkpoint_values(tmp_path / "run", 5)
  for step in (6, 7):  # skipped: weights and Adam's moments as step 5 left them, bit for bit
    values = checkpoint_values(tmp_path / "run", step)
    assert sorted(values) == sorted(after_5)
    for name, value in values.items():
      np.testing.assert_array_equal(value, after_5[name], err_msg=name)


@pytest.mark.parametrize("layout", [None, "heads:x,mlp:x,vocab:x"])
def test_skip_mode_takes_the_same_steps_when_finite(tmp_path, small_dataset, reference, layout):
  mesh = [f'mesh.layout = "{layout}"', 'mesh.mesh_shape = "x:2"'] if layout else []
  train_in_process(tmp_path / "skip", small_dataset, 6, *FAULT_BINDINGS, *mesh,
                   'train.on_nonfinite = "skip"')
  if layout:  # dropout masks follow the layout: the default mode on the same mesh to compare
    train_in_process(tmp_path / "stop", small_dataset, 6, *FAULT_BINDINGS, *mesh)
  skip = dict(metrics_lines(tmp_path / "skip"))
  default = dict(metrics_lines(tmp_path / "stop" if layout else reference))
  np.testing.assert_allclose([skip[s] for s in range(1, 7)], [default[s] for s in range(1, 7)],
                             rtol=0, atol=1e-6)


def eval_steps_logged(model_dir):
  with open(os.path.join(model_dir, "eval.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


def test_steps_rerun_after_a_kill_are_logged_once(tmp_path, small_dataset, reference):
  periodic_eval = ["train.eval_every_n_steps = 2", "train.eval_steps = 1"]
  trainer = Trainer(tmp_path / "run", small_dataset, 12, "train.steps_per_checkpoint = 4",
                    *periodic_eval)
  trainer.wait_for("step 6  validation loss")  # steps 5, 6 and an evaluation past model.ckpt-4
  trainer.process.send_signal(signal.SIGKILL)
  returncode, log = trainer.finish()
  assert returncode == -signal.SIGKILL, log[-3000:]
  assert checkpoint_steps(tmp_path / "run") == [4]
  assert {5, 6} <= {step for step, _ in metrics_lines(tmp_path / "run")}
  resumed = run_training(tmp_path / "run", small_dataset, 12, "train.steps_per_checkpoint = 4",
                         *periodic_eval)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert_losses_equal(tmp_path / "run", reference, 12)
  assert eval_steps_logged(tmp_path / "run") == [2, 4, 6, 8, 10, 12]


BAD_KNOBS = {  # binding(s) -> what the one line must say
    "zero batch": (["train.batch_size = 0"], ["train.batch_size = 0", "positive integer"]),
    "zero checkpoint cadence": (["train.steps_per_checkpoint = 0"],
                                ["train.steps_per_checkpoint = 0", "positive integer"]),
    "zero log cadence": (["train.log_every_n_steps = 0"],
                         ["train.log_every_n_steps = 0", "positive integer"]),
    "negative train_steps": (["train.train_steps = -5"], ["train.train_steps = -5"]),
    "negative keep_checkpoints": (["train.keep_checkpoints = -1"],
                                  ["train.keep_checkpoints = -1", "positive integer"]),
    "zero microbatches": (["train.microbatches_per_batch = 0"],
                          ["train.microbatches_per_batch = 0"]),
    "negative clip_norm": (["train.clip_norm = -1.0"], ["train.clip_norm = -1.0", "None or 0"]),
    "negative eval_batches": (["train.eval_batches = -1"],
                              ["train.eval_batches = -1", "0 or a positive integer"]),
    "negative eval_steps": (["train.eval_steps = -1"], ["train.eval_steps = -1"]),
    "negative eval cadence": (["train.eval_every_n_steps = -2"],
                              ["train.eval_every_n_steps = -2"]),
    "fractional eval_batches": (["train.eval_batches = 2.5"], ["train.eval_batches = 2.5"]),
    "negative learning rate": (["learning_rate_schedule.learning_rate = -3e-4"],
                               ["learning_rate_schedule.learning_rate = -0.0003", "positive"]),
    "negative checkpoint_every_secs": (["train.checkpoint_every_secs = -60"],
                                       ["train.checkpoint_every_secs = -60"]),
    "unknown on_nonfinite": (['train.on_nonfinite = "ignore"'],
                             ["train.on_nonfinite = 'ignore'", "'stop', 'skip'"]),
    "zero max_nonfinite_steps": (["train.max_nonfinite_steps = 0"],
                                 ["train.max_nonfinite_steps = 0"]),
}


@pytest.fixture(scope="module")
def bad_knob_runs(tmp_path_factory, small_dataset, four_good_steps):
  """Every BAD_KNOBS case through bin/train on one trained model dir, two at a time (each
  is mostly TensorFlow's start-up): (case -> result, the dir's files before, after)."""
  before = snapshot(four_good_steps)
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    runs = {case: pool.submit(run_training, four_good_steps, small_dataset, 4, *bindings)
            for case, (bindings, _) in BAD_KNOBS.items()}
    results = {case: run.result() for case, run in runs.items()}
  return results, before, snapshot(four_good_steps)


@pytest.mark.parametrize("case", sorted(BAD_KNOBS))
def test_a_bad_knob_is_one_line_before_anything_is_written(case, bad_knob_runs):
  results, before, after = bad_knob_runs
  assert_one_line_error(results[case], "train", *BAD_KNOBS[case][1])
  assert after == before


def uncommitted(model_dir):
  """What interrupted writes leave: TF's partial files, temporaries, checkpoint files of a step
  without the manifest that commits it (checkpoints.py)."""
  names = os.listdir(model_dir)
  steps = {m.group(1) for m in map(re.compile(r"model\.ckpt-(\d+)\.").match, names) if m}
  return sorted([name for name in names if "tempstate" in name or ".tmp" in name] +
                [f"model.ckpt-{step}.*" for step in steps
                 if f"model.ckpt-{step}.manifest.json" not in names])


def committed_steps(model_dir):
  return sorted(int(name.split("-")[1].split(".")[0]) for name in os.listdir(model_dir)
                if re.fullmatch(r"model\.ckpt-\d+\.manifest\.json", name))


# Where in the writing of checkpoint K a kill lands: once the model dir's names pass the test.
KILL_POINTS = {
    "logged": lambda names, k: True,  # step K logged, its checkpoint not begun
    "writing": lambda names, k: any(name.startswith(f"model.ckpt-{k}.") for name in names),
    "written": lambda names, k: f"model.ckpt-{k}.index" in names,  # TF done, not committed
    "committed": lambda names, k: f"model.ckpt-{k}.manifest.json" in names,
}


def wait_for_names(model_dir, test, process):
  """A bounded poll of the model dir's listing (a file appearing is all there is to wait on)."""
  deadline = time.monotonic() + TIMEOUT_SECS
  while not test(os.listdir(model_dir)):
    assert process.poll() is None and time.monotonic() < deadline, "no such file came"


def kill_at_random(model_dir, dataset, rng):
  """One bin/train run SIGKILLed 1 to 3 steps past its start, at a random point of writing
  that step's checkpoint; returns whether it left a write unfinished, or None if there was no
  room left to kill."""
  trainer = Trainer(model_dir, dataset, STORM_STEPS, "train.steps_per_checkpoint = 1")
  start = int(trainer.wait_for(r"(?:resumed from .*|started) at step (\d+)$").group(1))
  target = start + rng.randint(1, 3)
  if target >= STORM_STEPS:
    trainer.process.kill()
    trainer.finish()
    return None
  trainer.wait_for(rf"\] step {target}/")  # logged just before its checkpoint is written
  point = KILL_POINTS[rng.choice(sorted(KILL_POINTS))]
  wait_for_names(model_dir, lambda names: point(names, target), trainer.process)
  trainer.process.send_signal(signal.SIGKILL)
  returncode, log = trainer.finish()
  assert returncode == -signal.SIGKILL, log[-3000:]
  return bool(uncommitted(model_dir))


def verified_checkpoints(model_dir, reference_dir):
  """The committed checkpoints whose every variable equals the reference's at that step."""
  verified = 0
  for step in committed_steps(model_dir):
    values, expected = checkpoint_values(model_dir, step), checkpoint_values(reference_dir, step)
    verified += sorted(values) == sorted(expected) and all(
        np.allclose(values[name], expected[name], rtol=0, atol=1e-6) for name in values)
  return verified


def test_kill_storm_every_resume_equals_the_uninterrupted_run(tmp_path, small_dataset,
                                                             reference):
  rng, model_dir = random.Random(14), tmp_path / "storm"
  outcomes = []
  while len(outcomes) < KILLS:
    outcome = kill_at_random(model_dir, dataset=small_dataset, rng=rng)
    if outcome is None:
      break
    outcomes.append(outcome)
  final = run_training(model_dir, small_dataset, STORM_STEPS, "train.steps_per_checkpoint = 1")
  assert final.returncode == 0, final.stderr[-3000:]
  difference = assert_losses_equal(model_dir, reference, STORM_STEPS)
  total, verified = len(committed_steps(model_dir)), verified_checkpoints(model_dir, reference)
  leftovers = uncommitted(model_dir)
  print(f"\nkill storm: {len(outcomes)} kills, {sum(outcomes)} during checkpoint writes; "
        f"checkpoints verified {verified}/{total}; leftovers {len(leftovers)} {leftovers}; "
        f"max loss difference {difference:.1e}")
  assert len(outcomes) == KILLS
  assert verified == total == STORM_STEPS
  assert not leftovers


def test_skip_mode_on_the_tpu_loop_guards_every_update_and_leaves_none_unguarded(small_dataset,
                                                                                  tmp_path):
  """A TPU program runs every assignment it holds, fetched or not: skip mode must replace the
  optimizer's, not add to them (test_tpu's 8-core graph, Adam, 2 microbatches)."""
  assigns = {}
  for policy in train_checks.NONFINITE_POLICIES:
    rt = runtime.Runtime(test_tpu.simd_spec(), tpu=tpu.synthetic_system(num_chips=4))
    built = train_graph.build(test_tpu.settings(
        gpt_lib.GPT(**test_tpu.MODEL), rt.spec, small_dataset, steps_per_loop=10,
        on_nonfinite=policy), str(tmp_path / policy), rt)
    assigns[policy] = [op.inputs[1].op.type for op in built.graph.get_operations()
                       if op.type == "AssignVariableOp"]
    with built.graph.as_default():
      masters = set(tf.global_variables())
      weights = [v for v in tf.trainable_variables() if v in masters]
  assert len(assigns["skip"]) == len(assigns["stop"])
  assert assigns["skip"].count("SelectV2") == 3 * len(weights)  # each weight, Adam's m and v
  assert "SelectV2" not in assigns["stop"]
