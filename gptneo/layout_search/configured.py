"""The search as the binaries run it: the workload from the parsed gin config, a report, a gin file.

Shared by bin/search_layout and bin/train --auto_layout / --auto_layout_and_mesh_shape.
"""
import math
import os

import gin

from gptneo import gin_utils
from gptneo import mesh as mesh_lib
from gptneo.errors import UserError
from gptneo.layout_search import cost_model
from gptneo.layout_search import search as search_lib
from gptneo.model import gpt as gpt_lib

TOP = 5


parse_bytes = cost_model.parse_bytes  # the flags' sizes, as memory_check reads them


def _query(name, default):
  try:
    return gin.query_parameter(name)
  except ValueError:
    return default


def workload_from_gin():
  """The model, batch and optimizer the parsed gin config would train (MoE included)."""
  batch = _query("train.batch_size", 8)
  if type(batch) is not int or batch < 1:
    raise UserError(f"train.batch_size = {batch!r}; it must be a positive integer")
  work = cost_model.Workload.of(gpt_lib.GPT(), batch,
                                precision=_query("train.precision", "float32"))
  return work.with_optimizer(*configured_optimizer())


def configured_optimizer():
  """train.optimizer, built as train would get it, and its name.

  Raises:
    UserError: it is unset, or can't say what state it keeps (no `slot_shapes`), so its
      memory can't be estimated.
  """
  reference = _query("train.optimizer", None)
  build = getattr(reference, "scoped_configurable_fn", None)
  if build is None:
    raise UserError("train.optimizer is unset; include optimizers/adam.gin (or "
                    "optimizers/adafactor.gin) or bind it, e.g. train.optimizer = @Adam()")
  name = reference.selector.split(".")[-1]
  optimizer = build()
  if not callable(getattr(optimizer, "slot_shapes", None)):
    raise UserError(f"train.optimizer = @{name}(): the layout search can't estimate its "
                    f"state, it has no slot_shapes(shape); use Adam or Adafactor, or add one")
  return optimizer, name.lower()


# The optimizers --optimizers may name: their class and the gin file that trains with them.
OPTIMIZERS = {"adam": "Adam", "adafactor": "Adafactor"}


def optimizer_workloads(work, names):
  """`work` with each optimizer --optimizers names (None: the configured one only).

  Args:
    work: the workload of the configured optimizer (workload_from_gin).
    names: "adam,adafactor" or a part of it, or None.

  Returns:
    [Workload], the configured optimizer's first if named.
  """
  if names is None:
    return [work]
  wanted = [name.strip().lower() for name in names.split(",") if name.strip()]
  unknown = [name for name in wanted if name not in OPTIMIZERS]
  if not wanted or unknown:
    raise UserError(f"--optimizers={names!r}; give a comma-separated list of "
                    f"{', '.join(OPTIMIZERS)}, e.g. --optimizers=adam,adafactor")
  from gptneo.optim import optimizers  # pylint: disable=g-import-not-at-top  (loads TensorFlow)
  return [work if name == work.optimizer else
          work.with_optimizer(getattr(optimizers, OPTIMIZERS[name])(), name)
          for name in dict.fromkeys(wanted)]


def check_mesh_shape(mesh_shape, devices):
  """A fixed --mesh_shape must use exactly the devices there are."""
  shape = tuple(mesh_lib.parse_mesh_shape(mesh_shape))
  names = [name for name, _ in shape]
  if len(set(names)) < len(names) or any(dim_size < 1 for _, dim_size in shape):
    raise UserError(f"--mesh_shape={mesh_shape!r}: each dimension needs its own name and a "
                    f"positive size, e.g. --mesh_shape=x:2,y:4")
  size = math.prod(dim_size for _, dim_size in shape)
  if devices and size != devices:
    raise UserError(f"mesh_shape {mesh_shape!r} has {size} positions but --devices={devices}; "
                    f"make their product {devices} or drop --mesh_shape")
  return shape


def run(devices, mesh_shape, device_memory, link_bandwidth, device_flops, time_limit,
        recompute=None, optimizers=None):
  """Searches for the parsed gin config; returns (workload, Result).

  Args:
    devices, mesh_shape, device_memory, link_bandwidth, device_flops, time_limit: as
      bin/search_layout's flags.
    recompute: None lets the search weigh both per candidate, unless the config already sets
      GPT.recompute_grad = True; True or False fixes it.
    optimizers: "adam,adafactor" (or one): the optimizers to weigh; None: the configured one.
  """
  if not time_limit > 0:  # nan too
    raise UserError(f"--time_limit={time_limit}; give the search a positive number of seconds")
  for flag, rate in (("--device_flops", device_flops), ("--link_bandwidth", link_bandwidth)):
    if not 0 < rate < math.inf:
      raise UserError(f"{flag}={rate}; give a positive, finite rate, e.g. {flag}=5e10")
  shape = check_mesh_shape(mesh_shape, devices) if mesh_shape else None
  if shape is None and (not devices or devices < 1):
    raise UserError(f"--devices={devices}; give a positive device count or a --mesh_shape")
  work = workload_from_gin()
  works = optimizer_workloads(work, optimizers)
  if recompute is None and work.recompute:
    recompute = True  # the config recomputes already: cost it so
  hardware = cost_model.Hardware(device_memory, device_flops, link_bandwidth)
  results, refusal = [], None
  for index, each in enumerate(works):  # an even share of the time for each optimizer
    try:
      results.append(search_lib.search(each, hardware, devices, shape,
                                       time_limit / len(works), recompute))
    except search_lib.NothingFits as error:
      refusal = refusal if index else error
  if not results:
    raise refusal
  candidates = sorted((c for r in results for c in r.candidates), key=search_lib.rank)
  return work, search_lib.Result(candidates, sum(r.seconds for r in results),
                                 max(r.shapes_searched for r in results))


def report(work, result):
  """Human-readable: the top candidates and why the first won.

  Every candidate's line has its estimated step and utilization: the compute-bound step
  (6 x parameters x tokens / (devices x device_flops)) over the estimated one.
  """
  fmt = search_lib
  best = result.candidates[0]
  lines = [f"model: {work.num_parameters() / 1e9:.2f}B parameters, batch {work.batch}, "
           f"optimizer {work.optimizer}; searched {result.shapes_searched} mesh shapes in "
           f"{result.seconds:.1f}s; compute-bound step {best.compute_bound_seconds:.3f}s",
           f"{'mesh':<13} {'layout':<38} {'micro':>5} {'recomp.':>7} {'optimizer':>9} "
           f"{'params+opt':>11} {'gathered':>9} {'activ.':>10} {'comm/step':>10} "
           f"{'est. step':>10} {'util.':>6}"]
  for c in result.candidates[:TOP]:
    lines.append(f"{fmt.format_mesh(c.mesh_shape) or '-':<13} "
                 f"{fmt.format_layout(c.layout) or '-':<38} {c.microbatches:>5} "
                 f"{'yes' if c.recompute else 'no':>7} {c.optimizer or work.optimizer:>9} "
                 f"{fmt.format_bytes(c.param_bytes):>11} "
                 f"{fmt.format_bytes(c.gathered_bytes).replace(' GiB', 'G'):>9} "
                 f"{fmt.format_bytes(c.activation_bytes):>10}"
                 f" {c.comm_bytes / 2 ** 30:>7.1f}GiB {c.step_seconds:>9.3f}s "
                 f"{c.utilization:>6.1%}")
  return "\n".join(lines + explain(work, best))


def explain(work, best):
  sizes = dict(best.mesh_shape)
  split = ", ".join(f"{d} {sizes[m]}-way over {m}" for d, m in best.layout) or "nothing"
  model_split = [d for d, _ in best.layout if d not in ("batch",) + cost_model.SHARDED_FORMS]
  lines = [f"chosen: splits {split}; estimated step {best.step_seconds:.3f}s, utilization "
           f"{best.utilization:.1%}.",
           f"  weights + optimizer state + gradients: {search_lib.format_bytes(best.param_bytes)}"
           f" per device" + _weights_split(best, model_split),
           *_sharding_lines(best)]
  if best.optimizer and best.optimizer != work.optimizer:
    lines.append(f"  optimizer {best.optimizer} instead of {work.optimizer}: the layout file "
                 f"includes optimizers/{best.optimizer}.gin")
  lines += [f"  activations: {search_lib.format_bytes(best.activation_bytes)} per device "
            f"with {best.microbatches} microbatch(es) of {work.batch // best.microbatches} sequences"
           + (", recomputed per layer on the backward pass (GPT.recompute_grad = True)"
              if best.recompute else ", kept for the backward pass (no recompute)"),
            _whole_dims_line(work, best)]
  if best.n_vocab != work.n_vocab:
    lines.append(f"  vocabulary padded from {work.n_vocab} to {best.n_vocab} (GPT.n_vocab) so it "
                 f"can be split: nothing fits with {work.n_vocab}")
  replicated = cost_model.estimate(work, cost_model.Hardware(1), (), ())
  if model_split or best.param_bytes < replicated.param_bytes:
    lines.append(f"  data parallel alone would hold {search_lib.format_bytes(replicated.param_bytes)}"
                 f" of weights + optimizer state + gradients on every device")
  return lines


def _weights_split(best, model_split):
  """How the chosen layout divides the weights, for `explain`."""
  parts = [f"split by {'/'.join(model_split)}"] if model_split else []
  parts += [f"sharded by {d}" for d, _ in best.layout if d in cost_model.SHARDED_FORMS]
  return f" ({', '.join(parts)})" if parts else " (replicated: data parallel only)"


def _sharding_lines(best):
  """What the fsdp or zero rule of the chosen layout costs (docs/large_models.md)."""
  form = dict(best.layout)
  if "fsdp" in form:
    return [f"  fsdp over {form['fsdp']}: weights, gradients and optimizer state stored sharded;"
            f" {search_lib.format_bytes(best.gathered_bytes)} of gathered weights alive at once"
            + (" (one block's, regathered in the backward pass)" if best.recompute else
               " (every block's, kept for the backward pass)")]
  if "zero" in form:
    return [f"  zero over {form['zero']}: optimizer state and gradients sharded, the updated "
            f"weights all-gathered once a step"]
  return []


def _whole_dims_line(work, best):
  first = [d for d in cost_model.SPLITTABLE if d in work.dim_sizes()]
  fallback = [d for d, _ in best.layout if d not in first + list(cost_model.SHARDED_FORMS)]
  if fallback:
    return (f"  {'/'.join(fallback)} split only because no layout of "
            f"{'/'.join(first)} fits, even with recompute.")
  return "  sequence, memory, kv and embd stay whole: splitting them is never needed first."


def default_output(gin_files, devices, mesh_shape):
  """bin/search_layout's file without --output: search_<model>_<devices>.gin in the working
  directory (not the checkout's gin/layouts/, which an update of the checkout owns)."""
  model = os.path.splitext(os.path.basename(gin_files[-1]))[0] if gin_files else "model"
  count = devices or mesh_shape.replace(":", "").replace(",", "_")
  return f"search_{model}_{count}.gin"


def gin_text(work, best, command):
  """The layout file bin/search_layout writes: `best`'s bindings, found by `command`."""
  literal = gin_utils.gin_literal  # names from the command line can't start a gin line
  return (f"# Found by: {literal(command)}\n"
          f"# Estimated per device: {search_lib.format_bytes(best.memory_bytes)} "
          f"({search_lib.format_bytes(best.param_bytes)} weights+optimizer+gradients), "
          f"step {best.step_seconds:.3f}s"
          + (f", utilization {best.utilization:.1%}" if hasattr(best, "utilization") else "")
          + ".\n"
          + (f"include 'optimizers/{best.optimizer}.gin'  # as costed\n"
             if getattr(best, "optimizer", "") not in ("", getattr(work, "optimizer", ""))
             else "")
          + f"mesh.mesh_shape = {literal(search_lib.format_mesh(best.mesh_shape))}\n"
          f"mesh.layout = {literal(search_lib.format_layout(best.layout))}\n"
          f"train.microbatches_per_batch = {literal(int(best.microbatches))}\n"
          + (f"GPT.n_vocab = {literal(int(best.n_vocab))}  # padded so `vocab` splits\n"
             if best.n_vocab != work.n_vocab else "")
          + (f"GPT.recompute_grad = {literal(bool(best.recompute))}  # as costed\n"
             if best.recompute != work.recompute else ""))


def bind(best):
  """Makes the parsed gin config train with `best` (used by bin/train --auto_layout)."""
  with gin.unlock_config():
    gin.bind_parameter("mesh.mesh_shape", search_lib.format_mesh(best.mesh_shape))
    gin.bind_parameter("mesh.layout", search_lib.format_layout(best.layout))
    gin.bind_parameter("train.microbatches_per_batch", best.microbatches)
    model = gpt_lib.GPT()
    if best.n_vocab != model.n_vocab:
      gin.bind_parameter("GPT.n_vocab", best.n_vocab)
    if best.recompute != model.recompute_grad:
      gin.bind_parameter("GPT.recompute_grad", best.recompute)


def auto_configure(search_mesh_shape, devices, device_memory, time_limit, recompute=None):
  """bin/train --auto_layout[_and_mesh_shape]: searches, logs the report, binds the best.

  Args:
    search_mesh_shape: also search the mesh shape (else keep mesh.mesh_shape).
    devices: device count for the shape search (default: the size of mesh.mesh_shape).
    device_memory: bytes of one device.
    time_limit: seconds the search may take.
    recompute: None: the search decides; True/False: fixed (bin/train --[no]recompute).

  Returns:
    The report, for the log.
  """
  mesh_shape = _query("mesh.mesh_shape", "")
  if not devices:
    devices = math.prod(size for _, size in check_mesh_shape(mesh_shape, None))
  if not search_mesh_shape and not mesh_shape:
    raise UserError("--auto_layout keeps mesh.mesh_shape, which is unset; set it or use "
                    "--auto_layout_and_mesh_shape --devices=N")
  work, result = run(devices, None if search_mesh_shape else mesh_shape, device_memory,
                     50e9, 50e12, time_limit, recompute)
  bind(result.candidates[0])
  return report(work, result)
