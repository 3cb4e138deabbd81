#!/usr/bin/env python3
"""Local vs global attention step time at n_ctx 2048, and peak memory with recompute_grad.

  . .venv/bin/activate && export PYTHONPATH=$PWD
  python bench/attention.py                 # all rows, a few minutes on 2 cores
  python bench/attention.py --steps=3 --n_layer=2

Each row runs in its own subprocess (so the RSS high-water mark is that row's alone) and
times one training step, forward + backward (mtf.gradients of the mean cross-entropy,
no optimizer), on one CPU device, float32, batch 1, random tokens. Reported:
  * step time: median of --steps timed runs after one warm-up run;
  * TF peak: the largest `allocator_bytes_in_use` in one traced step's RunMetadata
    step_stats (what the CPU allocator held at its fullest);
  * RSS peak: the process's ru_maxrss, which includes TF's own ~0.5 GB.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gptneo import configurables  # noqa: E402,F401  (registers every configurable)
from gptneo import gin_utils  # noqa: E402
from gptneo import mesh as mesh_lib  # noqa: E402
from gptneo import runtime  # noqa: E402
from gptneo.compat import mtf, tf  # noqa: E402
from gptneo.model import gpt as gpt_lib  # noqa: E402
from gptneo.model import ops  # noqa: E402
from timing import cpu_line  # noqa: E402  (bench/ is sys.path[0])

ROWS = {  # name -> GPT overrides
    "global": {},
    "local": {"attention_layers": [["local", 1]]},
    "global + recompute_grad": {"recompute_grad": True},
    "local + recompute_grad": {"attention_layers": [["local", 1]], "recompute_grad": True},
}


def build_step(model, batch_size):
  """A forward + backward step: (graph, step tensor, windows placeholder, init ops, spec)."""
  graph = tf.Graph()
  with graph.as_default():
    mtf_graph, mtf_mesh = runtime.new_mesh()
    dims = model.dims(batch_size)
    windows = tf.placeholder(tf.int32, [batch_size, model.n_ctx + 1])
    shape = [dims.batch, dims.sequence]
    tokens = mtf.import_tf_tensor(mtf_mesh, windows[:, :-1], shape)
    targets = mtf.import_tf_tensor(mtf_mesh, windows[:, 1:], shape)
    logits, _ = model(tokens, runtime.variable_dtype("float32"), ops.Dropout(False, 0, 0))
    loss = gpt_lib.loss(logits, targets, dims.vocab)
    grads = mtf.gradients([loss], [v.outputs[0] for v in mtf_graph.trainable_variables])
    spec = mesh_lib.mesh()
    lowering = runtime.lower(mtf_graph, mtf_mesh, spec)
    # Fetch a value of every gradient: TF prunes a tf.group of them to almost nothing.
    step = tf.add_n([tf.reduce_sum(lowering.export_to_tf_tensor(g)) for g in grads])
    init = [tf.global_variables_initializer(), lowering.copy_masters_to_slices()]
  return graph, step, windows, init, spec


def measure(args, overrides):
  """Step seconds and peaks for one row (run in a child process)."""
  model = gpt_lib.GPT(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                      n_ctx=args.n_ctx, n_vocab=args.n_vocab, window_size=args.window_size,
                      **{k: v for k, v in overrides.items() if k != "attention_layers"},
                      attention_layers=_pattern(overrides, args.n_layer))
  graph, step, windows, init, spec = build_step(model, args.batch_size)
  feed = {windows: np.random.default_rng(0).integers(
      0, args.n_vocab, (args.batch_size, args.n_ctx + 1))}
  with graph.as_default(), tf.Session(config=spec.session_config()) as session:
    session.run(init[0])
    session.run(init[1])
    session.run(step, feed)  # warm-up
    times = []
    for _ in range(args.steps):
      start = time.perf_counter()
      session.run(step, feed)
      times.append(time.perf_counter() - start)
    metadata = tf.RunMetadata()
    session.run(step, feed, options=tf.RunOptions(trace_level=tf.RunOptions.FULL_TRACE),
                run_metadata=metadata)
  return {"step_seconds": float(np.median(times)), "tf_peak_bytes": _allocator_peak(metadata),
          "rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _pattern(overrides, n_layer):
  pattern = overrides.get("attention_layers")
  return [[pattern[0][0], n_layer]] if pattern else None


def _allocator_peak(metadata):
  return max((memory.allocator_bytes_in_use for device in metadata.step_stats.dev_stats
              for node in device.node_stats for memory in node.memory), default=0)


def run_rows(args):
  results = {}
  for name in ROWS:
    command = [sys.executable, os.path.abspath(__file__), f"--row={name}", *_shape_flags(args)]
    child = subprocess.run(command, capture_output=True, text=True, check=False)
    if child.returncode:
      raise SystemExit(f"row {name!r} failed:\n{child.stderr[-3000:]}")
    results[name] = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"{name}: {results[name]}", file=sys.stderr)
  return results


def _shape_flags(args):
  return [f"--{k}={getattr(args, k)}" for k in ("n_layer", "n_embd", "n_head", "n_ctx",
                                                "n_vocab", "window_size", "batch_size",
                                                "steps")]


def report(args, results):
  glob_time, local_time = (results[r]["step_seconds"] for r in ("global", "local"))
  lines = [f"n_layer {args.n_layer}, n_embd {args.n_embd}, n_head {args.n_head}, n_ctx "
           f"{args.n_ctx}, window {args.window_size}, batch {args.batch_size}, vocab "
           f"{args.n_vocab}; forward + backward, median of {args.steps} steps.", "",
           "| model | step time (s) | TF allocator peak (MiB) | process RSS peak (MiB) |",
           "|---|---|---|---|"]
  for name, row in results.items():
    lines.append(f"| {name} | {row['step_seconds']:.2f} | {row['tf_peak_bytes'] / 2**20:.0f} "
                 f"| {row['rss_peak_bytes'] / 2**20:.0f} |")
  lines += ["", f"local is {glob_time / local_time:.2f}x faster than global per step."]
  for kind in ("global", "local"):
    plain, remat = results[kind]["tf_peak_bytes"], results[f"{kind} + recompute_grad"][
        "tf_peak_bytes"]
    lines.append(f"recompute_grad cuts the {kind} model's allocator peak by "
                 f"{1 - remat / plain:.0%}.")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  for flag, default in (("n_layer", 4), ("n_embd", 256), ("n_head", 4), ("n_ctx", 2048),
                        ("n_vocab", 1024), ("window_size", 256), ("batch_size", 2),
                        ("steps", 5)):
    parser.add_argument(f"--{flag}", type=int, default=default)
  parser.add_argument("--row", choices=sorted(ROWS), help=argparse.SUPPRESS)
  args = parser.parse_args()
  print(cpu_line())
  if args.row:
    print(json.dumps(measure(args, ROWS[args.row])))
  else:
    print(report(args, run_rows(args)))


if __name__ == "__main__":
  gin_utils.graph_mode()  # as every program runs (gin_utils.run)
  main()
