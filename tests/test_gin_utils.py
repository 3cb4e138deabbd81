"""gin_utils: includes found wherever the user stands, model dirs that run no code, no import
switching TensorFlow to graph mode, and gin_utils a leaf of the package."""
import os
import pathlib
import select
import shutil
import socket
import subprocess
import sys

from absl import flags
import gin
import pytest

from gptneo import command_line
from gptneo import gin_utils
from gptneo.errors import UserError
from tests.conftest import REPO, run_binary
from tests.test_errors import assert_one_line_error
from tests.test_train import train_in_process


def run_python(code, cwd):
  """`python -c code` in `cwd`: the working directory is on sys.path, as in a notebook."""
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                        text=True, check=False)


PRINT_TRAIN_STEPS = """
import gin
import gptneo.configurables
import shutil
from gptneo import command_line
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


def test_gin_utils_imports_nothing_of_gptneo_but_errors_and_command_line():
  code = """
import sys
from gptneo import gin_utils
print(sorted(name for name in sys.modules if name.startswith("gptneo")))
"""
  result = run_python(code, REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ["['gptneo',", "'gptneo.command_line',", "'gptneo.errors',",
                                   "'gptneo.gin_utils']"]


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


@pytest.mark.parametrize("text,line,what,why", [
    ("GPT.n_layer = 2\nfrom __gin__ import dynamic_registration\n", 2,
     "`from __gin__ import dynamic_registration`", ""),
    ("import os.path as p\n", 1, "`import os.path as p`", ""),
    ("include 'tiny.gin'\n", 1, "`include 'tiny.gin'`", ""),
    ("GPT.n_layer = 2\n\nos.system.command = 'x'\n", 3, "`os.system.command = 'x'`",
     "os.system is not part of the model"),
    ("GPT.activation = @print\n", 1, "`GPT.activation = @print`", "@print is no choice of "
     "GPT.activation, which takes a configurable of gptneo.model.ops"),
    ("GPT.activation = @scope/print()\n", 1, "`GPT.activation = @scope/print()`", ""),
    ("X = [1, {'a': (2, @gin.singleton())}]\n", 1, "`X = [1, {'a': (2, @gin.singleton())}]`",
     "@gin.singleton(): only GPT.activation, "),
    ("macro:\n  value = 3\n", 1, "a block of 'macro'", ""),
    # What our programs are: each would run inside GPT() or at the macro's use, and fail.
    ("GPT.activation = @export_hf()\n", 1, "`GPT.activation = @export_hf()`", ""),
    ("GPT.positions = @sample()\n", 1, "`GPT.positions = @sample()`", "which takes a "
     "configurable of gptneo.model.positions, written @name()"),
    ("train.model = @evaluate()\n", 1, "`train.model = @evaluate()`", "takes @GPT"),
    ("GPT.n_layer = 2\nEVIL = @train()\n", 2, "`EVIL = @train()`", ""),
    ("GPT.positions = @RotaryPositions\n", 1, "`GPT.positions = @RotaryPositions`", ""),
    # A program's own settings, and knobs that don't exist.
    ("sample.temperature = 2.0\n", 1, "`sample.temperature = 2.0`",
     "sample is not part of the model"),
    ("GPT.n_embdd = 32\n", 1, "`GPT.n_embdd = 32`", "did you mean GPT.n_embd?"),
    ("LearnedPositions.size = 3\n", 1, "`LearnedPositions.size = 3`", "its parameters: "),
])
def test_the_check_refuses_in_one_line_naming_the_line(text, line, what, why):
  with pytest.raises(UserError) as error:
    check(text)
  assert str(error.value).startswith(f"operative_config.gin:{line}: {what} is not allowed in "
                                     f"a model dir's config"), str(error.value)
  assert why in str(error.value) and "docs/model_dirs.md" in str(error.value)
  assert "\n" not in str(error.value)


def test_the_check_names_the_line_of_a_syntax_error():
  with pytest.raises(UserError, match=r"^operative_config.gin:2: gin syntax error"):
    check("GPT.n_layer = 2\nGPT.n_embd = os.getcwd()\n")


def test_the_check_applies_the_model_and_ignores_how_it_was_trained():
  applied = gin_utils.check_model_config("operative_config.gin", (
      "DATASET_DIR = '/data'\n"
      "train.dataset_dir = %DATASET_DIR\ntrain.model = @GPT()\ntrain.mesh = @gptneo.mesh.mesh()\n"
      "GPT.activation = @gelu_tanh\nGPT.positions = @RotaryPositions()\n"
      "GPT.attention_layers = [[('global', 'local'), 1]]\nGPT.moe = None\n"
      "train.dataset_dir = {'/a': 0.5, '/b': -1e-3}\nGPT:\n  n_layer = 2\n  n_head = %N\n"
      "train.train_steps = %gin.REQUIRED\ntrain.optimizer = @Adafactor()\n"
      "mesh.tpu = 'grpc://10.0.0.2:8470'\nmesh.implementation = 'simd'\n"
      "mesh.cluster = {'worker': ['0.0.0.0:23457']}\nmesh.task_index = 1\nAdam.beta1 = 0.9\n"
      "RotaryPositions.fraction = 0.25\nGPT.feed_forward = @glu\nGPT.moe = @MoE()\n"))
  assert applied.splitlines() == [
      "DATASET_DIR = '/data'", "GPT.activation = @gelu_tanh",
      "GPT.positions = @RotaryPositions()", "GPT.attention_layers = [[('global', 'local'), 1]]",
      "GPT.moe = None", "GPT.n_layer = 2", "GPT.n_head = %N",
      "RotaryPositions.fraction = 0.25", "GPT.feed_forward = @glu", "GPT.moe = @MoE()"]


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "gin").glob("*.gin")))
def test_every_shipped_preset_passes_the_check(preset):
  gin_utils.parse([preset], ['DATASET_DIR = "/data"'])
  check(gin.config_str())


def test_a_trained_model_dirs_config_passes_the_check(neo_model_dir):
  path = os.path.join(neo_model_dir, "operative_config.gin")
  with open(path) as f:
    applied = gin_utils.check_model_config(path, f.read())
  assert "GPT.n_layer = 2" in applied and "mesh." not in applied and "train." not in applied


@pytest.mark.parametrize("bindings", [
    ["train.optimizer = @Adafactor()", "GPT.positions = @RotaryPositions()",
     "RotaryPositions.fraction = 0.5", "GPT.feed_forward = @glu", "GPT.activation = @silu",
     "GPT.moe = @MoE()", "MoE.layers = [1]", "MoE.num_experts = 2"],
    ["GPT.positions = @AxialPositions()", "AxialPositions.shape = (4, 8)"],
])
def test_our_own_variants_model_dirs_pass_the_check(tmp_path, small_dataset, bindings):
  # Adafactor calls mesh-tensorflow's configurables, which the operative config then holds.
  train_in_process(tmp_path, small_dataset, 1, "train.eval_batches = 0", *bindings)
  gin.clear_config()
  path = tmp_path / "operative_config.gin"
  applied = gin_utils.check_model_config(str(path), path.read_text())
  gin_utils.parse(["runs/sample.gin"], [], model_config=str(path))
  assert all(line in applied.splitlines() for line in bindings if not line.startswith("train."))


def holding_a_port():
  """A loopback socket listening on a free port: nothing else can bind it, and any connection
  to it waits in its backlog, where select() sees it at once."""
  listener = socket.socket()
  listener.bind(("127.0.0.1", 0))
  listener.listen(8)
  return listener


def was_connected(listener):
  return bool(select.select([listener], [], [], 0)[0])


@pytest.mark.parametrize("runtime", [
    "mesh.cluster = {{'worker': ['127.0.0.1:{port}']}}\n",  # would serve TF's gRPC there
    "mesh.implementation = 'simd'\nmesh.tpu = 'grpc://127.0.0.1:{port}'\n",  # would dial it
])
def test_a_model_dir_opens_no_server_and_dials_nothing(tmp_path, neo_model_dir, runtime):
  with holding_a_port() as listener:
    port = listener.getsockname()[1]
    with open(os.path.join(neo_model_dir, "operative_config.gin")) as f:
      config = f.read() + runtime.format(port=port)  # the last binding wins in gin
    model_dir = exploited_model_dir(tmp_path / "model", neo_model_dir, config)
    # The runtime of the run that trained it is ignored: this samples here, on one CPU.
    result = run_binary("sample", f"--model_dir={model_dir}", "--prompt=x",
                        "--gin_param=sample.max_new_tokens = 2", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]  # a server would not bind the port
    assert not was_connected(listener)


@pytest.mark.parametrize("binding", ["GPT.activation = @export_hf()", "GPT.positions = @sample()",
                                     "train.model = @evaluate()", "EVIL = @train()"])
def test_our_programs_named_in_a_model_dir_are_refused_in_one_line(tmp_path, neo_model_dir,
                                                                  binding):
  with open(os.path.join(neo_model_dir, "operative_config.gin")) as f:
    config = f.read()
  model_dir = exploited_model_dir(tmp_path / "model", neo_model_dir, config + binding + "\n")
  result = run_binary("sample", f"--model_dir={model_dir}", "--prompt=x")
  line = len(config.splitlines()) + 1
  assert_one_line_error(result, "sample", f"{model_dir}/operative_config.gin:{line}: "
                        f"`{binding}` is not allowed in a model dir's config")


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


# --- Gin text we write ---------------------------------------------------------------------

@pytest.mark.parametrize("value", [
    "folder\nimport os", "it's \"quoted\" \\ and\ttabbed", "", None, True, 3, -1.5e-300, 1e300,
    [1, "a\nb"], ("one",), (), {"x\ny": [None, 2.0]},
])
def test_gin_literal_reads_back_as_the_value_on_one_line(value):
  text = gin_utils.gin_literal(value)
  assert "\n" not in text
  (statement,) = gin_utils.statements(f"X = {text}", "test")
  assert statement.value == value and type(statement.value) is type(value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), b"x", object(), 1j])
def test_gin_literal_refuses_what_gin_cannot_read_back(value):
  with pytest.raises(TypeError):
    gin_utils.gin_literal(value)


@pytest.mark.parametrize("text", ["@gelu", "@gptneo.model.gpt.GPT()", "@scope/GPT()", "%N"])
def test_a_reference_is_written_as_it_is(text):
  assert gin_utils.gin_literal([gin_utils.Reference(text)]) == f"[{text}]"


@pytest.mark.parametrize("text", ["@x\nimport os", "gelu", "@x()()", "%A = 1"])
def test_a_reference_holds_only_a_name(text):
  with pytest.raises(ValueError):
    gin_utils.Reference(text)


# --- gin files and bindings from the command line ------------------------------------------

PRINT_STEPS_OF = """
import gin
import gptneo.configurables
from gptneo import command_line
from gptneo import gin_utils
gin_utils.parse([{name!r}], ['DATASET_DIR = "/data"'])
print(gin.query_parameter("train.train_steps"))
"""


def test_a_gin_prefix_finds_the_shipped_file_wherever_the_user_stands(tmp_path):
  result = run_python(PRINT_STEPS_OF.format(name="gin/tiny.gin"), tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ["600"]


def test_a_gin_file_in_the_working_directory_still_wins(tmp_path):
  (tmp_path / "gin").mkdir()
  (tmp_path / "gin" / "tiny.gin").write_text("include 'tiny.gin'\ntrain.train_steps = 7\n")
  result = run_python(PRINT_STEPS_OF.format(name="gin/tiny.gin"), tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ["7"]


@pytest.mark.parametrize("param, says", [
    ("sample.temperature = 0 0", "Expected newline."),
    ("GPT.n_layer = four", "Failed to parse token 'four'"),
    ("GPT.n_layer = [1", "EOF in multi-line statement"),
])
def test_a_gin_param_gin_cannot_parse_is_named(param, says):
  with pytest.raises(UserError) as error:
    gin_utils.parse(["tiny.gin"], ["GPT.n_layer = 2", param])
  assert str(error.value) == f"--gin_param={param!r}: gin syntax error: {says}"


@pytest.mark.parametrize("argv, culprit", [
    (["gptneo-sample", "--verbose", "extra"], "unexpected arguments ['extra']"),
    (["gptneo-eval", "--verbose", "false"], "unexpected arguments ['false']"),
    (["gptneo-train", "--bogus"], "bogus"),
])
def test_every_programs_command_line_is_refused_in_one_line(monkeypatch, capsys, argv, culprit):
  program_flags = flags.FlagValues()  # the programs' global FLAGS stays untouched
  flags.DEFINE_bool("verbose", False, "a flag of the program", flag_values=program_flags)
  monkeypatch.setattr(command_line, "FLAGS", program_flags)
  with pytest.raises(SystemExit) as exit_:
    command_line.parse(argv)
  assert exit_.value.code == 2
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"{argv[0]}: error: ") and culprit in lines[0]


def test_a_command_line_of_flags_only_passes(monkeypatch):
  program_flags = flags.FlagValues()
  flags.DEFINE_bool("verbose", False, "a flag of the program", flag_values=program_flags)
  monkeypatch.setattr(command_line, "FLAGS", program_flags)
  assert command_line.parse(["gptneo-sample", "--verbose"]) == ["gptneo-sample"]
  assert program_flags.verbose


@pytest.mark.parametrize("folder, says", [(False, "--output must name a file"),
                                          (True, "--output must name a folder")])
def test_an_empty_output_path_is_refused(folder, says):
  with pytest.raises(UserError) as error:
    gin_utils.check_output("", folder=folder)
  assert str(error.value) == says
