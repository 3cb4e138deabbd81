"""Searches mesh shapes and layout rules with OR-Tools CP-SAT under the cost model.

For each mesh shape (a factorization of the device count into 1-3 named dimensions), each
form (weights replicated over the data axis, `zero`, `fsdp`: cost_model's docstring), with
and without activations recomputed, and the fewest microbatches that fit (bisected), one small CP-SAT
model picks for every splittable tensor dimension at most one mesh dimension, such that the
split divides the dimension, no tensor has two dimensions on one mesh dimension, a sharded
form's pseudo dimension sits on the mesh dimension of `batch`, and the per-device memory
fits; it minimizes the estimated step time. The best solutions are re-evaluated exactly
(cost_model.estimate, the same terms) and ranked. The whole search, including starting a
solver process when TensorFlow was loaded first, keeps to its time limit.
"""
import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import time

# CP-SAT's protobuf and TensorFlow's clash when TF was loaded first: any Solve() then
# segfaults, whatever `num_workers`. Loaded the other way round, both work. Note which it is.
SOLVER_SAFE_IN_PROCESS = not ("tensorflow" in sys.modules
                              and "ortools.sat.python.cp_model" not in sys.modules)
from ortools.sat.python import cp_model  # noqa: E402  pylint: disable=g-import-not-at-top

from gptneo.errors import UserError  # noqa: E402  pylint: disable=g-import-not-at-top
from gptneo.layout_search import cost_model  # noqa: E402  pylint: disable=g-import-not-at-top

MESH_DIM_NAMES = ("x", "y", "z")
PICOSECONDS = 1e12  # the solver's unit of time: integers, fine enough for a tiny model


class NothingFits(UserError):
  """No mesh shape and layout fits the memory budget (or none was found in time): the user
  adds devices, memory or time, so the programs report it in one line."""


def single_worker_solver(time_limit):
  """CP-SAT with one search worker: its parallel workers segfault in a process that loaded TF."""
  if not SOLVER_SAFE_IN_PROCESS:
    raise RuntimeError("CP-SAT would segfault: TensorFlow was imported before OR-Tools; import "
                       "gptneo.layout_search before TensorFlow, or call search.search()")
  solver = cp_model.CpSolver()
  solver.parameters.num_workers = 1
  solver.parameters.max_time_in_seconds = max(time_limit, 0.01)
  return solver


def mesh_shapes(devices, max_dims=3):
  """Every way to write `devices` as a product of 1..max_dims factors >= 2, largest first."""
  shapes = set()

  def extend(remaining, factors):
    if remaining == 1:
      shapes.add(tuple(factors))
      return
    if len(factors) == max_dims:
      return
    for factor in range(2, remaining + 1):
      if remaining % factor == 0 and (not factors or factor <= factors[-1]):
        extend(remaining // factor, factors + [factor])

  extend(devices, [])
  named = [tuple(zip(MESH_DIM_NAMES, shape, strict=False)) for shape in sorted(shapes)]
  return named or [()]


@dataclasses.dataclass
class _Model:
  """One CP-SAT model: `assign[(tensor dim, mesh dim)]` booleans and its cost expressions."""
  model: cp_model.CpModel
  assign: dict
  memory: cp_model.LinearExpr
  step_time: cp_model.LinearExpr


def _build(work, hardware, mesh_shape, memory_limit, splittable, data_dim=None):
  model = cp_model.CpModel()
  sizes, dims = dict(mesh_shape), work.dim_sizes()
  assign = {(d, m): model.NewBoolVar(f"{d}_on_{m}") for d in splittable
            for m in sizes if dims[d] % sizes[m] == 0}
  for d in splittable:  # each tensor dimension on at most one mesh dimension
    model.AddAtMostOne(v for (td, _), v in assign.items() if td == d)
  if work.sharding:  # the form's pseudo dim on exactly one mesh dimension, batch's
    model.AddExactlyOne(v for (td, _), v in assign.items() if td == work.sharding)
    for (td, m), v in assign.items():
      if td == work.sharding:
        model.AddImplication(v, assign[("batch", m)]) if ("batch", m) in assign else (
            model.Add(v == 0))
        if data_dim is not None and m != data_dim:
          model.Add(v == 0)
  for a, b in cost_model.conflicts(work):
    for m in sizes:
      if (a, m) in assign and (b, m) in assign:
        model.AddBoolOr([assign[a, m].Not(), assign[b, m].Not()])
  max_split = max(sizes.values(), default=1)
  split = {}
  for d in splittable:
    split[d] = model.NewIntVar(1, max_split, f"split_{d}")
    model.Add(split[d] == 1 + sum((sizes[m] - 1) * v for (td, m), v in assign.items()
                                  if td == d))
  # Memory in bytes; FLOPs and communicated bytes as the picoseconds they take.
  units = {**dict.fromkeys(cost_model.MEMORY_KINDS, 1),
           "flops": PICOSECONDS / hardware.device_flops,
           "comm": PICOSECONDS / hardware.link_bandwidth}
  totals = {kind: 0 for kind in units}
  for index, term in enumerate(cost_model.terms(work)):
    totals[term.kind] += _term_expression(model, term, units[term.kind], split, max_split,
                                          index)
  memory = sum(totals[kind] for kind in cost_model.MEMORY_KINDS)
  if memory_limit is not None:
    model.Add(memory <= int(memory_limit))
  return _Model(model, assign, memory, totals["flops"] + totals["comm"])


def _term_expression(model, term, unit, split, max_split, index):
  """unit * coefficient / prod(split): a constant divided by a product of split variables."""
  numerator = abs(round(term.coefficient * unit))
  dims = [d for d in term.dims if d in split]  # the others stay whole: split 1
  if not dims:
    return int(math.copysign(numerator, term.coefficient))
  product = model.NewIntVar(1, max_split ** len(dims), f"prod_{index}")
  model.AddMultiplicationEquality(product, [split[d] for d in dims])
  quotient = model.NewIntVar(0, numerator, f"quot_{index}")
  model.AddDivisionEquality(quotient, numerator, product)
  return quotient if term.coefficient >= 0 else -quotient


def solve_layout(work, hardware, mesh_shape, time_limit, memory_limit=True,
                 splittable=cost_model.SPLITTABLE, clock=None, data_dim=None):
  """The best layout for one mesh shape, or None if nothing fits (or time ran out).

  Time running out (rather than proven infeasibility) is noted on `clock`. `data_dim` pins
  a sharded form (and so batch) to that mesh dimension.
  """
  splittable = tuple(d for d in splittable if d in work.dim_sizes()
                     and not (work.sharding and d in cost_model.NOT_WITH_SHARDING))
  splittable += (work.sharding,) if work.sharding else ()
  built = _build(work, hardware, mesh_shape,
                 hardware.device_memory if memory_limit else None, splittable, data_dim)
  built.model.Minimize(built.step_time if memory_limit else built.memory)
  solver = single_worker_solver(time_limit)
  status = solver.Solve(built.model)
  if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
    if status == cp_model.UNKNOWN and clock:
      clock.expired = True
    return None
  layout = tuple((d, m) for (d, m), v in built.assign.items() if solver.Value(v))
  return cost_model.estimate(work, hardware, mesh_shape, layout)


def microbatch_counts(batch):
  """Every divisor of the batch, smallest first: gradient accumulation trades steps for
  activation memory (GPT-3's 1536 = 3 x 512 needs the 3s)."""
  return [count for count in range(1, batch + 1) if batch % count == 0]


@dataclasses.dataclass
class Result:
  candidates: list  # Estimates that fit, fastest first
  seconds: float  # the search's own wall time
  shapes_searched: int


class Clock:
  """A deadline, and whether running out of time cut any part of the search short."""

  def __init__(self, deadline):
    self.deadline, self.expired = deadline, False

  def left(self):
    left = self.deadline - time.monotonic()
    if left <= 0:
      self.expired = True
    return left


def recompute_options(recompute):
  """None: the search weighs both; True/False: fixed."""
  return (False, True) if recompute is None else (bool(recompute),)


FORMS = ("",) + cost_model.SHARDED_FORMS  # weights replicated over the data axis, then sharded


def search(work, hardware, devices=None, mesh_shape=None, time_limit=30.0, recompute=None,
           forms=FORMS):
  """Ranks the fitting (mesh shape, layout, microbatches, recompute) by estimated step time.

  Solves in this process if that is safe (OR-Tools loaded before TensorFlow), else in a
  child Python that never loads TensorFlow; `time_limit` includes starting that child.

  Args:
    work: a cost_model.Workload (its `microbatches`, `recompute` and `sharding` are ignored:
      the search picks them).
    hardware: a cost_model.Hardware.
    devices: the device count whose factorizations to try (unless mesh_shape is given).
    mesh_shape: a fixed mesh shape, ((name, size), ...).
    time_limit: seconds for the whole search; it stops early with what it has.
    recompute: None weighs each layout with and without recomputing activations; True or
      False fixes it.
    forms: the sharded forms to weigh ("" for none, "zero", "fsdp": cost_model).

  Returns:
    A Result.

  Raises:
    NothingFits: no candidate fits (the message names the smallest requirement found), or
      none was found in time (it says to raise the time limit).
  """
  if not SOLVER_SAFE_IN_PROCESS:
    return _search_in_child(work, hardware, devices, mesh_shape, time_limit, recompute, forms)
  return _search(work, hardware, devices, mesh_shape, time.monotonic() + time_limit, recompute,
                 time_limit, forms)


def _search(work, hardware, devices, mesh_shape, deadline, recompute, time_limit, forms=FORMS):
  start, clock = time.monotonic(), Clock(deadline)
  shapes = [tuple(mesh_shape)] if mesh_shape is not None else mesh_shapes(devices)
  variants = [work] + ([cost_model.padded_vocab(work)]
                       if cost_model.padded_vocab(work) != work else [])
  options = [(form, r) for form in forms for r in recompute_options(recompute)]
  splittable, steps, candidates = (), len(cost_model.TIERS) * len(variants), []
  for tier in cost_model.TIERS:  # the next tier's dimensions only if nothing fits without
    splittable += tier
    for variant in variants:  # and a padded vocabulary only if the real one doesn't fit
      steps -= 1
      share = Clock(time.monotonic() + max(clock.left(), 0) / (steps + 1))
      candidates, searched = _search_shapes(variant, hardware, shapes, splittable, share,
                                            options)
      clock.expired |= share.expired
      if candidates:
        break
    if candidates:
      break
  if not candidates:
    raise NothingFits(_nothing_fits_message(variants[-1], hardware, shapes, clock, splittable,
                                            time_limit, max(recompute_options(recompute)),
                                            forms))
  candidates.sort(key=rank)
  return Result(candidates, time.monotonic() - start, searched)


def rank(candidate):
  """Fastest first; on a tie, no recompute, fewer microbatches, less memory."""
  return (candidate.step_seconds, candidate.recompute, candidate.microbatches,
          candidate.memory_bytes)


def _search_shapes(work, hardware, shapes, splittable, clock, options):
  """The fastest fitting layout of each shape and option, searched until the clock's deadline."""
  candidates, searched = [], 0
  for shape in shapes:
    left = clock.left()
    if left <= 0:
      break
    candidates += _fastest_fitting(work, hardware, shape, Clock(
        time.monotonic() + left / (len(shapes) - searched)), splittable, options, clock)
    searched += 1
  return candidates, searched


def _fastest_fitting(work, hardware, shape, share, splittable, options, clock):
  """For each (form, recompute): the fewest microbatches that fit, then the fastest layout."""
  found = []
  for index, (form, recompute) in enumerate(options):
    option = Clock(time.monotonic() + max(share.left(), 0) / (len(options) - index))

    def solve(count, data_dim=None, form=form, recompute=recompute, option=option):
      left = option.left()
      if left <= 0:
        clock.expired = True
        return None
      return solve_layout(dataclasses.replace(work, microbatches=count, recompute=recompute,
                                              sharding=form), hardware, shape, left,
                          splittable=splittable, clock=clock, data_dim=data_dim)
    if not form:  # from one microbatch up, the first that fits
      best = next(filter(None, map(solve, microbatch_counts(work.batch))), None)
      found += [best] if best else []
      continue
    fitting = [_fewest_fitting(functools.partial(solve, data_dim=name), work.batch, size)
               for size, name in {size: name for name, size in shape}.items()]
    fitting = [best for best in fitting if best]
    found += [min(fitting, key=rank)] if fitting else []
  return found


def _fewest_fitting(solve, batch, size):
  """A sharded form with batch on a mesh dimension of `size`: memory falls as microbatches
  rise, so the most that leave `size` dividing a microbatch are tried first (an option that
  can't fit costs one solve), then a bisection finds the fewest that fit."""
  counts = [count for count in microbatch_counts(batch) if (batch // count) % size == 0]
  best = counts and solve(counts[-1])
  low, high = 0, len(counts) - 1  # counts[high] fits
  while best and low < high:
    middle = (low + high) // 2
    fits = solve(counts[middle])
    if fits:
      best, high = fits, middle
    else:
      low = middle + 1
  return best


def _nothing_fits_message(work, hardware, shapes, clock, splittable, time_limit, recompute,
                          forms=FORMS):
  """Names the smallest per-device memory any shape and form needs, with the most microbatches."""
  if clock.expired:
    return (f"no layout found that fits within --time_limit={time_limit:g}s (the search was cut "
            f"short); raise --time_limit")
  most = [dataclasses.replace(work, microbatches=microbatch_counts(work.batch)[-1],
                              recompute=recompute, sharding=form) for form in forms]
  smallest, tries = None, [(shape, form) for shape in shapes for form in most]
  for index, (shape, form) in enumerate(tries):
    left = clock.left() / (len(tries) - index)
    found = left > 0 and solve_layout(form, hardware, shape, left, memory_limit=False,
                                      splittable=splittable)
    if found and (smallest is None or found.memory_bytes < smallest.memory_bytes):
      smallest = found
  if smallest is None:
    return (f"no layout found within --time_limit={time_limit:g}s; raise --time_limit")
  return (f"nothing fits {format_bytes(hardware.device_memory)} per device: the smallest "
          f"need found is {format_bytes(smallest.memory_bytes)} (mesh "
          f"{format_mesh(smallest.mesh_shape)}, layout {format_layout(smallest.layout)}, "
          f"{smallest.microbatches} microbatches{', recompute' if recompute else ''}); add "
          f"devices or raise --device_memory")


format_bytes = cost_model.format_bytes


def format_mesh(shape):
  return ",".join(f"{name}:{size}" for name, size in shape)


def format_layout(layout):
  return ",".join(f"{tensor_dim}:{mesh_dim}" for tensor_dim, mesh_dim in layout)


CHILD_GRACE = 10.0  # seconds past the limit before a child that hangs is killed


def _search_in_child(work, hardware, devices, mesh_shape, time_limit, recompute, forms):
  """The search in a fresh Python; the deadline is set now, so its start-up counts."""
  request = {"work": dataclasses.asdict(work), "hardware": dataclasses.asdict(hardware),
             "devices": devices, "mesh_shape": mesh_shape, "recompute": recompute,
             "deadline": time.time() + time_limit, "time_limit": time_limit,
             "forms": list(forms)}
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  try:
    child = subprocess.run([sys.executable, "-m", "gptneo.layout_search.search"], env=env,
                           input=json.dumps(request), capture_output=True, text=True,
                           check=False, timeout=time_limit + CHILD_GRACE)
  except subprocess.TimeoutExpired:
    raise RuntimeError(f"the layout search process outlived --time_limit={time_limit:g}s by "
                       f"{CHILD_GRACE:g}s and was killed") from None
  if child.returncode:
    raise RuntimeError(f"the layout search process failed: {child.stderr[-2000:]}")
  answer = json.loads(child.stdout)
  if "nothing_fits" in answer:
    raise NothingFits(answer["nothing_fits"])
  candidates = [_estimate_from_json(c) for c in answer["candidates"]]
  return Result(candidates, answer["seconds"], answer["shapes_searched"])


def _estimate_from_json(fields):
  fields = dict(fields, mesh_shape=tuple(map(tuple, fields["mesh_shape"])),
                layout=tuple(map(tuple, fields["layout"])))
  return cost_model.Estimate(**fields)


def _serve_one_request():
  """The child's side: a JSON request on stdin, the Result as JSON on stdout."""
  request = json.load(sys.stdin)
  shape = request["mesh_shape"] and tuple(map(tuple, request["mesh_shape"]))
  # The parent's wall-clock deadline, on this process's monotonic clock.
  deadline = time.monotonic() + request["deadline"] - time.time()
  try:
    result = _search(cost_model.Workload(**request["work"]),
                     cost_model.Hardware(**request["hardware"]), request["devices"],
                     shape or None, deadline, request["recompute"], request["time_limit"],
                     tuple(request["forms"]))
  except NothingFits as error:
    json.dump({"nothing_fits": str(error)}, sys.stdout)
    return
  json.dump({"candidates": [dataclasses.asdict(c) for c in result.candidates],
             "seconds": result.seconds, "shapes_searched": result.shapes_searched}, sys.stdout)


if __name__ == "__main__":
  _serve_one_request()
