"""The first run on new TPU hardware (bin/tpu_check): does training there match the CPU?

`check(options)` connects to the TPU (no TPU: one line, exit code 2, nothing written), then
drives our own programs as a user would, each in a process of its own, in `work_dir`:
1. prepares the stdlib dataset (as `make data`);
2. trains tiny.gin `steps` steps on the TPU, with the layout given, and on this machine's CPU;
3. checks the loss falls on the TPU, and ends where the CPU run's does;
4. takes the TPU run's last checkpoint one step further on the TPU and on the CPU, and
   compares that step's loss (same weights, same batch: only the arithmetic differs);
5. writes report.md: versions, the checks, tokens/s and MFU of the TPU run.
None of this has run on a TPU (docs/tpu.md).
"""
import dataclasses
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

from gptneo import gin_utils
from gptneo import mesh as mesh_lib
from gptneo import programs
from gptneo import tpu
from gptneo.compat import tf
from gptneo.errors import UserError

# tiny.gin's loss after a few hundred steps is ~3-4 nats; TPU matmuls round through bfloat16.
FINAL_LOSS_RTOL = 0.05  # the TPU run's last logged loss against the CPU run's
STEP_LOSS_RTOL = 0.01  # one step from the same checkpoint
FALL = 0.7  # the last logged loss must be below this fraction of the first


@dataclasses.dataclass(frozen=True)
class Options:
  """What bin/tpu_check was asked (its flags)."""
  tpu: str  # mesh.tpu: 'local' on a TPU VM, or a TPU's name
  layout: str  # a gin layout file of the slice, e.g. layouts/tpu_v4_8.gin
  work_dir: str
  steps: int
  peak_flops: str  # a device of flops.PEAK_FLOPS, or "" (no MFU)


def connect(options: Options) -> None:
  """Initializes the TPU once and releases it; UserError (one line) if there is none."""
  gin_utils.parse([options.layout], [f"mesh.tpu = {gin_utils.gin_literal(options.tpu)}"])
  spec = mesh_lib.mesh()
  if spec.implementation != "simd":
    raise UserError(f"--layout={options.layout} is not a TPU layout (mesh.implementation = "
                    f"{spec.implementation!r}); use one of gin/layouts/tpu_*.gin")
  system = tpu.connect(spec)
  with tf.Graph().as_default(), tf.Session(system.target) as session:
    session.run(tpu.shutdown_ops(system))


def check(options: Options) -> bool:
  """Runs the check (see the module's docstring); returns whether every check passed."""
  connect(options)
  os.makedirs(options.work_dir, exist_ok=True)
  data = os.path.join(options.work_dir, "data")
  if not os.path.exists(os.path.join(data, "dataset.json")):
    _program("prepare_data", f"--output_dir={data}", "--input=stdlib", "--n_ctx=256",
             "--vocab_size=4096", log=options.work_dir)
  runs = {where: os.path.join(options.work_dir, where) for where in ("tpu", "cpu")}
  for where, run in runs.items():
    _train(options, run, data, options.steps, on_tpu=where == "tpu")
  curves = {where: _losses(run) for where, run in runs.items()}
  one_step = {}
  for where in ("tpu", "cpu"):
    run = os.path.join(options.work_dir, f"step_{where}")
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(runs["tpu"], run)
    _train(options, run, data, options.steps + 1, on_tpu=where == "tpu")
    one_step[where] = _losses(run)[-1]
  report = _report(options, curves, one_step, _last_record(runs["tpu"]))
  with open(os.path.join(options.work_dir, "report.md"), "w") as f:
    f.write(report.text)
  print(report.text)
  return report.passed


def _train(options, model_dir, data, steps, on_tpu):
  params = [f"DATASET_DIR = {gin_utils.gin_literal(data)}", f"train.train_steps = {steps}",
            "train.eval_batches = 0", "train.eval_every_n_steps = 0",
            f"train.steps_per_checkpoint = {options.steps}", "train.log_every_n_steps = 25"]
  files = ["tiny.gin"]
  if on_tpu:
    files.append(options.layout)
    params += [f"mesh.tpu = {gin_utils.gin_literal(options.tpu)}", "train.steps_per_loop = 25"]
    if options.peak_flops:
      params.append(f"train.peak_flops = {gin_utils.gin_literal(options.peak_flops)}")
  _program("train", f"--model_dir={model_dir}", *[f"--gin_file={f}" for f in files],
           *[f"--gin_param={p}" for p in params], log=options.work_dir)


def _program(name, *args, log):
  """Runs bin/<name>; its output goes to work_dir/<name>.log; failing, a one-line error."""
  path = os.path.join(log, f"{name}.log")
  with open(path, "a") as out:
    result = subprocess.run([sys.executable, str(programs.bin_dir() / name), *args],
                            stdout=out, stderr=subprocess.STDOUT, check=False)
  if result.returncode:
    with open(path) as f:
      last = ([line.strip() for line in f if line.strip()] or ["no output"])[-1]
    raise UserError(f"{programs.command(name)} failed with exit code {result.returncode} "
                    f"({last[:200]}); its whole output is in {path}")


def _records(model_dir):
  with open(os.path.join(model_dir, "train_metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _losses(model_dir):
  return [record["loss"] for record in _records(model_dir)]


def _last_record(model_dir):
  return _records(model_dir)[-1]


@dataclasses.dataclass
class Report:
  text: str
  passed: bool


def _report(options, curves, one_step, throughput):
  """The markdown report, and whether all checks passed."""
  tpu_curve, cpu_curve = curves["tpu"], curves["cpu"]
  checks = [
      ("the loss falls on the TPU", f"{tpu_curve[0]:.4f} -> {tpu_curve[-1]:.4f}",
       tpu_curve[-1] < FALL * tpu_curve[0]),
      ("the last logged loss, TPU vs CPU", f"{tpu_curve[-1]:.4f} vs {cpu_curve[-1]:.4f}",
       abs(tpu_curve[-1] - cpu_curve[-1]) <= FINAL_LOSS_RTOL * cpu_curve[-1]),
      ("one step from the TPU checkpoint, TPU vs CPU",
       f"{one_step['tpu']:.5f} vs {one_step['cpu']:.5f}",
       abs(one_step["tpu"] - one_step["cpu"]) <= STEP_LOSS_RTOL * one_step["cpu"]),
  ]
  versions = {name: _version(name) for name in ("tensorflow-tpu", "tensorflow", "libtpu",
                                                "mesh-tensorflow")}
  lines = ["# gptneo-tpu-check", "",
           f"TPU `{options.tpu}`, layout `{options.layout}`, tiny.gin for {options.steps} steps.",
           "", "| check | values | result |", "|---|---|---|"]
  lines += [f"| {what} | {values} | {'pass' if ok else 'FAIL'} |" for what, values, ok in checks]
  lines += ["", f"TPU throughput: {throughput.get('tokens_per_sec', 0):.0f} tokens/s, "
                f"MFU {throughput['mfu']:.1%}" if "mfu" in throughput else
            f"TPU throughput: {throughput.get('tokens_per_sec', 0):.0f} tokens/s (MFU: give "
            f"--peak_flops)", "",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v), ""]
  return Report("\n".join(lines), all(ok for *_, ok in checks))


def _version(name):
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None
