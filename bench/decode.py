#!/usr/bin/env python3
"""Decoding speed: with vs without the key/value cache, and ours vs transformers' generate.

  . .venv/bin/activate && export PYTHONPATH=$PWD
  pip install -r requirements-bench.txt      # torch + transformers, for the HF side
  python bench/decode.py                     # both configs, ~10 minutes on 2 idle cores
  python bench/decode.py --configs=small --new_tokens=256

Per config, one random GPT-Neo (transformers' GPTNeoForCausalLM, torch.manual_seed(0)) is
saved with save_pretrained and imported with gptneo.hf.import_hf (bin/import_hf's code), so
both sides run the same weights. Each side decodes greedily --new_tokens tokens after the
same random --prompt_tokens-token prompt, batch --batch_size, without stopping at EOS
(HF: min_new_tokens = max_new_tokens; ours: eos_id = -1), float32, one CPU device:

  * ours, cached: gptneo.sample.generate with RestoredModel.start/extend (sample.cache=True,
    the default of bin/sample): the prompt runs once through the cache (chunks of 64
    positions), then one position a token;
  * ours, uncached: the same loop with next_logits (sample.cache=False): every token reruns
    the whole n_ctx window. Its cost per token does not depend on the position (the window
    is always n_ctx, right-padded), so on the big config it is timed on --uncached_tokens
    tokens only and reported per token;
  * HF: model.generate(do_sample=False, use_cache=True), torch.set_num_threads(--threads).

A round is one whole generate call (prompt included); graph building and restoring are
outside (bin/sample builds once and serves every prompt). Ours cached and HF run in
alternating rounds after a warm-up each, with bench/timing.py's guard against a busy
neighbour; tokens/s is the median undisturbed round, ours/HF the median ratio of back-to-back
pairs. Also printed: ours' prompt time and ms per new token, and how many greedy tokens ours
and HF's agree on.
"""
import argparse
import datetime
import os
import shutil
import sys
import sysconfig
import tempfile
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gptneo import configurables  # noqa: E402,F401  (registers every configurable)
from gptneo import gin_utils  # noqa: E402
from gptneo import hf  # noqa: E402
from gptneo import inference  # noqa: E402
from gptneo import mesh as mesh_lib  # noqa: E402
from gptneo import runtime  # noqa: E402
from gptneo import sample as sample_lib  # noqa: E402
from gptneo.data import tokenizer as tokenizer_lib  # noqa: E402
from gptneo.model import gpt as gpt_lib  # noqa: E402
from timing import Runner, add_round_flags, cpu_line, paired_ratio, wait_for_idle  # noqa: E402

CONFIGS = {  # transformers.GPTNeoConfig arguments
    "small": dict(hidden_size=256, num_layers=4, num_heads=4, max_position_embeddings=512,
                  window_size=128, initializer_range=0.1),
    "125m": dict(hidden_size=768, num_layers=12, num_heads=12, max_position_embeddings=2048,
                 window_size=256, initializer_range=0.02),  # GPT-Neo 125M's shapes
}


def hf_model_dir(torch, transformers, name, folder):
  """A random HF GPT-Neo of config `name` saved in folder/hf, with a small BPE tokenizer."""
  torch.manual_seed(0)
  layers = CONFIGS[name]["num_layers"]
  config = transformers.GPTNeoConfig(
      vocab_size=50257, attention_types=[[["global", "local"], layers // 2]],
      bos_token_id=0, eos_token_id=0, **CONFIGS[name])
  model = transformers.GPTNeoForCausalLM(config).eval()
  path = os.path.join(folder, "hf")
  model.save_pretrained(path)
  corpus = [os.path.join(sysconfig.get_paths()["stdlib"], f) for f in ("os.py", "json/decoder.py")]
  tokenizer_lib.train_bpe(corpus, vocab_size=1000).save(os.path.join(path, "tokenizer.json"))
  return model, path


def ours(hf_path, folder, batch_size):
  """Our RestoredModel (decode ops) of the imported HF folder."""
  model_dir = os.path.join(folder, "ours")
  source = hf.read_source(hf_path)  # as bin/import_hf does
  gin_utils.parse(["layouts/single.gin"], list(source.bindings))
  hf.import_hf(source, hf.build_model(source), model_dir)
  gin_utils.parse(["layouts/single.gin"], [],
                  model_config=os.path.join(model_dir, "operative_config.gin"))
  model = gpt_lib.GPT()
  restored = inference.RestoredModel(model, runtime.Runtime(mesh_lib.mesh()), model_dir,
                                     batch_size, decode=True)
  restored.restore()
  return model, restored


def median_seconds(run, repeats):
  run()  # warm-up: first-run allocations and oneDNN kernel selection
  times = []
  for _ in range(repeats):
    begin = time.perf_counter()
    run()
    times.append(time.perf_counter() - begin)
  return float(np.median(times))


def greedy(start, extend, prompts, n_ctx, new_tokens):
  return sample_lib.generate(start, extend, prompts, n_ctx, new_tokens, eos_id=-1,
                             choose=lambda i, logits: int(np.argmax(logits)))


def bench_config(name, args, torch, transformers):
  folder = tempfile.mkdtemp(prefix=f"decode_{name}_")
  try:
    hf_model, hf_path = hf_model_dir(torch, transformers, name, folder)
    model, restored = ours(hf_path, folder, args.batch_size)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, 50257, args.prompt_tokens)) for _ in range(args.batch_size)]
    n, rows = args.new_tokens, args.batch_size
    uncached_n = n if name == "small" else args.uncached_tokens
    input_ids = torch.tensor(prompts)

    def cached():
      return greedy(restored.start, restored.extend, prompts, model.n_ctx, n)

    def hf_generate():
      with torch.no_grad():
        return hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 use_cache=True, pad_token_id=0)

    agree = min(_common_prefix(a, b) for a, b in zip(
        cached(), hf_generate()[:, args.prompt_tokens:].tolist(), strict=True))
    runners = {side: Runner(fn, rows * n, args.max_foreign, args.idle_wait, args.retries)
               for side, fn in (("ours", cached), ("hf", hf_generate))}
    for _ in range(args.rounds):  # alternate, so a noisy neighbour hits both sides alike
      for runner in runners.values():
        runner.time_round(1)
    prompt_seconds = median_seconds(lambda: restored.start(prompts), args.rounds)
    uncached = Runner(lambda: greedy(restored.next_logits, restored.next_logits, prompts,
                                     model.n_ctx, uncached_n),
                      rows * uncached_n, args.max_foreign, args.idle_wait, args.retries)
    uncached.time_round(1)
    cached_tps, foreign = runners["ours"].median()
    return dict(config=name, params=sum(p.numel() for p in hf_model.parameters()),
                n_ctx=model.n_ctx, cached=cached_tps, uncached=uncached.median()[0],
                hf=runners["hf"].median()[0], ratio=paired_ratio(runners["ours"], runners["hf"]),
                uncached_tokens=uncached_n, agree=agree, prompt_ms=prompt_seconds * 1e3,
                token_ms=(rows * n / cached_tps - prompt_seconds) / n * 1e3,
                foreign=max(foreign, runners["hf"].median()[1]))
  finally:
    shutil.rmtree(folder, ignore_errors=True)


def _common_prefix(a, b):
  return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="small,125m")
  parser.add_argument("--new_tokens", type=int, default=256)
  parser.add_argument("--prompt_tokens", type=int, default=32)
  parser.add_argument("--batch_size", type=int, default=1)
  parser.add_argument("--uncached_tokens", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=5, help="timed rounds per side")
  parser.add_argument("--threads", type=int, default=2)
  add_round_flags(parser)
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  print(cpu_line())
  print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}  greedy, {args.new_tokens} new tokens after "
        f"{args.prompt_tokens}, batch {args.batch_size}, float32, tokens/s (median of "
        f"{args.rounds} rounds)", flush=True)
  wait_for_idle(args.max_foreign, args.idle_wait)
  print("| config | params | n_ctx | ours cached | ours uncached | HF generate | cached/uncached "
        "| ours/HF | ours prompt ms | ours ms/token | greedy tokens equal | foreign load |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for name in args.configs.split(","):
    r = bench_config(name, args, torch, transformers)
    print(f"| {r['config']} | {r['params'] / 1e6:.1f}M | {r['n_ctx']} | {r['cached']:.1f} | "
          f"{r['uncached']:.2f} ({r['uncached_tokens']} tok) | {r['hf']:.1f} | "
          f"{r['cached'] / r['uncached']:.1f}x | {r['ratio']:.2f}x | {r['prompt_ms']:.0f} | "
          f"{r['token_ms']:.1f} | {r['agree']}/{args.new_tokens} | {r['foreign']:.2f} |",
          flush=True)


if __name__ == "__main__":
  gin_utils.graph_mode()  # as every program runs (gin_utils.run)
  main()
