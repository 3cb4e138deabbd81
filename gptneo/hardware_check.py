"""The first run on new hardware (bin/tpu_check, bin/gpu_check): does training there match
the CPU?

`check(accelerator, options)` reaches the accelerator (none: one line, exit code 2, nothing
written), then drives our own programs as a user would, each in a process of its own, in
`work_dir`:
1. prepares the stdlib dataset (as `make data`);
2. trains tiny.gin `steps` steps on the accelerator and on this machine's CPU;
3. checks the loss falls on the accelerator, and ends where the CPU run's does;
4. takes the accelerator run's last checkpoint one step further on the accelerator and on the
   CPU, and compares that step's loss (same weights, same batch: only the arithmetic differs);
5. writes report.md: what was found, versions, the checks, tokens/s and MFU.
What differs between a TPU and a GPU is an `Accelerator` (`tpu`, `gpu`): how to reach it and
the gin of its run. None of this has run on a TPU or a GPU (docs/tpu.md, docs/gpu.md).
"""
import dataclasses
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from typing import Callable

from gptneo import gin_utils
from gptneo import mesh as mesh_lib
from gptneo import programs
from gptneo import tpu as tpu_lib
from gptneo.compat import tf
from gptneo.errors import UserError

# tiny.gin's loss after a few hundred steps is ~3-4 nats; TPU matmuls round through bfloat16.
FINAL_LOSS_RTOL = 0.05  # the accelerator run's last logged loss against the CPU run's
STEP_LOSS_RTOL = 0.01  # one step from the same checkpoint
FALL = 0.7  # the last logged loss must be below this fraction of the first


@dataclasses.dataclass(frozen=True)
class Options:
  """What the program was asked (its flags, but the accelerator's own)."""
  work_dir: str
  steps: int
  peak_flops: str  # a device of flops.PEAK_FLOPS, or "" (the run's default)


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """A kind of hardware the check runs on.

  Args:
    name: "TPU" or "GPU", as the report says it.
    program: the bin/ program checking it, e.g. "tpu_check".
    connect: reaches it once and releases it; returns one line saying what was found;
      raises UserError (one line) if there is none.
    gin_files: gin files of its run, after tiny.gin.
    gin_params: bindings of its run.
    packages: the packages whose versions the report names.
  """
  name: str
  program: str
  connect: Callable[[], str]
  gin_files: tuple = ()
  gin_params: tuple = ()
  packages: tuple = ("tensorflow", "mesh-tensorflow")


def tpu(name: str, layout: str) -> Accelerator:
  """The TPU `name` (mesh.tpu: 'local' on a TPU VM) with the slice's `layout` file."""
  def connect():
    gin_utils.parse([layout], [f"mesh.tpu = {gin_utils.gin_literal(name)}"])
    spec = mesh_lib.mesh()
    if spec.implementation != "simd":
      raise UserError(f"--layout={layout} is not a TPU layout (mesh.implementation = "
                      f"{spec.implementation!r}); use one of gin/layouts/tpu_*.gin")
    system = tpu_lib.connect(spec)
    with tf.Graph().as_default(), tf.Session(system.target) as session:
      session.run(tpu_lib.shutdown_ops(system))
    return f"TPU `{name}`, layout `{layout}`"

  return Accelerator("TPU", "tpu_check", connect, (layout,),
                     (f"mesh.tpu = {gin_utils.gin_literal(name)}", "train.steps_per_loop = 25"),
                     ("tensorflow-tpu", "tensorflow", "libtpu", "mesh-tensorflow"))


def gpu() -> Accelerator:
  """This machine's first GPU (mesh.device_type = "gpu", one device)."""
  def connect():
    gpus = tf.config.list_physical_devices("GPU")
    cuda = tf.sysconfig.get_build_info().get("cuda_version")
    if not gpus:
      raise UserError(f"no GPU visible to TensorFlow {tf.__version__} (CUDA "
                      f"{cuda or 'absent from this build'}); run on a machine with an NVIDIA "
                      f"driver (nvidia-smi lists its GPUs), installed with `make install "
                      f"PROFILE=gpu` (docs/gpu.md)")
    details = tf.config.experimental.get_device_details(gpus[0])
    capability = details.get("compute_capability")
    found = (f"GPU 0 of {len(gpus)}: {details.get('device_name', 'unknown')}, compute "
             f"capability {'.'.join(map(str, capability)) if capability else 'unknown'}, CUDA "
             f"{cuda}")
    if capability and tuple(capability) >= (9, 0):  # past the wheel's sm_89: PTX, JIT-compiled
      found += " (TensorFlow's kernels JIT-compiled from PTX on first start: docs/gpu.md)"
    return found

  return Accelerator("GPU", "gpu_check", connect, (), ('mesh.device_type = "gpu"',),
                     ("tensorflow", "nvidia-cudnn-cu12", "nvidia-cuda-runtime-cu12",
                      "mesh-tensorflow"))


def check(accelerator: Accelerator, options: Options) -> bool:
  """Runs the check (see the module's docstring); returns whether every check passed."""
  found = accelerator.connect()
  os.makedirs(options.work_dir, exist_ok=True)
  data = os.path.join(options.work_dir, "data")
  if not os.path.exists(os.path.join(data, "dataset.json")):
    _program("prepare_data", f"--output_dir={data}", "--input=stdlib", "--n_ctx=256",
             "--vocab_size=4096", log=options.work_dir)
  runs = {where: os.path.join(options.work_dir, folder)
          for where, folder in (("accelerator", accelerator.name.lower()), ("cpu", "cpu"))}
  for where, run in runs.items():
    _train(accelerator, options, run, data, options.steps, where == "accelerator")
  curves = {where: _losses(run) for where, run in runs.items()}
  one_step = {}
  for where in ("accelerator", "cpu"):
    run = f"{runs[where]}_one_step"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(runs["accelerator"], run)
    _train(accelerator, options, run, data, options.steps + 1, where == "accelerator")
    one_step[where] = _losses(run)[-1]
  report = _report(accelerator, found, options, curves, one_step,
                   _last_record(runs["accelerator"]))
  with open(os.path.join(options.work_dir, "report.md"), "w") as f:
    f.write(report.text)
  print(report.text)
  return report.passed


def _train(accelerator, options, model_dir, data, steps, on_accelerator):
  params = [f"DATASET_DIR = {gin_utils.gin_literal(data)}", f"train.train_steps = {steps}",
            "train.eval_batches = 0", "train.eval_every_n_steps = 0",
            f"train.steps_per_checkpoint = {options.steps}", "train.log_every_n_steps = 25"]
  files = ["tiny.gin"]
  if on_accelerator:
    files += accelerator.gin_files
    params += accelerator.gin_params
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


def _report(accelerator, found, options, curves, one_step, throughput):
  """The markdown report, and whether all checks passed."""
  name, fast, cpu_curve = accelerator.name, curves["accelerator"], curves["cpu"]
  checks = [
      (f"the loss falls on the {name}", f"{fast[0]:.4f} -> {fast[-1]:.4f}",
       fast[-1] < FALL * fast[0]),
      (f"the last logged loss, {name} vs CPU", f"{fast[-1]:.4f} vs {cpu_curve[-1]:.4f}",
       abs(fast[-1] - cpu_curve[-1]) <= FINAL_LOSS_RTOL * cpu_curve[-1]),
      (f"one step from the {name} checkpoint, {name} vs CPU",
       f"{one_step['accelerator']:.5f} vs {one_step['cpu']:.5f}",
       abs(one_step["accelerator"] - one_step["cpu"]) <= STEP_LOSS_RTOL * one_step["cpu"]),
  ]
  versions = {package: _version(package) for package in accelerator.packages}
  lines = [f"# {programs.command(accelerator.program)}", "",
           f"{found}; tiny.gin for {options.steps} steps.",
           "", "| check | values | result |", "|---|---|---|"]
  lines += [f"| {what} | {values} | {'pass' if ok else 'FAIL'} |" for what, values, ok in checks]
  tokens = f"{name} throughput: {throughput.get('tokens_per_sec', 0):.0f} tokens/s"
  lines += ["", f"{tokens}, MFU {throughput['mfu']:.1%}" if "mfu" in throughput else
            f"{tokens} (MFU: give --peak_flops)", "",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v), ""]
  return Report("\n".join(lines), all(ok for *_, ok in checks))


def _version(name):
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None
