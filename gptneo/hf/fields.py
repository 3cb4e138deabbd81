"""config.json values, checked before they reach gin text.

Every value import reads from an HF config.json goes through `field` (a type check that
names the key and what it expects in one line) and is written into gin by
gin_utils.gin_literal, the one path by which any value reaches gin text.
bool is an int in Python, so every number check names the types it takes.
"""
import json
import math

from gptneo import gin_utils
from gptneo.errors import UserError

REQUIRED = object()


def is_int(value):
  return type(value) is int


def is_real(value):
  return type(value) in (int, float) and math.isfinite(value)


BOOL = (lambda value: type(value) is bool, "true or false")
POSITIVE_INT = (lambda value: is_int(value) and value > 0, "a positive integer")
OPTIONAL_POSITIVE_INT = (lambda value: value is None or POSITIVE_INT[0](value),
                         "null or a positive integer")
POSITIVE_REAL = (lambda value: is_real(value) and value > 0, "a positive number")
FRACTION = (lambda value: is_real(value) and 0 < value <= 1, "a number in (0, 1]")
PROBABILITY = (lambda value: is_real(value) and 0 <= value < 1, "a number in [0, 1)")
OBJECT = (lambda value: type(value) is dict, "an object")


def one_of(names):
  """A check accepting the strings in `names`."""
  return (lambda value: type(value) is str and value in names, f"one of {sorted(names)}")


def equal_to(expected, meaning):
  """A check accepting `expected` only; `meaning` says why (what ours computes)."""
  return (lambda value: value == expected and type(value) is type(expected),
          f"{json.dumps(expected)} ({meaning})")


def json_type(value):
  """The JSON name of a json.load value's type, for error messages."""
  names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
           dict: "object", type(None): "null"}
  return names.get(type(value), type(value).__name__)


def field(config, path, key, check, default=REQUIRED):
  """config[key] (`default` if absent) once `check` accepts it; else a one-line UserError."""
  if key not in config:
    if default is REQUIRED:
      raise UserError(f"{path} lacks {key}; every HF config.json of this architecture has it")
    return default
  value = config[key]
  accepts, expected = check
  if not accepts(value):
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    raise UserError(f"{path}: {key} = {shown} (a JSON {json_type(value)}), expected "
                    f"{expected}; fix config.json")
  return value


class Reference(gin_utils.Reference):
  """A gin reference to one of our configurables, named without its @ (`mlp`,
  `LearnedPositions()`): never config.json text."""

  def __init__(self, name):
    super().__init__("@" + name)
