#!/usr/bin/env python3
"""Training throughput of gptneo's mtf train step next to a plain PyTorch twin, eager and compiled.

  . .venv/bin/activate && export PYTHONPATH=$PWD
  python bench/train_throughput.py                    # both configs, float32, ~6 min on 2 idle cores
  python bench/train_throughput.py --configs=tiny --rounds=5 --precision=float32,bfloat16
  python bench/train_throughput.py --no_compile       # ours and the eager twin only

One small dataset (n_ctx 256, BPE vocab 4096, 14 stdlib modules) is prepared with
`prepare_dataset` in a temp dir; then, per config and precision (one table row each):
  * ours:  gin_utils.parse(["tiny.gin"], overrides) -> train.settings() -> train_graph.build(...), exactly
           the graph bin/train builds (tf.data input, dropout sites, clipping, AdamW, step
           increment), run in a Session with the mesh's session config (TF's default
           inter/intra-op threads: all cores); tokens/s of `session.run(train_op)`;
           bfloat16 adds the binding `train.precision = "bfloat16"` (bfloat16 activations
           over float32 master weights);
  * torch: bench/torch_gpt.py, same shapes, parameter count (asserted), batch, AdamW
           hyperparameters, clipping and schedule, torch.set_num_threads(#cores); tokens/s
           of forward + backward + clip + AdamW step; bfloat16 runs forward + loss under
           torch.autocast("cpu", torch.bfloat16) (weights, gradients and AdamW float32);
  * compile: the same twin (same seed, same batches) with the model wrapped in
           torch.compile (inductor, CPU); backward runs through the compiled graph, clip and
           AdamW stay eager. The first step compiles: it is warm-up, and its seconds are
           printed (inductor's on-disk cache, /tmp/torchinductor_$USER, makes reruns
           faster). If compiling fails, one line says why and the columns read "n/a
           (reason)". The loss of both twins after the same steps is printed, to show the
           compiled twin computes the same thing. `--no_compile` skips this side;
  * all sides warm up, then run `--rounds` timed rounds of `--steps` steps, alternating
    torch, ours, compile, so that a busy neighbour hits all alike and ours runs back to back
    with each twin. This machine is shared: each round records the CPU other processes used
    meanwhile ("foreign", in cores), waits for them to idle first and is redone when
    disturbed; the table reports the median undisturbed round and, as ours/torch and
    ours/compile, the median ratio of back-to-back round pairs (the VM's speed drifts by
    ~10% over minutes, which pairing cancels).
  * the 1024x1024 @ 1024x1024 matmul rate (best of 20) in float32 (numpy, torch, TF) and in
    bfloat16 (torch, TF), and MFU = tokens/s * FLOPs/token / matmul rate, with FLOPs/token
    the model's training FLOPs as bin/train's log counts them (gptneo.flops: 6 per weight a
    token meets, the output projection included, position embeddings not; 12 * n_ctx *
    n_embd per global layer). The denominator of a row is the best matmul rate measured in
    this run at the row's precision (the table's "MFU denominator" column names it).
"""
import argparse
import dataclasses
import datetime
import logging
import os
import shutil
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ info/warnings: noise here
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gptneo import configurables  # noqa: E402,F401  (registers every configurable)
from gptneo import flops  # noqa: E402
from gptneo import gin_utils  # noqa: E402
from gptneo import runtime  # noqa: E402
from gptneo import train as train_lib  # noqa: E402
from gptneo import train_graph  # noqa: E402
from gptneo.compat import tf  # noqa: E402
from gptneo.data import prepare  # noqa: E402

import torch  # noqa: E402  (after TF: both load their own OpenMP/oneDNN; this order works)
import torch_gpt  # noqa: E402
from timing import (Runner, add_round_flags, bench_corpus_files, cpu_line, paired_ratio,  # noqa: E402
                    wait_for_idle)

CORES = os.cpu_count()
N_CTX = 256


@dataclasses.dataclass
class Config:
  name: str
  gin_params: list  # on top of tiny.gin (which sets the tiny model, batch 16, Adam)
  n_layer: int
  n_embd: int
  n_head: int
  batch_size: int
  n_vocab: int = 4096
  n_ctx: int = N_CTX


CONFIGS = {
    # gin/models/tiny.gin as is: 4 layers, 128 embd, 4 heads, n_ctx 256, vocab 4096, batch 16.
    "tiny": Config("tiny", [], 4, 128, 4, 16),
    # ~19.4M parameters: 10 layers, 384 embd, 6 heads of 64, n_ctx 256, vocab 4096, batch 8.
    "20m": Config("20m", ["GPT.n_layer = 10", "GPT.n_embd = 384", "GPT.n_head = 6",
                          "train.batch_size = 8"], 10, 384, 6, 8),
}


# --------------------------------------------------------------------------- matmul rate


def _best_seconds(fn, repeats):
  fn()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def _torch_rate(a, b, dtype, repeats):
  ta, tb = torch.from_numpy(a).to(dtype), torch.from_numpy(b).to(dtype)
  with torch.no_grad():
    return 2.0 * a.shape[0] ** 3 / _best_seconds(lambda: torch.mm(ta, tb), repeats)


def _tf_rate(a, b, dtype, repeats):
  graph = tf.Graph()
  with graph.as_default():
    va = tf.Variable(tf.cast(a, dtype))
    vb = tf.Variable(tf.cast(b, dtype))
    # A scalar out keeps the fetch (a 4 MB copy into numpy) out of the measurement.
    product = tf.reduce_sum(tf.matmul(va, vb)[:1, :1])
    with tf.Session(graph=graph) as session:
      session.run(tf.global_variables_initializer())
      return 2.0 * a.shape[0] ** 3 / _best_seconds(lambda: session.run(product), repeats)


def matmul_rates(n=1024, repeats=20):
  """FLOP/s of an n x n @ n x n matmul, best of `repeats`, per precision and library:
  {"float32": {"numpy", "torch", "tf"}, "bfloat16": {"torch", "tf"}} (numpy has no bf16)."""
  rng = np.random.default_rng(0)
  a = rng.standard_normal((n, n), dtype=np.float32)
  b = rng.standard_normal((n, n), dtype=np.float32)
  fp32 = {"numpy": 2.0 * n ** 3 / _best_seconds(lambda: a @ b, repeats),
          "torch": _torch_rate(a, b, torch.float32, repeats),
          "tf": _tf_rate(a, b, tf.float32, repeats)}
  bf16 = {"torch": _torch_rate(a, b, torch.bfloat16, repeats),
          "tf": _tf_rate(a, b, tf.bfloat16, repeats)}
  return {"float32": fp32, "bfloat16": bf16}


def denominators(rates):
  """Per precision, (library, FLOP/s) of the fastest matmul measured: the MFU denominator."""
  return {precision: max(by_lib.items(), key=lambda item: item[1])
          for precision, by_lib in rates.items()}


# --------------------------------------------------------------------------- data


def prepare_data(folder):
  files = bench_corpus_files()
  info = prepare.prepare_dataset(files, folder, n_ctx=N_CTX, vocab_size=4096,
                                 validation_fraction=0.0)
  return info


# --------------------------------------------------------------------------- ours


class Ours:
  """gptneo's real train step, built through gin as bin/train does, in a live Session."""

  def __init__(self, cfg, precision, dataset_dir, model_dir, inter_threads, intra_threads):
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)  # gin logs "Path not found" for each include it resolves
    extra = [f'train.precision = "{precision}"'] if precision != "float32" else []
    try:
      gin_utils.parse(["tiny.gin"], [f'DATASET_DIR = "{dataset_dir}"',
                                     "train.eval_batches = 0", *cfg.gin_params, *extra])
    finally:
      root.setLevel(level)
    settings = train_lib.settings(keep_checkpoints=1)  # as bin/train would, from gin
    model = settings.model
    assert (model.n_layer, model.n_embd, model.n_head, model.n_ctx, model.n_vocab) == (
        cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_ctx, cfg.n_vocab), "gin config mismatch"
    assert settings.batch_size == cfg.batch_size, (settings.batch_size, cfg.batch_size)
    assert settings.precision == precision, (settings.precision, precision)
    self.params, self.steps = model.num_parameters(), 0
    self.flops_per_token = flops.training_flops_per_token(model)
    settings.check()
    rt = runtime.Runtime(settings.mesh)
    self.graph = train_graph.build(settings, model_dir, rt)
    config = rt.session_config()  # what train() uses; threads 0 = TF's default (all cores)
    config.inter_op_parallelism_threads = inter_threads
    config.intra_op_parallelism_threads = intra_threads
    self.session = tf.Session(graph=self.graph.graph, config=config)
    with self.graph.graph.as_default():
      self.graph.checkpoints.restore_or_initialize(self.session, self.graph.init_ops)

  def step(self):
    self.session.run(self.graph.train_op)
    self.steps += 1

  def loss(self):
    return float(self.session.run(self.graph.loss))


# --------------------------------------------------------------------------- torch


class Torch:
  """bench/torch_gpt.py at the same config and batch: forward, backward, clip, AdamW.

  compiled=True wraps the model in torch.compile (inductor; compiled lazily, by the first
  step); the optimizer step stays eager. Every step's loss is kept in `losses`.
  """

  def __init__(self, cfg, n_params, attention, total_steps, precision, compiled=False):
    torch.manual_seed(0)
    self.model = torch_gpt.TorchGPT(cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_ctx,
                                    cfg.n_vocab, attention=attention)
    assert self.model.num_parameters() == n_params, (self.model.num_parameters(), n_params)
    self.optimizer = torch_gpt.make_optimizer(self.model)
    if compiled:
      torch._dynamo.reset()  # a fresh cache per twin: honest compile time, no cache limit
    self.forward = torch.compile(self.model, backend="inductor") if compiled else self.model
    self.autocast = None if precision == "float32" else getattr(torch, precision)
    generator = torch.Generator().manual_seed(0)
    self.batches = [torch.randint(0, cfg.n_vocab, (cfg.batch_size, cfg.n_ctx + 1),
                                  generator=generator) for _ in range(4)]
    self.total_steps, self.losses = total_steps, []

  def step(self):
    count = len(self.losses)
    loss = torch_gpt.train_step(self.forward, self.optimizer, self.batches[count % 4], count,
                                self.total_steps, 2e-3, autocast_dtype=self.autocast)
    self.losses.append(loss.item())


def compiled_twin(cfg, n_params, attention, total_steps, precision):
  """(the compiled Torch twin, compile seconds, None), or (None, None, why it failed).

  Times the first step, where torch.compile traces and inductor builds the C++ kernels."""
  twin = Torch(cfg, n_params, attention, total_steps, precision, compiled=True)
  start = time.perf_counter()
  try:
    twin.step()
  except Exception as error:  # noqa: BLE001  (any compile failure: report it, keep benching)
    reason = (str(error).strip().splitlines() or [""])[0][:100]
    return None, None, f"{type(error).__name__}: {reason}"
  return twin, time.perf_counter() - start, None


# --------------------------------------------------------------------------- main

PRECISIONS = ("float32", "bfloat16")
SIDES = ("torch", "ours", "compile")  # round order: ours back to back with each twin
# |compiled - eager| / eager loss under which the twins count as computing the same thing.
LOSS_RTOL = {"float32": 1e-3, "bfloat16": 2e-2}


@dataclasses.dataclass
class Row:
  """One table row: a config at a precision."""
  config: str
  precision: str
  params: int
  tps: dict  # side -> median tokens/s; "compile" missing when it did not run
  ratios: dict  # "torch"/"compile" -> median paired ours/side ratio
  flops_per_token: float
  denominator: tuple  # (library, FLOP/s) of the row's precision
  foreign: float
  compile_na: str = ""  # why the compile side is missing, e.g. "--no_compile"


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="tiny,20m", help=f"comma list of {list(CONFIGS)}")
  parser.add_argument("--precision", default="float32",
                      help=f"comma list of {list(PRECISIONS)}: one row per config and each")
  parser.add_argument("--no_compile", action="store_true",
                      help="skip the torch.compile twin (its columns read n/a)")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps first, each side")
  parser.add_argument("--rounds", type=int, default=5,
                      help="timed rounds per side, the sides alternating")
  parser.add_argument("--steps", type=int, default=0,
                      help="steps per round (0: 10 for tiny, 3 for 20m)")
  parser.add_argument("--torch_attention", default="sdpa", choices=["sdpa", "manual"],
                      help="torch attention: F.scaled_dot_product_attention or explicit math")
  parser.add_argument("--torch_threads", type=int, default=CORES)
  parser.add_argument("--inter_op_threads", type=int, default=0, help="TF; 0 = TF's default")
  parser.add_argument("--intra_op_threads", type=int, default=0, help="TF; 0 = TF's default")
  add_round_flags(parser)
  parser.add_argument("--data_dir", default=None, help="reuse/keep the prepared dataset here")
  args = parser.parse_args()
  args.precision = args.precision.split(",")
  for precision in args.precision:
    if precision not in PRECISIONS:
      parser.error(f"--precision={precision}; use a comma list of {list(PRECISIONS)}")
  return args


def print_matmul_rates(rates, peaks):
  for precision, by_lib in rates.items():
    lib, peak = peaks[precision]
    print(f"{precision} matmul 1024^3: " + ", ".join(
        f"{k} {v / 1e9:.1f}" for k, v in by_lib.items()) + f" GFLOP/s; MFU denominator "
        f"{peak / 1e9:.1f} GFLOP/s ({lib})", flush=True)


def compare_losses(label, precision, eager, compiled):
  """Prints both twins' loss after the same steps (same seed, batches and schedule)."""
  n = min(len(eager.losses), len(compiled.losses))
  a, b = eager.losses[n - 1], compiled.losses[n - 1]
  close = abs(a - b) <= LOSS_RTOL[precision] * abs(a)
  print(f"[{label}] torch loss after {n} steps: eager {a:.5f}, compiled {b:.5f} "
        f"(|diff| {abs(a - b):.1e}, {'close' if close else 'NOT close'}: rtol "
        f"{LOSS_RTOL[precision]:g})", flush=True)


def start_compiled(args, label, cfg, params, total_steps, precision):
  """The compiled twin (None when skipped or failed) and why it is missing."""
  if args.no_compile:
    return None, "--no_compile"
  twin, seconds, why = compiled_twin(cfg, params, args.torch_attention, total_steps, precision)
  if twin is None:
    print(f"[{label}] torch.compile failed, compile columns n/a: {why}", flush=True)
    return None, why.split(":")[0]
  print(f"[{label}] torch.compile (inductor): {seconds:.1f} s to compile + run the first "
        f"step (warm-up, not timed)", flush=True)
  return twin, ""


def bench_row(args, cfg, precision, dataset_dir, workdir, denominator):
  """Builds the sides for one config at one precision, warms them up, times the rounds."""
  label = f"{cfg.name} {precision}"
  steps = args.steps or (10 if cfg.name == "tiny" else 3)
  total_steps = args.warmup + args.rounds * steps
  ours = Ours(cfg, precision, dataset_dir, os.path.join(workdir, f"model-{label}"),
              args.inter_op_threads, args.intra_op_threads)
  eager = Torch(cfg, ours.params, args.torch_attention, total_steps, precision)
  compiled, compile_na = start_compiled(args, label, cfg, ours.params, total_steps, precision)
  steppers = {"torch": eager.step, "ours": ours.step, "compile": compiled and compiled.step}
  runners = {side: Runner(steppers[side], cfg.batch_size * cfg.n_ctx, args.max_foreign,
                          args.idle_wait, args.retries) for side in SIDES if steppers[side]}
  for runner in runners.values():
    for _ in range(args.warmup):
      runner.step()
  for _ in range(args.rounds):  # alternate, so a noisy neighbour hits all sides alike
    for runner in runners.values():
      runner.time_round(steps)
  for side, runner in runners.items():
    print(f"[{label}] {side:7s} rounds of {steps} steps: " + "  ".join(
        f"{tps:.0f} tok/s (cpu {util:.2f}, foreign {foreign:.2f})"
        for tps, foreign, util in runner.rounds), flush=True)
  print(f"[{label}] ours loss after {ours.steps} steps: {ours.loss():.3f}", flush=True)
  if compiled:
    compare_losses(label, precision, eager, compiled)
  ours.session.close()
  medians = {side: runner.median() for side, runner in runners.items()}
  return Row(cfg.name, precision, ours.params, {k: v[0] for k, v in medians.items()},
             {side: paired_ratio(runners["ours"], runners[side])
              for side in ("torch", "compile") if side in runners},
             ours.flops_per_token, denominator, max(v[1] for v in medians.values()),
             compile_na)


def table_cells(row):
  """The markdown cells of one row; the compile side's read "n/a (reason)" when missing."""
  na = f"n/a ({row.compile_na})"
  peak = row.denominator[1]
  mfu = {side: f"{tps * row.flops_per_token / peak:.1%}" for side, tps in row.tps.items()}
  tps = {side: f"{v:.0f}" for side, v in row.tps.items()}
  ratios = {side: f"{v:.2f}" for side, v in row.ratios.items()}
  short = "bf16" if row.precision == "bfloat16" else "fp32"
  return (row.config, row.precision, f"{row.params / 1e6:.2f}M", tps["ours"], tps["torch"],
          tps.get("compile", na), ratios["torch"], ratios.get("compile", na), mfu["ours"],
          mfu["torch"], mfu.get("compile", na),
          f"{short} {row.denominator[0]} {peak / 1e9:.1f} GFLOP/s", f"{row.foreign:.2f}")


def print_table(rows, seconds):
  header = ("config", "precision", "params", "ours tok/s", "torch tok/s", "compile tok/s",
            "ours/torch", "ours/compile", "MFU ours", "MFU torch", "MFU compile",
            "MFU denominator", "foreign load")
  print("\n| " + " | ".join(header) + " |")
  print("|" + "|".join("---" for _ in header) + "|")
  for row in rows:
    print("| " + " | ".join(table_cells(row)) + " |")
  print(f"\nMFU denominator = the best 1024^3 matmul rate measured in this run at the row's "
        f"precision; FLOPs/token = gptneo.flops.training_flops_per_token (as bin/train logs "
        f"MFU); compile = the torch twin under torch.compile (inductor); tok/s = median "
        f"undisturbed round; ours/torch, ours/compile = median of back-to-back round pairs; "
        f"foreign load = cores other processes used in those rounds; total {seconds:.0f} s")
  if any(row.foreign > 0.2 for row in rows):
    print("WARNING: other processes used CPU during the reported rounds; numbers are disturbed "
          "(torch's OpenMP threads suffer most). Rerun on an idle machine.")


def main():
  args = parse_args()
  torch.set_num_threads(args.torch_threads)
  tf.get_logger().setLevel("ERROR")  # deprecation notices of the tf.compat.v1 API
  started = time.time()
  print(cpu_line())
  print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}  cores={CORES}  torch threads="
        f"{torch.get_num_threads()}  TF {tf.__version__}  torch {torch.__version__}  "
        f"TF threads inter={args.inter_op_threads or 'default'} "
        f"intra={args.intra_op_threads or 'default'}  loadavg "
        f"{' '.join(open('/proc/loadavg').read().split()[:3])}", flush=True)
  wait_for_idle(args.max_foreign, args.idle_wait)
  rates = matmul_rates()
  peaks = denominators(rates)
  print_matmul_rates(rates, peaks)

  workdir = tempfile.mkdtemp(prefix="gptneo-bench-")
  rows = []
  try:
    dataset_dir = args.data_dir or os.path.join(workdir, "data")
    if not os.path.exists(os.path.join(dataset_dir, "dataset.json")):
      info = prepare_data(dataset_dir)
      print(f"dataset: {info['splits']['train']['windows']} windows of {N_CTX + 1} tokens, "
            f"vocab {info['n_vocab']}", flush=True)
    for name in args.configs.split(","):
      for precision in args.precision:
        rows.append(bench_row(args, CONFIGS[name], precision, dataset_dir, workdir,
                              peaks[precision]))
  finally:
    if not args.data_dir:
      shutil.rmtree(workdir, ignore_errors=True)
  print_table(rows, time.time() - started)


if __name__ == "__main__":
  gin_utils.graph_mode()  # as every program runs (gin_utils.run)
  main()
