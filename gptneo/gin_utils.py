"""The gin helper every binary shares: flags, search path, parsing, errors, operative config.

A leaf: of gptneo it imports only errors. What parse can bind is what is registered when it
runs; binaries (and tests) import gptneo.configurables, the one registration point, first.
"""
import contextlib
import io
import os
import pathlib
import sys
import tokenize
import traceback

from absl import app
from absl import flags
import gin
from gin import config_parser

from gptneo.errors import EXIT_DIVERGED, Diverged, UserError


@contextlib.contextmanager
def _native_stderr_silenced():
  """Drops what C++ writes to fd 2: TF's start-up banner ignores TF_CPP_MIN_LOG_LEVEL."""
  saved_stderr = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    yield
  finally:  # restored before any Python exception is reported, so real errors still show
    os.dup2(saved_stderr, 2)
    os.close(saved_stderr)
    os.close(devnull)


with _native_stderr_silenced():
  import tensorflow  # pylint: disable=g-import-not-at-top
  # Probing devices now (absl's app.run would, via a TF hook) keeps its cuInit noise quiet.
  tensorflow.config.list_physical_devices()

FLAGS = flags.FLAGS
OUR_PACKAGE = "gptneo"


def define_flags():
  """--gin_file and --gin_param, for the binaries configured with gin."""
  flags.DEFINE_multi_string("gin_file", [], "Gin file to load; repeatable. Looked up relative "
                            "to the working directory, then in the shipped gin/ folder.")
  flags.DEFINE_multi_string("gin_param", [], "Gin binding, e.g. 'GPT.n_layer = 4'; repeatable.")


def shipped_gin_dir():
  """The `gin/` folder shipped with the package (installed) or at the repo root (source)."""
  package_dir = pathlib.Path(__file__).resolve().parent
  for candidate in (package_dir / "gin", package_dir.parent / "gin"):
    if candidate.is_dir():
      return candidate
  raise UserError(f"no gin/ folder next to {package_dir}; reinstall with `make install`")


def _registry():
  """gin's registry of configurables: complete selector -> gin.config.Configurable.

  gin 0.5 has no public way to list what is registered, so this one place reads its private
  SelectorMap.
  """
  return gin.config._REGISTRY  # pylint: disable=protected-access


def _is_ours(configurable):
  return configurable.module.split(".")[0] == OUR_PACKAGE


def registered(module=None):
  """gptneo's configurables, in the order they were registered.

  Args:
    module: if given (e.g. gptneo.model.ops), only the configurables that module registers.

  Returns:
    gin's records of them (name, wrapped function or class, module, denylist, ...).
  """
  return [configurable for _, configurable in _registry().items() if _is_ours(configurable)
          and (module is None or configurable.module == module.__name__)]


def _our_configurable(selector):
  """The one gptneo configurable `selector` (e.g. "GPT" or "gpt.GPT") names, else None."""
  matches = _registry().get_all_matches(selector)
  return matches[0] if len(matches) == 1 and _is_ours(matches[0]) else None


@contextlib.contextmanager
def _include_lookup(gin_dir):
  """While gin parses, a relative `include` is looked up in gin_dir, then the working directory.

  So the shipped presets' includes (`include 'runs/train.gin'`) find the shipped files wherever
  the user stands. gin's own lookup tries the working directory first, then reads a path's
  folder as a Python package on sys.path: a `runs/` or `data/` folder beside a script or
  notebook is found as a namespace package without a file, and gin crashes on it.
  """
  # gin 0.5 can only append to its search path and readers, so they are swapped in place.
  prefixes = gin.config._LOCATION_PREFIXES  # pylint: disable=protected-access
  readers = gin.config._FILE_READERS  # pylint: disable=protected-access
  saved = prefixes[:], readers[:]
  prefixes[:] = [str(gin_dir), ""]
  readers[:] = [(open, os.path.isfile)]
  try:
    yield
  finally:
    prefixes[:], readers[:] = saved


def _gin_error_message(error):
  """gin's errors span several lines (with the config's context); the first names the culprit."""
  text = str(error).strip().splitlines()
  return text[0] if text else type(error).__name__


def _find_gin_file(name, gin_dir):
  for candidate in (pathlib.Path(name), gin_dir / name):
    if candidate.is_file():
      return str(candidate.resolve())  # absolute: gin opens it without a search of its own
  raise UserError(f"gin file {name!r} not found in the working directory or in {gin_dir}")


class _Reference:
  """@name or @name() as the model config check sees it: a name, resolved by no one."""

  def __init__(self, name, evaluate):
    self.name, self.evaluate = name, evaluate

  def __str__(self):
    return f"@{self.name}{'()' if self.evaluate else ''}"


class _Macro:
  """%name, a macro bound in the config or a constant a registered module defines."""

  def __init__(self, name):
    self.name = name


class _RecordingDelegate(config_parser.ParserDelegate):
  """Makes gin's parser hand references and macros back as names, importing nothing."""

  def configurable_reference(self, scoped_configurable_name, evaluate):
    return _Reference(scoped_configurable_name, evaluate)

  def macro(self, macro_name):
    return _Macro(macro_name)


_LITERALS = (bool, int, float, complex, str, bytes, type(None))


def _foreign_value(value):
  """The first part of a parsed value that is not a literal, a macro or a reference to one of
  our configurables, as gin text; None if there is none."""
  if isinstance(value, _Reference):
    return None if _our_configurable(value.name.rsplit("/", 1)[-1]) else str(value)
  if isinstance(value, _LITERALS + (_Macro,)):
    return None
  if isinstance(value, dict):
    value = [*value.keys(), *value.values()]
  if isinstance(value, (list, tuple)):
    return next(filter(None, map(_foreign_value, value)), None)
  return repr(value)  # gin's parser makes nothing else; refused all the same


def _refusal(statement):
  """What in one parsed statement a model dir's config may not hold, as gin text; or None."""
  if isinstance(statement, config_parser.ImportStatement):
    return f"`{statement.format()}`"
  if isinstance(statement, config_parser.IncludeStatement):
    return f"`include {statement.filename!r}`"
  selector = statement.selector
  if isinstance(statement, config_parser.BlockDeclaration) or statement.arg_name:
    if not _our_configurable(selector):
      return f"a binding of {selector!r}, not a configurable of gptneo,"
  if isinstance(statement, config_parser.BindingStatement):
    foreign = _foreign_value(statement.value)
    if foreign:
      return f"the value {foreign}"
  return None


def check_model_config(path, text):
  """Refuses in one line anything in a model dir's config but our own bindings.

  A model dir can come from anyone (a gs:// bucket, a download). gin would import the modules
  its `import` lines name, and with `from __gin__ import dynamic_registration` call any
  installed function; an `include` reads any other file. Our runs write only bindings and
  macros of literals, macros and references to our configurables (gin.operative_config_str),
  so that is all a model dir's config may hold. It is read with gin's parser, which evaluates
  only literals, before gin itself sees it.

  Args:
    path: the config's file name, for the messages.
    text: its contents.

  Raises:
    UserError: "<path>:<line>: <what> is not allowed in a model dir's config; ...".
  """
  source = io.StringIO(text)
  source.name = path
  try:
    for statement in config_parser.ConfigParser(source, _RecordingDelegate()):
      refused = _refusal(statement)
      if refused:
        raise UserError(f"{path}:{statement.location.line_num}: {refused} is not allowed in a "
                        f"model dir's config; it may only bind gptneo's configurables to "
                        f"literals, macros and @references to gptneo's configurables")
  except SyntaxError as error:
    raise UserError(f"{path}:{error.lineno}: gin syntax error: {error.msg}") from None
  except tokenize.TokenError as error:
    raise UserError(f"{path}: gin syntax error: {error.args[0]}") from None


def _read_model_config(path):
  """A model dir's config, checked, as a file-like object gin parses (named for its errors)."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError as error:
    raise UserError(f"can't read {path}: {error.strerror}") from None
  check_model_config(path, text)
  source = io.StringIO(text)  # gin parses the very text checked, not the file again
  source.name = path
  return source


def parse(gin_files, gin_params, model_config=None):
  """Parses gin files and bindings; binds only what is registered (gptneo.configurables).

  Args:
    gin_files: file names or paths, looked up in the working directory, then in `gin/`, e.g.
      ["tiny.gin"] or ["gin/tiny.gin"]; an `include` in them is looked up in `gin/`, then in
      the working directory.
    gin_params: bindings, e.g. ["gpt.n_layer = 2"].
    model_config: a model dir's operative_config.gin, parsed before gin_files once
      check_model_config has found nothing but our own bindings in it.

  Raises:
    UserError: a file is missing, a model config holds more than bindings, or a binding
      names an unknown configurable or parameter.
  """
  gin.clear_config()
  gin_dir = shipped_gin_dir()
  source = _read_model_config(model_config) if model_config else None
  paths = [_find_gin_file(name, gin_dir) for name in gin_files]
  try:
    with _include_lookup(gin_dir):
      if source:
        gin.parse_config(source)
      gin.parse_config_files_and_bindings(paths, gin_params, finalize_config=True)
  except (ValueError, KeyError, IOError, SyntaxError) as error:
    message = _gin_error_message(error)
    if "gin.REQUIRED" in message:
      message += " Set it with --gin_param."
    raise UserError(f"gin: {message}") from None


def parse_flags():
  parse(FLAGS.gin_file, FLAGS.gin_param)


def write_run_files(model_dir):
  """Writes the operative config and the full command line into `model_dir`.

  Args:
    model_dir: a local folder (a gs:// model dir's mirror): neither file is written through a
      link (model_dir.open_file).
  """
  # Here, not at the top: gin_utils stays a leaf that every binary imports first.
  from gptneo import model_dir as model_dir_lib  # pylint: disable=g-import-not-at-top
  os.makedirs(model_dir, exist_ok=True)
  with model_dir_lib.open_file(os.path.join(model_dir, "operative_config.gin"), "w") as f:
    f.write(gin.operative_config_str())
  with model_dir_lib.open_file(os.path.join(model_dir, "command.txt"), "a") as f:
    f.write(" ".join(sys.argv) + "\n")


def graph_mode():
  """Switches this process to TF1 graph mode, as our entry points run: run() and the tests.

  Importing gptneo leaves TensorFlow eager, for the user's own code. Our graphs are built
  inside `with graph.as_default()`, but checkpoints are restored and saved (tf.train.Saver,
  checkpoints.Checkpoints) outside it, which only graph mode allows.
  """
  tensorflow.compat.v1.disable_eager_execution()  # resource variables stay on


BUG_REPORT = ("this is a bug in gptneo, not in your input: please report it with the "
              "traceback above and the command line")


def run(main):
  """Like `absl.app.run`: bad input (UserError) ends in one line on stderr and exit code 2;
  a run that diverged (Diverged) in one line and EXIT_DIVERGED; anything else is a bug, shown
  with its traceback, a line saying so, and exit code 1."""
  def guarded_main(argv):
    program = os.path.basename(sys.argv[0])
    try:
      return main(argv)
    except UserError as error:
      print(f"{program}: error: {str(error).strip().splitlines()[0]}", file=sys.stderr)
      sys.exit(2)
    except Diverged as error:  # not a bug, not bad input: the run's own outcome
      print(f"{program}: diverged: {str(error).strip().splitlines()[0]}", file=sys.stderr)
      sys.exit(EXIT_DIVERGED)
    except Exception:  # pylint: disable=broad-except
      traceback.print_exc()
      print(f"{program}: internal error: {BUG_REPORT}", file=sys.stderr)
      sys.exit(1)
  graph_mode()
  app.run(guarded_main, flags_parser=_parse_flags)


def _parse_flags(argv):
  """absl's flag parsing, its errors (unknown flag, missing value) in our one line, exit 2."""
  try:
    return FLAGS(argv)
  except flags.Error as error:
    program = os.path.basename(argv[0])
    print(f"{program}: error: {str(error).strip().splitlines()[0]} (see --helpshort)",
          file=sys.stderr)
    sys.exit(2)


def check_output(path, flag="--output", overwrite=False, folder=False):
  """Refuses to write the user's `path` where that would lose or can't make anything.

  Args:
    path: the file (or, with folder=True, the folder) a program is about to write.
    flag: the flag that named it, for the message.
    overwrite: whether replacing an existing file (a non-empty folder) was asked for.
    folder: path is a folder to write files into.

  Raises:
    UserError: path is of the other kind, exists without overwrite, or its parent is a file.
  """
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UserError(f"{flag}={path}: {parent} is a file, not a folder; choose another path")
  if os.path.isdir(path) != folder and os.path.exists(path):
    kind = "a folder; name a file" if not folder else "a file; name a folder"
    raise UserError(f"{flag}={path} is {kind}")
  occupied = os.path.isdir(path) and os.listdir(path) if folder else os.path.exists(path)
  if occupied and not overwrite:
    raise UserError(f"{flag}={path} exists; pass --overwrite to replace it, or choose another "
                    f"path")
