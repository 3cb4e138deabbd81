"""The gin helper every binary shares: flags, search path, parsing, errors, operative config."""
import contextlib
import logging as std_logging
import os
import pathlib
import sys
import traceback

from absl import app
from absl import flags
import gin

from gptneo.errors import UserError


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


def _gin_error_message(error):
  """gin's errors span several lines (with the config's context); the first names the culprit."""
  text = str(error).strip().splitlines()
  return text[0] if text else type(error).__name__


def _find_gin_file(name, gin_dir):
  for candidate in (pathlib.Path(name), gin_dir / name):
    if candidate.is_file():
      return str(candidate)
  raise UserError(f"gin file {name!r} not found in the working directory or in {gin_dir}")


def parse(gin_files, gin_params):
  """Parses gin files and bindings, with the working directory then `gin/` as search path.

  Args:
    gin_files: file names or paths, e.g. ["tiny.gin"] or ["gin/tiny.gin"].
    gin_params: bindings, e.g. ["gpt.n_layer = 2"].

  Raises:
    UserError: a file is missing, or a binding names an unknown configurable or parameter.
  """
  from gptneo import configurables  # noqa: F401  (registers every configurable)
  gin.clear_config()
  gin_dir = shipped_gin_dir()
  gin.add_config_file_search_path(str(gin_dir))  # for `include`s inside gin files
  paths = [_find_gin_file(name, gin_dir) for name in gin_files]
  # gin logs an ERROR for every place an `include` is not, before it finds it in gin/.
  previous = std_logging.root.manager.disable
  std_logging.disable(std_logging.ERROR)
  try:
    gin.parse_config_files_and_bindings(paths, gin_params, finalize_config=True)
  except (ValueError, KeyError, IOError, SyntaxError) as error:
    message = _gin_error_message(error)
    if "gin.REQUIRED" in message:
      message += " Set it with --gin_param."
    raise UserError(f"gin: {message}") from None
  finally:
    std_logging.disable(previous)


def parse_flags():
  parse(FLAGS.gin_file, FLAGS.gin_param)


def write_run_files(model_dir):
  """Writes the operative config and the full command line into `model_dir`."""
  gfile = tensorflow.io.gfile
  gfile.makedirs(model_dir)
  with gfile.GFile(os.path.join(model_dir, "operative_config.gin"), "w") as f:
    f.write(gin.operative_config_str())
  with gfile.GFile(os.path.join(model_dir, "command.txt"), "a") as f:
    f.write(" ".join(sys.argv) + "\n")


BUG_REPORT = ("this is a bug in gptneo, not in your input: please report it with the "
              "traceback above and the command line")


def run(main):
  """Like `absl.app.run`: bad input (UserError) ends in one line on stderr and exit code 2;
  anything else is a bug, shown with its traceback, a line saying so, and exit code 1."""
  def guarded_main(argv):
    program = os.path.basename(sys.argv[0])
    try:
      return main(argv)
    except UserError as error:
      print(f"{program}: error: {str(error).strip().splitlines()[0]}", file=sys.stderr)
      sys.exit(2)
    except Exception:  # pylint: disable=broad-except
      traceback.print_exc()
      print(f"{program}: internal error: {BUG_REPORT}", file=sys.stderr)
      sys.exit(1)
  app.run(guarded_main)
