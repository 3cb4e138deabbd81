"""Imports TensorFlow with its C++ start-up banner silenced; configurables imports it first.

Not gin_utils: what only reads gin text or JSON (gptneo-sweep --status) loads no TensorFlow.
"""
import contextlib
import os


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
