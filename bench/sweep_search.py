"""A search with pruning against the full grid: the best loss each finds, the tokens each spends.

  .venv/bin/python bench/sweep_search.py            # needs data/stdlib (make data)

Both run through bin/sweep on gin/sweeps/tiny_search.gin, tiny.gin's space of learning rate x
width x warmup (3 x 3 x 3 = 27 points) shortened to 60 steps of 8 x 256 tokens: first the
whole grid, then --search=tpe --pruner=asha with TRIALS trials (pruning at the validation
losses of every 10 steps). Tokens spent are each run dir's last step trained (train_metrics.jsonl)
times its tokens per step: a pruned point counts the steps it ran, a trial repeating a point
already run counts nothing (its result is copied). The goal (issue 26): the search's best
final validation loss within 1% of the grid's, with at most a third of its tokens.
"""
import argparse
import csv
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from timing import cpu_line  # noqa: E402  (bench/ is sys.path[0])

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SWEEP, TRIALS = "tiny_search.gin", 12


def run_sweep(root, parallel, extra=()):
  """Runs one sweep into `root`; returns its wall time in seconds."""
  command = [sys.executable, str(REPO / "bin" / "sweep"), f"--sweep={SWEEP}", f"--root={root}",
             f"--parallel={parallel}", *extra]
  start = time.time()
  subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO)
  return time.time() - start


def tokens_spent(root):
  """Training tokens of every run dir: its last step trained times its tokens per step."""
  from gptneo.sweep import metrics  # pylint: disable=g-import-not-at-top
  from gptneo.sweep import root as root_lib  # pylint: disable=g-import-not-at-top
  total = 0
  points, facts = root_lib.Root(root).points()
  for point, fact in zip(points, facts, strict=True):
    records = metrics.train(root / point.name)
    total += (records[-1]["step"] if records else 0) * fact.tokens_per_step
  return total, len(points)


def best(root):
  """(best final validation loss, its point) among the points run to the end."""
  with open(root / "results.csv") as f:
    done = [r for r in csv.DictReader(f) if r["status"] == "done" and r["val_loss_final"]]
  row = min(done, key=lambda r: float(r["val_loss_final"]))
  return float(row["val_loss_final"]), row["point"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--parallel", type=int, default=2)
  parser.add_argument("--root", default=None, help="keep the sweeps here (default: a tmp dir)")
  args = parser.parse_args()
  print(cpu_line())
  print(f"cores: {len(os.sched_getaffinity(0))}, load average before: {os.getloadavg()}")
  with tempfile.TemporaryDirectory() as tmp:
    base = pathlib.Path(args.root or tmp)
    results = {}
    for name, extra in (("grid", ()), (f"tpe+asha, {TRIALS} trials",
                                       ("--search=tpe", f"--trials={TRIALS}", "--pruner=asha"))):
      root = base / name.split(",")[0].replace("+", "_")
      wall = run_sweep(root, args.parallel, extra)
      tokens, points = tokens_spent(root)
      results[name] = (*best(root), tokens, points, wall)
      print(json.dumps({name: results[name]}), flush=True)
    grid_loss, _, grid_tokens, _, _ = results["grid"]
    print(f"load average after: {os.getloadavg()}")
    print("| sweep | best val loss | vs grid | best point | points run | tokens | vs grid | wall |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (loss, point, tokens, points, wall) in results.items():
      print(f"| {name} | {loss:.4f} | {100 * (loss / grid_loss - 1):+.2f}% | {point} | "
            f"{points} | {tokens:,} | {tokens / grid_tokens:.0%} | {wall / 60:.1f} min |")


if __name__ == "__main__":
  main()
