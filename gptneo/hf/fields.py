"""config.json values, checked before they reach gin text.

Every value import reads from an HF config.json goes through `field` (a type check that
names the key and what it expects in one line) and is written into gin by
gin_utils.gin_literal, the one path by which any value reaches gin text.
bool is an int in Python, so every number check names the types it takes.

Two kinds of refusal: a value no HF config of the architecture holds (a string for a count)
is a damaged file, to fix; a valid HF value ours does not compute (a parallel residual) is a
model that can't be imported (yet): editing the file would import a different model.
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


# A check is (accepts, expected) or (accepts, expected, valid): a value it refuses but `valid`
# accepts is a valid HF model ours does not compute, any other a damaged config.json.

def one_of(names):
  """A check accepting the strings in `names` (another string: a feature ours lacks)."""
  return (lambda value: type(value) is str and value in names, f"one of {sorted(names)}",
          lambda value: type(value) is str)


def equal_to(expected, meaning, valid=None):
  """A check accepting `expected` only; `meaning` says what ours computes. Another value
  `valid` accepts (default: one of expected's JSON type) is a model ours does not compute."""
  return (lambda value: value == expected and type(value) is type(expected),
          f"{json.dumps(expected)} ({meaning})",
          valid or (lambda value: type(value) is type(expected)))


def unsupported(path, problem):
  """The one-line refusal of a valid HF model ours does not compute: `problem` says what it
  has that ours lacks. Never "edit the file": that would import a different model."""
  return UserError(f"{path}: {problem}; this model can't be imported (yet)")


def culprit(error):
  """The first clause of a UserError's message (what is wrong, without the fix it suggests
  in its own context)."""
  return str(error).strip().splitlines()[0].split("; ")[0]


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
  accepts, expected, *valid = check
  if not accepts(value):
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    if valid and valid[0](value):
      raise unsupported(path, f"{key} = {shown}, but ours computes only {expected}")
    raise UserError(f"{path}: {key} = {shown} (a JSON {json_type(value)}), expected "
                    f"{expected}; fix config.json")
  return value


class Reference(gin_utils.Reference):
  """A gin reference to one of our configurables, named without its @ (`mlp`,
  `LearnedPositions()`): never config.json text."""

  def __init__(self, name):
    super().__init__("@" + name)
