#!/usr/bin/env python3
"""Where one training step's time goes: ours per TF op type, the PyTorch twin per aten op.

  . .venv/bin/activate && export PYTHONPATH=$PWD
  python bench/profile_step.py                          # tiny and 20m, ~2 minutes
  python bench/profile_step.py --configs=20m --traced=5 --inter_op_threads=1
  python bench/profile_step.py --configs=20m --no_torch --gin_param='train.precision = "bfloat16"'
  TF_XLA_FLAGS="--tf_xla_auto_jit=2 --tf_xla_cpu_global_jit" python bench/profile_step.py

Ours is bench/train_throughput.py's `Ours` (the real train step bin/train builds, through
gin), traced with `RunOptions(trace_level=FULL_TRACE)`: each node's own time from the step
stats, summed per op type over `--traced` steps and divided by it. With
`--inter_op_threads=1` ops do not overlap, so their times add up to the step; with TF's
default (all cores) they overlap and the shares are of summed op time. The twin
(bench/torch_gpt.py, same config) runs under torch.profiler; self CPU time per aten op.
Both are grouped into matmul / element-wise / optimizer update / input pipeline / other;
XLA clusters (`_XlaCompile`, `_XlaRun`, `XlaLaunch`, `cluster_*`) are counted and reported.
The machine may be shared: the load average is printed with the numbers.
"""
import argparse
import collections
import dataclasses
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_throughput as bench  # noqa: E402  (sets up paths, TF, torch in the right order)

from gptneo import gin_utils  # noqa: E402
from gptneo import train_graph  # noqa: E402
from gptneo.compat import tf  # noqa: E402
from timing import cpu_line  # noqa: E402

MATMUL = ("MatMul", "BatchMatMul", "Einsum", "Conv")  # TF (incl. _Mkl*, _Fused*) and aten
INPUT = ("Iterator", "Dataset", "GetNext", "OptionalGetValue")
XLA = ("_XlaCompile", "_XlaRun", "XlaLaunch", "_XlaMerge")


def update_only(graph):
  """Names of the ops only the update needs: the optimizer's and the clip's scaling of the
  gradients (mtf names them einsum_N, scalar_mul_N: no scope says "optimizer")."""
  before = train_graph.ancestors([graph.loss.op, graph.grad_norm.op])
  return {op.name for op in train_graph.ancestors([graph.train_op], stop=before)}


def category(op_type, name, optimizer=()):
  if any(k in op_type for k in XLA) or op_type.startswith("cluster"):
    return "xla cluster"
  if any(k in op_type for k in INPUT):
    return "input pipeline"
  if any(k.lower() in op_type.lower() for k in MATMUL) or op_type in ("aten::mm", "aten::addmm",
                                                                      "aten::bmm"):
    return "matmul"
  if name in optimizer or "Apply" in op_type:
    return "optimizer update"
  if op_type in ("NoOp", "Const", "_Retval", "_Arg", "VarHandleOp", "ReadVariableOp",
                 "Identity", "_SOURCE", "Reshape", "Cast"):
    return "other (bookkeeping)"
  return "element-wise/other"


def profile_ours(ours, traced):
  """{op type: [µs per step, nodes per step]}, {category: µs per step}, wall ms per step."""
  graph = ours.graph.graph
  types = {op.name: op.type for op in graph.get_operations()}
  optimizer = update_only(ours.graph)
  per_type = collections.defaultdict(lambda: [0.0, 0])
  per_category = collections.defaultdict(float)
  options = tf.RunOptions(trace_level=tf.RunOptions.FULL_TRACE)
  wall = 0.0
  for _ in range(traced):
    metadata = tf.RunMetadata()
    start = time.perf_counter()
    ours.session.run(ours.graph.train_op, options=options, run_metadata=metadata)
    wall += time.perf_counter() - start
    for device in metadata.step_stats.dev_stats:
      for node in device.node_stats:
        name = node.node_name.split(":")[0]
        # The kernel that ran (grappler's fusions: _MklFusedMatMul under a BiasAdd's name).
        label = node.timeline_label.split("(")[0].split(" = ")
        op_type = label[1].strip() if len(label) == 2 else types.get(name, name)
        micros = node.op_end_rel_micros - node.op_start_rel_micros
        per_type[op_type][0] += micros / traced
        per_type[op_type][1] += 1 / traced
        per_category[category(op_type, name, optimizer)] += micros / traced
  return per_type, per_category, 1000 * wall / traced


def profile_torch(theirs, traced):
  """{aten op: [µs per step, calls per step]}, {category: µs per step}, wall ms per step."""
  import torch
  activities = [torch.profiler.ProfilerActivity.CPU]
  start = time.perf_counter()
  with torch.profiler.profile(activities=activities) as prof:
    for _ in range(traced):
      theirs.step()
  wall = time.perf_counter() - start
  per_type = {}
  per_category = collections.defaultdict(float)
  optimizer_us = 0.0
  for event in prof.key_averages():
    if event.key.startswith("Optimizer.step"):
      optimizer_us += event.cpu_time_total / traced  # the whole AdamW step, children included
      continue
    if not event.key.startswith("aten::"):
      continue
    micros = event.self_cpu_time_total / traced
    per_type[event.key] = [micros, event.count / traced]
  for key, (micros, _) in per_type.items():
    per_category[category(key, key)] += micros
  # The AdamW step's aten ops are among the element-wise ones: move its total over.
  per_category["element-wise/other"] -= optimizer_us
  per_category["optimizer update"] += optimizer_us
  return per_type, per_category, 1000 * wall / traced


def report(label, per_type, per_category, wall_ms, top):
  total = sum(per_category.values())
  nodes = sum(count for _, count in per_type.values())
  print(f"\n[{label}] wall {wall_ms:.1f} ms/step, summed op time {total / 1000:.1f} ms/step, "
        f"{nodes:.0f} ops executed per step, {len(per_type)} op types")
  print("| part | ms/step | share |\n|---|---|---|")
  for name, micros in sorted(per_category.items(), key=lambda kv: -kv[1]):
    print(f"| {name} | {micros / 1000:.1f} | {micros / total:.1%} |")
  print(f"| op type (top {top}) | ms/step | share | ops/step |\n|---|---|---|---|")
  for name, (micros, count) in sorted(per_type.items(), key=lambda kv: -kv[1][0])[:top]:
    print(f"| {name} | {micros / 1000:.1f} | {micros / total:.1%} | {count:.0f} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="tiny,20m", help=f"comma list of {list(bench.CONFIGS)}")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--traced", type=int, default=3, help="traced steps per side")
  parser.add_argument("--top", type=int, default=15, help="op types listed")
  parser.add_argument("--inter_op_threads", type=int, default=0, help="TF; 0 = TF's default")
  parser.add_argument("--intra_op_threads", type=int, default=0, help="TF; 0 = TF's default")
  parser.add_argument("--no_torch", action="store_true", help="profile ours only")
  parser.add_argument("--data_dir", default=None, help="reuse/keep the prepared dataset here")
  parser.add_argument("--gin_param", action="append", default=[],
                      help='extra binding for ours, e.g. \'train.precision = "bfloat16"\'')
  args = parser.parse_args()
  import torch
  torch.set_num_threads(bench.CORES)
  tf.get_logger().setLevel("ERROR")
  print(cpu_line())
  print(f"loadavg {' '.join(open('/proc/loadavg').read().split()[:3])} on {bench.CORES} cores; "
        f"TF_XLA_FLAGS={os.environ.get('TF_XLA_FLAGS', '')!r}; TF threads "
        f"inter={args.inter_op_threads or 'default'} intra={args.intra_op_threads or 'default'}",
        flush=True)
  workdir = tempfile.mkdtemp(prefix="gptneo-profile-")
  try:
    dataset_dir = args.data_dir or os.path.join(workdir, "data")
    if not os.path.exists(os.path.join(dataset_dir, "dataset.json")):
      bench.prepare_data(dataset_dir)
    for name in args.configs.split(","):
      cfg = bench.CONFIGS[name]
      cfg = dataclasses.replace(cfg, gin_params=cfg.gin_params + args.gin_param)
      ours = bench.Ours(cfg, dataset_dir, os.path.join(workdir, f"model-{name}"),
                        args.inter_op_threads, args.intra_op_threads)
      for _ in range(args.warmup):
        ours.step()
      per_type, per_category, wall = profile_ours(ours, args.traced)
      clusters = sum(count for op_type, (_, count) in per_type.items()
                     if category(op_type, "") == "xla cluster")
      print(f"\n[{name}] graph: {len(ours.graph.graph.get_operations())} tf ops; XLA cluster "
            f"ops executed per step: {clusters:.0f}")
      report(f"{name} ours", per_type, per_category, wall, args.top)
      ours.session.close()
      if not args.no_torch:
        theirs = bench.Torch(cfg, ours.params, "sdpa", args.warmup + args.traced)
        for _ in range(args.warmup):
          theirs.step()
        report(f"{name} torch", *profile_torch(theirs, args.traced), args.top)
      print(f"loadavg now {' '.join(open('/proc/loadavg').read().split()[:3])}", flush=True)
  finally:
    if not args.data_dir:
      shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
  gin_utils.graph_mode()
  main()
