"""bin/sweep: expansion, validation before anything is created, running, resuming after a
SIGKILL of the driver, divergence, the report, the cluster launchers and bad input."""
import csv
import json
import math
import os
import pathlib
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from tensorboard.backend.event_processing import plugin_event_multiplexer as events
from tensorboard.plugins.hparams import metadata

from conftest import N_CTX, REPO, TINY_TEST_BINDINGS, VOCAB, run_binary
from gptneo import model_dir as model_dir_lib
from gptneo import storage
from gptneo.errors import UserError
from gptneo.sweep import driver
from gptneo.sweep import hparams
from gptneo.sweep import launch
from gptneo.sweep import metrics
from gptneo.sweep import plots
from gptneo.sweep import report
from gptneo.sweep import root as root_lib
from gptneo.sweep import runner
from gptneo.sweep import scaling
from gptneo.sweep import spec as spec_lib
from gptneo.sweep import sweep_file
from gptneo.sweep import validate
from tests.test_errors import assert_one_line_error

LR = "learning_rate_schedule.learning_rate"
# 3 learning rates (the last diverges) x 2 widths; long enough that a kill lands mid-run.
# Each evaluation reads the whole validation split (632 windows = 79 batches of 8).
RUN_BINDINGS = ["train.train_steps = 150", "train.steps_per_checkpoint = 50",
                "train.eval_every_n_steps = 50", "train.eval_steps = 79"]
AXES = [f"{LR} = [1e-3, 3e-3, 1e30]", "GPT.n_embd = [32, 64]"]
DETERMINISTIC = ("point", "status", "steps", "train_loss", "val_loss_best", "val_loss_final",
                 "bits_per_byte", "parameters", "best")


def _flags(dataset, axes=AXES, extra=()):
  params = [*TINY_TEST_BINDINGS, f'DATASET_DIR = "{dataset}"', *RUN_BINDINGS, *extra]
  return (["--gin_file=tiny.gin"] + [f"--gin_param={p}" for p in params]
          + [f"--axis={a}" for a in axes])


def _spec(dataset, axes=AXES, extra=()):
  params = [*TINY_TEST_BINDINGS, f'DATASET_DIR = "{dataset}"', *RUN_BINDINGS, *extra]
  return sweep_file.spec_from(None, ["tiny.gin"], params, axes)


def _csv(root):
  with open(pathlib.Path(root) / report.RESULTS_CSV) as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def finished_sweep(small_dataset, tmp_path_factory):
  """The 6-point sweep run at --parallel=2 without interruption; returns its root."""
  root = tmp_path_factory.mktemp("sweep") / "root"
  run_binary("sweep", *_flags(small_dataset), f"--root={root}", "--parallel=2", check=True)
  return root


# ------------------------------------------------------------------ expansion and naming


def test_grid_zip_random_seeds_expand_deterministically():
  spec = sweep_file.spec_from(
      None, ["tiny.gin"], ["train.train_steps = 10"],
      [f"{LR} = [1e-3, 3e-3]", "GPT.n_embd, GPT.n_head = [32, 64, 128], [2, 4, 8]"],
      ["Adam.beta2 = uniform(0.9, 0.99)", "GPT.init_std = log_uniform(1e-3, 1e-1)",
       "GPT.activation = choice(@gelu, @relu)"], {"random_points": 4, "seeds": 2})
  points = spec.expand()
  assert len(points) == 2 * 3 * 4 * 2
  assert len({p.name for p in points}) == len(points)
  first = dict(points[0].values)
  assert first[LR] == "0.001" and first["GPT.n_embd"] == "32" and first["GPT.n_head"] == "2"
  assert first["train.seed"] == "1234" and dict(points[1].values)["train.seed"] == "1235"
  pairs = {(dict(p.values)["GPT.n_embd"], dict(p.values)["GPT.n_head"]) for p in points}
  assert pairs == {("32", "2"), ("64", "4"), ("128", "8")}  # zipped, never crossed
  draws = {tuple(v for n, v in p.values if n.startswith(("Adam", "GPT.init", "GPT.act")))
           for p in points}
  assert len(draws) == 4
  for beta2, std, activation in draws:
    assert 0.9 <= float(beta2) <= 0.99 and 1e-3 <= float(std) <= 1e-1
    assert float(std) == float(f"{float(std):.3g}") and activation in ("@gelu", "@relu")
  assert points[0].name.startswith("lr=1e-3,n_embd=32,n_head=2,beta2=")
  assert points[0].gin_params[-1] == "train.seed = 1234"
  again = sweep_file.spec_from(None, ["tiny.gin"], ["train.train_steps = 10"], spec_axes(spec),
                               spec_random(spec), {"random_points": 4, "seeds": 2})
  assert [p.values for p in again.expand()] == [p.values for p in points]
  other = spec_lib.Spec(**{**spec.__dict__, "random_seed": 1}).expand()
  assert [p.values for p in other] != [p.values for p in points]


def spec_axes(spec):
  return [f"{', '.join(a.names)} = " + ", ".join(
      "[" + ", ".join(v[i] for v in a.values) + "]" for i in range(len(a.names)))
      for a in spec.axes]


def spec_random(spec):
  return [f"{k.name} = {k.distribution}({', '.join(k.args)})" for k in spec.random]


def test_sweep_file_reads_like_gin(tmp_path):
  path = tmp_path / "s.gin"
  path.write_text("# a comment\ninclude 'tiny.gin'\ntrain.train_steps = 10  # fixed\n"
                  "axis gin_file = ['models/tiny.gin', 'layouts/single.gin']\n"
                  "axis GPT.n_embd, GPT.n_head = [32,   # two widths\n  64], [2, 4]\n"
                  "random Adam.beta1 = uniform(0.8, 0.9)\nrandom_points 3\nrandom_seed 7\n"
                  "seeds 2\n")
  spec = sweep_file.spec_from(str(path))
  assert spec.gin_files == ("tiny.gin",) and spec.gin_params == ("train.train_steps = 10",)
  assert spec.axes[1].values == (("32", "2"), ("64", "4"))
  assert (spec.random_points, spec.random_seed, spec.seeds) == (3, 7, 2)
  points = spec.expand()
  assert len(points) == 2 * 2 * 3 * 2
  assert points[0].gin_files == ("tiny.gin", "models/tiny.gin")
  assert points[0].name.startswith("file=tiny,n_embd=32,n_head=2,beta1=")


def test_shipped_sweep_parses():
  points = sweep_file.spec_from("tiny_lr.gin").expand()
  assert len(points) >= 4 and all("lr=" in p.name for p in points)


def test_two_gin_file_axes_get_two_keys():
  axes = (spec_lib.parse_axis("gin_file = ['models/tiny.gin']"),
          spec_lib.parse_axis("gin_file = ['layouts/single.gin', 'layouts/cpu2_data.gin']"))
  points = spec_lib.Spec(axes=axes).expand()
  assert [p.name for p in points] == ["gin_file=tiny,gin_file_2=single",
                                      "gin_file=tiny,gin_file_2=cpu2_data"]
  assert points[1].gin_files == ("models/tiny.gin", "layouts/cpu2_data.gin")


def test_names_get_a_hash_only_where_they_would_clash():
  points = spec_lib.Spec(axes=(spec_lib.parse_axis("GPT.activation = ['a/b', 'a_b', 'c']"),)
                         ).expand()
  assert points[2].name == "activation=c"
  assert points[0].name.startswith("activation=a_b,") and points[0].name != points[1].name


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("axis, message", [
    ("GPT.n_embd = []", "the axis is empty"),
    ("GPT.n_embd, GPT.n_head = [32, 64], [4]", "zipped lists have lengths [1, 2]"),
    ("GPT.n_embd = 32", "give 1 list(s) of values"),
    ("GPT.n_embd = [32, 32]", "a value is given twice"),
])
def test_bad_axes_are_refused(axis, message):
  with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(")
                     .replace(")", r"\)")):
    sweep_file.spec_from(None, ["tiny.gin"], [], [axis])


def test_a_sweep_files_unknown_line_is_named_by_file_and_line(tmp_path):
  path = tmp_path / "s.gin"
  path.write_text("include 'tiny.gin'\n\ntrain.train_steps = 10\naxes GPT.n_embd = [32, 64]\n")
  with pytest.raises(UserError) as error:
    sweep_file.spec_from(str(path))
  assert str(error.value).startswith(f"{path}:4: 'axes GPT.n_embd = [32, 64]' is no line of a "
                                     f"sweep file (gin: "), str(error.value)
  assert "write a gin binding 'NAME = VALUE', include 'FILE', axis NAME = [VALUES]" in str(
      error.value)


@pytest.mark.parametrize("line, fix", [
    ("axis GPT.n_embdd = [32, 64]", "GPT has no parameter 'n_embdd'; did you mean GPT.n_embd?"),
    ("random Adam.betta1 = uniform(0.8, 0.9)", "Adam has no parameter 'betta1'; did you mean "
     "Adam.beta1?"),
    ("GTP.n_layer = 2", "'GTP' is no configurable of gptneo; did you mean GPT?"),
])
def test_an_unknown_binding_of_a_sweep_file_says_what_to_write(tmp_path, line, fix):
  path = tmp_path / "s.gin"
  path.write_text(f"include 'tiny.gin'\n{line}\nrandom_points 2\n")
  with pytest.raises(UserError) as error:
    sweep_file.spec_from(str(path))
  assert str(error.value).startswith(f"{path}:2: ") and str(error.value).endswith(fix)


def test_an_unknown_axis_flag_says_what_to_write():
  with pytest.raises(UserError, match=r"^--axis: 'GPT.n_embdd = \[32\]' binds GPT.n_embdd, but "
                     r"GPT has no parameter 'n_embdd'; did you mean GPT.n_embd\?$"):
    sweep_file.spec_from(None, ["tiny.gin"], [], ["GPT.n_embdd = [32]"])


def test_unknown_binding_refused_before_anything_is_created(small_dataset, tmp_path):
  root = tmp_path / "root"
  result = run_binary("sweep", *_flags(small_dataset, [f"{LR} = [1e-3]", "GPT.n_embdd = [32]"]),
                      f"--root={root}")
  assert result.returncode == 2, result.stderr
  line = result.stderr.strip().splitlines()[-1]
  assert line == ("sweep: error: --axis: 'GPT.n_embdd = [32]' binds GPT.n_embdd, but GPT has "
                  "no parameter 'n_embdd'; did you mean GPT.n_embd?")
  assert not root.exists()


def test_one_bad_point_refused_before_anything_is_created(small_dataset, tmp_path):
  root = tmp_path / "root"
  with pytest.raises(UserError, match=r"point 1 \(n_head=5\): .*n_head"):
    driver.run(_spec(small_dataset, ["GPT.n_head = [4, 5]"]), str(root), 1, 0, ["test"])
  assert not root.exists()


def test_parallel_larger_than_the_cores_is_refused(small_dataset, tmp_path):
  cores = len(os.sched_getaffinity(0))
  with pytest.raises(UserError, match=f"--parallel={cores + 1} but .* {cores} cores"):
    driver.run(_spec(small_dataset), str(tmp_path / "root"), cores + 1, 0, ["test"])
  assert not (tmp_path / "root").exists()


def test_a_root_holding_another_sweep_is_refused_unless_updated(small_dataset, tmp_path):
  root = str(tmp_path / "root")
  driver.write_root(_spec(small_dataset), root, ["first"])
  other = _spec(small_dataset, [f"{LR} = [1e-3, 3e-3]"])
  with pytest.raises(UserError, match="holds a different sweep .*--update"):
    driver.write_root(other, root, ["second"])
  driver.write_root(_spec(small_dataset), root, ["same again"])  # the same sweep: resumes
  driver.write_root(other, root, ["second"], update=True)
  assert len(root_lib.Root(root).points()[0]) == 2


def test_gpu_points_get_disjoint_visible_gpus(monkeypatch):
  """The split only (no GPU here): each slot's CUDA_VISIBLE_DEVICES, from the GPUs visible."""
  def facts(device_type, devices):
    return root_lib.Facts(10, 64, 1000, 100, 0, device_type, devices)
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,4,5,6")
  assert runner.gpu_slots(2, [facts("gpu", 2), facts("gpu", 1)]) == ["0,1", "4,5"]
  assert runner.gpu_slots(2, [facts("cpu", 2)]) == [None, None]
  with pytest.raises(UserError, match="need 6 GPUs but 5 are visible; lower --parallel"):
    runner.gpu_slots(3, [facts("gpu", 2)])


def test_random_knobs_need_points():
  with pytest.raises(UserError, match="random_points is 0"):
    sweep_file.spec_from(None, [], [], [], ["Adam.beta1 = uniform(0.8, 0.9)"])
  with pytest.raises(UserError, match="log_uniform takes two numbers low < high"):
    sweep_file.spec_from(None, [], [], [], ["Adam.beta1 = log_uniform(0, 1)"],
                         {"random_points": 2})


# ------------------------------------------------------------------ running and the report


def test_results_equal_each_runs_own_logs(finished_sweep):
  table = _csv(finished_sweep)
  assert len(table) == 6
  for row in table:
    run_dir = finished_sweep / row["point"]
    train, evals = metrics.train(run_dir), metrics.validation(run_dir)
    if row["status"] == "diverged":
      continue
    assert row["status"] == "done" and int(row["steps"]) == train[-1]["step"] == 150
    assert float(row["train_loss"]) == train[-1]["loss"]
    assert float(row["val_loss_final"]) == evals[-1]["loss"]
    assert float(row["val_loss_best"]) == min(e["loss"] for e in evals)
    assert float(row["bits_per_byte"]) == evals[-1]["bits_per_byte"]
    assert [e["step"] for e in evals] == [50, 100, 150]
  finals = [float(r["val_loss_final"]) for r in table if r["status"] == "done"]
  assert finals == sorted(finals) and table[0]["best"] == "True"
  assert sum(r["best"] == "True" for r in table) == 1
  for name in ("results.md", "loss.png", "scaling.png", "sweep.json"):
    assert (finished_sweep / name).stat().st_size > 0


def test_a_diverging_point_is_diverged_and_the_others_finish(finished_sweep):
  status = {r["point"]: r for r in _csv(finished_sweep)}
  for width in (32, 64):
    diverged = status[f"lr=1e30,n_embd={width}"]
    assert diverged["status"] == "diverged"
    train = metrics.train(finished_sweep / diverged["point"])
    # bin/train stops before logging the non-finite step (exit code EXIT_DIVERGED); a NaN
    # logged by a run that trained on would be the step named instead.
    nan_step = metrics.first_non_finite(train)
    assert int(diverged["steps"]) == (nan_step if nan_step else train[-1]["step"]) < 150
  assert sum(r["status"] == "done" for r in status.values()) == 4


def test_sweep_json_records_spec_points_commit_and_command(finished_sweep):
  record = root_lib.read_json(finished_sweep / "sweep.json")
  assert len(record["points"]) == 6 and record["spec"]["axes"][1]["names"] == ["GPT.n_embd"]
  assert record["git_commit"] and "--parallel=2" in record["command"]
  gin = (finished_sweep / "lr=3e-3,n_embd=64" / root_lib.POINT_GIN).read_text()
  assert f"{LR} = 0.003" in gin and "GPT.n_embd = 64" in gin and "include 'tiny.gin'" in gin


# Stands in for bin/train: fails its first `fails` runs, then logs train_steps steps; notes
# the cores it was given.
FAKE_TRAIN = """
import json, os, pathlib, sys
run_dir, fails, steps = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
runs = len(list(run_dir.glob("ran-*")))
(run_dir / f"ran-{runs}").write_text(json.dumps(sorted(os.sched_getaffinity(0))))
if runs < fails:
  sys.exit(1)
with open(run_dir / "train_metrics.jsonl", "w") as f:
  f.writelines(json.dumps({"step": i + 1, "loss": 1.0}) + "\\n" for i in range(steps))
"""


def _fake_driver(monkeypatch, root, points, facts, fails, parallel, max_retries):
  monkeypatch.setattr(runner, "train_command", lambda point, run_dir: [
      sys.executable, "-c", FAKE_TRAIN, str(run_dir), str(fails[point.index]), "150"])
  return runner.Driver(root, points, facts, parallel, max_retries, lambda line: None,
                       poll_seconds=0.05).run()


def test_failed_points_are_retried_up_to_max_retries_over_restarts(
    small_dataset, tmp_path, monkeypatch):
  root, points, facts = driver.write_root(_spec(small_dataset), str(tmp_path / "root"), ["t"])
  fails = [0, 1, 2, 0, 5, 0]
  counts = _fake_driver(monkeypatch, root, points, facts, fails, 2, max_retries=1)
  assert counts == {"done": 4, "failed": 2}
  runs = [len(list(root.run_dir(p).glob("ran-*"))) for p in points]
  assert runs == [1, 2, 2, 1, 2, 1]
  counts = _fake_driver(monkeypatch, root, points, facts, fails, 2, max_retries=2)
  assert counts == {"done": 5, "failed": 1}  # the restart retries the failed ones once more
  assert [len(list(root.run_dir(p).glob("ran-*"))) for p in points] == [1, 2, 3, 1, 3, 1]
  outcomes = [a["outcome"] for a in root.state(points[4])["attempts"]]
  assert outcomes == ["failed", "failed", "failed"]
  cores = {json.loads(f.read_text())[0] for p in points for f in root.run_dir(p).glob("ran-*")}
  slots = runner.core_slots(2)
  assert all(len(slot) == 1 for slot in slots) and cores == {s[0] for s in slots}


def _children_of_root(root):
  found = []
  for proc in pathlib.Path("/proc").glob("[0-9]*"):
    try:
      if str(root) in (proc / "cmdline").read_bytes().decode(errors="replace"):
        found.append(proc.name)
    except OSError:
      continue
  return found


def _kill_mid_point(process, root):
  """SIGKILLs the driver once some point is between two checkpoints of its training."""
  deadline = time.time() + 240
  while time.time() < deadline:
    for run_dir in root.glob("lr=*"):
      steps = [r["step"] for r in metrics.train(run_dir)]
      if steps and 60 <= steps[-1] < 140:
        status = report.status(str(root))  # what --status prints while the sweep runs
        assert " running" in status.splitlines()[0] and "ETA" in status
        process.send_signal(signal.SIGKILL)
        process.wait()
        return run_dir.name
    time.sleep(0.02)
  raise AssertionError("no point was caught mid-run")


def test_sigkill_of_the_driver_then_restart_gives_the_same_table(
    finished_sweep, small_dataset, tmp_path):
  root = tmp_path / "root"
  command = [sys.executable, str(REPO / "bin" / "sweep"), *_flags(small_dataset),
             f"--root={root}", "--parallel=2"]
  env = dict(os.environ, PYTHONPATH=str(REPO))
  process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  cut = _kill_mid_point(process, root)
  time.sleep(1.0)
  assert not _children_of_root(root), "a bin/train outlived its driver"
  assert not (root / report.RESULTS_CSV).exists()
  subprocess.run(command, env=env, cwd=REPO, check=True, capture_output=True)
  state = root_lib.read_json(root / cut / root_lib.STATE_JSON)
  assert [a["outcome"] for a in state["attempts"]] == ["interrupted", "done"]
  assert "resumed from" in (root / cut / root_lib.TRAIN_LOG).read_text()
  again, once = _csv(root), _csv(finished_sweep)
  assert [{k: r[k] for k in DETERMINISTIC} for r in again] == [
      {k: r[k] for k in DETERMINISTIC} for r in once]


def test_a_finished_sweep_is_skipped_and_status_says_done(finished_sweep, small_dataset):
  started = time.time()
  result = run_binary("sweep", *_flags(small_dataset), f"--root={finished_sweep}",
                      "--parallel=2", check=True)
  assert "0 of 6 points to run" in result.stderr and time.time() - started < 60
  # It ends with the table (make sweep shows it): the report's own, best point in bold.
  assert result.stdout == (finished_sweep / report.RESULTS_MD).read_text() + "\n"
  assert "| **lr=" in result.stdout
  status = run_binary("sweep", f"--root={finished_sweep}", "--status", check=True).stdout
  assert "6 points: 4 done, 2 diverged; ETA 0:00:00" in status


def test_hparams_summary_reads_in_tensorboard(finished_sweep):
  multiplexer = events.EventMultiplexer()
  multiplexer.AddRunsFromDirectory(str(finished_sweep))
  multiplexer.Reload()
  content = multiplexer.PluginRunToTagToContent(metadata.PLUGIN_NAME)
  experiment = metadata.parse_experiment_plugin_data(content["."][metadata.EXPERIMENT_TAG])
  assert [h.name for h in experiment.hparam_infos] == ["lr", "n_embd", "parameters"]
  assert {m.name.tag for m in experiment.metric_infos} == {"loss", "eval/loss",
                                                           "eval/bits_per_byte"}
  session = metadata.parse_session_start_info_plugin_data(
      content["lr=3e-3,n_embd=64"][metadata.SESSION_START_INFO_TAG])
  assert session.hparams["lr"].number_value == 0.003
  assert session.hparams["n_embd"].string_value == "64"  # an integer stays one
  # The session's metrics are the run's own summaries, which bin/train wrote beside it.
  assert {"loss", "eval/loss"} <= set(multiplexer.GetAccumulator("lr=3e-3,n_embd=64")
                                      .Tags()["tensors"])


def _fake_run(run_dir, losses, val_losses, repeat_from=None):
  """Logs as bin/train writes them; a resume at `repeat_from` logs its steps again."""
  lines = [{"step": i + 1, "loss": loss, "tokens_per_sec": 1000.0 + i}
           for i, loss in enumerate(losses)]
  if repeat_from:
    lines += lines[repeat_from:]
  (run_dir / metrics.TRAIN_METRICS).write_text("".join(f"{json.dumps(r)}\n" for r in lines))
  evals = [{"step": 50 * (i + 1), "task": "lm", "split": "validation", "loss": v,
            "bits_per_byte": v / 2} for i, v in enumerate(val_losses)]
  (run_dir / metrics.EVAL_JSONL).write_text("".join(f"{json.dumps(r)}\n" for r in evals))


def test_report_reads_last_line_per_step_and_sums_up_seeds(small_dataset, tmp_path):
  spec = sweep_file.spec_from(None, ["tiny.gin"], [*TINY_TEST_BINDINGS, *RUN_BINDINGS,
                                                   f'DATASET_DIR = "{small_dataset}"'],
                              [f"{LR} = [1e-3, 3e-3]"], (), {"seeds": 2})
  root, points, _ = driver.write_root(spec, str(tmp_path / "root"), ["t"])
  for i, point in enumerate(points):
    run_dir = root.run_dir(point)
    _fake_run(run_dir, [6.0 - i * 0.1 - s / 100 for s in range(150)],
              [5.0 - i * 0.1, 4.5 - i * 0.1, 4.0 - i * 0.1], repeat_from=100 if i else None)
  with open(root.run_dir(points[0]) / metrics.TRAIN_METRICS, "a") as f:
    f.write('{"step": 150, "loss": 4.')  # a line cut by a kill
  markdown = report.write(root)
  table = _csv(root.path)
  assert [r["point"] for r in table] == [p.name for p in reversed(points)]
  assert all(r["status"] == "done" and r["steps"] == "150" for r in table)
  assert float(table[0]["train_loss"]) == 6.0 - 3 * 0.1 - 149 / 100
  assert float(table[0]["val_loss_final"]) == 4.0 - 0.3 and table[0]["best"] == "True"
  assert "Over seeds" in markdown and "| lr | seeds | mean | std |" in markdown
  assert "| 3e-3 | 2 | 3.7500 | 0.0707 |" in markdown
  assert (root.path / "loss.png").stat().st_size and not (root.path / "scaling.png").exists()
  status = report.status(str(root.path))
  assert "4 points: 4 done, 0 diverged; ETA 0:00:00" in status


# ------------------------------------------------------------------ clusters


def test_printed_commands_run_as_they_are(small_dataset, tmp_path):
  root = tmp_path / "root"
  result = run_binary("sweep", *_flags(small_dataset, [f"{LR} = [3e-3]"],
                                       ["train.train_steps = 3", "train.eval_every_n_steps = 3"]),
                      f"--root={root}", "--print_commands", check=True)
  (line,) = result.stdout.strip().splitlines()
  subprocess.run(line, shell=True, check=True, capture_output=True, cwd=tmp_path,
                 env=dict(os.environ, PYTHONPATH=str(REPO)))
  (row,) = report.rows(report.open_root(str(root)))
  assert row["status"] == "done" and row["steps"] == 3 and row["val_loss_final"] > 0


def test_slurm_script_keys_each_point_by_its_index(small_dataset, tmp_path):
  root, points, _ = driver.write_root(_spec(small_dataset), str(tmp_path / "root"), ["t"])
  path = launch.write_slurm(root, points, ["--partition=cpu", "--time=1:00:00"], parallel=2)
  text = path.read_text()
  assert text.startswith("#!/bin/bash\n") and os.access(path, os.X_OK)
  assert "#SBATCH --array=0,1,2,3,4,5%2\n" in text
  assert "#SBATCH --partition=cpu\n#SBATCH --time=1:00:00\n" in text
  commands = launch.commands(root, points).splitlines()
  for point, command in zip(points, commands, strict=True):
    assert f"  {point.index}) exec {command} ;;\n" in text
    assert f"--model_dir={root.run_dir(point)}" in command
  root.write_state(points[0], {"status": "done", "attempts": []})
  assert "#SBATCH --array=1,2,3,4,5%2\n" in launch.slurm_script(root, points, (), 2)


# ------------------------------------------------------------------ a gs:// root


def test_a_gs_root_runs_into_the_bucket_and_resumes_from_a_fresh_cache(
    small_dataset, gcs, tmp_path, monkeypatch):
  uri = gcs.uri("sweeps/s")
  flags = [*_flags(small_dataset, [f"{LR} = [1e-3, 3e-3]"],
                   ["train.train_steps = 4", "train.steps_per_checkpoint = 2",
                    "train.eval_every_n_steps = 4", "train.eval_steps = 1"]),
           f"--root={uri}"]
  run_binary("sweep", *flags, check=True)
  objects = gcs.objects("sweeps/s")
  table = list(csv.DictReader(objects[f"{root_lib.DRIVER_PREFIX}/results.csv"][1]
                              .decode().splitlines()))
  assert sorted(r["status"] for r in table) == ["done", "done"]
  for row in table:  # the numbers are the bucket's own logs, and its checkpoints are there
    lines = objects[f"{row['point']}/{metrics.TRAIN_METRICS}"][1].decode().splitlines()
    last = json.loads(lines[-1])
    assert int(row["steps"]) == last["step"] == 4 and float(row["train_loss"]) == last["loss"]
    assert f"{row['point']}/checkpoint" in objects
    assert f"{root_lib.DRIVER_PREFIX}/{row['point']}/{root_lib.STATE_JSON}" in objects
  _assert_hparams_in_the_bucket(objects, tmp_path / "tensorboard", [r["point"] for r in table])
  commands = run_binary("sweep", *flags, "--print_commands", check=True).stdout
  assert commands.strip() == ""  # every point done
  # Another machine: an empty cache. Nothing is run again, and the table is the same.
  monkeypatch.setenv("GPTNEO_CACHE_DIR", str(tmp_path / "other_cache"))
  again = run_binary("sweep", *flags, check=True)
  assert "0 of 2 points to run" in again.stderr
  rerun = gcs.objects("sweeps/s")
  assert rerun[f"{root_lib.DRIVER_PREFIX}/results.csv"][1] == \
      objects[f"{root_lib.DRIVER_PREFIX}/results.csv"][1]
  for row in table:  # bin/train never ran: its logs and checkpoints are as they were
    name = f"{row['point']}/{metrics.TRAIN_METRICS}"
    assert rerun[name] == objects[name]


def _assert_hparams_in_the_bucket(objects, folder, point_names, metric_tags=("loss", "eval/loss")):
  """`tensorboard --logdir=gs://ROOT` (here: the bucket's objects copied out) shows the sweep:
  the experiment, and each point's session in the run holding the point's own metrics."""
  for name, (_, data) in objects.items():
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
  multiplexer = events.EventMultiplexer()
  multiplexer.AddRunsFromDirectory(str(folder))
  multiplexer.Reload()
  content = multiplexer.PluginRunToTagToContent(metadata.PLUGIN_NAME)
  assert [run for run, tags in content.items() if metadata.EXPERIMENT_TAG in tags] == [
      root_lib.DRIVER_PREFIX]
  sessions = {run for run, tags in content.items() if metadata.SESSION_START_INFO_TAG in tags}
  assert sessions == set(point_names)
  for name in point_names:
    assert set(metric_tags) <= set(multiplexer.GetAccumulator(name).Tags()["tensors"])


def test_status_from_another_machine_tells_a_live_remote_driver_from_a_dead_one(
    small_dataset, gcs, tmp_path, monkeypatch):
  """A point `running` in the bucket: running while the driver's lease (another machine's) is
  renewed, interrupted once that driver is gone."""
  uri = gcs.uri("sweeps/r")
  run_binary("sweep", *_flags(small_dataset, [f"{LR} = [3e-3]"]), f"--root={uri}",
             "--print_commands", check=True)
  root = root_lib.Root(uri)
  (point,), _ = root.points()
  root.write_state(point, {"status": "running", "attempts": [{"start": time.time()}]})
  driver_lease = storage.Lease(root._driver_uri(),  # pylint: disable=protected-access
                               {"program": "bin/sweep", "pid": 1, "host": "another-machine",
                                "since": time.time(), "mirror": "/elsewhere"}).acquire()
  monkeypatch.setenv("GPTNEO_CACHE_DIR", str(tmp_path / "third_machine"))
  status = run_binary("sweep", f"--root={uri}", "--status", check=True).stdout
  assert "1 points: 0 done, 1 running, 0 diverged" in status
  driver_lease.release()
  status = run_binary("sweep", f"--root={uri}", "--status", check=True).stdout
  assert "1 interrupted" in status and "1 running" not in status


def test_a_gs_root_prints_gs_model_dirs_and_resumes_an_unfinished_point(
    small_dataset, gcs, tmp_path, monkeypatch):
  uri = gcs.uri("sweeps/p")
  flags = [*_flags(small_dataset, [f"{LR} = [3e-3]"],
                   ["train.train_steps = 4", "train.steps_per_checkpoint = 2",
                    "train.eval_every_n_steps = 0"]), f"--root={uri}"]
  (line,) = run_binary("sweep", *flags, "--print_commands", check=True).stdout.splitlines()
  assert f"--model_dir={uri}/lr=3e-3" in line
  half = line.replace("train.train_steps = 4", "train.train_steps = 2")
  subprocess.run(half, shell=True, check=True, capture_output=True, cwd=tmp_path,
                 env=dict(os.environ, PYTHONPATH=str(REPO)))
  session = f"lr=3e-3/{hparams.EVENTS_FILE}"
  run_binary("sweep", "--report", f"--root={uri}", check=True)
  assert session not in gcs.objects("sweeps/p")  # unfinished: the bucket is the run's alone
  monkeypatch.setenv("GPTNEO_CACHE_DIR", str(tmp_path / "other_cache"))
  run_binary("sweep", *flags, check=True)
  lines = gcs.objects("sweeps/p")[f"lr=3e-3/{metrics.TRAIN_METRICS}"][1].decode().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]  # resumed at step 2
  (row,) = report.rows(report.open_root(uri))
  assert row["status"] == "done" and row["steps"] == 4
  _assert_hparams_in_the_bucket(gcs.objects("sweeps/p"), tmp_path / "tb", ["lr=3e-3"], ["loss"])
  # A point run by another launcher has no session; the report gives it one once it is done.
  gcs.bucket.blob(f"sweeps/p/{session}").delete()
  run_binary("sweep", "--report", f"--root={uri}", check=True)
  _assert_hparams_in_the_bucket(gcs.objects("sweeps/p"), tmp_path / "tensorboard", ["lr=3e-3"],
                                ["loss"])  # no evaluations


# ------------------------------------------------------------------ scaling


def test_power_law_fit_recovers_its_parameters():
  sizes = [1e4, 3e4, 1e5, 3e5, 1e6]
  losses = [5.0 * n ** -0.3 + 1.5 for n in sizes]
  a, alpha, c = scaling.fit(sizes, losses)
  assert math.isclose(alpha, 0.3, rel_tol=0.05) and math.isclose(c, 1.5, abs_tol=0.05)
  a, alpha, c = scaling.fit(sizes[:3], losses[:3])  # three sizes: no irreducible term
  assert c == 0.0 and alpha > 0
  assert scaling.fit(sizes[:1], losses[:1]) is None


def test_a_gs_root_another_machine_drives_is_refused_unless_force(gcs, tmp_path):
  """A driver lease held by another machine (a driver that died there) blocks this one, in one
  line, until --force takes it over."""
  root = root_lib.Root(gcs.uri("sweeps/f"))
  other = {"program": "bin/sweep", "pid": 1, "host": "another-machine", "since": time.time(),
           "mirror": "/elsewhere"}
  storage.Lease(root._driver_uri(), other).acquire()  # pylint: disable=protected-access
  with pytest.raises(UserError, match="another-machine"):
    with root.lock():
      pass
  with root.lock(force=True):
    assert (root.path / model_dir_lib.LOCK_NAME).is_file()


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"spec": {}}'])
def test_a_damaged_sweep_json_is_one_line(tmp_path, content):
  (tmp_path / "sweep.json").write_text(content)
  result = run_binary("sweep", f"--root={tmp_path}", "--status")
  assert_one_line_error(result, "sweep", f"{tmp_path / 'sweep.json'} is damaged (",
                        "move it away and run the sweep's command again")
  assert (tmp_path / "sweep.json").read_text() == content


@pytest.mark.parametrize("content, says", [
    (b"", "is empty (no statement)"),
    (b"# only a comment\n\n", "is empty (no statement)"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "is not text"),
    (b"include 'tiny.gin'\x00\n", "is not text"),
])
def test_an_empty_or_binary_sweep_file_is_one_line_naming_it(tmp_path, content, says):
  path = tmp_path / "s.gin"
  path.write_bytes(content)
  with pytest.raises(UserError) as error:
    sweep_file.spec_from(str(path))
  assert str(error.value).startswith(f"sweep file {path} {says}"), str(error.value)


# ------------------------------------------------------------------ plots and HParams

LR_WIDTH = [f"{LR} = [1e-3, 3e-3, 1e-2]", "GPT.n_embd, GPT.n_head = [32, 64, 128], [1, 2, 4]"]


def _lr_width_points(tmp_path):
  """tiny_lr.gin's 9 points (not validated: no dataset needed), each with fake logs whose
  final validation loss is lowest at lr=3e-3 and falls with width; and their report table."""
  points = sweep_file.spec_from(None, ["tiny.gin"], [], LR_WIDTH).expand()
  root = root_lib.Root(str(tmp_path / "root"))
  table = []
  for point in points:
    run_dir = root.run_dir(point)
    run_dir.mkdir(parents=True)
    lr, width = float(point.labels["lr"]), int(point.labels["n_embd"])
    final = 5.0 + abs(math.log10(lr / 3e-3)) - width / 1000
    _fake_run(run_dir, [6.0 - s / 100 for s in range(150)], [final + 0.2, final + 0.1, final])
    table.append({"point": point.name, "status": "done", "val_loss_final": final,
                  "parameters": 1000 * width, "best": False})
  table.sort(key=lambda r: r["val_loss_final"])
  table[0]["best"] = True
  return root, points, table


def test_loss_png_colours_points_by_their_values_with_a_line_per_width(tmp_path):
  root, points, table = _lr_width_points(tmp_path)
  styles = plots.point_styles(points)
  colors = [tuple(np.round(styles.colors[p.name], 3)) for p in points]
  assert len(set(colors)) == 9
  # Neighbours in the legend and in the grid are told apart: no two colours close.
  closest = min(np.linalg.norm(np.subtract(a, b)) for i, a in enumerate(colors)
                for b in colors[i + 1:])
  assert closest > 0.1, closest
  assert styles.x_key == "lr" and list(styles.groups) == [
      "n_embd=32,n_head=1", "n_embd=64,n_head=2", "n_embd=128,n_head=4"]
  fig = plots.loss_figure(root, points, table)
  try:
    train, val, final = fig.axes
    assert len(fig.legends) == 1 and len(fig.legends[0].get_texts()) == 9  # shared: every point
    assert len(train.lines) == len(val.lines) == 9
    assert final.get_xscale() == "log" and final.get_xlabel() == "lr"
    assert [line.get_label() for line in final.lines] == list(styles.groups)
    assert [list(line.get_xdata()) for line in final.lines] == [[1e-3, 3e-3, 1e-2]] * 3
  finally:
    plots.plt.close(fig)


def test_loss_png_puts_the_axis_of_most_values_on_x_a_line_per_other_combination():
  """muP's shape (gin/sweeps/mup_transfer.gin): a string axis x 4 widths x 7 learning rates."""
  points = sweep_file.spec_from(None, ["tiny.gin"], [], [
      'train.on_nonfinite = ["stop", "skip"]', "GPT.n_embd = [64, 128, 256, 512]",
      f"{LR} = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]"]).expand()
  styles = plots.point_styles(points)
  assert styles.x_key == "lr" and len(styles.groups) == 8
  assert len({tuple(np.round(c, 3)) for c in styles.colors.values()}) == 56


def _texts(fig):
  return " ".join(t.get_text() for t in [fig.axes[0].title, *fig.axes[0].texts])


def test_scaling_fits_three_sizes_or_more_and_says_so_on_the_plot():
  table = [{"point": f"p{n}", "status": "done", "val_loss_final": 6.0 - n / 100}
           for n in (1, 2)]
  facts = {f"p{n}": root_lib.Facts(300, 1, 10_000 * n + 5, 5, 50, "cpu", 1) for n in (1, 2)}
  two = scaling.fit_table(table, facts)
  assert not two.fitted and two.sizes == (10_000, 20_000)
  assert "no fit: 2 model sizes" in report.to_markdown([], two)
  fig = plots.scaling_figure(two)
  try:
    assert not fig.axes[0].lines and "no fit: 2 model sizes" in _texts(fig)
  finally:
    plots.plt.close(fig)
  three = scaling.Fit(*scaling.fit([1e4, 3e4, 1e5], [6.0, 5.5, 5.1]), (1e4, 3e4, 1e5),
                      (6.0, 5.5, 5.1), ((1e4, 6.0, "a"), (3e4, 5.5, "b"), (1e5, 5.1, "c")))
  fig = plots.scaling_figure(three)
  try:
    assert len(fig.axes[0].lines) == 1 and "rough: 3 sizes, 1 degree(s)" in _texts(fig)
  finally:
    plots.plt.close(fig)


def test_hparams_keep_integers_integers(tmp_path):
  """TensorBoard's table prints a number as a float (64 as 64.000): integers go as their text,
  the experiment declaring an integer column a string one."""
  root, points, table = _lr_width_points(tmp_path)
  hparams.write(root, points, table)
  multiplexer = events.EventMultiplexer()
  multiplexer.AddRunsFromDirectory(str(root.path))
  multiplexer.Reload()
  content = multiplexer.PluginRunToTagToContent(metadata.PLUGIN_NAME)
  experiment = metadata.parse_experiment_plugin_data(content["."][metadata.EXPERIMENT_TAG])
  infos = {h.name: h for h in experiment.hparam_infos}
  assert {v.string_value for v in infos["n_embd"].domain_discrete.values} == {"32", "64", "128"}
  assert {v.string_value for v in infos["parameters"].domain_discrete.values} == {
      "32000", "64000", "128000"}
  assert not infos["lr"].HasField("domain_discrete")
  session = metadata.parse_session_start_info_plugin_data(
      content["lr=3e-3,n_embd=64,n_head=2"][metadata.SESSION_START_INFO_TAG])
  assert session.hparams["n_embd"].string_value == "64"
  assert session.hparams["parameters"].string_value == "64000"
  assert session.hparams["lr"].number_value == 0.003


# ------------------------------------------------------------------ the bookkeeping's weight

TRAINING_STACK = ("tensorflow", "mesh_tensorflow", "ortools")


def _imported(*args):
  """The top-level packages `bin/sweep *args` imported (python -X importtime), and its result."""
  result = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "bin" / "sweep"),
                           *args], env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO,
                          capture_output=True, text=True, check=False)
  names = re.findall(r"(?m)^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)$", result.stderr)
  return {name.split(".")[0] for name in names}, result


def test_status_and_report_load_no_training_stack(tmp_path):
  """--status and --report read JSON and logs: no TensorFlow, mtf or OR-Tools loads."""
  root, points, table = _lr_width_points(tmp_path)
  facts = [root_lib.Facts(150, 64, r["parameters"], 0, 50, "cpu", 1)
           for r in sorted(table, key=lambda r: [p.name for p in points].index(r["point"]))]
  root.create(sweep_file.spec_from(None, ["tiny.gin"], [], LR_WIDTH), points, facts, ["t"])
  loaded, result = _imported(f"--root={root.path}", "--status")
  assert result.returncode == 0 and "9 points: 9 done" in result.stdout, result.stderr[-2000:]
  assert "gptneo" in loaded and not loaded & set(TRAINING_STACK), loaded & set(TRAINING_STACK)
  loaded, result = _imported(f"--root={root.path}", "--report")
  assert result.returncode == 0 and "| **lr=3e-3,n_embd=128" in result.stdout
  assert (root.path / plots.LOSS_PNG).is_file() and (root.path / hparams.EVENTS_FILE).is_file()
  assert not loaded & set(TRAINING_STACK), loaded & set(TRAINING_STACK)


def _holder(root, shared):
  """A process holding the sweep's lock (shared or not) until its stdin closes."""
  code = ("import sys; from gptneo.sweep import root; "
          f"root.Root(sys.argv[1]).lock(shared={shared}); print('held', flush=True); "
          "sys.stdin.read()")
  process = subprocess.Popen([sys.executable, "-c", code, str(root.path)], text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert process.stdout.readline() == "held\n"
  return process


def test_the_sweeps_lock_is_the_model_dirs_naming_its_holder_and_sharable(tmp_path):
  """Root.lock is model_dir.lock: a refusal names the holder; search drivers share it, and one
  of them leaving does not let an exclusive driver in beside the others."""
  root = root_lib.Root(str(tmp_path / "root"))
  other = _holder(root, shared=True)
  try:
    with root.lock(shared=True):
      assert root.driver_running()
    assert root.driver_running()  # the other still holds it
    with pytest.raises(UserError) as refusal:
      root.lock()
    # Named as model_dir.lock names a holder (a shared lock: its latest one).
    assert re.fullmatch(rf"sweep {re.escape(str(root.path))} is being written by \S+ \(pid "
                        rf"\d+ on {re.escape(socket.gethostname())}, since [\d-]+ [\d:]+ UTC\); "
                        rf"wait for it \(gptneo-sweep --status --root={re.escape(str(root.path))}"
                        rf"\)", str(refusal.value)), str(refusal.value)
  finally:
    other.stdin.close()
    other.wait()
  assert not root.driver_running()
  with root.lock():
    assert (root.path / model_dir_lib.LOCK_NAME).is_file()
  assert not (root.path / model_dir_lib.LOCK_NAME).exists()


def _documented_sweeps():
  """(doc, command) of every command-line grid sweep README.md and docs/sweeps.md show."""
  from tests.test_docs import doc_commands  # pylint: disable=g-import-not-at-top
  found = []
  for doc in ("README.md", "docs/sweeps.md"):
    found += [(doc, c) for c in doc_commands((REPO / doc).read_text())
              if "gptneo-sweep" in c and "--axis=" in c and "--search" not in c]
  return found


def test_documented_sweeps_report_a_final_validation_loss(small_dataset):
  """Each point of the docs' sweep commands validates at its last step, so the report's
  validation loss is the trained model's (train.eval_every_n_steps dividing train_steps)."""
  documented = _documented_sweeps()
  assert {doc for doc, _ in documented} == {"README.md", "docs/sweeps.md"}
  for doc, command in documented:
    args = shlex.split(command)[1:]
    values = {flag: [a.split("=", 1)[1] for a in args if a.startswith(f"--{flag}=")]
              for flag in ("gin_file", "gin_param", "axis")}
    data = [f'DATASET_DIR = "{small_dataset}"', f"GPT.n_ctx = {N_CTX}", f"GPT.n_vocab = {VOCAB}"]
    spec = sweep_file.spec_from(None, values["gin_file"], [*values["gin_param"], *data],
                                values["axis"])
    for point, facts in zip(spec.expand(), validate.check_all(spec.expand()), strict=True):
      assert facts.validates_at_end, (doc, point.name, facts)
