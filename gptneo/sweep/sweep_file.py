"""Reading a sweep file (gin/sweeps/*.gin) and the command line into one Spec.

A statement is a line, continued while a bracket is open; `#` starts a comment outside
quotes. Each kind of line has a flag that does the same (see gptneo/sweep/spec.py).
"""
import pathlib
import tokenize

from gptneo import gin_utils
from gptneo.errors import UserError
from gptneo.sweep import spec as spec_lib

_OPEN, _CLOSE = "([{", ")]}"
_COUNTS = ("random_points", "random_seed", "seeds", "trials")
_WORDS = {"search": spec_lib.SAMPLERS, "pruner": spec_lib.PRUNERS,  # a one-word value
          "objective": tuple(spec_lib.OBJECTIVES)}


def _scan(line, depth):
  """(the line without its comment, bracket depth after it)."""
  quote = None
  for i, char in enumerate(line):
    if quote:
      quote = None if char == quote else quote
    elif char in "'\"":
      quote = char
    elif char == "#":
      return line[:i], depth
    else:
      depth += (char in _OPEN) - (char in _CLOSE)
  return line, depth


def statements(text, path):
  """(line number, statement text on one line) of a sweep file."""
  out, parts, depth, start = [], [], 0, 0
  for number, line in enumerate(text.splitlines(), 1):
    code, depth = _scan(line, depth)
    if not parts:
      start = number
    if code.strip() or parts:
      parts.append(code.strip())
    if parts and depth <= 0:
      out.append((start, " ".join(p for p in parts if p)))
      parts, depth = [], 0
  if parts:
    raise UserError(f"{path}:{start}: a bracket opened here is never closed")
  return out


def portable_gin_file(name):
  """A gin file as a point's command names it: shipped ones by their name in gin/, others
  by absolute path, so the command runs from any folder (a cluster node, xargs)."""
  gin_dir = gin_utils.shipped_gin_dir()
  path = pathlib.Path(name)
  if path.is_file():
    path = path.resolve()
    return str(path.relative_to(gin_dir)) if path.is_relative_to(gin_dir) else str(path)
  return name  # not here: the shipped one, or validation names it missing


def _portable_axis(axis):
  if spec_lib.GIN_FILE not in axis.names:
    return axis
  i = axis.names.index(spec_lib.GIN_FILE)
  values = tuple(v[:i] + (gin_utils.gin_literal(portable_gin_file(spec_lib.parse_value(
      v[i], "gin_file"))),)
                 + v[i + 1:] for v in axis.values)
  return spec_lib.Axis(axis.names, values)


def find(name):
  """A sweep file: as given (from the working directory), else in gin/ or gin/sweeps/."""
  gin_dir = gin_utils.shipped_gin_dir()
  for candidate in (pathlib.Path(name), *gin_utils.shipped_candidates(name, gin_dir),
                    gin_dir / "sweeps" / name):
    if candidate.is_file():
      return candidate
  raise UserError(f"sweep file {name!r} not found in the working directory, {gin_dir} or "
                  f"{gin_dir / 'sweeps'}")


def _count(where, keyword, rest):
  try:
    return int(rest)
  except ValueError:
    raise UserError(f"{where}: `{keyword} {rest}` needs a whole number") from None


def _statement(parts, where, text):
  """Adds one statement's part to `parts` (the Spec's fields, as lists)."""
  keyword, _, rest = text.partition(" ")
  if keyword == "include":
    value = spec_lib.parse_value(rest, where)
    if not isinstance(value, str):
      raise UserError(f"{where}: include takes a file name in quotes")
    parts["gin_files"].append(value)
  elif keyword == "axis":
    parts["axes"].append(_located(where, spec_lib.parse_axis, rest))
  elif keyword == "random":
    parts["random"].append(_located(where, spec_lib.parse_random, rest))
  elif keyword in _COUNTS:
    parts[keyword] = _count(where, keyword, rest.strip())
  elif keyword in _WORDS and rest.strip().isidentifier():
    if rest.strip() not in _WORDS[keyword]:
      raise UserError(f"{where}: {keyword} {rest.strip()!r} is unknown; use one of "
                      f"{', '.join(_WORDS[keyword])}")
    parts[keyword] = rest.strip()
  else:
    parts["gin_params"].append(_binding(where, text))


_LINES = ("a gin binding 'NAME = VALUE', include 'FILE', axis NAME = [VALUES], random NAME = "
          "log_uniform(LOW, HIGH), random_points N, random_seed N, seeds N, search SAMPLER, "
          "trials N, pruner PRUNER or objective COLUMN")


def _binding(where, text):
  """A fixed binding of a sweep file, checked as gin text naming bin/train's knobs."""
  try:
    statements = gin_utils.statements(text, where)
  except (SyntaxError, tokenize.TokenError) as error:
    raise UserError(f"{where}: {text!r} is no line of a sweep file (gin: "
                    f"{gin_utils.syntax_message(error)}); write {_LINES}") from None
  for statement in statements:
    if getattr(statement, "arg_name", None):
      _check_name(where, f"{statement.selector}.{statement.arg_name}", text)
  return text


def _check_name(where, name, text):
  """A binding name an axis, random knob or fixed binding sets must be one bin/train knows."""
  selector, _, parameter = name.rpartition(".")
  problem = selector and gin_utils.binding_problem(selector, parameter)
  if problem:
    raise UserError(f"{where}: {text.strip()!r} binds {name}, but {problem}")


def _located(where, parse, text):
  try:
    parsed = parse(text)
  except UserError as error:
    raise UserError(f"{where}: {error}") from None
  for name in getattr(parsed, "names", None) or [parsed.name]:
    if name != spec_lib.GIN_FILE:
      _check_name(where, name, text)
  return parsed


def read(path):
  """The Spec fields a sweep file gives, as lists (see `spec_from`).

  Args:
    path: the sweep file.

  Raises:
    UserError: the file is not text, or holds no statement (an empty file is a mistake: the
      sweep it was meant to hold would silently become the flags' alone).
  """
  try:
    text = pathlib.Path(path).read_text(encoding="utf-8")
  except UnicodeDecodeError:
    text = "\0"
  if "\0" in text:
    raise UserError(f"sweep file {path} is not text; name a sweep file (see gin/sweeps/)")
  parts = _empty()
  found = statements(text, path)
  if not found:
    raise UserError(f"sweep file {path} is empty (no statement); write its gin files and axes in it (see "
                    f"gin/sweeps/)")
  for number, statement in found:
    _statement(parts, f"{path}:{number}", statement)
  return parts


def _empty():
  return {"gin_files": [], "gin_params": [], "axes": [], "random": []}


def spec_from(sweep_file=None, gin_files=(), gin_params=(), axes=(), randoms=(), counts=None):
  """The sweep: a sweep file's statements, then the flags' (files, bindings, axes added).

  Args:
    sweep_file: a sweep file name (see `find`), or None.
    gin_files: --gin_file: base gin files after the sweep file's includes.
    gin_params: --gin_param: fixed bindings after the sweep file's.
    axes: --axis texts, e.g. "GPT.n_embd = [64, 128]".
    randoms: --random texts, e.g. "learning_rate_schedule.learning_rate = log_uniform(1e-4, 1e-2)".
    counts: {random_points, random_seed, seeds, search, trials, pruner, objective} given on
      the command line (None: unset).

  Returns:
    A checked spec.Spec.
  """
  parts = read(find(sweep_file)) if sweep_file else _empty()
  parts["gin_files"] += list(gin_files)
  parts["gin_params"] += list(gin_params)
  parts["axes"] += [_located("--axis", spec_lib.parse_axis, a) for a in axes]
  parts["random"] += [_located("--random", spec_lib.parse_random, r) for r in randoms]
  parts.update({k: v for k, v in (counts or {}).items() if v is not None})
  parts["gin_files"] = [portable_gin_file(f) for f in parts["gin_files"]]
  parts["axes"] = [_portable_axis(a) for a in parts["axes"]]
  spec = spec_lib.Spec(**{k: tuple(v) if isinstance(v, list) else v for k, v in parts.items()})
  spec.check()
  return spec
