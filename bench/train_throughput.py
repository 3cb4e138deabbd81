#!/usr/bin/env python3
"""Training throughput of gptneo's mtf train step next to a plain PyTorch twin, on this CPU.

  . .venv/bin/activate && export PYTHONPATH=$PWD
  python bench/train_throughput.py                    # both configs, ~3 minutes on 2 idle cores
  python bench/train_throughput.py --configs=tiny --rounds=5

One small dataset (n_ctx 256, BPE vocab 4096, 14 stdlib modules) is prepared with
`prepare_dataset` in a temp dir; then, per config:
  * ours:  gin_utils.parse(["tiny.gin"], overrides) -> train.settings() -> train_graph.build(...), exactly
           the graph bin/train builds (tf.data input, dropout sites, clipping, AdamW, step
           increment), run in a Session with the mesh's session config (TF's default
           inter/intra-op threads: all cores); tokens/s of `session.run(train_op)`;
  * torch: bench/torch_gpt.py, same shapes, parameter count (asserted), batch, AdamW
           hyperparameters, clipping and schedule, float32, torch.set_num_threads(#cores);
           tokens/s of forward + backward + clip + AdamW step;
  * both warm up, then run `--rounds` timed rounds of `--steps` steps, alternating ours and
    torch so that a busy neighbour hits both alike. This machine is shared: each round
    records the CPU other processes used meanwhile ("foreign", in cores), waits for them to
    idle first and is redone when disturbed; the table reports the median undisturbed round
    and, as ours/torch, the median ratio of back-to-back round pairs (the VM's speed drifts
    by ~10% over minutes, which pairing cancels).
  * the fp32 matmul rate (1024x1024 @ 1024x1024, best of 20) of numpy, torch and TF, and
    MFU = tokens/s * FLOPs/token / matmul rate, with FLOPs/token the model's training FLOPs
    as bin/train's log counts them (gptneo.flops: 6 per weight a token meets, the output
    projection included, position embeddings not; 12 * n_ctx * n_embd per global layer).
    The denominator is the best fp32 matmul rate measured in this run (the largest of the
    three).
"""
import argparse
import dataclasses
import datetime
import logging
import os
import shutil
import sys
import sysconfig
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
from timing import Runner, add_round_flags, cpu_line, paired_ratio, wait_for_idle  # noqa: E402

CORES = os.cpu_count()
N_CTX = 256
# A few large stdlib modules: ~1.3 MB of text, ~400k tokens, far more windows than needed.
_CORPUS = ("typing.py", "argparse.py", "inspect.py", "subprocess.py", "tarfile.py",
           "pathlib.py", "collections/__init__.py", "logging/__init__.py", "ast.py",
           "datetime.py", "_pydecimal.py", "dataclasses.py", "enum.py", "functools.py")


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


def matmul_rates(n=1024, repeats=20):
  """fp32 FLOP/s of an n x n @ n x n matmul, best of `repeats`, in numpy, torch and TF."""
  per_matmul = 2.0 * n ** 3
  rng = np.random.default_rng(0)
  a = rng.standard_normal((n, n), dtype=np.float32)
  b = rng.standard_normal((n, n), dtype=np.float32)
  rates = {"numpy": per_matmul / _best_seconds(lambda: a @ b, repeats)}
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  with torch.no_grad():
    rates["torch"] = per_matmul / _best_seconds(lambda: torch.mm(ta, tb), repeats)
  graph = tf.Graph()
  with graph.as_default():
    va = tf.Variable(a)
    vb = tf.Variable(b)
    # A scalar out keeps the fetch (a 4 MB copy into numpy) out of the measurement.
    product = tf.reduce_sum(tf.matmul(va, vb)[:1, :1])
    with tf.Session(graph=graph) as session:
      session.run(tf.global_variables_initializer())
      rates["tf"] = per_matmul / _best_seconds(lambda: session.run(product), repeats)
  return rates


# --------------------------------------------------------------------------- data


def prepare_data(folder):
  root = sysconfig.get_paths()["stdlib"]
  files = [os.path.join(root, name) for name in _CORPUS if os.path.isfile(os.path.join(root, name))]
  info = prepare.prepare_dataset(files, folder, n_ctx=N_CTX, vocab_size=4096,
                                 validation_fraction=0.0)
  return info


# --------------------------------------------------------------------------- ours


class Ours:
  """gptneo's real train step, built through gin as bin/train does, in a live Session."""

  def __init__(self, cfg, dataset_dir, model_dir, inter_threads, intra_threads):
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)  # gin logs "Path not found" for each include it resolves
    try:
      gin_utils.parse(["tiny.gin"], [f'DATASET_DIR = "{dataset_dir}"',
                                     "train.eval_batches = 0", *cfg.gin_params])
    finally:
      root.setLevel(level)
    settings = train_lib.settings(keep_checkpoints=1)  # as bin/train would, from gin
    model = settings.model
    assert (model.n_layer, model.n_embd, model.n_head, model.n_ctx, model.n_vocab) == (
        cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_ctx, cfg.n_vocab), "gin config mismatch"
    assert settings.batch_size == cfg.batch_size, (settings.batch_size, cfg.batch_size)
    self.params = model.num_parameters()
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

  def loss(self):
    return float(self.session.run(self.graph.loss))


# --------------------------------------------------------------------------- torch


class Torch:
  """bench/torch_gpt.py at the same config and batch: forward, backward, clip, AdamW."""

  def __init__(self, cfg, n_params, attention, total_steps):
    torch.manual_seed(0)
    self.model = torch_gpt.TorchGPT(cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_ctx,
                                    cfg.n_vocab, attention=attention)
    assert self.model.num_parameters() == n_params, (self.model.num_parameters(), n_params)
    self.optimizer = torch_gpt.make_optimizer(self.model)
    generator = torch.Generator().manual_seed(0)
    self.batches = [torch.randint(0, cfg.n_vocab, (cfg.batch_size, cfg.n_ctx + 1),
                                  generator=generator) for _ in range(4)]
    self.total_steps, self.count = total_steps, 0

  def step(self):
    loss = torch_gpt.train_step(self.model, self.optimizer, self.batches[self.count % 4],
                                self.count, self.total_steps, 2e-3)
    loss.item()
    self.count += 1


# --------------------------------------------------------------------------- main


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="tiny,20m", help=f"comma list of {list(CONFIGS)}")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps first, each side")
  parser.add_argument("--rounds", type=int, default=5,
                      help="timed rounds per side, ours and torch alternating")
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
  peak = max(rates.values())
  print("fp32 matmul 1024^3: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in rates.items())
        + f" GFLOP/s; MFU denominator {peak / 1e9:.1f} GFLOP/s", flush=True)

  workdir = tempfile.mkdtemp(prefix="gptneo-bench-")
  rows = []
  try:
    dataset_dir = args.data_dir or os.path.join(workdir, "data")
    if not os.path.exists(os.path.join(dataset_dir, "dataset.json")):
      info = prepare_data(dataset_dir)
      print(f"dataset: {info['splits']['train']['windows']} windows of {N_CTX + 1} tokens, "
            f"vocab {info['n_vocab']}", flush=True)
    for name in args.configs.split(","):
      cfg = CONFIGS[name]
      steps = args.steps or (10 if name == "tiny" else 3)
      tokens = cfg.batch_size * cfg.n_ctx
      ours = Ours(cfg, dataset_dir, os.path.join(workdir, f"model-{name}"),
                  args.inter_op_threads, args.intra_op_threads)
      theirs = Torch(cfg, ours.params, args.torch_attention,
                     args.warmup + args.rounds * steps)
      runners = {side: Runner(fn, tokens, args.max_foreign, args.idle_wait, args.retries)
                 for side, fn in (("ours", ours.step), ("torch", theirs.step))}
      for runner in runners.values():
        for _ in range(args.warmup):
          runner.step()
      for _ in range(args.rounds):  # alternate, so a noisy neighbour hits both sides alike
        for runner in runners.values():
          runner.time_round(steps)
      for side, runner in runners.items():
        print(f"[{name}] {side:5s} rounds of {steps} steps: " + "  ".join(
            f"{tps:.0f} tok/s (cpu {util:.2f}, foreign {foreign:.2f})"
            for tps, foreign, util in runner.rounds), flush=True)
      print(f"[{name}] ours loss after {args.warmup + args.rounds * steps} steps: "
            f"{ours.loss():.3f}", flush=True)
      ours.session.close()
      (ours_tps, ours_foreign), (torch_tps, torch_foreign) = (runners["ours"].median(),
                                                              runners["torch"].median())
      per_token = ours.flops_per_token
      rows.append((name, ours.params, ours_tps, torch_tps,
                   paired_ratio(runners["ours"], runners["torch"]), ours_tps * per_token / peak,
                   torch_tps * per_token / peak, max(ours_foreign, torch_foreign)))
  finally:
    if not args.data_dir:
      shutil.rmtree(workdir, ignore_errors=True)

  print()
  header = ("config", "params", "ours tok/s", "torch tok/s", "ours/torch", "MFU ours",
            "MFU torch", "foreign load")
  print("| " + " | ".join(header) + " |")
  print("|" + "|".join("---" for _ in header) + "|")
  for name, params, ours, theirs, ratio, mfu_ours, mfu_torch, foreign in rows:
    print(f"| {name} | {params / 1e6:.2f}M | {ours:.0f} | {theirs:.0f} | {ratio:.2f} | "
          f"{mfu_ours:.1%} | {mfu_torch:.1%} | {foreign:.2f} |")
  print(f"\nmatmul rate (MFU denominator): {peak / 1e9:.1f} GFLOP/s; FLOPs/token = "
        f"gptneo.flops.training_flops_per_token (as bin/train logs MFU); "
        f"tok/s = median undisturbed round; "
        f"ours/torch = median of back-to-back round pairs; foreign load = cores other "
        f"processes used in those rounds; total {time.time() - started:.0f} s")
  if any(row[-1] > 0.2 for row in rows):
    print("WARNING: other processes used CPU during the reported rounds; numbers are disturbed "
          "(torch's OpenMP threads suffer most). Rerun on an idle machine.")


if __name__ == "__main__":
  gin_utils.graph_mode()  # as every program runs (gin_utils.run)
  main()
