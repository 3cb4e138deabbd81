"""The sweep driver's own overhead, and what --parallel=2 gains over 1 on this machine.

  .venv/bin/python bench/sweep_overhead.py            # both workloads, --parallel 1 and 2

For each workload a 4-point sweep (2 learning rates x 2 widths) runs through bin/sweep into a
fresh root, at --parallel=1 and then 2. The points' own time is the union of the intervals in
which at least one point's bin/train ran (from sweep_state.json); the driver's overhead is its
wall time minus that: its start-up and validation, the gaps between points, the report. The
driver's CPU is its own (bin/sweep logs it at the end), not its children's: what it costs
whatever else runs on the machine.
"""
import json
import os
import pathlib
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
from timing import cpu_line  # noqa: E402  (bench/ is sys.path[0])

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

AXES = ["learning_rate_schedule.learning_rate = [1e-3, 3e-3]"]
# "start-up": a test-sized model, 100 steps (TF start-up dominates each point).
# "compute": tiny.gin's shape at 64 wide, 150 steps of 8 x 256 tokens (the steps dominate).
WORKLOADS = {
    "start-up bound": ("small", ["GPT.n_layer = 2", "GPT.n_embd = 32", "GPT.n_head = 4",
                                 "GPT.n_ctx = 32", "GPT.n_vocab = 512", "train.batch_size = 8",
                                 "train.train_steps = 100"], "GPT.n_embd = [32, 64]"),
    "compute bound": ("stdlib", ["GPT.n_embd = 64", "GPT.n_head = 2", "train.batch_size = 8",
                                 "train.train_steps = 150"], "GPT.n_layer = [2, 4]"),
}
COMMON = ["train.log_every_n_steps = 10", "train.steps_per_checkpoint = 1000",
          "train.eval_every_n_steps = 50", "train.eval_steps = 4"]


def small_dataset(folder):
  from gptneo.data import prepare  # pylint: disable=g-import-not-at-top
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  names = ["argparse.py", "ast.py", "calendar.py", "csv.py", "difflib.py", "fractions.py",
           "heapq.py", "json/decoder.py", "string.py", "textwrap.py", "shlex.py", "queue.py"]
  prepare.prepare_dataset([str(stdlib / n) for n in names], str(folder), n_ctx=32,
                          vocab_size=512, validation_fraction=0.2)
  return folder


def union_seconds(spans):
  """Length of the union of (start, end) intervals."""
  total, end = 0.0, None
  for start, stop in sorted(spans):
    if end is None or start > end:
      total, end = total + stop - start, stop
    elif stop > end:
      total, end = total + stop - end, stop
  return total


def run_sweep(root, dataset, bindings, width_axis, parallel):
  params = [f'DATASET_DIR = "{dataset}"', *bindings, *COMMON]
  command = [sys.executable, str(REPO / "bin" / "sweep"), "--gin_file=tiny.gin",
             *[f"--gin_param={p}" for p in params], *[f"--axis={a}" for a in AXES],
             f"--axis={width_axis}", f"--root={root}", f"--parallel={parallel}"]
  start = time.time()
  result = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO)
  wall = time.time() - start
  cpu = float(re.search(r"the driver itself used ([0-9.]+) s of CPU", result.stderr).group(1))
  spans = []
  for state in root.glob("*/sweep_state.json"):
    spans += [(a["start"], a["end"]) for a in json.loads(state.read_text())["attempts"]]
  first = min(s for s, _ in spans)
  last = max(e for _, e in spans)
  points = union_seconds(spans)
  return {"parallel": parallel, "wall_s": wall, "points_s": points, "overhead_s": wall - points,
          "before_first_s": first - start, "after_last_s": start + wall - last,
          "point_mean_s": sum(e - s for s, e in spans) / len(spans), "driver_cpu_s": cpu}


def main():
  print(cpu_line())
  print(f"cores: {len(os.sched_getaffinity(0))}, load average before: {os.getloadavg()}")
  with tempfile.TemporaryDirectory() as tmp:
    datasets = {"small": small_dataset(pathlib.Path(tmp) / "small"),
                "stdlib": REPO / "data" / "stdlib"}
    print("| workload | parallel | sweep wall | points' own | driver overhead | before the "
          "first point | after the last | driver CPU | mean point | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (data, bindings, width_axis) in WORKLOADS.items():
      results = [run_sweep(pathlib.Path(tmp) / f"{name}-{p}".replace(" ", "_"), datasets[data],
                           bindings, width_axis, p) for p in (1, 2)]
      for r in results:
        speedup = results[0]["wall_s"] / r["wall_s"]
        print(f"| {name} | {r['parallel']} | {r['wall_s']:.1f} s | {r['points_s']:.1f} s | "
              f"{r['overhead_s']:.1f} s | {r['before_first_s']:.1f} s | "
              f"{r['after_last_s']:.1f} s | {r['driver_cpu_s']:.1f} s | "
              f"{r['point_mean_s']:.1f} s | {speedup:.2f}x |",
              flush=True)


if __name__ == "__main__":
  main()
