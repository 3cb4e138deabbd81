"""Input files the user names (prompt files, task files): JSON Lines, one object per line;
errors name the file and the line."""
import json

import tensorflow.compat.v1 as tf

from gptneo.errors import UserError


def read_lines(path, flag):
  """The lines of the user's file `path` (local or gs://), given with `flag`.

  Raises:
    UserError: the file is missing, a folder, unreadable, or holds nothing but blank lines.
  """
  if tf.io.gfile.isdir(path):
    raise UserError(f"{flag}={path} is a folder; name a file")
  try:
    with tf.io.gfile.GFile(path) as f:
      lines = f.read().splitlines()
  except (tf.errors.NotFoundError, tf.errors.PermissionDeniedError, OSError) as error:
    reason = "not found" if isinstance(error, tf.errors.NotFoundError) else "unreadable"
    raise UserError(f"{flag}={path}: {reason}; check the path") from None
  except UnicodeDecodeError:
    raise UserError(f"{flag}={path} is not UTF-8 text") from None
  if not any(line.strip() for line in lines):
    raise UserError(f"{flag}={path} is empty; write one entry per line")
  return lines


def string_field(line, path, number, field):
  """The string `field` of JSONL line `number` of `path`.

  Args:
    line: the line's text.
    path: the file, for the error message.
    number: the 1-based line number, for the error message.
    field: the key whose string value to return.

  Raises:
    ValueError: the line is not a JSON object with a string `field`.
  """
  fix = f'write one {{"{field}": ...}} object per line'
  try:
    record = json.loads(line)
  except json.JSONDecodeError as error:
    raise UserError(f"{path} line {number} is not JSON ({error.msg}); {fix}") from None
  value = record.get(field) if isinstance(record, dict) else None
  if not isinstance(value, str):
    raise UserError(f'{path} line {number} has no string "{field}" field; {fix}')
  return value
