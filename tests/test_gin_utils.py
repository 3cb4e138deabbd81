"""gin_utils: includes found wherever the user stands, model dirs that run no code, no import
switching TensorFlow to graph mode, and gin_utils a leaf of the package."""
import os
import pathlib
import shutil
import subprocess
import sys

import gin
import pytest

from gptneo import gin_utils
from gptneo.errors import UserError
from tests.conftest import REPO, run_binary
from tests.test_errors import assert_one_line_error


def run_python(code, cwd):
  """`python -c code` in `cwd`: the working directory is on sys.path, as in a notebook."""
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                        text=True, check=False)


PRINT_TRAIN_STEPS = """
import gin
import gptneo.configurables
import shutil
from gptneo import gin_utils
gin_utils.parse(["tiny.gin"], [])
print(gin.query_parameter("train.train_steps"))
"""


def test_includes_resolve_beside_empty_runs_and_data_folders(tmp_path):
  (tmp_path / "runs").mkdir()  # what `make demo` leaves in the working directory
  (tmp_path / "data").mkdir()
  result = run_python(PRINT_TRAIN_STEPS, tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ["600"]


def test_the_working_directory_does_not_shadow_a_shipped_include(tmp_path):
  (tmp_path / "runs").mkdir()
  (tmp_path / "runs" / "train.gin").write_text("train.train_steps = 7\ntrain.bogus = 1\n")
  result = run_python(PRINT_TRAIN_STEPS, tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ["600"]


def test_a_users_file_still_includes_its_neighbour(tmp_path, monkeypatch):
  (tmp_path / "base.gin").write_text("GPT.n_layer = 3\n")
  (tmp_path / "mine.gin").write_text("include 'tiny.gin'\ninclude 'base.gin'\n")
  monkeypatch.chdir(tmp_path)
  gin_utils.parse(["mine.gin"], [])
  assert gin.query_parameter("GPT.n_layer") == 3


def test_a_missing_include_is_one_line_naming_it(tmp_path):
  (tmp_path / "data").mkdir()
  (tmp_path / "mine.gin").write_text("include 'data/missing.gin'\n")
  result = run_python("from gptneo import gin_utils\ngin_utils.parse(['mine.gin'], [])",
                      tmp_path)
  assert "UserError" in result.stderr and "data/missing.gin" in result.stderr, result.stderr


def test_importing_gptneo_leaves_tensorflow_eager():
  code = """
import gptneo.configurables
from gptneo.compat import mtf, tf
assert tf.executing_eagerly()
print([int(x) for x in tf.data.Dataset.range(3).map(lambda x: x * 2)])
"""
  result = run_python(code, REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ["[0,", "2,", "4]"]


def test_gin_utils_imports_nothing_of_gptneo_but_errors():
  code = """
import sys
from gptneo import gin_utils
print(sorted(name for name in sys.modules if name.startswith("gptneo")))
"""
  result = run_python(code, REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ["['gptneo',", "'gptneo.errors',", "'gptneo.gin_utils']"]


# --- A model dir's config runs no code of its author's ---------------------------------------

def exploited_model_dir(folder, trained_dir, config):
  """A copy of a real trained model dir (its checkpoints verify) whose config is `config`."""
  shutil.copytree(trained_dir, folder)
  (folder / "operative_config.gin").write_text(config)
  return folder


def dynamic_registration_exploit(marker):
  # GPT() runs in every program that reads a model dir, so every one would call check_call.
  return ("from __gin__ import dynamic_registration\n"
          "import subprocess\n"
          "import gptneo.model.gpt\n"
          "gptneo.model.gpt.GPT.n_layer = @subprocess.check_call()\n"
          f"subprocess.check_call.args = ['touch', {str(marker)!r}]\n")


def import_exploit(marker):
  """A module of the attacker's on sys.path: gin's `import` line would run it."""
  (marker.parent / "evil_module.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
  return "import evil_module\nGPT.n_layer = 2\n"


PROGRAMS = {
    "sample": ["--prompt=x"],
    "eval": [],
    "export": ["--output={tmp}/exported"],
}


@pytest.mark.parametrize("program", sorted(PROGRAMS))
@pytest.mark.parametrize("exploit,line,what", [
    (dynamic_registration_exploit, 1, "`from __gin__ import dynamic_registration`"),
    (import_exploit, 1, "`import evil_module`"),
])
def test_a_model_dirs_config_runs_no_code(tmp_path, neo_model_dir, program, exploit, line,
                                         what):
  marker = tmp_path / "marker"
  model_dir = exploited_model_dir(tmp_path / "model", neo_model_dir, exploit(marker))
  args = [arg.format(tmp=tmp_path) for arg in PROGRAMS[program]]
  # tmp_path on the path: where evil_module would be imported from.
  result = run_binary(program, f"--model_dir={model_dir}", *args, pythonpath=[tmp_path])
  assert not marker.exists(), "the model dir's config ran code"
  assert_one_line_error(result, program, f"{model_dir}/operative_config.gin:{line}: {what}",
                        "not allowed in a model dir's config")


def check(text):
  gin_utils.check_model_config("operative_config.gin", text)


@pytest.mark.parametrize("text,line,what", [
    ("GPT.n_layer = 2\nfrom __gin__ import dynamic_registration\n", 2,
     "`from __gin__ import dynamic_registration`"),
    ("import os.path as p\n", 1, "`import os.path as p`"),
    ("include 'tiny.gin'\n", 1, "`include 'tiny.gin'`"),
    ("GPT.n_layer = 2\n\nos.system.command = 'x'\n", 3, "a binding of 'os.system', not a configurable"),
    ("GPT.activation = @print\n", 1, "the value @print"),
    ("GPT.activation = @scope/print()\n", 1, "the value @scope/print()"),
    ("X = [1, {'a': (2, @gin.singleton())}]\n", 1, "the value @gin.singleton()"),
    ("macro:\n  value = 3\n", 1, "a binding of 'macro', not a configurable"),
])
def test_the_check_refuses_in_one_line_naming_the_line(text, line, what):
  with pytest.raises(UserError) as error:
    check(text)
  assert str(error.value).startswith(f"operative_config.gin:{line}: {what}"), str(error.value)
  assert "not allowed in a model dir's config" in str(error.value)


def test_the_check_names_the_line_of_a_syntax_error():
  with pytest.raises(UserError, match=r"^operative_config.gin:2: gin syntax error"):
    check("GPT.n_layer = 2\nGPT.n_embd = os.getcwd()\n")


def test_the_check_accepts_what_our_configs_bind():
  check("DATASET_DIR = '/data'\n"
        "train.dataset_dir = %DATASET_DIR\ntrain.model = @GPT()\ntrain.mesh = @gptneo.mesh.mesh()\n"
        "GPT.activation = @gelu_tanh\nGPT.positions = @RotaryPositions()\n"
        "GPT.attention_layers = [[('global', 'local'), 1]]\nGPT.moe = None\n"
        "train.dataset_dir = {'/a': 0.5, '/b': -1e-3}\nGPT:\n  n_layer = 2\n  n_head = %N\n"
        "train.train_steps = %gin.REQUIRED\n")


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "gin").glob("*.gin")))
def test_every_shipped_preset_passes_the_check(preset):
  gin_utils.parse([preset], ['DATASET_DIR = "/data"'])
  check(gin.config_str())


def test_a_checked_model_config_is_parsed_before_the_other_files(tmp_path):
  config = tmp_path / "operative_config.gin"
  config.write_text("GPT.n_layer = 5\nGPT.n_embd = 48\n")
  gin_utils.parse(["runs/sample.gin"], ["GPT.n_embd = 64"], model_config=str(config))
  assert gin.query_parameter("GPT.n_layer") == 5
  assert gin.query_parameter("GPT.n_embd") == 64


def test_a_refused_model_config_binds_nothing(tmp_path):
  config = tmp_path / "operative_config.gin"
  config.write_text("GPT.n_layer = 5\nimport os\n")
  with pytest.raises(UserError, match=f"^{config}:2: `import os`"):
    gin_utils.parse([], [], model_config=str(config))
  with pytest.raises(ValueError):
    gin.query_parameter("GPT.n_layer")


def test_registered_lists_only_gptneo_configurables_of_a_module():
  from gptneo.model import feedforward  # pylint: disable=g-import-not-at-top
  assert [c.name for c in gin_utils.registered(feedforward)] == ["mlp", "glu"]
  assert all(c.module.startswith("gptneo.") for c in gin_utils.registered())
  assert "macro" not in [c.name for c in gin_utils.registered()]


def test_shipped_gin_dir_is_the_repo_gin_folder():
  assert gin_utils.shipped_gin_dir() == pathlib.Path(REPO / "gin").resolve()
