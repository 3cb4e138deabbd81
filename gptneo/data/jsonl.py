"""JSON Lines input (prompt files, task files): one object per line, errors name the line."""
import json

from gptneo.errors import UserError


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
