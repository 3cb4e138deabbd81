"""bin/sweep --search: Optuna picks the points, a pruner stops them (SIGTERM, checkpoint kept),
--resume_pruned takes them up again; one PostgreSQL study shared by two drivers, one killed;
bad input (samplers, distributions, storage, another sweep's study)."""
import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import optuna
import pytest

from conftest import REPO, TINY_TEST_BINDINGS, run_binary
from gptneo.errors import UserError
from gptneo.sweep import launch
from gptneo.sweep import metrics
from gptneo.sweep import report
from gptneo.sweep import root as root_lib
from gptneo.sweep import search
from gptneo.sweep import sweep_file
from gptneo.sweep import validate
from tests.test_errors import assert_one_line_error
from tests.test_sweep import TRAINING_STACK, _imported

LR = "learning_rate_schedule.learning_rate"
# Three learning rates: one that learns, two too small to (their losses stay where they start).
AXES = [f"{LR} = [3e-3, 1e-7, 2e-7]"]
LONG = 200  # test_grid_search_prunes...: steps of its points
RUN = ["train.train_steps = 60", "train.steps_per_checkpoint = 10", "train.eval_every_n_steps = 10",
       "train.eval_steps = 4", "train.log_every_n_steps = 10"]


def _flags(dataset, axes=AXES, run=RUN):
  params = [*TINY_TEST_BINDINGS, f'DATASET_DIR = "{dataset}"', *run]
  return (["--gin_file=tiny.gin"] + [f"--gin_param={p}" for p in params]
          + [f"--axis={a}" for a in axes])


def _spec(dataset, **search):
  params = [*TINY_TEST_BINDINGS, f'DATASET_DIR = "{dataset}"', *RUN]
  return sweep_file.spec_from(None, ["tiny.gin"], params, AXES, (), search)


def _trials(url, name):
  """The study's trials, its connections closed (polled: an engine per call would pile up
  connections until the server refuses more)."""
  storage = optuna.storages.RDBStorage(url)
  try:
    return optuna.load_study(study_name=name, storage=storage).get_trials()
  finally:
    storage.engine.dispose()


def _rows(root):
  with open(root / report.RESULTS_CSV) as f:
    return {r["point"]: r for r in csv.DictReader(f)}


# ------------------------------------------------------------------ the space and samplers


@pytest.mark.parametrize("sampler", ["grid", "random", "tpe", "cmaes"])
def test_each_sampler_picks_points_of_the_space(sampler):
  ranges = sampler == "cmaes"  # CMA-ES takes ranges only; grid takes no range
  axes = [] if ranges else [f"{LR} = [1e-3, 3e-3]", "GPT.n_embd, GPT.n_head = [32, 64], [2, 4]"]
  randoms = ["Adam.beta2 = uniform(0.9, 0.99)"] + (
      [f"{LR} = log_uniform(1e-4, 1e-2)"] if ranges else [])
  if sampler == "grid":
    randoms = []
  spec = sweep_file.spec_from(None, ["tiny.gin"], [], axes, randoms,
                              {"search": sampler, "trials": 4, "random_seed": 3})
  params = search.space(spec)
  study = optuna.create_study(sampler=search.sampler(spec, params))
  names = set()
  for _ in range(4):
    trial = study.ask({p.name: p.distribution for p in params})
    point = search.point(spec, params, trial.params, trial.number)
    values = dict(point.values)
    if ranges:
      assert 1e-4 <= float(values[LR]) <= 1e-2 and 0.9 <= float(values["Adam.beta2"]) <= 0.99
      assert float(values[LR]) == float(f"{float(values[LR]):.3g}")
    else:
      assert values[LR] in ("0.001", "0.003")
      assert (values["GPT.n_embd"], values["GPT.n_head"]) in (("32", "2"), ("64", "4"))
    assert point.gin_params == tuple(f"{n} = {v}" for n, v in point.values)
    names.add(point.name)
    study.tell(trial, float(len(names)))
  if sampler == "grid":
    assert len(names) == 4  # every grid point once
  assert search.grid_size(params) == (1 if ranges else 4)


def test_slurm_launches_drivers_of_the_one_study(tmp_path):
  command = ["bin/sweep", "--sweep=tiny_search.gin", "--root=r", "--search=tpe", "--trials=9",
             "--launcher=slurm", "--sbatch", "--partition=cpu", "--parallel=3",
             "--storage=postgresql://u@db/s"]
  script = launch.write_search_slurm(tmp_path / "r", command, ["--partition=cpu"], 3)
  text = script.read_text()
  assert "#SBATCH --array=0-2\n" in text and "#SBATCH --partition=cpu\n" in text
  worker = launch.worker_command(command)
  assert worker[2:] == ["--sweep=tiny_search.gin", "--root=r", "--search=tpe", "--trials=9",
                        "--storage=postgresql://u@db/s", "--parallel=1"]
  assert text.rstrip().endswith(shlex.join(worker))


# ------------------------------------------------------------------ bad input


def test_samplers_and_distributions_they_cannot_take_are_refused(small_dataset, tmp_path):
  with pytest.raises(UserError, match="search cmaes samples numbers from ranges, but "
                     "learning_rate_schedule.learning_rate is a list"):
    search.space(_spec(small_dataset, search="cmaes", trials=2))
  ranged = sweep_file.spec_from(None, ["tiny.gin"], [], (), [f"{LR} = log_uniform(1e-4, 1e-2)"],
                                {"search": "grid"})
  with pytest.raises(UserError, match="search grid can't take .*learning_rate .a range"):
    search.space(ranged)
  with pytest.raises(UserError, match="trials 0 with search tpe; give --trials"):
    _spec(small_dataset, search="tpe")
  with pytest.raises(UserError, match="pruner is given without a search"):
    _spec(small_dataset, pruner="asha")
  path = tmp_path / "s.gin"
  path.write_text("include 'tiny.gin'\naxis GPT.n_embd = [32, 64]\nsearch bayes\n")
  with pytest.raises(UserError, match=r"s.gin:3: search 'bayes' is unknown; use one of grid, "
                     r"random, tpe, cmaes"):
    sweep_file.spec_from(str(path))
  path.write_text("include 'tiny.gin'\naxis GPT.n_embd = [32, 64]\nsearch tpe\ntrials 3\n"
                  "pruner asha\nobjective train_loss\n")
  spec = sweep_file.spec_from(str(path))
  assert (spec.search, spec.trials, spec.pruner, spec.objective) == ("tpe", 3, "asha",
                                                                     "train_loss")
  result = run_binary("sweep", *_flags(small_dataset), f"--root={tmp_path / 'r'}",
                      "--search=tpe", "--trials=2", "--pruner=successive")
  assert_one_line_error(result, "sweep", "--pruner", "successive")
  assert not (tmp_path / "r").exists()


def test_a_storage_that_does_not_connect_is_one_line_and_creates_nothing(
    small_dataset, tmp_path):
  root = tmp_path / "root"
  result = run_binary("sweep", *_flags(small_dataset), f"--root={root}", "--search=tpe",
                      "--trials=2", "--storage=postgresql://someone:secret@127.0.0.1:1/study")
  assert_one_line_error(result, "sweep", "--storage=postgresql://someone:***@127.0.0.1:1/study",
                        "does not open")
  assert "secret" not in result.stderr
  assert not root.exists()


def test_a_study_of_another_sweep_is_refused_unless_update(small_dataset, tmp_path):
  root = root_lib.Root(tmp_path / "root")
  root.path.mkdir()
  storage = search.open_storage(search.default_storage(root), 60)
  spec = _spec(small_dataset, search="tpe", trials=2)
  params = search.space(spec)
  facts = validate.check(search.first_point(spec, params))
  search.open_study(spec, params, facts, root, storage)
  other = _spec(small_dataset, search="tpe", trials=5)
  with pytest.raises(UserError, match=r"the study 'root' in sqlite:///.*study.db was made from "
                     r"another sweep \(its trials differ\).*--update"):
    search.open_study(other, params, facts, root, storage)
  study = search.open_study(other, params, facts, root, storage, update=True)
  assert study.user_attrs["spec"]["trials"] == 5


# ------------------------------------------------------------------ search, pruning, resume


def test_grid_search_prunes_the_hopeless_points_then_resume_pruned_finishes_them(
    small_dataset, tmp_path):
  root = tmp_path / "root"
  # 200 steps, pruned from step 10 on: a loaded machine may starve the driver for seconds, and
  # a hopeless point must still be running when its SIGTERM comes (60 steps could finish first).
  run = [r.replace("train.train_steps = 60", f"train.train_steps = {LONG}") for r in RUN]
  flags = [*_flags(small_dataset, run=run), f"--root={root}", "--search=grid", "--pruner=asha"]
  run_binary("sweep", *flags, check=True)
  url = f"sqlite:///{root / search.STUDY_DB}"
  trials = _trials(url, "root")
  states = {t.user_attrs["point"]: t.state.name for t in trials}
  assert states["lr=3e-3"] == "COMPLETE" and "PRUNED" in states.values(), states
  rows = _rows(root)
  for trial in trials:
    name, row = trial.user_attrs["point"], rows[trial.user_attrs["point"]]
    state = root_lib.read_json(root / name / root_lib.STATE_JSON)
    if trial.state.name == "PRUNED":
      # Stopped by SIGTERM at a step boundary past the pruning step, a checkpoint saved there.
      assert row["status"] == "pruned" and int(row["pruned_step"]) == state["pruned_step"]
      stopped = metrics.train(root / name)[-1]["step"]
      assert state["pruned_step"] <= stopped < LONG
      assert (root / name / f"model.ckpt-{stopped}.index").is_file()
      log = (root / name / root_lib.TRAIN_LOG).read_text()
      assert f"preempted (SIGTERM) at step {stopped}" in log
      assert max(trial.intermediate_values) == state["pruned_step"]
    else:
      assert row["status"] == "done" and trial.value == float(row["val_loss_final"])
  markdown = (root / report.RESULTS_MD).read_text()
  assert "| pruned at " in markdown and "| trials |" in markdown
  assert (root / search.HISTORY_PNG).stat().st_size > 0
  loaded, result = _imported(f"--root={root}", "--status")  # bookkeeping: no training stack
  assert result.returncode == 0 and not loaded & set(TRAINING_STACK), result.stderr[-2000:]
  status = result.stdout
  loaded, result = _imported(f"--root={root}", "--report")  # a search's plots too
  assert result.returncode == 0 and not loaded & set(TRAINING_STACK), loaded & set(TRAINING_STACK)
  assert (root / search.HISTORY_PNG).stat().st_size > 0
  pruned = [t.user_attrs["point"] for t in trials if t.state.name == "PRUNED"]
  assert f"{3 - len(pruned)} done, {len(pruned)} pruned" in status.splitlines()[0]
  assert "pruned at" in status

  run_binary("sweep", *flags, "--resume_pruned", check=True)
  rows = _rows(root)
  for name in pruned:
    assert rows[name]["status"] == "done" and rows[name]["steps"] == str(LONG)
    assert "resumed from" in (root / name / root_lib.TRAIN_LOG).read_text()
  resumed = [t for t in _trials(url, "root") if "resumes" in t.user_attrs]
  assert sorted(t.user_attrs["point"] for t in resumed) == sorted(pruned)
  assert all(t.state.name == "COMPLETE" for t in resumed)


# ------------------------------------------------------------------ one study, two drivers


def _driver(flags):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.Popen([sys.executable, str(REPO / "bin" / "sweep"), *flags], env=env,
                          cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_mid_trial(process, url, root):
  """SIGKILLs the driver once a trial it runs has a checkpoint and is not finished."""
  deadline = time.time() + 300
  while time.time() < deadline:
    assert process.poll() is None, process.stderr.read()[-3000:]
    try:
      trials = _trials(url, "root")
    except KeyError:  # the study is not made yet
      trials = []
    for trial in trials:
      name = trial.user_attrs.get("point")
      if (trial.state.name == "RUNNING" and name
          and trial.user_attrs.get("driver", "").endswith(f":{process.pid}")):
        steps = [r["step"] for r in metrics.train(root / name)]
        if steps and 20 <= steps[-1] < 60:
          process.send_signal(signal.SIGKILL)
          process.wait()
          return name
    time.sleep(0.05)
  raise AssertionError("no trial of the driver was caught mid-run")


def test_two_drivers_share_a_postgres_study_and_a_killed_ones_trial_is_taken_up(
    small_dataset, tmp_path, postgres):
  root = tmp_path / "root"
  axes = [f"{LR} = [3e-3, 1e-3]", "GPT.n_embd = [32, 64]"]
  flags = [*_flags(small_dataset, axes), f"--root={root}", "--search=tpe", "--trials=4",
           f"--storage={postgres}", "--stale_seconds=10"]
  first, second = _driver(flags), _driver(flags)
  cut = _kill_mid_trial(first, postgres, root)
  assert second.wait(timeout=600) == 0, second.stderr.read()[-3000:]

  trials = _trials(postgres, "root")
  failed = [t for t in trials if t.state.name == "FAIL"]
  taken = [t for t in trials if "takes_up" in t.user_attrs]
  assert [t.user_attrs["point"] for t in taken] == [cut]
  assert taken[0].user_attrs["takes_up"] in [t.number for t in failed]
  assert taken[0].state.name == "COMPLETE"
  complete = [t for t in trials if t.state.name == "COMPLETE"]
  assert len(complete) >= 4
  ran = [t for t in complete if "copy_of" not in t.user_attrs]
  assert len({t.user_attrs["point"] for t in ran}) == len(ran)  # no point trained twice
  rows = _rows(root)
  assert all(r["status"] == "done" and r["steps"] == "60" for r in rows.values())
  assert "resumed from" in (root / cut / root_lib.TRAIN_LOG).read_text()
  for name in rows:  # never two bin/train processes on one run dir at once
    attempts = root_lib.read_json(root / name / root_lib.STATE_JSON)["attempts"]
    spans = sorted((a["start"], a.get("end", a["start"])) for a in attempts)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), attempts
  assert json.loads((root / root_lib.SWEEP_JSON).read_text())["storage"] == postgres


def test_a_trial_whose_driver_died_before_its_first_heartbeat_is_taken_up(tmp_path):
  """Killed between study.ask and its first heartbeat, a driver leaves a RUNNING trial with
  no heartbeat: once older than the grace period it is failed and its point enqueued again,
  as a trial whose heartbeat stopped is (else the other drivers wait for it for good)."""
  storage = search.open_storage(f"sqlite:///{tmp_path / 'study.db'}", stale_seconds=60)
  study = optuna.create_study(storage=storage, study_name="s")
  orphan = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
  beaten = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
  storage.record_heartbeat(beaten._trial_id)  # pylint: disable=protected-access
  optuna.storages.fail_stale_trials(study)
  assert study.trials[orphan.number].state == optuna.trial.TrialState.RUNNING  # within grace
  with storage.engine.begin() as connection:  # its driver died an hour ago
    connection.exec_driver_sql("UPDATE trials SET datetime_start = datetime('now', '-1 hour') "
                               f"WHERE number = {orphan.number}")
  optuna.storages.fail_stale_trials(study)
  states = [t.state for t in study.trials]
  assert states[orphan.number] == optuna.trial.TrialState.FAIL
  assert states[beaten.number] == optuna.trial.TrialState.RUNNING
  assert study.trials[-1].state == optuna.trial.TrialState.WAITING  # its point, enqueued again
  assert study.trials[-1].system_attrs["fixed_params"] == orphan.params


@pytest.mark.parametrize("name", ["asha", "hyperband", "median"])
def test_each_pruner_stops_a_trial_worse_than_the_finished_ones(name):
  """--pruner's Optuna pruner, rungs from the point's evaluation cadence: after finished
  trials whose validation losses fall, one whose losses stay high is pruned by the last
  evaluation (the end-to-end pruning of a sweep is test_grid_search_prunes...)."""
  import types  # pylint: disable=g-import-not-at-top
  spec = types.SimpleNamespace(pruner=name)
  facts = types.SimpleNamespace(eval_every_n_steps=10, train_steps=60)
  # Named: Hyperband assigns a trial's bracket by a hash of the study's name.
  study = optuna.create_study(study_name="pruners", pruner=search.pruner(spec, facts))
  for good in range(9):
    trial = study.ask()
    for step in range(10, 61, 10):
      trial.report(5.0 - step / 100 - good / 1000, step)
      trial.should_prune()  # the driver asks after every report: the rungs record it
    study.tell(trial, 5.0 - 0.6 - good / 1000)
  bad = study.ask()
  pruned_at = None
  for step in range(10, 61, 10):
    bad.report(8.0, step)
    if bad.should_prune():
      pruned_at = step
      break
  assert pruned_at is not None, f"{name} never pruned a trial 3 nats worse at every step"
