"""Model FLOPs per token, the devices' peak, and MFU: what a training log line reports.

MFU (model FLOPs utilization, PaLM's appendix B) = tokens/s x training FLOPs per token / the
peak FLOP/s of the devices. Training FLOPs are 3 x the forward's (backward: twice the
forward), 2 per multiply-add, counted from the model as it computes: every weight matrix a
token goes through, the output projection, and per attention layer the keys each query is
scored against (all n_ctx for a global layer, masked ones included since the kernel computes
them; 2 x window_size for a local one; d_head-wide running sums for a linear one). A
recomputed forward (GPT.recompute_grad) is not model FLOPs and is not counted.

The peak: `train.peak_flops`, a number (FLOP/s per device) or a device name of PEAK_FLOPS.
Unset, a CPU mesh uses this machine's matmul rate at the run's activation precision (float32,
or bfloat16 for `train.precision = "bfloat16"`: oneDNN runs it about twice as fast on CPUs
with AVX512_BF16 or AMX, and slower than float32 on those without); half a second to measure,
the first few runs measure it and the best is cached per machine (the cores we may use) and
precision, only when other processes left those cores alone meanwhile. A GPU is
looked up by its name; a TPU must be named (its runtime does not say which chip it is).
"""
import json
import os
import platform
import time

import numpy as np

from gptneo.errors import UserError
from gptneo.model import attention
from gptneo.model import feedforward

# Dense bf16 FLOP/s per chip (TPU) or GPU, without sparsity.
PEAK_FLOPS = {
    "tpu_v2": 45e12,   # cloud.google.com/tpu/docs/v2: 45 TFLOP/s per chip
    "tpu_v3": 123e12,  # cloud.google.com/tpu/docs/v3: 123 TFLOP/s per chip
    "tpu_v4": 275e12,  # cloud.google.com/tpu/docs/v4: 275 TFLOP/s per chip
    "tpu_v5e": 197e12,  # cloud.google.com/tpu/docs/v5e: 197 TFLOP/s per chip
    "tpu_v5p": 459e12,  # cloud.google.com/tpu/docs/v5p: 459 TFLOP/s per chip
    "tpu_v6e": 918e12,  # cloud.google.com/tpu/docs/v6e: 918 TFLOP/s per chip
    "a100": 312e12,    # NVIDIA A100 datasheet: 312 TFLOP/s bf16 tensor core, dense
    "h100": 989e12,    # NVIDIA H100 SXM datasheet: 989 TFLOP/s bf16 tensor core, dense
}
_GPU_NAMES = {"A100": "a100", "H100": "h100"}  # a substring of TF's device name -> its kind
RATE_CACHE = "matmul_rate_v2.json"  # v1 kept rates measured under load: not read again
MEASUREMENTS = 3  # runs that measure the CPU's rate before the cached best is trusted
MAX_OTHERS_SHARE = 0.1  # of our cores' time used by other processes: more, and not cached


def attended_keys(layer_type, n_ctx, window_size, d_head):
  """How many keys one query of a layer is scored against (the width of its q.k and p.v)."""
  kind = attention.lookup(layer_type)
  if kind.decode == "linear":
    return d_head  # the [kv, kv] running sum stands in for the keys
  if kind.windowed and window_size < n_ctx:
    return 2 * window_size  # a block of queries sees its own block and the one before
  return n_ctx


def forward_flops_per_token(model):
  """The forward pass's FLOPs (2 per multiply-add) for one token of a full context."""
  e, m, d_head = model.n_embd, model.mlp_ratio * model.n_embd, model.n_embd // model.n_head
  ff_matrices = feedforward.INPUT_PROJECTIONS[model.feed_forward.__name__] + 1
  moe_layers = set(model.moe.layers) if model.moe is not None else set()
  total = 2 * e * model.n_vocab  # the output projection
  for layer, layer_type in enumerate(model.layer_types):
    total += 2 * 4 * e * e  # q, k, v and out
    total += 2 * 2 * e * attended_keys(layer_type, model.n_ctx, model.window_size, d_head)
    if layer in moe_layers:  # the router, then one expert's MLP (top-1)
      total += 2 * e * model.moe.num_experts + 2 * 2 * e * m
    else:
      total += 2 * ff_matrices * e * m
  return total


def training_flops_per_token(model):
  return 3 * forward_flops_per_token(model)


def peak_flops(spec, setting=None, cache_dir=None, precision="float32"):
  """The mesh's peak FLOP/s, or None if unknown (MFU is then not reported).

  Args:
    spec: the MeshSpec trained on.
    setting: train.peak_flops: None, a number (per device) or a key of PEAK_FLOPS.
    cache_dir: where the measured CPU rate is cached (default: storage's cache root).
    precision: the activations' precision, "float32" or "bfloat16": the dtype a CPU's
      matmul rate is measured in.
  """
  check_peak_setting(setting)
  if isinstance(setting, str):
    return PEAK_FLOPS[setting] * spec.size
  if setting is not None:
    return float(setting) * spec.size
  if spec.device_type == "cpu":  # the mesh's CPU devices share this machine's cores
    return cpu_matmul_rate(cache_dir, precision)
  if spec.device_type == "gpu":
    kind = _gpu_kind()
    return PEAK_FLOPS[kind] * spec.size if kind else None
  return None


def check_peak_setting(setting):
  """A one-line UserError unless train.peak_flops is None, a positive number or a device."""
  if isinstance(setting, str) and setting not in PEAK_FLOPS:
    raise UserError(f"train.peak_flops = {setting!r} is no device we know; use a number "
                    f"(FLOP/s per device) or one of {sorted(PEAK_FLOPS)}")
  if setting is not None and not isinstance(setting, str) and (
      isinstance(setting, bool) or not isinstance(setting, (int, float)) or setting <= 0):
    raise UserError(f"train.peak_flops = {setting!r}; it must be a positive FLOP/s per "
                    f"device, a device name of {sorted(PEAK_FLOPS)}, or None")


def _gpu_kind():
  from gptneo.compat import tf  # pylint: disable=g-import-not-at-top
  for device in tf.config.list_physical_devices("GPU"):
    name = tf.config.experimental.get_device_details(device).get("device_name", "")
    for part, kind in _GPU_NAMES.items():
      if part in name:
        return kind
  return None


def machine_key():
  """What a measured rate is valid for: the CPU model, the cores we may use, TF's version."""
  from gptneo.compat import tf  # pylint: disable=g-import-not-at-top
  model = platform.processor() or "cpu"
  try:
    with open("/proc/cpuinfo") as f:
      model = next((line.split(":", 1)[1].strip() for line in f
                    if line.startswith("model name")), model)
  except OSError:
    pass
  return f"{model}|{len(os.sched_getaffinity(0))} cores|tf {tf.__version__}"


def cpu_matmul_rate(cache_dir=None, precision="float32"):
  """This machine's matmul FLOP/s in TF on the cores we may use, cached per machine.

  A neighbour busy on our cores during a measurement lowers it (a sweep's parallel points:
  MFU above 100% for good), so a measurement is cached only if other processes used less
  than MAX_OTHERS_SHARE of those cores meanwhile; a loaded one serves this run alone. The
  first MEASUREMENTS unloaded measurements are kept at their best; later runs only read it.

  Args:
    cache_dir: the cache root (default: storage's).
    precision: "float32" or "bfloat16", the dtype of the measured matmul.
  """
  from gptneo import storage  # pylint: disable=g-import-not-at-top
  path = os.path.join(storage.cache_dir_of(cache_dir), RATE_CACHE)
  key, rates = machine_key(), {}
  key = key if precision == "float32" else f"{key}|{precision}"
  try:
    with open(path) as f:
      rates = json.load(f)
  except (OSError, ValueError):
    pass
  rates = rates if isinstance(rates, dict) else {}
  entry = rates.get(key)
  if not (isinstance(entry, dict) and isinstance(entry.get("rate"), (int, float))
          and isinstance(entry.get("samples"), int)):
    entry = {"rate": 0.0, "samples": 0}
  if entry["samples"] < MEASUREMENTS:
    cores = os.sched_getaffinity(0)
    before = _core_times(cores), os.times()
    rate = measure_matmul_rate(precision=precision)
    others = others_share(before, (_core_times(cores), os.times()))
    if others is not None and others > MAX_OTHERS_SHARE:
      return float(max(rate, entry["rate"]))  # the cache's unloaded best, or this run's
    entry = {"rate": max(entry["rate"], rate), "samples": entry["samples"] + 1}
    rates[key] = entry
    storage.atomic_write(path, lambda temporary: _write_json(temporary, rates))
  return float(entry["rate"])


def _core_times(cores, stat="/proc/stat"):
  """(busy, all) seconds of CPU time so far, summed over `cores`; None where unknown."""
  try:
    with open(stat) as f:
      lines = [line.split() for line in f if line.startswith("cpu") and line[3].isdigit()]
  except (OSError, IndexError):
    return None
  busy = total = 0
  for fields in lines:
    if int(fields[0][3:]) in cores:
      ticks = [int(value) for value in fields[1:9]]  # user nice system idle iowait irq ...
      total += sum(ticks)
      busy += sum(ticks) - ticks[3] - ticks[4]
  hertz = os.sysconf("SC_CLK_TCK")
  return busy / hertz, total / hertz


def others_share(before, after) -> float | None:
  """The share of our cores' time that other processes used between two readings.

  Args:
    before, after: (_core_times(cores), os.times()) before and after a measurement.

  Returns:
    0 (idle neighbours) to 1 (every core busy with others); None if /proc/stat is unreadable
    or the interval too short to tell (under 0.1 core-seconds: a few clock ticks).
  """
  (cores_before, own_before), (cores_after, own_after) = before, after
  if cores_before is None or cores_after is None:
    return None
  capacity = cores_after[1] - cores_before[1]
  if capacity < 0.1:
    return None
  own = (own_after.user + own_after.system) - (own_before.user + own_before.system)
  return max(0.0, (cores_after[0] - cores_before[0] - own) / capacity)


def _write_json(path, value):
  with open(path, "w") as f:
    json.dump(value, f, indent=1)


def measure_matmul_rate(n=1024, seconds=0.5, precision="float32"):
  """FLOP/s of an n x n matmul in a TF graph, best of the repeats that fit in `seconds`.

  Args:
    n: the matrices' size.
    seconds: how long to keep measuring.
    precision: "float32" or "bfloat16", the matrices' dtype.
  """
  from gptneo.compat import tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  dtype = tf.as_dtype(precision).as_numpy_dtype
  graph = tf.Graph()
  with graph.as_default():
    a = tf.constant(rng.standard_normal((n, n), dtype=np.float32).astype(dtype))
    b = tf.Variable(rng.standard_normal((n, n), dtype=np.float32).astype(dtype))
    product = tf.reduce_sum(tf.matmul(a, b)[:1, :1])  # a scalar out: no copy measured
    with tf.compat.v1.Session(graph=graph) as session:
      session.run(b.initializer)
      session.run(product)
      best, deadline = float("inf"), time.perf_counter() + seconds
      while time.perf_counter() < deadline:
        start = time.perf_counter()
        session.run(product)
        best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best


def utilization(tokens_per_sec, flops_per_token, peak):
  """{"tflops": achieved TFLOP/s, "mfu": the share of peak} (mfu left out if peak is None)."""
  achieved = tokens_per_sec * flops_per_token
  values = {"tflops": achieved / 1e12}
  if peak:
    values["mfu"] = achieved / peak
  return values
