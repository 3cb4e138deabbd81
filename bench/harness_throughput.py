#!/usr/bin/env python3
"""lm-evaluation-harness throughput: our native model ("gptneo") vs lm-eval's `--model hf` on
the same weights, requests/s per task, side by side in one run.

  . .venv/bin/activate && export PYTHONPATH=$PWD
  python bench/harness_throughput.py                  # ~10 minutes on 2 idle cores
  python bench/harness_throughput.py --steps=1 --rounds=3 --batch_size=8

The model: models/tiny.gin (4 layers, 128 wide, n_ctx 256, vocab 4096, GPT.scale_attention =
False so any export works) trained --steps steps on the stdlib corpus (data/stdlib, made by
`make data`), exported with bin/export --format=hf. Both sides score the same lm-eval
Instances of our offline tasks (gptneo_lambada: 40 loglikelihood requests, gptneo_hellaswag:
160, gptneo_wikitext: 40 documents, rolling) with batch --batch_size, float32, on the CPU:
ours through GptNeoLM.loglikelihood / loglikelihood_rolling (a RestoredModel of n_ctx and
--length_buckets of shorter windows, lm.Windows, built and restored before the timing by the
agreement check; --length_buckets=0 is one graph of n_ctx, as before), HF through lm_eval.models.huggingface.HFLM(device="cpu"),
torch.set_num_threads(--threads). Rounds alternate between the sides with bench/timing.py's
guard against a busy neighbour; requests/s is the median undisturbed round, ours/HF the
median ratio of back-to-back pairs. Also printed: the largest difference of log-likelihoods.
"""
import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gptneo import configurables  # noqa: E402,F401  (registers every configurable)
from gptneo import gin_utils  # noqa: E402
from gptneo import harness  # noqa: E402
from gptneo import inference  # noqa: E402
from gptneo import mesh as mesh_lib  # noqa: E402
from gptneo import runtime  # noqa: E402
from gptneo import train  # noqa: E402
from gptneo.harness import specs as specs_lib  # noqa: E402
from gptneo.model import gpt as gpt_lib  # noqa: E402
from timing import Runner, add_round_flags, cpu_line, paired_ratio, wait_for_idle  # noqa: E402

TASKS = ("gptneo_lambada", "gptneo_hellaswag", "gptneo_wikitext")


def trained_and_exported(folder, steps):
  """models/tiny.gin trained `steps` steps into folder/ours, exported to folder/hf."""
  gin_utils.parse(["tiny.gin"], ["GPT.scale_attention = False", f"train.train_steps = {steps}",
                                 "train.eval_batches = 0", "train.log_every_n_steps = 1"])
  model_dir = os.path.join(folder, "ours")
  train.train(model_dir)
  subprocess.run([sys.executable, os.path.join(REPO, "bin", "export"), "--format=hf",
                  f"--model_dir={model_dir}", f"--output={os.path.join(folder, 'hf')}"],
                 check=True, env=dict(os.environ, PYTHONPATH=REPO))
  return model_dir, os.path.join(folder, "hf")


def native_lm(model_dir, batch_size, length_buckets):
  from gptneo.harness import lm as lm_lib  # pylint: disable=g-import-not-at-top
  gin_utils.parse(["layouts/single.gin"], [],
                  model_config=os.path.join(model_dir, "operative_config.gin"))
  model, rt = gpt_lib.GPT(), runtime.Runtime(mesh_lib.mesh())
  def restored(length=None):
    return inference.RestoredModel(model, rt, model_dir, batch_size, sequence_length=length)
  windows = lm_lib.Windows(restored(), restored, lm_lib.bucket_lengths(model, length_buckets))
  windows.restore()
  return lm_lib.GptNeoLM(windows.full, inference.load_tokenizer(model_dir), windows=windows)


def task_requests(name):
  """(request type, lm-eval Instances) of one of our tasks, as simple_evaluate builds them."""
  tasks = harness.import_lm_eval("lm_eval.tasks")
  manager = tasks.TaskManager(include_defaults=False)
  [task] = tasks.get_task_dict([specs_lib.load(specs_lib.TASK_DIR / f"{name}.yaml")],
                               manager).values()
  task.build_all_requests(limit=None, rank=0, world_size=1)
  return task.OUTPUT_TYPE, task.instances


def score(lm, kind, instances):
  if kind == "loglikelihood_rolling":
    return list(lm.loglikelihood_rolling(instances))
  return [ll for ll, _ in lm.loglikelihood(instances)]


def bench_task(name, ours, hf, args):
  kind, instances = task_requests(name)
  a, b = score(ours, kind, instances), score(hf, kind, instances)
  largest = max(abs(x - y) for x, y in zip(a, b, strict=True))
  runners = {side: Runner(lambda lm=lm: score(lm, kind, instances), len(instances),
                          args.max_foreign, args.idle_wait, args.retries)
             for side, lm in (("ours", ours), ("hf", hf))}
  for _ in range(args.rounds):  # alternate, so a noisy neighbour hits both sides alike
    for runner in runners.values():
      runner.time_round(1)
  return dict(task=name, kind=kind, requests=len(instances), ours=runners["ours"].median()[0],
              hf=runners["hf"].median()[0], ratio=paired_ratio(runners["ours"], runners["hf"]),
              largest=largest, foreign=max(r.median()[1] for r in runners.values()))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=20, help="training steps of the model")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=5, help="timed rounds per side and task")
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--length_buckets", type=int, default=3,
                      help="our shorter window lengths (lm_eval.length_buckets)")
  add_round_flags(parser)
  args = parser.parse_args()
  print(cpu_line())
  gin_utils.graph_mode()
  os.chdir(REPO)  # tiny.gin's DATASET_DIR is data/stdlib
  folder = tempfile.mkdtemp(prefix="harness_throughput_")
  try:
    model_dir, hf_dir = trained_and_exported(folder, args.steps)
    ours = native_lm(model_dir, args.batch_size, args.length_buckets)
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(args.threads)
    hf_module = harness.import_lm_eval("lm_eval.models.huggingface")
    hf = hf_module.HFLM(pretrained=hf_dir, device="cpu", batch_size=args.batch_size)
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}  models/tiny.gin ({args.steps} steps), "
          f"batch {args.batch_size}, float32, length_buckets {args.length_buckets}, HF threads "
          f"{args.threads}, requests/s (median of {args.rounds} rounds)",
          flush=True)
    wait_for_idle(args.max_foreign, args.idle_wait)
    print("| task | requests | ours (gptneo) | lm-eval hf | ours/HF | largest log-likelihood "
          "difference | foreign load |")
    print("|---|---|---|---|---|---|---|")
    for name in TASKS:
      r = bench_task(name, ours, hf, args)
      print(f"| {r['task']} ({r['kind']}) | {r['requests']} | {r['ours']:.1f} | {r['hf']:.1f} | "
            f"{r['ratio']:.2f}x | {r['largest']:.1e} | {r['foreign']:.2f} |", flush=True)
  finally:
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
  main()
