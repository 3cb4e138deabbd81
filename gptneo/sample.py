"""Sampling: batched prompts of any length through one graph, built once.

With the key/value cache (the default) the prompts run once, a chunk of positions at a time,
and every new token then costs one position. Once a sequence outgrows n_ctx its window
slides, positions shift, and every further token reruns the window, as without the cache.
"""

import gin
import numpy as np

from gptneo import inference
from gptneo import runtime
from gptneo.data import jsonl
from gptneo.data import tokenizer as tokenizer_lib
from gptneo.errors import UserError


def read_prompts(path):
  """Prompts from a file: one per line, or with a .jsonl name one {"prompt": ...} per line.

  Blank lines are skipped; write {"prompt": ""} in a JSONL file to start a new document.
  """
  lines = jsonl.read_lines(path, "--prompt_file")
  if not path.endswith(".jsonl"):
    return [line for line in lines if line.strip()]
  prompts = []
  for number, line in enumerate(lines, start=1):
    if line.strip():
      prompts.append(jsonl.string_field(line, path, number, "prompt"))
  return prompts


def choose_token(logits, temperature, top_k, top_p, rng):
  """One id from float logits: greedy at temperature 0, else sampled after top-k / top-p."""
  if temperature == 0:
    return int(np.argmax(logits))
  logits = logits.astype(np.float64) / temperature
  order = np.argsort(-logits, kind="stable")
  if top_k:
    order = order[:top_k]
  probs = np.exp(logits[order] - logits[order[0]])
  probs /= probs.sum()
  # Nucleus: the fewest most-likely tokens whose mass reaches top_p (at least one).
  keep = int(np.searchsorted(np.cumsum(probs), top_p * (1 - 1e-12))) + 1
  probs = probs[:keep] / probs[:keep].sum()
  return int(order[rng.choice(keep, p=probs)])


def generate(start, extend, prompts_ids, n_ctx, max_new_tokens, eos_id, choose):
  """New ids per prompt, all prompts stepped together; each stops at its EOS.

  Args:
    start: function(windows) -> [len, vocab] logits after each window.
    extend: the same, for windows that each grew by one id since the last call (or, for a
      sequence that already ended, stayed the same); `start` itself when there is no cache.
    prompts_ids: one list of ids per prompt.
    n_ctx: the window: longer sequences keep their last n_ctx ids.
    max_new_tokens: at most this many new ids per prompt.
    eos_id: ends a sequence (not included in the output).
    choose: function(prompt index, logits) -> id.
  """
  sequences = [list(ids) for ids in prompts_ids]
  new_ids = [[] for _ in prompts_ids]
  active = set(range(len(prompts_ids)))
  logits = start(sequences) if max_new_tokens else None
  for remaining in range(max_new_tokens - 1, -1, -1):
    for index in sorted(active):
      token = choose(index, logits[index])
      if token == eos_id:
        active.remove(index)
      else:
        sequences[index].append(token)
        new_ids[index].append(token)
    if not active or not remaining:
      break
    slid = any(len(sequences[index]) > n_ctx for index in active)
    logits = (start if slid else extend)([ids[-n_ctx:] for ids in sequences])
  return new_ids


def _validate(max_new_tokens, temperature, top_k, top_p, batch_size):
  if temperature < 0:
    raise UserError(f"sample.temperature = {temperature}; it must be >= 0")
  if not isinstance(top_k, int) or top_k < 0:
    raise UserError(f"sample.top_k = {top_k!r}; it must be an integer >= 0 (0: off)")
  if not 0 < top_p <= 1:
    raise UserError(f"sample.top_p = {top_p}; it must be in (0, 1] (1: off)")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
    raise UserError(f"sample.max_new_tokens = {max_new_tokens!r}; it must be an integer >= 0")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise UserError(f"sample.batch_size = {batch_size!r}; it must be a positive integer")


def _rows(batch_size, prompts, mesh):
  """Rows the graph runs: the prompts, up to batch_size, rounded up to what the layout splits.

  Fewer rows than batch_size when there are fewer prompts: a step over 8 rows costs about
  twice one over 1 (oneDNN switches from its matrix-vector kernel), for nothing.
  """
  split = dict(mesh.shape).get(dict(mesh.layout).get("batch"), 1)
  return min(batch_size, -(-prompts // split) * split)


def encode_prompts(tokenizer, prompts, n_ctx):
  """Ids per prompt ("" starts from EOS); a prompt longer than n_ctx tokens is an error."""
  eos = tokenizer_lib.eos_id(tokenizer)
  prompts_ids = [tokenizer.encode(p).ids if p else [eos] for p in prompts]
  for number, ids in enumerate(prompts_ids, start=1):
    if len(ids) > n_ctx:
      raise UserError(f"prompt {number} is {len(ids)} tokens, more than GPT.n_ctx = {n_ctx};"
                       f" shorten it")
  return prompts_ids


@gin.configurable(denylist=["model_dir", "prompts"])
def sample(model_dir, prompts, model=gin.REQUIRED, mesh=gin.REQUIRED, max_new_tokens=100,
           temperature=0.8, top_k=0, top_p=1.0, seed=0, batch_size=8, precision="float32",
           cache=True):
  """Continues each prompt with the latest checkpoint in `model_dir`.

  Args:
    model_dir: a trained model's folder (checkpoints, operative_config.gin, tokenizer.json).
    prompts: the texts to continue; "" starts from the end-of-text token. A prompt longer
      than GPT.n_ctx tokens is an error; continuations past n_ctx slide the window.
    model: the model, as trained (read from the operative config).
    mesh: the mesh to sample on.
    max_new_tokens: stop after this many new tokens (or at end-of-text, per prompt).
    temperature: softmax temperature; 0 is greedy.
    top_k: sample among the k most likely tokens only; 0 is off.
    top_p: nucleus sampling: among the fewest most likely tokens holding this much
      probability; in (0, 1], 1 is off.
    seed: seeds the sampling; prompt i draws from its own stream (seed, i), so batching
      does not change the samples.
    batch_size: prompts run together through the graph (as many as there are, if fewer).
    precision: "float32" or "bfloat16" activations.
    cache: decode with the key/value cache (one position per new token); False reruns the
      whole window for every token (the reference the cache is tested against).

  Returns:
    the decoded continuations (without the prompts), one per prompt.
  """
  _validate(max_new_tokens, temperature, top_k, top_p, batch_size)
  inference.check_model_dir(model_dir)
  tokenizer = inference.load_tokenizer(model_dir)
  prompts_ids = encode_prompts(tokenizer, prompts, model.n_ctx)
  batch_size = _rows(batch_size, len(prompts), mesh)
  rngs = [np.random.default_rng([seed, index]) for index in range(len(prompts))]

  def choose(index, logits):
    return choose_token(logits, temperature, top_k, top_p, rngs[index])

  with runtime.started(mesh) as rt:
    restored = inference.RestoredModel(model, rt, model_dir, batch_size, precision,
                                       decode=cache)
    restored.restore()
    new_ids = _continue(restored, prompts_ids, batch_size, cache, max_new_tokens,
                        tokenizer_lib.eos_id(tokenizer), choose)
  return [tokenizer.decode(ids) for ids in new_ids]


def _continue(restored, prompts_ids, batch_size, cache, max_new_tokens, eos_id, choose):
  """New ids per prompt, batch_size prompts at a time through `restored`."""
  start, extend = ((restored.start, restored.extend) if cache
                   else (restored.next_logits, restored.next_logits))
  new_ids = []
  for first in range(0, len(prompts_ids), batch_size):
    new_ids += generate(start, extend, prompts_ids[first:first + batch_size],
                        restored.model.n_ctx, max_new_tokens, eos_id,
                        lambda i, logits, first=first: choose(first + i, logits))
  return new_ids
