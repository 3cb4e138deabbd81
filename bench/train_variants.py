#!/usr/bin/env python3
"""A/B of the proposed bench/fast_ops.py against the current code, on the real train step.

  . .venv/bin/activate && export PYTHONPATH=$PWD
  python bench/train_variants.py                      # check + tiny and 20m, ~8 minutes, 2 idle cores
  python bench/train_variants.py --check_only         # equivalence on 3 layouts, no timing

Nothing in gptneo/ changes: before a graph is built, this process swaps three mtf functions
for the bench/fast_ops.py versions (each falls back to mtf's own where it does not apply):

  gather  mtf.gather -> fast_ops.embedding_lookup
  xent    mtf.layers.softmax_cross_entropy_with_logits -> fast_ops.softmax_cross_entropy
  softmax mtf.softmax -> fast_ops.softmax

so the graph is otherwise exactly the one bin/train builds. It first checks that every
variant trains identically (losses and gradient norms of a few steps, on the single-device,
data-parallel and model-parallel layouts), then times the variants in alternating rounds
(same machinery as bench/train_throughput.py).
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_throughput as bench  # noqa: E402  (sets up sys.path and TF logging)
import fast_ops  # noqa: E402
from gptneo.compat import mtf, tf  # noqa: E402

_ORIGINAL = {"gather": mtf.gather, "xent": mtf.layers.softmax_cross_entropy_with_logits,
             "softmax": mtf.softmax}


def _gather(weights, indices, dim, output_shape=None):
  if (output_shape is None and isinstance(indices, mtf.Tensor) and indices.dtype.is_integer
      and weights.shape.dims[0] == dim):
    return fast_ops.embedding_lookup(weights, indices, dim)
  return _ORIGINAL["gather"](weights, indices, dim, output_shape)


def _xent(logits, targets, vocab_dim, z_loss=0.0):
  if (not z_loss and targets.dtype.is_integer and logits.shape.dims[-1] == vocab_dim
      and targets.shape.dims == logits.shape.dims[:-1]):
    return fast_ops.softmax_cross_entropy(logits, targets, vocab_dim)
  return _ORIGINAL["xent"](logits, targets, vocab_dim, z_loss)


def _softmax(x, reduced_dim, extra_logit=None, name=None):
  # attention scores only: their memory dim is last and never split (an MoE router's
  # experts dim may be split, which fast_ops.softmax does not support)
  if (extra_logit is None and x.shape.dims[-1] == reduced_dim
      and reduced_dim.name in ("memory", "block_memory")):
    return fast_ops.softmax(x, reduced_dim)
  return _ORIGINAL["softmax"](x, reduced_dim, extra_logit, name)


def use(variant):
  """variant: "base", or "+"-joined names among gather, xent, softmax."""
  names = set() if variant == "base" else set(variant.split("+"))
  unknown = names - {"gather", "xent", "softmax"}
  if unknown:
    raise ValueError(f"unknown variant part(s) {sorted(unknown)}")
  mtf.gather = _gather if "gather" in names else _ORIGINAL["gather"]
  mtf.softmax = _softmax if "softmax" in names else _ORIGINAL["softmax"]
  mtf.layers.softmax_cross_entropy_with_logits = (
      _xent if "xent" in names else _ORIGINAL["xent"])


LAYOUTS = {"single": [], "data": ['mesh.mesh_shape = "x:2"', 'mesh.layout = "batch:x"'],
           "model": ['mesh.mesh_shape = "x:2"', 'mesh.layout = "heads:x,mlp:x,vocab:x"']}


def check(variants, dataset_dir, workdir, steps=3):
  """Every variant must give the base's losses and gradient norms, on every layout."""
  ok = True
  for layout, params in LAYOUTS.items():
    cfg = bench.Config("check", ["GPT.n_layer = 2", *params], 2, 128, 4, 16)
    reference = None
    for variant in ["base"] + variants:
      use(variant)
      ours = bench.Ours(cfg, dataset_dir, os.path.join(workdir, "check"), 0, 0)
      with ours.graph.graph.as_default():
        got = [ours.session.run([ours.graph.train_op, ours.graph.loss,
                                 ours.graph.grad_norm])[1:] for _ in range(steps)]
      ours.session.close()
      reference = reference or got
      same = all(abs(a - b) <= 1e-4 * max(1.0, abs(b))
                 for pair, ref in zip(got, reference, strict=False) for a, b in zip(pair, ref, strict=False))
      ok &= same
      print(f"check {layout:6s} {variant:22s} loss/grad-norm " + "  ".join(
          f"{loss:.5f}/{norm:.4f}" for loss, norm in got) + ("" if same else "  MISMATCH"),
          flush=True)
  return ok


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="tiny,20m")
  parser.add_argument("--variants", default="gather,xent,softmax,gather+xent+softmax",
                      help="comma list; each a '+'-joined set of gather, xent, softmax")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=0, help="0: 10 for tiny, 3 for 20m")
  parser.add_argument("--check_only", action="store_true")
  parser.add_argument("--max_foreign", type=float, default=0.15)
  parser.add_argument("--idle_wait", type=float, default=20)
  parser.add_argument("--retries", type=int, default=2)
  parser.add_argument("--data_dir", default=None)
  args = parser.parse_args()
  tf.get_logger().setLevel("ERROR")
  variants = args.variants.split(",")

  workdir = tempfile.mkdtemp(prefix="gptneo-variants-")
  try:
    dataset_dir = args.data_dir or os.path.join(workdir, "data")
    if not os.path.exists(os.path.join(dataset_dir, "dataset.json")):
      bench.prepare_data(dataset_dir)
    if not check(variants, dataset_dir, workdir):
      sys.exit("a variant trains differently from the current code")
    if args.check_only:
      return
    print("\n| config | variant | tok/s (median) | vs base | tok/s (best) | foreign max |")
    print("|---|---|---|---|---|---|")
    for name in args.configs.split(","):
      cfg = bench.CONFIGS[name]
      steps = args.steps or (10 if name == "tiny" else 3)
      tokens = cfg.batch_size * cfg.n_ctx
      runners = {}
      for variant in ["base"] + variants:
        use(variant)
        ours = bench.Ours(cfg, dataset_dir, os.path.join(workdir, f"{name}-{variant}"), 0, 0)
        runners[variant] = bench.Runner(ours.step, tokens, args.max_foreign, args.idle_wait,
                                        args.retries)
        for _ in range(3):
          ours.step()
      for _ in range(args.rounds):
        for runner in runners.values():
          runner.time_round(steps)
      base = statistics.median(r[0] for r in runners["base"].rounds)
      for variant, runner in runners.items():
        median = statistics.median(r[0] for r in runner.rounds)
        print(f"| {name} | {variant} | {median:.0f} | {median / base - 1:+.1%} | "
              f"{max(r[0] for r in runner.rounds):.0f} | "
              f"{max(r[1] for r in runner.rounds):.2f} |", flush=True)
  finally:
    use("base")
    if not args.data_dir:
      shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
  main()
