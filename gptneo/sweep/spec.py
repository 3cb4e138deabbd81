"""What a sweep is: base gin files, fixed bindings and axes; expanded into named points.

A sweep file (gin/sweeps/*.gin) is a gin file with four more kinds of line:

  include 'tiny.gin'                                     # a base gin file   (--gin_file)
  train.train_steps = 300                                # a fixed binding   (--gin_param)
  axis learning_rate_schedule.learning_rate = [1e-3, 3e-3]              # grid  (--axis)
  axis GPT.n_embd, GPT.n_head = [64, 128], [2, 4]        # zipped: varied together
  axis gin_file = ['models/tiny.gin', 'models/gpt3_small.gin']          # over gin files
  random learning_rate_schedule.learning_rate = log_uniform(1e-4, 1e-2)   # (--random)
  random_points 8                                        # (--random_points, --random_seed)
  seeds 3                                                # train.seed 1234, 1235, 1236
  search tpe                                             # (--search: grid|random|tpe|cmaes)
  trials 20                                              # (--trials)
  pruner asha                                            # (--pruner: asha|hyperband|median|none)
  objective val_loss_final                               # (--objective)

The points are the cartesian product of the grid axes (the first varies slowest), the
random points and the seeds. Values are gin text, so `@relu` and `%MACRO` work as in gin.
With `search`, an Optuna sampler picks the points instead, one trial at a time, from the
same axes and distributions (gptneo/sweep/search.py).
"""
import dataclasses
import hashlib
import itertools
import json
import math
import random
import re
import tokenize

from gptneo import gin_utils
from gptneo.errors import UserError

GIN_FILE = "gin_file"  # the axis name that varies a base gin file instead of a binding
SEED = "train.seed"
SEED_KEY = "seed"  # its key in names and the report
FIRST_SEED = 1234  # train.seed's default: a one-seed sweep is the unswept run
DISTRIBUTIONS = ("choice", "uniform", "log_uniform")
SAMPLERS = ("grid", "random", "tpe", "cmaes")  # --search
PRUNERS = ("none", "asha", "hyperband", "median")  # --pruner
# The report's columns a search may minimize (or, tokens/s, maximize): its objective.
OBJECTIVES = {"val_loss_final": "minimize", "val_loss_best": "minimize", "train_loss": "minimize",
              "bits_per_byte": "minimize", "tokens_per_s": "maximize", "wall_time_s": "minimize"}
SEARCH_DEFAULTS = {"search": "", "trials": 0, "pruner": "none", "objective": "val_loss_final"}
SEARCH_NAMES = {"search": SAMPLERS, "pruner": PRUNERS, "objective": tuple(OBJECTIVES)}
# Short keys for the run dir names of the knobs swept most; any other knob is its last part.
SHORT_KEYS = {"learning_rate": "lr", "batch_size": "bs", "train_steps": "steps",
              "warmup_steps": "warmup", "weight_decay": "wd", GIN_FILE: "file"}


def check_name(field: str, value: str, shown: str) -> None:
  """UserError naming `shown` (how the user wrote it) unless `value` is a known `field`
  (SEARCH_NAMES: search, pruner or objective)."""
  if value not in SEARCH_NAMES[field]:
    raise UserError(f"{shown} is unknown; use one of {', '.join(SEARCH_NAMES[field])}")


_NAME = re.compile(r"^[A-Za-z_][\w./]*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+@-]+")
_MAX_NAME = 96


def parse_value(text, where):
  """A gin value as Python (references and macros as gin_utils.References)."""
  try:
    statements = gin_utils.statements(f"a.b = {text}", where)
  except (SyntaxError, ValueError, tokenize.TokenError) as error:
    raise UserError(f"{where}: {text!r} is not a gin value ({gin_utils.syntax_message(error)})"
                    ) from None
  if len(statements) != 1:
    raise UserError(f"{where}: {text!r} is not one gin value")
  try:
    gin_utils.gin_literal(statements[0].value)  # a point's bindings are written with it
  except TypeError:
    raise UserError(f"{where}: {text!r} holds a value gin can't write back; use numbers, "
                    f"strings, None, references and lists of them") from None
  return statements[0].value


@dataclasses.dataclass(frozen=True)
class Axis:
  """Bindings varied together: point i of the axis binds names[j] to values[i][j] (gin text)."""
  names: tuple
  values: tuple


@dataclasses.dataclass(frozen=True)
class RandomKnob:
  """One knob of the random search: a distribution and its arguments (gin text)."""
  name: str
  distribution: str
  args: tuple

  def draw(self, rng):
    """One value, as gin text; floats rounded to 3 significant digits (a readable name)."""
    u = rng.random()
    args = [parse_value(a, self.name) for a in self.args]
    if self.distribution == "choice":
      return self.args[min(int(u * len(args)), len(args) - 1)]
    low, high = args
    if self.distribution == "log_uniform":
      low, high = math.log(low), math.log(high)
    x = low + u * (high - low)
    x = math.exp(x) if self.distribution == "log_uniform" else x
    return gin_utils.gin_literal(float(f"{x:.3g}"))


def _names(text, where):
  names = tuple(n.strip() for n in text.split(","))
  for name in names:
    if not _NAME.match(name):
      raise UserError(f"{where}: {name!r} is not a gin binding name; write e.g. "
                      f"'GPT.n_embd = [64, 128]'")
  if len(set(names)) != len(names):
    raise UserError(f"{where}: a binding is named twice in {text.strip()!r}")
  return names


def _split_binding(text, where):
  if "=" not in text:
    raise UserError(f"{where}: {text!r} has no '='; write 'NAME = VALUES'")
  left, right = text.split("=", 1)
  return left, right.strip()


def parse_axis(text):
  """`NAME = [v, ...]`, or `A, B = [a, ...], [b, ...]` (zipped: equal lengths)."""
  where = f"axis {text.strip()!r}"
  left, right = _split_binding(text, where)
  names = _names(left, where)
  lists = parse_value(f"({right},)", where)
  if len(lists) != len(names) or not all(isinstance(v, list) for v in lists):
    raise UserError(f"{where}: give {len(names)} list(s) of values, one per name, e.g. "
                    f"'{', '.join(names)} = {', '.join(['[1, 2]'] * len(names))}'")
  lengths = sorted({len(v) for v in lists})
  if len(lengths) > 1:
    raise UserError(f"{where}: zipped lists have lengths {lengths}; give each the same "
                    f"number of values")
  if not lengths[0]:
    raise UserError(f"{where}: the axis is empty; give it at least one value")
  values = tuple(tuple(gin_utils.gin_literal(v) for v in point) for point in zip(*lists, strict=True))
  if len(set(values)) < len(values):
    raise UserError(f"{where}: a value is given twice; give each once")
  if GIN_FILE in names and not all(isinstance(v, str) for v in lists[names.index(GIN_FILE)]):
    raise UserError(f"{where}: the values of {GIN_FILE} must be file names in quotes")
  return Axis(names, values)


def parse_random(text):
  """`NAME = log_uniform(low, high)`, `uniform(low, high)` or `choice(v, ...)`."""
  where = f"random {text.strip()!r}"
  left, right = _split_binding(text, where)
  (name,) = _names(left, where)
  match = re.match(r"^(\w+)\s*\((.*)\)$", right, re.S)
  if not match or match.group(1) not in DISTRIBUTIONS:
    raise UserError(f"{where}: use one of {', '.join(d + '(...)' for d in DISTRIBUTIONS)}")
  distribution, args = match.group(1), parse_value(f"[{match.group(2)}]", where)
  _check_distribution(where, distribution, args)
  return RandomKnob(name, distribution, tuple(gin_utils.gin_literal(a) for a in args))


def _check_distribution(where, distribution, args):
  if distribution == "choice":
    if not args:
      raise UserError(f"{where}: choice() is empty; give it at least one value")
    return
  numbers = len(args) == 2 and all(isinstance(a, (int, float)) for a in args)
  if not numbers or not args[0] < args[1] or (distribution == "log_uniform" and args[0] <= 0):
    raise UserError(f"{where}: {distribution} takes two numbers low < high"
                    f"{' (low > 0)' if distribution == 'log_uniform' else ''}")


@dataclasses.dataclass(frozen=True)
class Spec:
  """A sweep, as given: base files, fixed bindings, axes, random search and seeds."""
  gin_files: tuple = ()
  gin_params: tuple = ()
  axes: tuple = ()
  random: tuple = ()
  random_points: int = 0
  random_seed: int = 0
  seeds: int = 1
  search: str = ""  # an Optuna sampler (SAMPLERS) picks the points; "": they are enumerated
  trials: int = 0
  pruner: str = "none"
  objective: str = "val_loss_final"

  def to_json(self):
    """As sweep.json records it: the search fields only when set (older sweeps lack them)."""
    record = json.loads(json.dumps(dataclasses.asdict(self)))  # tuples as lists, as read back
    return {k: v for k, v in record.items() if k not in SEARCH_DEFAULTS or v != SEARCH_DEFAULTS[k]}

  def check(self):
    """The parts fit together: random knobs need points, each knob is swept once."""
    self._check_search()
    if self.random and self.random_points < 1 and not self.search:
      raise UserError("random knobs are given but random_points is 0; set --random_points "
                      "(or `random_points N` in the sweep file)")
    if self.random_points and not self.random:
      raise UserError(f"random_points {self.random_points} but no random knob; add one with "
                      f"--random='NAME = log_uniform(low, high)'")
    if self.seeds < 1:
      raise UserError(f"seeds {self.seeds}; use 1 or more")
    swept = [n for axis in self.axes for n in axis.names] + [k.name for k in self.random]
    swept += [SEED] if self.seeds > 1 else []
    twice = sorted({n for n in swept if swept.count(n) > 1 and n != GIN_FILE})
    if twice:
      raise UserError(f"{twice[0]} is swept by more than one axis; sweep each binding once "
                      f"(zip bindings that vary together: 'A, B = [..], [..]')")

  def _check_search(self):
    """search, trials, pruner and objective: known names, and only with a search."""
    for field in SEARCH_NAMES:
      value = getattr(self, field)
      if value or field != "search":  # "": no search
        check_name(field, value, f"{field} {value!r}")
    if not self.search:
      used = [f for f, default in SEARCH_DEFAULTS.items() if getattr(self, f) != default]
      if used:
        raise UserError(f"{used[0]} is given without a search; add --search=tpe (or "
                        f"`search tpe`), or drop it")
      return
    if self.trials < 0 or (self.search != "grid" and self.trials < 1):
      raise UserError(f"trials {self.trials} with search {self.search}; give --trials=N "
                      f"(N >= 1: the points the sampler picks)")
    if self.seeds > 1:
      raise UserError(f"seeds {self.seeds} with search {self.search}: a search picks one run "
                      f"per point; drop seeds (or bind train.seed)")
    if self.random_points:
      raise UserError(f"random_points {self.random_points} with search {self.search}: the "
                      f"search draws from the random knobs itself; give --trials instead")
    if self.pruner != "none" and OBJECTIVES[self.objective] != "minimize":
      raise UserError(f"pruner {self.pruner} stops points by their validation loss, but the "
                      f"objective {self.objective} is maximized; use --pruner=none")

  def all_axes(self):
    """The grid axes, then the random points as one axis, then the seeds."""
    axes = list(self.axes)
    if self.random:
      rng = random.Random(self.random_seed)
      draws = [tuple(k.draw(rng) for k in self.random) for _ in range(self.random_points)]
      axes.append(Axis(tuple(k.name for k in self.random), tuple(draws)))
    if self.seeds > 1:
      axes.append(Axis((SEED,), tuple((str(FIRST_SEED + i),) for i in range(self.seeds))))
    return axes

  def expand(self):
    """Every point of the sweep, in order, each with a unique readable name."""
    self.check()
    axes = self.all_axes()
    combos = itertools.product(*[range(len(axis.values)) for axis in axes])
    points = [_point(self, axes, i, combo) for i, combo in enumerate(combos)]
    _check_distinct(points)
    return _named(points)


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of the sweep: its gin files and bindings, and the axis values that made it."""
  index: int
  name: str
  values: tuple  # ((binding name or gin_file, gin text), ...) in axis order
  gin_files: tuple
  gin_params: tuple

  @property
  def labels(self):
    """{short key: value as in the name}, e.g. {"lr": "3e-3", "n_embd": "256"}."""
    keys = _keys([n for n, _ in self.values])
    return dict(zip(keys, (label(v) for _, v in self.values), strict=True))

  def to_json(self):
    return json.loads(json.dumps(dataclasses.asdict(self)))

  @classmethod
  def from_json(cls, record):
    return cls(record["index"], record["name"], tuple(map(tuple, record["values"])),
               tuple(record["gin_files"]), tuple(record["gin_params"]))


def point_of(spec, values, index):
  """One named point binding `values` (the values of each axis: (Axis, one value tuple))."""
  axes = [Axis(axis.names, (value,)) for axis, value in values]
  return _named([_point(spec, axes, index, (0,) * len(axes))])[0]


def _point(spec, axes, index, combo):
  values = tuple(pair for axis, i in zip(axes, combo, strict=True)
                 for pair in zip(axis.names, axis.values[i], strict=True))
  files = [parse_value(v, GIN_FILE) for n, v in values if n == GIN_FILE]
  bindings = [f"{n} = {v}" for n, v in values if n != GIN_FILE]
  return Point(index, "", values, tuple(spec.gin_files) + tuple(files),
               tuple(spec.gin_params) + tuple(bindings))


def _check_distinct(points):
  seen = {}
  for point in points:
    first = seen.setdefault((point.gin_files, point.gin_params), point)
    if first is not point:
      raise UserError(f"points {first.index} and {point.index} bind the same values "
                      f"({dict(point.values)}); a random choice drew them twice: change "
                      f"random_seed or random_points")


def _keys(names):
  """Short keys for the names: their last part (SHORT_KEYS abbreviated), unless ambiguous."""
  def short(name):
    last = name.rsplit(".", 1)[-1].rsplit("/", 1)[-1]
    return SHORT_KEYS.get(last, last)
  shorts = [short(n) for n in names]
  keys = [s if shorts.count(s) == 1 else n for s, n in zip(shorts, names, strict=True)]
  # Only gin_file may be swept twice (say, a model axis and a layout axis): number the others.
  return [k if not keys[:i].count(k) else f"{k}_{keys[:i].count(k) + 1}"
          for i, k in enumerate(keys)]


def label(text):
  """A value as a run dir name shows it: 3e-3, 256, tiny (a gin file's stem), relu."""
  value = parse_value(text, "value")
  if isinstance(value, float) and not isinstance(value, bool):
    return _number(value)
  if isinstance(value, str) and value.endswith(".gin"):
    return value.rsplit("/", 1)[-1][:-len(".gin")]
  return _UNSAFE.sub("_", value if isinstance(value, str) else gin_utils.gin_literal(value)).strip("_")


def _number(x):
  if x != 0 and (abs(x) < 0.1 or abs(x) >= 1e5):
    mantissa, exponent = f"{x:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
  return f"{x:.4g}"


def short_hash(point):
  text = json.dumps([point.gin_files, point.gin_params])
  return hashlib.sha1(text.encode()).hexdigest()[:6]


def _named(points):
  """Names like `lr=3e-3,n_embd=256`; a short hash where two would clash or one is long."""
  names = [",".join(f"{k}={v}" for k, v in p.labels.items()) or "base" for p in points]
  out = []
  for point, name in zip(points, names, strict=True):
    if names.count(name) > 1 or len(name) > _MAX_NAME:
      name = f"{name[:_MAX_NAME - 7]},{short_hash(point)}"
    out.append(dataclasses.replace(point, name=name))
  return out
