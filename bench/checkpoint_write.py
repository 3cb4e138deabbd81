#!/usr/bin/env python3
"""Checkpoint write time with and without the manifest (gptneo/checkpoints.py), GPT-Neo 125M.

  PYTHONPATH=$PWD .venv/bin/python bench/checkpoint_write.py     # ~3 minutes on 2 cores
  PYTHONPATH=$PWD .venv/bin/python bench/checkpoint_write.py --rounds=5 --dir=/mnt/disk

The training graph bin/train builds for gin/gpt_neo_125m.gin (Adam: the weights and two
moments, ~1.5 GB a checkpoint; a dataset of n_ctx 2048 from stdlib modules), in a live
Session, saved in alternating rounds into two folders on the same disk (--dir):
  * before: what Checkpoints.save did before manifests: the masters copied, then TF's Saver
    with its own pruning (max_to_keep) and `checkpoint` index;
  * committed: Checkpoints.save as it is: the same Saver write, then the manifest (each
    file's size and CRC-32, written last), TF's index, our pruning and cleanup.
Both keep 2 checkpoints, so every round also deletes one. Also: each file's CRC-32 and
BLAKE2b rate on this CPU (hot page cache, as right after a save; the verification a loader
does is the same CRC-32 pass). This machine is shared: each round records the CPU other
processes used meanwhile (bench/timing.py's CpuMeter).
"""
import argparse
import datetime
import hashlib
import os
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
import zlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gptneo import checkpoints  # noqa: E402
from gptneo import gin_utils  # noqa: E402
from gptneo import runtime  # noqa: E402
from gptneo import train as train_lib  # noqa: E402
from gptneo import train_graph  # noqa: E402
from gptneo.compat import tf  # noqa: E402
from gptneo.data import prepare  # noqa: E402
from timing import CpuMeter, cpu_line, wait_for_idle  # noqa: E402

N_CTX = 2048  # gpt_neo_125m's
_CORPUS = ("typing.py", "argparse.py", "inspect.py", "subprocess.py", "tarfile.py")


CHECKSUM_ISA = ("sse4_2", "pclmulqdq", "vpclmulqdq", "sha_ni")  # what CRC-32 leans on


def build(dataset_dir, model_dir):
  """The 125M training graph in a live session, initialized; returns (graph, session)."""
  gin_utils.parse(["gpt_neo_125m.gin"], [f'DATASET_DIR = "{dataset_dir}"',
                                         "train.batch_size = 1", "train.keep_checkpoints = 2"])
  settings = train_lib.settings()
  settings.check()
  graph = train_graph.build(settings, model_dir, runtime.Runtime(settings.mesh))
  with graph.graph.as_default():
    session = tf.Session(config=runtime.Runtime(settings.mesh).session_config())
    graph.checkpoints.restore_or_initialize(session, graph.init_ops)
    # The save of before: the same masters copy, TF's Saver pruning to 2 and writing its index.
    saver = tf.train.Saver(tf.global_variables(), max_to_keep=2, sharded=False,
                           save_relative_paths=True)
  return graph, session, saver


def save_before(graph, session, saver, folder, step):
  with graph.graph.as_default():
    session.run(graph.checkpoints._to_masters)  # pylint: disable=protected-access
    saver.save(session, os.path.join(folder, "model.ckpt"), global_step=step,
               write_meta_graph=False)


def checksum_rates(files):
  """(CRC-32, BLAKE2b) GB/s over `files`, read hot (each read once untimed first)."""
  total = sum(os.path.getsize(name) for name in files)
  for name in files:
    checkpoints.crc32(name)
  start = time.perf_counter()
  for name in files:
    checkpoints.crc32(name)
  crc = total / (time.perf_counter() - start) / 1e9
  start = time.perf_counter()
  for name in files:
    digest = hashlib.blake2b()
    with open(name, "rb") as f:
      while chunk := f.read(8 << 20):
        digest.update(chunk)
  return crc, total / (time.perf_counter() - start) / 1e9


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=4, help="timed saves per side")
  parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
  parser.add_argument("--max_foreign", type=float, default=0.3)
  args = parser.parse_args()
  gin_utils.graph_mode()
  tf.get_logger().setLevel("ERROR")
  print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  "
        f"{cpu_line(CHECKSUM_ISA)}, zlib {zlib.ZLIB_RUNTIME_VERSION}  "
        f"TF {tf.__version__}  loadavg {' '.join(open('/proc/loadavg').read().split()[:3])}",
        flush=True)
  workdir = tempfile.mkdtemp(prefix="gptneo-ckpt-bench-", dir=args.dir)
  try:
    root = sysconfig.get_paths()["stdlib"]
    prepare.prepare_dataset([os.path.join(root, name) for name in _CORPUS],
                            os.path.join(workdir, "data"), n_ctx=N_CTX, vocab_size=512,
                            validation_fraction=0.0)
    committed_dir, before_dir = os.path.join(workdir, "committed"), os.path.join(workdir, "before")
    os.makedirs(before_dir)
    graph, session, saver = build(os.path.join(workdir, "data"), committed_dir)
    times = {"before": [], "committed": []}
    for step in range(1, args.rounds + 2):  # the first save of each side is a warm-up
      for side in times:
        wait_for_idle(args.max_foreign, 20)
        with CpuMeter() as meter:
          if side == "before":
            save_before(graph, session, saver, before_dir, step)
          else:
            graph.checkpoints.save(session, step)
        if step > 1:
          times[side].append((meter.wall, meter.foreign))
    report(times, committed_dir, args.rounds + 1)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


def report(times, committed_dir, step):
  files = [os.path.join(committed_dir, name) for name in sorted(os.listdir(committed_dir))
           if name.startswith(f"model.ckpt-{step}.") and not name.endswith(".json")]
  size = sum(os.path.getsize(name) for name in files)
  print(f"checkpoint: {size / 1e9:.2f} GB in {len(files)} files")
  for side, rounds in times.items():
    walls = [wall for wall, _ in rounds]
    print(f"{side:>9}: median {statistics.median(walls):.2f} s  (rounds "
          f"{', '.join(f'{wall:.2f}' for wall in walls)} s; foreign cores "
          f"{max(foreign for _, foreign in rounds):.2f} at most)")
  before, committed = (statistics.median([w for w, _ in times[s]]) for s in times)
  crc, blake = checksum_rates(files)
  print(f"manifest: +{committed - before:.2f} s a checkpoint ({committed / before:.2f}x); "
        f"CRC-32 {crc:.2f} GB/s ({size / 1e9 / crc:.2f} s for this one), BLAKE2b "
        f"{blake:.2f} GB/s ({size / 1e9 / blake:.2f} s)")


if __name__ == "__main__":
  main()
