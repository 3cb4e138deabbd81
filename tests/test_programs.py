"""The programs' names: installed as gptneo-* (no shell builtin among them), and bin/* run from
a checkout by a python without our dependencies re-runs itself in the checkout's .venv."""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from gptneo import programs
from tests.conftest import REPO, run_binary
from tests.test_errors import assert_one_line_error

VENV_PYTHON = REPO / ".venv" / "bin" / "python"


def test_every_program_in_bin_has_its_command():
  in_bin = sorted(p.name for p in (REPO / "bin").iterdir()
                  if p.is_file() and not p.suffix and not p.name.startswith("_"))
  assert list(programs.PROGRAMS) == in_bin
  for program in in_bin:
    assert callable(getattr(programs, programs.command(program).replace("-", "_")))
  assert programs.command("import_hf") == "gptneo-import-hf"


def test_installed_command_runs_and_names_itself():
  command = pathlib.Path(sys.executable).parent / "gptneo-train"
  assert command.is_file(), f"{command} is missing: run `make install`"
  assert not (command.parent / "train").exists(), "a stale `train` script: run `make install`"
  result = subprocess.run([str(command), "--helpshort"], capture_output=True, text=True,
                          check=False, cwd=REPO)
  assert result.returncode == 0, result.stderr[-2000:]  # help is no error
  assert f"{command.name}:" in result.stdout and "--model_dir" in result.stdout
  assert "bin/train:" not in result.stdout


def test_installed_command_names_itself_in_errors(tmp_path):
  command = pathlib.Path(sys.executable).parent / "gptneo-train"
  result = subprocess.run([str(command), "--gin_file=missing.gin", f"--model_dir={tmp_path}"],
                          capture_output=True, text=True, check=False, cwd=tmp_path)
  assert_one_line_error(result, "gptneo-train", "missing.gin")


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
  """A python3 that can't import absl, gin or gptneo: a fresh venv without packages."""
  folder = tmp_path_factory.mktemp("bare") / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
  python = folder / "bin" / "python"
  probe = subprocess.run([str(python), "-c", "import absl"], capture_output=True, check=False)
  assert probe.returncode, "the bare venv imports absl"
  return python


def _run(python, program_path, *args):
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  return subprocess.run([str(python), str(program_path), *args], capture_output=True,
                        text=True, check=False, env=env, cwd=program_path.parent.parent)


@pytest.mark.skipif(not VENV_PYTHON.exists(), reason="no .venv in the checkout")
def test_bin_program_reruns_itself_in_the_checkouts_venv(bare_python):
  result = _run(bare_python, REPO / "bin" / "eval", "--helpshort")
  assert result.returncode == 0, result.stderr[-2000:]  # help is no error
  assert "bin/eval:" in result.stdout and "--model_dir" in result.stdout


def test_bin_program_without_a_venv_says_to_install(bare_python, tmp_path):
  shutil.copytree(REPO / "bin", tmp_path / "checkout" / "bin")
  result = _run(bare_python, tmp_path / "checkout" / "bin" / "eval", "--helpshort")
  assert_one_line_error(result, "eval", "can't import absl", "make install")


def test_bin_program_whose_venv_lacks_them_too_stops_instead_of_looping(bare_python, tmp_path):
  checkout = tmp_path / "checkout"
  shutil.copytree(REPO / "bin", checkout / "bin")
  (checkout / ".venv").symlink_to(bare_python.parent.parent)
  result = _run(bare_python, checkout / "bin" / "eval", "--helpshort")
  assert_one_line_error(result, "eval", "neither can", "make install")


@pytest.fixture(scope="module")
def no_tensorflow(tmp_path_factory):
  """A folder whose `tensorflow` package fails to import: a program that loads TensorFlow
  from it stops with exit code 97 and says so."""
  folder = tmp_path_factory.mktemp("no_tf")
  (folder / "tensorflow").mkdir()
  (folder / "tensorflow" / "__init__.py").write_text(
      "import sys\nprint('TensorFlow was imported', file=sys.stderr)\nsys.exit(97)\n")
  return folder


@pytest.mark.parametrize("program", programs.PROGRAMS)
def test_help_is_answered_before_tensorflow_loads_and_lists_the_gin_flags(program,
                                                                           no_tensorflow):
  result = run_binary(program, "--help", pythonpath=[no_tensorflow])
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"bin/{program}:" in result.stdout and "--helpfull" in result.stdout
  gin_programs = set(programs.PROGRAMS) - {"convert_config", "gpu_check", "import_gpt_neo",
                                           "import_hf", "prepare_data", "tpu_check"}
  assert ("--gin_file" in result.stdout) == ("--gin_param" in result.stdout) == (
      program in gin_programs)


# Each program's smallest command line that gets past its flags (nothing is read before
# TensorFlow loads, so the paths need not exist).
STARTS = {"convert_config": ["--config=c.json", "--output=c.gin"], "eval": ["--model_dir=m"],
          "export": ["--model_dir=m", "--output=o"], "gpu_check": [], "import_hf": ["--hf_dir=h", "--model_dir=m"],
          "import_gpt_neo": ["--checkpoint_dir=n", "--config=c.json", "--model_dir=m"],
          "lm_eval": ["--model_dir=m", "--tasks=gptneo_lambada"], "prepare_data": [],
          "sample": ["--model_dir=m", "--prompt=a"], "search_layout": [], "sweep": ["--root=r"],
          "tpu_check": ["--layout=x"], "train": ["--model_dir=m"]}


@pytest.fixture(scope="module")
def tensorflow_spy(tmp_path_factory):
  """A `tensorflow` package that, imported, says which of OR-Tools and gptneo.configurables
  were loaded before it (on stdout: quiet_tensorflow silences fd 2 while TensorFlow loads), exit 97."""
  folder = tmp_path_factory.mktemp("tf_spy")
  (folder / "tensorflow").mkdir()
  (folder / "tensorflow" / "__init__.py").write_text(
      "import sys\nprint('ortools' in sys.modules, 'gptneo.configurables' in sys.modules)\n"
      "sys.stdout.flush()\nsys.exit(97)\n")
  return folder


@pytest.mark.parametrize("program", programs.PROGRAMS)
def test_every_program_loads_or_tools_then_configurables_before_tensorflow(program,
                                                                            tensorflow_spy):
  """One entry (command_line.start): CP-SAT segfaults in a process that loaded TensorFlow
  first, and every program is one that may search a layout or parse any gin file."""
  result = run_binary(program, *STARTS[program], pythonpath=[tensorflow_spy])
  assert result.returncode == 97, result.stderr[-2000:]  # TensorFlow was reached, once
  assert result.stdout.split() == ["True", "True"]


@pytest.mark.parametrize("program, flag", [("train", "--model_dir"), ("eval", "--model_dir"),
                                           ("sweep", "--root")])
def test_a_missing_flag_is_reported_before_tensorflow_loads(program, flag, no_tensorflow):
  result = run_binary(program, pythonpath=[no_tensorflow])
  assert_one_line_error(result, program, flag)
