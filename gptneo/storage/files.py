"""Local files written so that an interrupted write never looks like the finished file."""
import contextlib
import os
import uuid


def atomic_write(path, write):
  """Calls write(temporary path) next to path, then renames it into place."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  partial = temporary(path)
  try:
    write(partial)
    os.replace(partial, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(partial)
    raise


def temporary(path):
  """A hidden name next to path: an interrupted write never looks like the finished file."""
  directory, name = os.path.split(path)
  return os.path.join(directory, f".{name}.{uuid.uuid4().hex[:8]}.partial")
