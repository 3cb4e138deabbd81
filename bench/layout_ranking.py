#!/usr/bin/env python3
"""The layout search's step-time estimate against measured step times, on 2 CPU devices.

  .venv/bin/python bench/layout_ranking.py        # ~5 minutes on 2 idle cores

One model (gin/tiny.gin with 4 layers x 512, 8 heads, n_ctx 256, vocab 4096, batch 8, Adam,
float32) runs bin/train's real step (train.settings + train_graph.build, tf.data input included) on mesh
x:2 (two CPU devices of this process, one per core) under each layout of LAYOUTS; its time is
the median of --steps timed steps after 2 warm-ups. The estimate is the search's own
(cost_model.estimate) with this CPU as the hardware: device_flops = a measured one-thread
fp32 matmul rate (a device is a core), link_bandwidth = a measured in-memory copy rate.
Printed: per layout, estimated and measured seconds per step, then every pair whose
estimates differ by more than --min_ratio, and whether the measured times order it the same.

The sharded layouts (SHARDED_LAYOUTS: `zero:x`, `fsdp:x`, docs/large_models.md) are measured
too when this tree's mesh knows their rules (gptneo.mesh.Sharding); otherwise they are
skipped with a line saying so.
"""
import argparse
import itertools
import os
import shutil
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from gptneo import configurables  # noqa: E402,F401  (registers every configurable)
from gptneo import gin_utils  # noqa: E402
from gptneo import mesh as mesh_lib  # noqa: E402
from gptneo import runtime  # noqa: E402
from gptneo import train as train_lib  # noqa: E402
from gptneo import train_graph  # noqa: E402
from gptneo.compat import tf  # noqa: E402
from gptneo.layout_search import configured  # noqa: E402
from gptneo.layout_search import cost_model  # noqa: E402
from gptneo.optim import optimizers  # noqa: E402
from train_throughput import prepare_data  # noqa: E402
from timing import cpu_line  # noqa: E402  (bench/ is sys.path[0])

MODEL = ["GPT.n_layer = 4", "GPT.n_embd = 512", "GPT.n_head = 8", "GPT.n_ctx = 256",
         "GPT.n_vocab = 4096", "train.batch_size = 8", "train.eval_batches = 0",
         'mesh.mesh_shape = "x:2"']
LAYOUTS = ["", "batch:x", "heads:x,mlp:x,vocab:x", "mlp:x", "vocab:x", "kv:x"]
# Weights (fsdp) or optimizer state (zero) sharded over the data axis: one more all-gather
# and reduce-scatter per step than batch:x, no model-parallel activation allreduce.
SHARDED_LAYOUTS = ["batch:x,zero:x", "batch:x,fsdp:x"]


def layouts():
  """LAYOUTS, and SHARDED_LAYOUTS if the tree's mesh has the rules (else says it skips them)."""
  if hasattr(mesh_lib, "Sharding"):
    return LAYOUTS + SHARDED_LAYOUTS
  print(f"skipping {', '.join(SHARDED_LAYOUTS)}: this tree's gptneo.mesh has no Sharding, so "
        f"mesh.layout can't hold fsdp:/zero: rules yet (issue 22's mechanism)")
  return LAYOUTS


def matmul_flops(n=1024, repeats=10):
  """One thread's fp32 matmul rate in FLOP/s (TF, best of `repeats`)."""
  config = tf.ConfigProto(intra_op_parallelism_threads=1, inter_op_parallelism_threads=1)
  with tf.Graph().as_default(), tf.Session(config=config) as session:
    a = tf.Variable(tf.random.normal([n, n]))
    product = tf.reduce_sum(tf.matmul(a, a))
    session.run(a.initializer)
    best = min(_seconds(lambda: session.run(product)) for _ in range(repeats))
  return 2 * n ** 3 / best


def copy_bandwidth(megabytes=256, repeats=5):
  """Bytes/s of one in-memory copy (what a collective between CPU devices amounts to)."""
  source = np.ones(megabytes * 2 ** 20 // 4, np.float32)
  best = min(_seconds(lambda: source.copy()) for _ in range(repeats))
  return source.nbytes / best


def _seconds(run):
  start = time.perf_counter()
  run()
  return time.perf_counter() - start


def measured_step_seconds(layout, dataset_dir, model_dir, steps):
  gin_utils.parse(["tiny.gin"], MODEL + [f'DATASET_DIR = "{dataset_dir}"',
                                         f'mesh.layout = "{layout}"'])
  settings = train_lib.settings(optimizer=optimizers.Adam(), train_steps=1000, seed=1,
                                eval_batches=0, keep_checkpoints=1)
  settings.check()
  rt = runtime.Runtime(settings.mesh)
  graph = train_graph.build(settings, model_dir, rt)
  with graph.graph.as_default(), tf.Session(config=rt.session_config()) as session:
    graph.checkpoints.restore_or_initialize(session, graph.init_ops)
    for _ in range(2):
      session.run(graph.train_op)
    return float(np.median([_seconds(lambda: session.run(graph.train_op))
                            for _ in range(steps)]))


def estimated_step_seconds(layout, hardware):
  gin_utils.parse(["tiny.gin"], MODEL + [f'mesh.layout = "{layout}"'])
  rules = tuple(tuple(rule.split(":")) for rule in layout.split(",") if rule)
  return cost_model.estimate(configured.workload_from_gin(), hardware, (("x", 2),),
                             rules).step_seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--min_ratio", type=float, default=1.5)
  args = parser.parse_args()
  print(cpu_line())
  hardware = cost_model.Hardware(device_memory=2 ** 40, device_flops=matmul_flops(),
                                 link_bandwidth=copy_bandwidth())
  print(f"hardware: {hardware.device_flops / 1e9:.1f} GFLOP/s per device, "
        f"{hardware.link_bandwidth / 1e9:.1f} GB/s per link")
  folder = tempfile.mkdtemp(prefix="layout_ranking_")
  try:
    rows = measure_all(folder, hardware, args.steps, layouts())
  finally:
    shutil.rmtree(folder, ignore_errors=True)
  report(rows, args.min_ratio)


def measure_all(folder, hardware, steps, names):
  """{layout: (estimated, measured) seconds per step} of each of `names`, printed as they
  come."""
  prepare_data(os.path.join(folder, "data"))
  rows = {}
  print("| layout on x:2 | estimated s/step | measured s/step |\n|---|---|---|")
  for number, layout in enumerate(names):
    rows[layout] = (estimated_step_seconds(layout, hardware),
                    measured_step_seconds(layout, os.path.join(folder, "data"),
                                          os.path.join(folder, f"run{number}"), steps))
    print(f"| `{layout or '(replicated)'}` | {rows[layout][0]:.3f} | {rows[layout][1]:.3f} |",
          flush=True)
  return rows


def report(rows, min_ratio):
  """Every pair the estimate separates by more than min_ratio: same order as measured?"""
  print(f"\npairs whose estimates differ by more than {min_ratio}x:")
  agree = 0
  pairs = [(a, b) for a, b in itertools.combinations(rows, 2)
           if max(rows[a][0], rows[b][0]) > min_ratio * min(rows[a][0], rows[b][0])]
  for a, b in pairs:
    same = (rows[a][0] < rows[b][0]) == (rows[a][1] < rows[b][1])
    agree += same
    print(f"  {a or '(replicated)'} vs {b or '(replicated)'}: estimate "
          f"{rows[a][0] / rows[b][0]:.2f}x, measured {rows[a][1] / rows[b][1]:.2f}x -> "
          f"{'same order' if same else 'OPPOSITE order'}")
  print(f"{agree} of {len(pairs)} pairs in the measured order")


if __name__ == "__main__":
  gin_utils.graph_mode()  # as every program runs (gin_utils.run)
  main()
