"""The one error type of bad input: a config, flag, data set or file the user must fix.

Binaries (gin_utils.run) report a UserError in one line on stderr, exit code 2; any other
exception is a bug and keeps its traceback. Raise UserError only for what the user can change,
with a message that names the culprit and the fix. A run that diverged (Diverged) is neither:
one line, and its own exit code, EXIT_DIVERGED.
"""

import json

EXIT_DIVERGED = 3  # bin/train: the loss went non-finite (a sweep marks the point diverged)


class UserError(ValueError):
  """Bad input from the user (config, flags, data, files): one line on stderr, exit code 2."""


class Diverged(Exception):
  """bin/train stopped on a NaN or infinite loss: one line naming the step and the last good
  checkpoint on stderr, exit code EXIT_DIVERGED."""


def read_json(path, fix, problem="is not readable JSON"):
  """The JSON value in the file `path`; one that can't be read, isn't UTF-8 or isn't JSON is
  a one-line UserError: "<path> <problem> (<why>); <fix>".

  Args:
    path: a local file name.
    fix: what the user should do, ending the message.
    problem: what the message says of the file.
  """
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as error:  # ValueError: not UTF-8, or not JSON
    raise UserError(f"{path} {problem} ({error}); {fix}") from None
