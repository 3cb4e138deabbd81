#!/usr/bin/env python3
"""Peak resident memory of our real train step next to gptneo.memory's analytic estimate.

  . .venv/bin/activate && export PYTHONPATH=$PWD
  python bench/memory.py                          # 20m and 125m-shaped, float32, ~5 min on 2 cores
  python bench/memory.py --configs=20m --precisions=float32,bfloat16
  python bench/memory.py --configs=20m --mesh_shape=x:4 --layouts="batch:x;batch:x,fsdp:x" \
      --processes                                 # each device's own allocator, ~5 min

Each (config, precision) runs in a fresh child process (so peaks don't mix), which builds the
train step exactly as bench/train_throughput.py's `Ours` does (gin -> train.settings() ->
train_graph.build: tf.data input, AdamW, clipping, step increment), initializes it in a
Session and takes --steps steps. The child reads /proc/self/status:
  * baseline: VmRSS after its imports (TensorFlow, mesh-tensorflow, gptneo), before any graph;
  * built: VmRSS after the graph is built and the variables initialized;
  * peak: VmHWM after the steps (the process's high-water mark, ru_maxrss likewise);
and TF's CPU allocator peak: the largest `allocator_bytes_in_use` in one traced step's
RunMetadata step_stats (the tensors and variables TF allocated, no framework code or graph),
and what the allocator holds after init and between steps (a traced tiny run at each).
The estimate is gptneo.memory.training_memory_bytes(model, batch, precision, optimizer).

Per device (--mesh_shape, --processes): the CPU devices of one process share one allocator,
so its figures are the mesh's total. With --processes each device is its own process (task 0
measures; tasks 1.. are bare TF servers of one CPU device, a mesh.cluster over loopback), and
the traced step's step_stats give each device's allocator peak, set against
train_checks.training_estimate (memory.per_device: the estimate Settings.check uses).

ratio = (peak - baseline) / estimate: what the step adds above the imported framework, over
what the model's weights, optimizer state, gradients and kept activations should take.
The allocator ratio (TF allocator peak / estimate) isolates the tensors alone.

Configs: `20m` is train_throughput's (tiny.gin + 10 layers, 384 embd, 6 heads, batch 8, n_ctx
256, vocab 4096); `125m` is gin/gpt_neo_125m.gin's shape (12 layers, 768 embd, 12 heads, vocab
50257, global and local attention alternating, window 256) at n_ctx 1024 and batch 2 instead
of 2048 x 256, so a step fits this CPU. Data: one small BPE-4096 dataset per n_ctx prepared
from stdlib modules in a temp dir (the 125m model's larger vocabulary only leaves ids unused).
"""
import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ info/warnings: noise here
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import bench_corpus_files, cpu_line  # noqa: E402  (no TF: the parent stays light)

MIB = 2 ** 20


@dataclasses.dataclass
class Config:
  name: str
  gin_file: str
  gin_params: list
  n_ctx: int
  note: str


CONFIGS = {
    "20m": Config("20m", "tiny.gin", ["GPT.n_layer = 10", "GPT.n_embd = 384", "GPT.n_head = 6",
                                      "train.batch_size = 8"], 256,
                  "10 layers, 384 embd, 6 heads, n_ctx 256, vocab 4096, batch 8"),
    "125m": Config("125m", "gpt_neo_125m.gin", ["GPT.n_ctx = 1024", "train.batch_size = 2"],
                   1024, "GPT-Neo-125M shape (global/local, window 256, vocab 50257) at "
                   "n_ctx 1024, batch 2"),
}


def proc_status():
  """{"VmRSS": bytes, "VmHWM": bytes} of this process."""
  values = {}
  with open("/proc/self/status") as f:
    for line in f:
      key, _, rest = line.partition(":")
      if key in ("VmRSS", "VmHWM"):
        values[key] = int(rest.split()[0]) * 1024
  return values


# --------------------------------------------------------------------------- child


def measure(cfg, precision, dataset_dir, model_dir, steps, mesh_shape="", layout="",
            processes=False):
  """One config's memory, in this (fresh) process: a dict of bytes and the estimate.

  With a `mesh_shape` of several CPU devices, also each device's weights and optimizer slots
  (per_device_slices) and TF's allocator's view of them (per_device_measured). With
  `processes`, this process is task 0 of a loopback mesh.cluster whose other tasks are bare
  TF servers of one CPU device each (`serve`): every device has its own process, so its own
  allocator, and the traced step's allocator peak of each device is that device's own.
  """
  import contextlib  # pylint: disable=g-import-not-at-top
  import resource  # pylint: disable=g-import-not-at-top

  from gptneo import configurables  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from gptneo import gin_utils  # pylint: disable=g-import-not-at-top
  from gptneo import memory  # pylint: disable=g-import-not-at-top
  from gptneo import runtime  # pylint: disable=g-import-not-at-top
  from gptneo import train as train_lib  # pylint: disable=g-import-not-at-top
  from gptneo import train_checks  # pylint: disable=g-import-not-at-top
  from gptneo import train_graph  # pylint: disable=g-import-not-at-top
  from gptneo.compat import tf  # pylint: disable=g-import-not-at-top

  gin_utils.graph_mode()
  tf.get_logger().setLevel("ERROR")
  baseline = proc_status()["VmRSS"]
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.CRITICAL)  # gin logs "Path not found" for each include it resolves
  try:
    gin_utils.parse([cfg.gin_file], [f'DATASET_DIR = "{dataset_dir}"', "train.eval_batches = 0",
                                     f'train.precision = "{precision}"', *cfg.gin_params,
                                     *mesh_bindings(mesh_shape, layout, processes)])
  finally:
    root.setLevel(level)
  settings = train_lib.settings(keep_checkpoints=1)
  settings.check()
  model = settings.model
  estimate = memory.training_memory_bytes(model, settings.batch_size, settings.precision,
                                          settings.optimizer)
  peers = [subprocess.Popen([sys.executable, os.path.abspath(__file__),
                             f"--serve={json.dumps(settings.mesh.cluster)}", f"--task={task}"])
           for task in range(1, settings.mesh.num_tasks)]
  stack = contextlib.ExitStack()
  stack.callback(lambda: [(peer.kill(), peer.wait()) for peer in peers])
  rt = stack.enter_context(runtime.started(settings.mesh))
  graph = train_graph.build(settings, model_dir, rt)
  built_graph = proc_status()["VmRSS"]
  session = stack.enter_context(rt.session(graph.graph))
  with graph.graph.as_default():
    graph.checkpoints.restore_or_initialize(session, graph.init_ops)
    variable_bytes = sum(v.shape.num_elements() * v.dtype.base_dtype.size
                         for v in tf.global_variables())
    probe = tf.reduce_sum(tf.cast(graph.step, tf.float32) + tf.zeros([256]))

  def allocator_in_use():  # what TF's allocator holds between steps: a traced tiny run
    metadata = tf.RunMetadata()
    session.run(probe, options=tf.RunOptions(trace_level=tf.RunOptions.FULL_TRACE),
                run_metadata=metadata)
    return max(m.allocator_bytes_in_use for device in metadata.step_stats.dev_stats
               for node in device.node_stats for m in node.memory)

  initialized = proc_status()["VmRSS"]
  held_after_init = allocator_in_use()
  started = time.perf_counter()
  for _ in range(steps):
    session.run(graph.train_op)
  step_seconds = (time.perf_counter() - started) / steps
  status = proc_status()
  held_between_steps = allocator_in_use()
  maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  metadata = tf.RunMetadata()
  session.run(graph.train_op, options=tf.RunOptions(trace_level=tf.RunOptions.FULL_TRACE),
              run_metadata=metadata)
  device_peaks = {device.device: max((m.allocator_bytes_in_use for node in device.node_stats
                                       for m in node.memory), default=0)
                  for device in metadata.step_stats.dev_stats}
  allocator_peak = max(device_peaks.values(), default=0)
  loss = float(session.run(graph.loss))
  stack.close()
  slices = slice_bytes_by_device(graph.graph)
  return {"config": cfg.name, "precision": precision, "params": model.num_parameters(),
          "mesh_shape": mesh_shape, "layout": layout,
          "per_device_slices": max(slices.values(), default=variable_bytes),
          "all_slices": sum(slices.values()),
          "baseline": baseline, "built_graph": built_graph, "initialized": initialized,
          "peak": status["VmHWM"], "ru_maxrss": maxrss, "allocator_peak": allocator_peak,
          "variable_bytes": variable_bytes, "held_after_init": held_after_init,
          "held_between_steps": held_between_steps, "step_seconds": step_seconds, "loss": loss,
          "estimate": estimate.peak, "items": estimate.items(),
          "device_estimate": train_checks.training_estimate(settings).peak,
          "device_allocator_peaks": device_peaks if processes else {},
          "phases": {"persistent": sum(estimate.persistent.values()),
                     "backward start": sum(estimate.backward_start.values()),
                     "backward end": sum(estimate.backward_end.values())}}


def mesh_bindings(mesh_shape, layout, processes=False):
  """gin bindings of the mesh to measure on ("" and "": the preset's own); with `processes`,
  one task per device over loopback ports (this process task 0)."""
  if not mesh_shape:
    return []
  bindings = [f'mesh.mesh_shape = "{mesh_shape}"', f'mesh.layout = "{layout}"']
  if processes:
    from tests.test_multiprocess import free_ports  # pylint: disable=g-import-not-at-top
    devices = math.prod(int(size) for _, size in (d.split(":") for d in mesh_shape.split(",")))
    cluster = {"worker": [f"localhost:{port}" for port in free_ports(devices)]}
    bindings.append(f"mesh.cluster = {cluster!r}")
  return bindings


def serve(cluster, task):
  """A peer task of a --processes mesh: a bare TF server of one CPU device, until killed."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.compat.v1.disable_eager_execution()
  tf.distribute.Server(tf.train.ClusterSpec(cluster), job_name="worker", task_index=task,
                       config=tf.compat.v1.ConfigProto(device_count={"CPU": 1})).join()


def slice_bytes_by_device(graph):
  """{device: bytes of the mesh variables' slices (weights, optimizer slots) placed on it}.

  mtf's slice variables (named <variable>_slice_<position>) are in no collection: found as
  the graph's VarHandleOps.
  """
  from gptneo.compat import tf  # pylint: disable=g-import-not-at-top
  totals = {}
  for op in graph.get_operations():
    if op.type == "VarHandleOp" and "_slice_" in op.name:
      shape = tf.TensorShape(op.get_attr("shape"))
      size = shape.num_elements() * tf.as_dtype(op.get_attr("dtype")).size
      totals[op.device] = totals.get(op.device, 0) + size
  return totals


# --------------------------------------------------------------------------- parent


def prepare_data(folder, n_ctx, tokenizer_path=None):
  """A small stdlib dataset of `n_ctx`-token windows (BPE 4096, or `tokenizer_path`'s)."""
  from gptneo.data import prepare  # pylint: disable=g-import-not-at-top
  files = bench_corpus_files()
  if tokenizer_path:
    return prepare.prepare_dataset(files, folder, n_ctx=n_ctx, tokenizer_path=tokenizer_path,
                                   validation_fraction=0.0)
  return prepare.prepare_dataset(files, folder, n_ctx=n_ctx, vocab_size=4096,
                                 validation_fraction=0.0)


def _prepare_child(folder, n_ctx, tokenizer_path):
  """Prepares in a child too: the parent never imports TensorFlow."""
  code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import memory; "
          "memory.prepare_data(sys.argv[3], int(sys.argv[4]), sys.argv[5] or None)")
  here = os.path.dirname(os.path.abspath(__file__))
  subprocess.run([sys.executable, "-c", code, os.path.dirname(here), here, folder, str(n_ctx),
                  tokenizer_path or ""], check=True, capture_output=True)


def run_child(name, precision, dataset_dir, model_dir, steps, mesh_shape="", layout="",
              processes=False):
  command = [sys.executable, os.path.abspath(__file__), f"--child={name}",
             f"--precisions={precision}", f"--data_dir={dataset_dir}",
             f"--model_dir={model_dir}", f"--steps={steps}", f"--mesh_shape={mesh_shape}",
             f"--layouts={layout}"] + (["--processes"] if processes else [])
  child = subprocess.run(command, capture_output=True, text=True, check=False)
  if child.returncode:
    raise SystemExit(f"{name} {precision} failed:\n{child.stderr[-3000:]}")
  return json.loads(child.stdout.strip().splitlines()[-1])


def _short(name):
  return (name.replace("activations: ", "act ").replace("optimizer state (float32)", "Adam m+v")
          .replace("weights (float32)", "weights").replace(" (float32)", ""))


def report(rows):
  header = ("config", "precision", "params", "estimate (MiB)", "measured peak (MiB)",
            "import baseline (MiB)", "peak - baseline (MiB)", "ratio", "TF allocator peak (MiB)",
            "allocator / estimate")
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  for r in rows:
    above = r["peak"] - r["baseline"]
    lines.append(f"| {r['config']} | {r['precision']} | {r['params'] / 1e6:.2f}M | "
                 f"{r['estimate'] / MIB:.0f} | {r['peak'] / MIB:.0f} | {r['baseline'] / MIB:.0f} | "
                 f"{above / MIB:.0f} | {above / r['estimate']:.2f} | "
                 f"{r['allocator_peak'] / MIB:.0f} | {r['allocator_peak'] / r['estimate']:.2f} |")
  lines.append("")
  for r in rows:
    items = " + ".join(f"{_short(name)} {value / MIB:.0f}" for name, value in r["items"])
    phases = ", ".join(f"{k} {v / MIB:.0f}" for k, v in r["phases"].items())
    lines.append(f"- {r['config']} {r['precision']} estimate = {items} = "
                 f"{r['estimate'] / MIB:.0f} MiB (phases: {phases} MiB); RSS after build "
                 f"{r['built_graph'] / MIB:.0f}, after init {r['initialized'] / MIB:.0f} "
                 f"(TF variables {r['variable_bytes'] / MIB:.0f}); TF allocator holds "
                 f"{r['held_after_init'] / MIB:.0f} after init, {r['held_between_steps'] / MIB:.0f} "
                 f"between steps; step {r['step_seconds']:.2f} s, "
                 f"loss {r['loss']:.3f}")
  return "\n".join(lines)


def report_per_device(rows):
  """Each device's weights and optimizer slots, per layout: counted and seen by TF's allocator."""
  header = ("config", "mesh", "layout", "per-device weights + slots (MiB)",
            "masters + all slices (MiB)", "allocator between steps (MiB)")
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  for r in rows:
    lines.append(f"| {r['config']} | {r['mesh_shape'] or '-'} | {r['layout'] or '-'} | "
                 f"{r['per_device_slices'] / MIB:.1f} | "
                 f"{(r['variable_bytes'] + r['all_slices']) / MIB:.0f} | "
                 f"{r['held_between_steps'] / MIB:.0f} |")
  return "\n".join(lines)


def report_device_allocators(rows):
  """--processes: each device's own TF allocator peak in the traced step against the
  per-device estimate (train_checks.training_estimate, as Settings.check uses it). Task 0 also holds
  the masters (every tf.global_variable: the checkpoint's whole tensors; on a TPU the host's),
  which no device of the estimate holds: they are taken off its figure."""
  header = ("config", "mesh", "layout", "per-device estimate (MiB)",
            "tasks 1.. allocator peaks (MiB)", "tasks 1.. / estimate",
            "task 0 allocator peak - masters (MiB)", "task 0 / estimate")
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  for r in rows:
    peaks = dict(sorted(r["device_allocator_peaks"].items(),
                        key=lambda item: int(item[0].split("task:")[1].split("/")[0])))
    measured = list(peaks.values())
    measured[0] -= r["variable_bytes"]
    ratios = [m / r["device_estimate"] for m in measured[1:]]
    lines.append(f"| {r['config']} | {r['mesh_shape']} | {r['layout']} | "
                 f"{r['device_estimate'] / MIB:.1f} | "
                 f"{', '.join(f'{m / MIB:.1f}' for m in measured[1:])} | "
                 f"{min(ratios):.2f}-{max(ratios):.2f} | {measured[0] / MIB:.1f} | "
                 f"{measured[0] / r['device_estimate']:.2f} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="20m,125m", help=f"comma list of {list(CONFIGS)}")
  parser.add_argument("--precisions", default="float32", help="comma list: float32, bfloat16")
  parser.add_argument("--steps", type=int, default=3, help="steps before the traced one")
  parser.add_argument("--data_dir", default=None, help="reuse/keep the prepared data here")
  parser.add_argument("--mesh_shape", default="", help="a CPU mesh to measure on, e.g. x:4")
  parser.add_argument("--layouts", default="",
                      help="with --mesh_shape: layouts to measure, separated by ';', e.g. "
                           "'batch:x;batch:x,fsdp:x;batch:x,zero:x'")
  parser.add_argument("--processes", action="store_true",
                      help="with --mesh_shape: one process per device, each with its own TF "
                           "allocator, whose peaks are set against the per-device estimate")
  parser.add_argument("--child", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
  parser.add_argument("--model_dir", help=argparse.SUPPRESS)
  parser.add_argument("--serve", help=argparse.SUPPRESS)
  parser.add_argument("--task", type=int, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.serve:
    serve(json.loads(args.serve), args.task)
    return
  if args.child:
    print(json.dumps(measure(CONFIGS[args.child], args.precisions, args.data_dir, args.model_dir,
                             args.steps, args.mesh_shape, args.layouts, args.processes)))
    return
  started = time.time()
  print(cpu_line())
  print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  loadavg "
        f"{' '.join(open('/proc/loadavg').read().split()[:3])}", flush=True)
  workdir = tempfile.mkdtemp(prefix="gptneo-memory-")
  data_root = args.data_dir or os.path.join(workdir, "data")
  rows = []
  try:
    tokenizer = None
    for n_ctx in sorted({CONFIGS[name].n_ctx for name in args.configs.split(",")}):
      folder = os.path.join(data_root, f"ctx{n_ctx}")
      if not os.path.exists(os.path.join(folder, "dataset.json")):
        _prepare_child(folder, n_ctx, tokenizer)
      tokenizer = tokenizer or os.path.join(folder, "tokenizer.json")
    for name in args.configs.split(","):
      cfg = CONFIGS[name]
      for precision, layout in [(p, layout) for p in args.precisions.split(",")
                                for layout in args.layouts.split(";")]:
        row = run_child(name, precision, os.path.join(data_root, f"ctx{cfg.n_ctx}"),
                        os.path.join(workdir, f"model-{name}-{precision}-{len(rows)}"),
                        args.steps, args.mesh_shape, layout, args.processes)
        print(f"[{name} {precision}] {json.dumps({k: v for k, v in row.items() if k != 'items'})}",
              file=sys.stderr, flush=True)
        rows.append(row)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)  # a --data_dir outside it is kept
  print()
  for name in args.configs.split(","):
    print(f"{name}: {CONFIGS[name].note}")
  print()
  print(report(rows))
  if args.mesh_shape:
    print()
    print(report_per_device(rows))
    if args.processes:
      print()
      print(report_device_allocators(rows))
    print("\nper-device weights + slots: the largest device's mesh-variable slices (the "
          "graph's slice variables); masters + all slices: what the allocator should hold for "
          "them; allocator between steps: what TF's allocator holds between two steps")
  print(f"\nratio = (measured peak VmHWM - VmRSS after imports) / estimate; "
        f"allocator / estimate = TF's allocator peak in a traced step / estimate; "
        f"total {time.time() - started:.0f} s")


if __name__ == "__main__":
  main()
