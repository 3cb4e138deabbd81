#!/usr/bin/env python3
"""Training throughput of gptneo's mtf train step next to a plain PyTorch twin, on this CPU.

  . .venv/bin/activate && export PYTHONPATH=$PWD
  python bench/train_throughput.py                    # both configs, ~3-4 minutes on 2 cores
  python bench/train_throughput.py --configs=tiny --steps=20

For each config it prepares nothing new: one small dataset (n_ctx 256, BPE vocab 4096, a few
stdlib files) is written once into a temp dir; then
  * ours:  gin_utils.parse(["tiny.gin"], overrides) -> train._validated_graph(...), exactly
           the graph bin/train builds (tf.data input, dropout sites, clipping, AdamW, step
           increment), run in a Session with the mesh's session config; tokens/s of
           `session.run(train_op)` after warm-up;
  * torch: bench/torch_gpt.py, same shapes/params/batch/optimizer, float32,
           torch.set_num_threads(#cores); tokens/s of forward + backward + clip + AdamW step;
  * the fp32 matmul rate (1024x1024 @ 1024x1024, best of several) of numpy, torch and TF,
    and MFU = tokens/s * FLOPs/token / matmul rate, with FLOPs/token = 6N + 12*L*T*E
    (N = GPT.num_parameters(): all trainable parameters, the tied embedding counted once,
    position embeddings included; T = n_ctx, E = n_embd, L = n_layer). The denominator is the
    best fp32 matmul rate measured in this run (the largest of the three).
"""
import argparse
import dataclasses
import datetime
import os
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gptneo import gin_utils  # noqa: E402
from gptneo import mesh as mesh_lib  # noqa: E402
from gptneo import train as train_lib  # noqa: E402
from gptneo.compat import tf  # noqa: E402
from gptneo.data import prepare  # noqa: E402
from gptneo.model import gpt as gpt_lib  # noqa: E402
from gptneo.optim import optimizers  # noqa: E402

import torch  # noqa: E402  (after TF: both load their own OpenMP/oneDNN; this order works)
import torch_gpt  # noqa: E402

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


def flops_per_token(n_params, cfg):
  return 6 * n_params + 12 * cfg.n_layer * cfg.n_ctx * cfg.n_embd


# --------------------------------------------------------------------------- matmul rate


def _best_seconds(fn, repeats):
  fn()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def matmul_rates(n=1024, repeats=10):
  """fp32 FLOP/s of an n x n @ n x n matmul, best of `repeats`, in numpy, torch and TF."""
  flops = 2.0 * n ** 3
  rng = np.random.default_rng(0)
  a = rng.standard_normal((n, n), dtype=np.float32)
  b = rng.standard_normal((n, n), dtype=np.float32)
  rates = {"numpy": flops / _best_seconds(lambda: a @ b, repeats)}
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  with torch.no_grad():
    rates["torch"] = flops / _best_seconds(lambda: torch.mm(ta, tb), repeats)
  graph = tf.Graph()
  with graph.as_default():
    va = tf.Variable(a)
    vb = tf.Variable(b)
    # A scalar out keeps the fetch (a 4 MB copy into numpy) out of the measurement.
    product = tf.reduce_sum(tf.matmul(va, vb)[:1, :1])
    with tf.Session(graph=graph) as session:
      session.run(tf.global_variables_initializer())
      rates["tf"] = flops / _best_seconds(lambda: session.run(product), repeats)
  return rates


# --------------------------------------------------------------------------- data


def prepare_data(folder):
  root = sysconfig.get_paths()["stdlib"]
  files = [os.path.join(root, name) for name in _CORPUS if os.path.isfile(os.path.join(root, name))]
  info = prepare.prepare_dataset(files, folder, n_ctx=N_CTX, vocab_size=4096,
                                 validation_fraction=0.0)
  return info


# --------------------------------------------------------------------------- ours


def run_ours(cfg, dataset_dir, model_dir, warmup, steps, inter_threads, intra_threads):
  """tokens/s of gptneo's real train step, built through gin as bin/train does."""
  gin_utils.parse(["tiny.gin"], [f'DATASET_DIR = "{dataset_dir}"', "train.eval_batches = 0",
                                 *cfg.gin_params])
  model, optimizer, spec = gpt_lib.GPT(), optimizers.Adam(), mesh_lib.mesh()
  assert (model.n_layer, model.n_embd, model.n_head, model.n_ctx, model.n_vocab) == (
      cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_ctx, cfg.n_vocab), "gin config mismatch"
  import gin  # pylint: disable=g-import-not-at-top
  batch_size = gin.query_parameter("train.batch_size")
  assert batch_size == cfg.batch_size, (batch_size, cfg.batch_size)
  total_steps = gin.query_parameter("train.train_steps")
  graph = train_lib._validated_graph(  # pylint: disable=protected-access
      model, optimizer, spec, dataset_dir, batch_size, total_steps, seed=1234,
      precision="float32", microbatches=1, clip_norm=1.0, eval_batches=0,
      model_dir=model_dir, keep=1)
  config = spec.session_config()
  config.inter_op_parallelism_threads = inter_threads
  config.intra_op_parallelism_threads = intra_threads
  with graph.graph.as_default(), tf.Session(config=config) as session:
    graph.checkpoints.restore_or_initialize(session, graph.init_ops)
    for _ in range(warmup):
      session.run(graph.train_op)
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      session.run(graph.train_op)
      times.append(time.perf_counter() - start)
    loss = session.run(graph.loss)
  tokens = cfg.batch_size * cfg.n_ctx
  return {"params": model.num_parameters(), "tokens_per_s": tokens * steps / sum(times),
          "median_step_s": statistics.median(times), "loss": float(loss)}


# --------------------------------------------------------------------------- torch


def run_torch(cfg, n_params, warmup, steps, attention):
  torch.manual_seed(0)
  model = torch_gpt.TorchGPT(cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_ctx, cfg.n_vocab,
                             attention=attention)
  assert model.num_parameters() == n_params, (model.num_parameters(), n_params)
  optimizer = torch_gpt.make_optimizer(model)
  generator = torch.Generator().manual_seed(0)
  batches = [torch.randint(0, cfg.n_vocab, (cfg.batch_size, cfg.n_ctx + 1), generator=generator)
             for _ in range(4)]
  total = warmup + steps
  for step in range(warmup):
    torch_gpt.train_step(model, optimizer, batches[step % 4], step, total, 2e-3)
  times = []
  for step in range(warmup, total):
    start = time.perf_counter()
    loss = torch_gpt.train_step(model, optimizer, batches[step % 4], step, total, 2e-3)
    loss.item()
    times.append(time.perf_counter() - start)
  tokens = cfg.batch_size * cfg.n_ctx
  return {"tokens_per_s": tokens * steps / sum(times), "median_step_s": statistics.median(times)}


# --------------------------------------------------------------------------- main


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="tiny,20m", help=f"comma list of {list(CONFIGS)}")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
  parser.add_argument("--steps", type=int, default=0,
                      help="timed steps per framework (0: 30 for tiny, 8 for 20m)")
  parser.add_argument("--torch_attention", default="sdpa", choices=["sdpa", "manual"],
                      help="torch attention: F.scaled_dot_product_attention or explicit math")
  parser.add_argument("--inter_op_threads", type=int, default=0, help="TF; 0 = TF's default")
  parser.add_argument("--intra_op_threads", type=int, default=0, help="TF; 0 = TF's default")
  parser.add_argument("--data_dir", default=None, help="reuse/keep the prepared dataset here")
  args = parser.parse_args()

  torch.set_num_threads(CORES)
  started = time.time()
  print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}  cores={CORES}  torch threads="
        f"{torch.get_num_threads()}  TF {tf.__version__}  torch {torch.__version__}  "
        f"TF threads inter={args.inter_op_threads or 'default'} "
        f"intra={args.intra_op_threads or 'default'}", flush=True)
  rates = matmul_rates()
  peak = max(rates.values())
  print("fp32 matmul 1024^3: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in rates.items())
        + " GFLOP/s; MFU denominator " + f"{peak / 1e9:.1f} GFLOP/s", flush=True)

  workdir = tempfile.mkdtemp(prefix="gptneo-bench-")
  try:
    dataset_dir = args.data_dir or os.path.join(workdir, "data")
    if not os.path.exists(os.path.join(dataset_dir, "dataset.json")):
      info = prepare_data(dataset_dir)
      print(f"dataset: {info['splits']['train']['windows']} windows of {N_CTX + 1} tokens, "
            f"vocab {info['n_vocab']}", flush=True)
    rows = []
    for name in args.configs.split(","):
      cfg = CONFIGS[name]
      steps = args.steps or (30 if name == "tiny" else 8)
      ours = run_ours(cfg, dataset_dir, os.path.join(workdir, f"model-{name}"), args.warmup,
                      steps, args.inter_op_threads, args.intra_op_threads)
      print(f"[{name}] ours:  {ours['tokens_per_s']:.0f} tokens/s  (median step "
            f"{ours['median_step_s'] * 1e3:.0f} ms, loss {ours['loss']:.3f})", flush=True)
      theirs = run_torch(cfg, ours["params"], args.warmup, steps, args.torch_attention)
      print(f"[{name}] torch: {theirs['tokens_per_s']:.0f} tokens/s  (median step "
            f"{theirs['median_step_s'] * 1e3:.0f} ms)", flush=True)
      per_token = flops_per_token(ours["params"], cfg)
      rows.append((name, ours["params"], ours["tokens_per_s"], theirs["tokens_per_s"],
                   ours["tokens_per_s"] / theirs["tokens_per_s"],
                   ours["tokens_per_s"] * per_token / peak,
                   theirs["tokens_per_s"] * per_token / peak))
  finally:
    if not args.data_dir:
      shutil.rmtree(workdir, ignore_errors=True)

  print()
  header = ("config", "params", "ours tok/s", "torch tok/s", "ours/torch", "MFU ours",
            "MFU torch")
  print("| " + " | ".join(header) + " |")
  print("|" + "|".join("---" for _ in header) + "|")
  for name, params, ours, theirs, ratio, mfu_ours, mfu_torch in rows:
    print(f"| {name} | {params / 1e6:.2f}M | {ours:.0f} | {theirs:.0f} | {ratio:.2f} | "
          f"{mfu_ours:.1%} | {mfu_torch:.1%} |")
  print(f"\nmatmul rate (MFU denominator): {peak / 1e9:.1f} GFLOP/s; "
        f"FLOPs/token = 6N + 12*L*T*E, N = all trainable params; total {time.time() - started:.0f} s")


if __name__ == "__main__":
  main()
