"""Lets `bin/<program>` run from a checkout whatever python3 starts it.

Every program in bin/ imports this first. Where our dependencies import (the checkout's
.venv, an installed gptneo, the gptneo-* commands) it does nothing. Otherwise, e.g. `bin/eval`
started by the system python3 through its shebang, it runs the same command again with the
checkout's .venv/bin/python; without a usable .venv it says in one line to run `make install`.
"""
import importlib.util
import os
import sys

# Set for the re-run: if the .venv's python lacks them too, report instead of looping.
_RERUN = "GPTNEO_VENV_RERUN"
_NEEDED = ("absl", "gin", "gptneo")


def _missing():
  return [name for name in _NEEDED if importlib.util.find_spec(name) is None]


def _venv_python():
  checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return os.path.join(checkout, ".venv", "bin", "python")


def _fail(missing, python, rerun):
  program = os.path.basename(sys.argv[0])
  where = f"neither can {python}" if rerun else f"there is no {python}"
  print(f"{program}: error: {sys.executable} can't import {', '.join(missing)} and {where}: "
        f"run `make install` first", file=sys.stderr)
  sys.exit(2)


def ensure():
  """Re-runs this program in the checkout's .venv if our dependencies don't import here."""
  rerun = os.environ.pop(_RERUN, None)  # popped: the program's own children start afresh
  missing = _missing()
  if not missing:
    return
  python = _venv_python()
  if rerun or not os.access(python, os.X_OK):
    _fail(missing, python, rerun)
  os.environ[_RERUN] = "1"
  os.execv(python, [python, sys.argv[0], *sys.argv[1:]])


ensure()
