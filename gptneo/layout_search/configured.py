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
  work = cost_model.Workload.of(gpt_lib.GPT(), batch)
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
        recompute=None):
  """Searches for the parsed gin config; returns (workload, Result).

  recompute: None lets the search decide per candidate (no recompute if it fits), unless the
  config already sets GPT.recompute_grad = True; True or False fixes it.
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
  if recompute is None and work.recompute:
    recompute = True  # the config recomputes already: cost it so
  hardware = cost_model.Hardware(device_memory, device_flops, link_bandwidth)
  return work, search_lib.search(work, hardware, devices, shape, time_limit, recompute)


def report(work, result):
  """Human-readable: the top candidates and why the first won."""
  fmt = search_lib
  lines = [f"model: {work.num_parameters() / 1e9:.2f}B parameters, batch {work.batch}, "
           f"optimizer {work.optimizer}; searched {result.shapes_searched} mesh shapes in "
           f"{result.seconds:.1f}s",
           f"{'mesh':<12} {'layout':<36} {'micro':>5} {'recomp.':>7} {'params+opt':>11} "
           f"{'activ.':>10} {'comm/step':>10} {'est. step':>10}"]
  for c in result.candidates[:TOP]:
    lines.append(f"{fmt.format_mesh(c.mesh_shape) or '-':<12} "
                 f"{fmt.format_layout(c.layout) or '-':<36} {c.microbatches:>5} "
                 f"{'yes' if c.recompute else 'no':>7} "
                 f"{fmt.format_bytes(c.param_bytes):>11} {fmt.format_bytes(c.activation_bytes):>10}"
                 f" {c.comm_bytes / 2 ** 30:>7.1f}GiB {c.step_seconds:>9.3f}s")
  return "\n".join(lines + explain(work, result.candidates[0]))


def explain(work, best):
  sizes = dict(best.mesh_shape)
  split = ", ".join(f"{d} {sizes[m]}-way over {m}" for d, m in best.layout) or "nothing"
  model_split = [d for d, _ in best.layout if d != "batch"]
  lines = [f"chosen: splits {split}.",
           f"  weights + optimizer state + gradients: {search_lib.format_bytes(best.param_bytes)}"
           f" per device" + (f" (split by {'/'.join(model_split)})" if model_split else
                             " (replicated: data parallel only)"),
           f"  activations: {search_lib.format_bytes(best.activation_bytes)} per device with "
           f"{best.microbatches} microbatch(es) of {work.batch // best.microbatches} sequences"
           + (", recomputed per layer on the backward pass (GPT.recompute_grad = True)"
              if best.recompute else ", kept for the backward pass (no recompute)"),
           _whole_dims_line(work, best)]
  if best.n_vocab != work.n_vocab:
    lines.append(f"  vocabulary padded from {work.n_vocab} to {best.n_vocab} (GPT.n_vocab) so it "
                 f"can be split: nothing fits with {work.n_vocab}")
  replicated = cost_model.estimate(work, cost_model.Hardware(1), (), ())
  if model_split:
    lines.append(f"  data parallel alone would hold {search_lib.format_bytes(replicated.param_bytes)}"
                 f" of weights + optimizer state + gradients on every device")
  return lines


def _whole_dims_line(work, best):
  first = [d for d in cost_model.SPLITTABLE if d in work.dim_sizes()]
  fallback = [d for d, _ in best.layout if d not in first]
  if fallback:
    return (f"  {'/'.join(fallback)} split only because no layout of "
            f"{'/'.join(first)} fits, even with recompute.")
  return "  sequence, memory and kv stay whole: splitting them is never needed first."


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
          f"step {best.step_seconds:.3f}s.\n"
          f"mesh.mesh_shape = {literal(search_lib.format_mesh(best.mesh_shape))}\n"
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
