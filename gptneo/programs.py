"""The installed commands: gptneo-train runs bin/train, gptneo-eval bin/eval, and so on.

The programs themselves stay the scripts in bin/ (tests and a checkout run them as
`bin/<name>`); the commands get a `gptneo-` prefix so that none is a shell builtin (`eval`,
`export`) or another tool's name. setup.py points each console script at the function here
named like it (gptneo-import-hf -> gptneo_import_hf).
"""
import os
import pathlib
import sys
import types

PROGRAMS = ("convert_config", "eval", "export", "gpu_check", "import_gpt_neo", "import_hf",
            "lm_eval", "prepare_data", "sample", "search_layout", "sweep", "tpu_check", "train")


def command(program):
  """The installed name of bin/<program>: gptneo-train, gptneo-import-hf, ..."""
  return "gptneo-" + program.replace("_", "-")


def bin_dir():
  """The `bin/` folder shipped with the package (installed) or at the repo root (source)."""
  package_dir = pathlib.Path(__file__).resolve().parent
  for candidate in (package_dir / "bin", package_dir.parent / "bin"):
    if (candidate / "_venv.py").is_file():
      return candidate
  return None


def run(program):
  """Runs bin/<program> as its __main__, its messages naming the installed command."""
  name = command(program)
  folder = bin_dir()
  if folder is None:
    print(f"{name}: error: no bin/ folder next to {pathlib.Path(__file__).parent}; reinstall "
          f"with `make install`", file=sys.stderr)
    sys.exit(2)
  # absl's --help and gin_utils.run's error lines name sys.argv[0]; the console-script wrapper
  # already set it to this command's path (which command.txt then records, runnable as is).
  if os.path.basename(sys.argv[0]) != name:
    sys.argv[0] = name
  sys.path.insert(0, str(folder))  # as for a script run directly: its `import _venv` works
  run_as_main(folder / program)


def run_as_main(path):
  """runpy.run_path(path, run_name="__main__"), but leaving sys.argv[0] alone.

  run_path sets sys.argv[0] to the file's path while it runs, so absl's usage and every
  error line would name bin/train, not the gptneo-train the user typed.
  """
  main = types.ModuleType("__main__")
  main.__file__ = str(path)
  sys.modules["__main__"] = main
  exec(compile(path.read_bytes(), str(path), "exec"), main.__dict__)  # pylint: disable=exec-used


def _entry_point(program):
  def launch():
    run(program)
  launch.__name__ = launch.__qualname__ = command(program).replace("-", "_")
  launch.__doc__ = f"The `{command(program)}` command: bin/{program}."
  return launch


gptneo_convert_config = _entry_point("convert_config")
gptneo_eval = _entry_point("eval")
gptneo_export = _entry_point("export")
gptneo_gpu_check = _entry_point("gpu_check")
gptneo_import_gpt_neo = _entry_point("import_gpt_neo")
gptneo_import_hf = _entry_point("import_hf")
gptneo_lm_eval = _entry_point("lm_eval")
gptneo_prepare_data = _entry_point("prepare_data")
gptneo_sample = _entry_point("sample")
gptneo_search_layout = _entry_point("search_layout")
gptneo_sweep = _entry_point("sweep")
gptneo_train = _entry_point("train")
gptneo_tpu_check = _entry_point("tpu_check")
