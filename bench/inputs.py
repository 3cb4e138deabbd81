#!/usr/bin/env python3
"""Input pipeline speed: training windows per second by `train.sampling` and for a mixture.

  . .venv/bin/activate && export PYTHONPATH=$PWD
  python bench/inputs.py                  # ~3 minutes on 2 idle cores
  python bench/inputs.py --n_ctx=2048 --batch_size=16

Prepares Python's standard library (BPE 4096, --n_ctx) twice, as two halves of its files
(the second with the first's tokenizer), then times gptneo.data.inputs.make_dataset's
training pipeline (shuffle, repeat, batch, parse) in a session, each configuration in its own
graph and iterator, in alternating rounds with bench/timing.py's guard against a busy
neighbour:

  * fixed: the stored windows of one half (train.sampling = "fixed", the default);
  * random_chunk / document: the same half, each window cut from it and its successor;
  * mixture: {half 1: 3, half 2: 1}, fixed windows.
  * gs:// cached: half 1 uploaded to a storage emulator (in this process) and read through
    gptneo.data.shard_cache without a limit: after the first pass every shard is local, so
    this is the cache's own cost (fetching each shard through Python, prefetching) against
    reading the same files directly ("fixed").
  * gs:// limit: the same with $GPTNEO_CACHE_MAX_BYTES half the train shards' bytes: shards
    are evicted and downloaded again from the emulator every pass.

Prints tokens/s (median undisturbed round) and each one's paired ratio to fixed. The trainer
needs far less than any of these: the tiny model trains at ~10k tokens/s on 2 cores.
"""
import argparse
import os
import sys
import sysconfig
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tensorflow.compat.v1 as tf  # noqa: E402

from gptneo import gin_utils  # noqa: E402
from gptneo.data import inputs, prepare, shard_cache  # noqa: E402
from timing import Runner, cpu_line, paired_ratio  # noqa: E402


def prepare_halves(folder, n_ctx):
  """Two datasets of the stdlib's .py files (alternate files each), one tokenizer."""
  files = prepare.resolve_inputs([sysconfig.get_paths()["stdlib"] + "/*.py"])
  first, second = os.path.join(folder, "first"), os.path.join(folder, "second")
  # Shards of 64k tokens: enough of them for gs:// limit to evict.
  prepare.prepare_dataset(files[0::2], first, n_ctx, vocab_size=4096, tokens_per_shard=65536)
  prepare.prepare_dataset(files[1::2], second, n_ctx,
                          tokenizer_path=os.path.join(first, "tokenizer.json"))
  return first, second


def upload_to_emulator(folder):
  """Starts an in-process storage emulator holding folder twice; returns their gs:// URIs
  (the first read without a cache limit, the second with one) and the server."""
  from gcp_storage_emulator.server import create_server  # pylint: disable=g-import-not-at-top
  from google.cloud import storage as gcs  # pylint: disable=g-import-not-at-top
  from gptneo import storage  # pylint: disable=g-import-not-at-top
  server = create_server("127.0.0.1", 0, in_memory=True)
  server.start()
  os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{server._api._httpd.server_address[1]}"
  gcs.Client(project=None).create_bucket("bench")
  for prefix in ("cached", "limited"):
    storage.upload_folder(folder, f"gs://bench/{prefix}")
  return "gs://bench/cached", "gs://bench/limited", server


def half_the_train_shards(folder):
  info = inputs.read_dataset_info(folder)
  sizes = [os.path.getsize(os.path.join(folder, name)) for name in info["splits"]["train"]["files"]]
  return max(2 * max(sizes), sum(sizes) // 2), sum(sizes)


def pipeline_step(spec, batch_size, sampling):
  """A function fetching one training batch of spec, its pipeline in a graph of its own."""
  graph = tf.Graph()
  with graph.as_default():
    dataset = inputs.make_dataset(spec, "train", batch_size, seed=1, sampling=sampling)
    next_batch = tf.data.make_one_shot_iterator(dataset).get_next()
  session = tf.Session(graph=graph)
  return lambda: session.run(next_batch)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n_ctx", type=int, default=256)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--steps", type=int, default=200, help="batches per round")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--max_foreign", type=float, default=0.15)
  parser.add_argument("--idle_wait", type=float, default=20)
  parser.add_argument("--configs", default="",
                      help="comma-separated names to time (default all), e.g. 'fixed,gs:// cached'")
  args = parser.parse_args()
  print(cpu_line())
  with tempfile.TemporaryDirectory() as folder:
    first, second = prepare_halves(folder, args.n_ctx)
    os.environ["GPTNEO_CACHE_DIR"] = os.path.join(folder, "cache")
    limit, train_bytes = half_the_train_shards(first)
    cached, limited, server = upload_to_emulator(first)
    print(f"train shards {train_bytes:,} bytes; gs:// limit: {shard_cache.MAX_BYTES_ENV}={limit:,}")
    configs = {"fixed": (first, "fixed"), "random_chunk": (first, "random_chunk"),
               "document": (first, "document"), "mixture 3:1": ({first: 3, second: 1}, "fixed"),
               "gs:// cached": (cached, "fixed"), "gs:// limit": (limited, "fixed")}
    if args.configs:
      configs = {name: configs[name] for name in args.configs.split(",")}
    tokens = args.batch_size * args.n_ctx
    runners = {}
    for name, (spec, sampling) in configs.items():
      # The cache of a gs:// dataset takes the limit the environment says when first read.
      os.environ[shard_cache.MAX_BYTES_ENV] = str(limit) if name == "gs:// limit" else ""
      step = pipeline_step(spec, args.batch_size, sampling)
      step()  # warm-up: fills the shuffle buffer
      runners[name] = Runner(step, tokens, args.max_foreign, args.idle_wait, retries=2)
    for _ in range(args.rounds):
      for runner in runners.values():
        runner.time_round(args.steps)
    os.environ[shard_cache.MAX_BYTES_ENV] = str(limit)
    limited_cache = shard_cache.current()
    server.stop()
  print(f"\ninput pipeline, n_ctx {args.n_ctx}, batch {args.batch_size}, "
        f"{args.rounds} rounds of {args.steps} batches")
  for name, runner in runners.items():
    rate, foreign = runner.median()
    ratio = paired_ratio(runner, runners["fixed"])
    print(f"  {name:13s} {rate:12,.0f} tokens/s  {ratio:5.2f}x fixed  (foreign {foreign:.2f})")
  if "gs:// limit" in runners:
    print(f"gs:// limit: {limited_cache.downloads} shard downloads, high-water "
          f"{limited_cache.high_water:,} of {limited_cache.max_bytes:,} bytes")


if __name__ == "__main__":
  gin_utils.graph_mode()  # as every program runs (gin_utils.run)
  main()
