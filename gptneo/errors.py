"""The one error type of bad input: a config, flag, data set or file the user must fix.

Binaries (gin_utils.run) report a UserError in one line on stderr, exit code 2; any other
exception is a bug and keeps its traceback. Raise UserError only for what the user can change,
with a message that names the culprit and the fix.
"""

EXIT_DIVERGED = 3  # bin/train: the loss went non-finite (a sweep marks the point diverged)


class UserError(ValueError):
  """Bad input from the user (config, flags, data, files): one line on stderr, exit code 2."""
