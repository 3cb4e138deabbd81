#!/usr/bin/env python3
"""bin/prepare_data's throughput and memory on a generated JSONL corpus, next to raw HF
`tokenizers` encode_batch on the same texts.

  . .venv/bin/activate && export PYTHONPATH=$PWD
  python bench/prepare.py                     # 200 MB and 50 MB corpora, ~15 min on 2 cores
  python bench/prepare.py --mb=400 --small_mb=100

Generates (into a temp dir, deleted after) a JSONL corpus of --mb MB from Python's standard
library: every .py file is a document, copied with a numbered header line until the size is
reached. Trains one BPE (vocab 4096) on the stdlib, then times, each in its own process:

  * raw: `Tokenizer.encode_batch` over the corpus's texts (already in memory, batches of
    1 MB of text), with tokenizers' own thread pool at 1 and at 2 threads;
  * prepare: `bin/prepare_data --input=corpus.jsonl --tokenizer=... --workers=N` (reading,
    JSON, tokenizing, splitting, writing TFRecords; program start-up included), N = 1, 2;
  * prepare --workers=2 on a --small_mb corpus: peak RSS should not grow with the corpus.

Peak RSS is of the whole process tree (the program and its workers), sampled every 50 ms.
Prints `timing.cpu_line()` first and the load average (the VM is shared with other agents).
"""
import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import cpu_line  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAW = """
import json, sys, time
from tokenizers import Tokenizer
tokenizer = Tokenizer.from_file(sys.argv[1])
tokenizer.encode_special_tokens = True
texts = [json.loads(line)["text"] for line in open(sys.argv[2], encoding="utf-8")]
batches, batch, size = [], [], 0
for text in texts:
  batch.append(text); size += len(text)
  if size >= 1 << 20:
    batches.append(batch); batch, size = [], 0
batches.append(batch)
started, tokens = time.perf_counter(), 0
for batch in batches:
  tokens += sum(len(e.ids) for e in tokenizer.encode_batch(batch, add_special_tokens=False))
print(json.dumps({"seconds": time.perf_counter() - started, "tokens": tokens}))
"""


def generate_corpus(path, megabytes):
  """A JSONL file of `megabytes` MB: the stdlib's .py files as documents, over and over."""
  root = sysconfig.get_paths()["stdlib"]
  files = sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names
                 if n.endswith(".py") and "site-packages" not in d)
  texts = []
  for name in files:
    try:
      with open(name, encoding="utf-8") as f:
        texts.append(f.read())
    except UnicodeDecodeError:
      continue
  written, copy = 0, 0
  with open(path, "w", encoding="utf-8") as out:
    while written < megabytes * 1e6:
      text = texts[copy % len(texts)]
      line = json.dumps({"text": f"# copy {copy}\n{text}", "meta": {"copy": copy}}) + "\n"
      out.write(line)
      written += len(line)
      copy += 1
  return os.path.getsize(path)


def tree_rss(pid):
  """RSS in bytes of a process and all its descendants, from /proc."""
  total, stack = 0, [pid]
  while stack:
    current = stack.pop()
    try:
      with open(f"/proc/{current}/status") as f:
        total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
      with open(f"/proc/{current}/task/{current}/children") as f:
        stack += [int(child) for child in f.read().split()]
    except (OSError, StopIteration):
      continue
  return total


def run(command, env=None):
  """(wall seconds, peak tree RSS bytes, stdout) of a command."""
  started = time.perf_counter()
  log = tempfile.TemporaryFile(mode="w+")
  process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True,
                             env=dict(os.environ, **(env or {})))
  peak = 0
  while process.poll() is None:
    peak = max(peak, tree_rss(process.pid))
    time.sleep(0.05)
  stdout = process.stdout.read()
  if process.returncode:
    log.seek(0)
    raise SystemExit(f"{command[:3]} failed: {log.read()[-2000:]}")
  return time.perf_counter() - started, peak, stdout


def raw_tokenizer(tokenizer, corpus, threads):
  env = {"RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "true"}
  _, peak, stdout = run([sys.executable, "-c", RAW, tokenizer, corpus], env)
  result = json.loads(stdout)
  return result["seconds"], result["tokens"], peak


def prepare(tokenizer, corpus, workers, folder):
  output_dir = os.path.join(folder, f"out-{workers}-{os.path.getsize(corpus)}")
  seconds, peak, _ = run([sys.executable, os.path.join(REPO, "bin", "prepare_data"),
                          f"--input={corpus}", f"--tokenizer={tokenizer}", "--n_ctx=256",
                          f"--output_dir={output_dir}", f"--workers={workers}"])
  with open(os.path.join(output_dir, "dataset.json")) as f:
    info = json.load(f)
  # Tokenized, EOS left out (sources: as read; the splits don't count the train tail dropped).
  tokens = sum(source["tokens"] for source in info["sources"]) - info["documents"]
  return seconds, tokens, peak


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--mb", type=float, default=200, help="size of the corpus, MB")
  parser.add_argument("--small_mb", type=float, default=50, help="the smaller corpus, MB")
  args = parser.parse_args()
  print(cpu_line())
  print(f"load average before: {' '.join(open('/proc/loadavg').read().split()[:3])}")
  sys.stdout.flush()
  with tempfile.TemporaryDirectory(prefix="gptneo-prepare-bench-") as folder:
    corpus, small = os.path.join(folder, "corpus.jsonl"), os.path.join(folder, "small.jsonl")
    size, small_size = generate_corpus(corpus, args.mb), generate_corpus(small, args.small_mb)
    tokenizer = os.path.join(folder, "tokenizer.json")
    subprocess.run([sys.executable, "-c",
                    "import sys; from gptneo.data import prepare, tokenizer as t; "
                    "t.train_bpe(prepare.resolve_inputs(['stdlib']), 4096).save(sys.argv[1])",
                    tokenizer], check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                   stderr=subprocess.DEVNULL)
    rows = []
    for cores in (1, 2):
      seconds, tokens, peak = raw_tokenizer(tokenizer, corpus, cores)
      rows.append((f"raw encode_batch, {cores} thread(s)", size, cores, seconds, tokens, peak))
      seconds, tokens, peak = prepare(tokenizer, corpus, cores, folder)
      rows.append((f"prepare_data --workers={cores}", size, cores, seconds, tokens, peak))
    seconds, tokens, peak = prepare(tokenizer, small, 2, folder)
    rows.append(("prepare_data --workers=2", small_size, 2, seconds, tokens, peak))
  print("| run | corpus MB | cores | seconds | MB/s | tokens/s | vs raw | peak RSS MB |")
  print("|---|---|---|---|---|---|---|---|")
  raw_rate = {}
  for name, nbytes, cores, seconds, tokens, peak in rows:
    rate = nbytes / seconds
    raw_rate.setdefault(cores, rate)
    print(f"| {name} | {nbytes / 1e6:.0f} | {cores} | {seconds:.1f} | {rate / 1e6:.2f} | "
          f"{tokens / seconds:,.0f} | {rate / raw_rate[cores]:.2f} | {peak / 1e6:.0f} |")
  prepare_rates = [n / s for name, n, c, s, _, _ in rows[:4] if name.startswith("prepare")]
  print(f"speed-up --workers=1 -> 2: {prepare_rates[1] / prepare_rates[0]:.2f}x")
  print(f"load average after: {' '.join(open('/proc/loadavg').read().split()[:3])}")


if __name__ == "__main__":
  main()
