"""Sampling: batched prompts of any length through one graph, built once.

With the key/value cache (the default) the prompts run once, a chunk of positions at a time,
and every new token then costs one position. Once a sequence outgrows n_ctx its window
slides, positions shift, and every further token reruns the window, as without the cache.
"""

import dataclasses

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


def generate(start, extend, prompts_ids, n_ctx, max_new_tokens, eos_id, choose,
             stopped=None):
  """New ids per prompt, all prompts stepped together; each stops at its EOS (or `stopped`).

  Args:
    start: function(windows) -> [len, vocab] logits after each window.
    extend: the same, for windows that each grew by one id since the last call (or, for a
      sequence that already ended, stayed the same); `start` itself when there is no cache.
    prompts_ids: one list of ids per prompt.
    n_ctx: the window: longer sequences keep their last n_ctx ids.
    max_new_tokens: at most this many new ids per prompt.
    eos_id: ends a sequence (not included in the output).
    choose: function(prompt index, logits) -> id.
    stopped: function(a prompt's new ids) -> True when that prompt is done (a stop string
      appeared); None: only EOS and max_new_tokens end a prompt.
  """
  sequences = [list(ids) for ids in prompts_ids]
  new_ids = [[] for _ in prompts_ids]
  active = set(range(len(prompts_ids)))
  logits = start([ids[-n_ctx:] for ids in sequences]) if max_new_tokens else None
  for remaining in range(max_new_tokens - 1, -1, -1):
    for index in sorted(active):
      token = choose(index, logits[index])
      if token == eos_id:
        active.remove(index)
      else:
        sequences[index].append(token)
        new_ids[index].append(token)
        if stopped and stopped(new_ids[index]):
          active.remove(index)
    if not active or not remaining:
      break
    slid = any(len(sequences[index]) > n_ctx for index in active)
    logits = (start if slid else extend)([ids[-n_ctx:] for ids in sequences])
  return new_ids


@dataclasses.dataclass
class Completion:
  """One prompt's continuation, as `complete` and `sample` return it."""
  text: str  # the new ids decoded, cut before the first stop string
  ids: list  # the new ids (no EOS); with a stop string, up to the one that completed it
  prompt_ids: list  # the ids the model was given ("" is [EOS])


def greedy(index, logits):
  """The `choose` of greedy decoding: the most likely id (the first, on a tie)."""
  del index
  return int(np.argmax(logits))


def check_stop(stop):
  """`stop` must be a list of non-empty strings (an empty list: no stop strings)."""
  if isinstance(stop, str) or not all(isinstance(s, str) for s in stop):
    raise UserError(f"sample.stop = {stop!r}; it must be a list of strings, e.g. ['\\n\\n']")
  if "" in stop:
    raise UserError(f"sample.stop = {list(stop)!r} holds an empty string, which would stop "
                    f"every prompt at once; remove it")


def cut_at_stop(text, stop):
  """`text` up to the earliest occurrence of any string of `stop` (all of it if none)."""
  cuts = [text.find(s) for s in stop if s in text]
  return text[:min(cuts)] if cuts else text


def decodable_mask(tokenizer, n_vocab):
  """None if the tokenizer decodes every id below n_vocab, else float32 [n_vocab]: 0 where
  it does, -inf at the ids it has no token for (a vocabulary padded past the tokenizer's)."""
  known = [i for i in tokenizer.get_vocab(with_added_tokens=True).values() if i < n_vocab]
  if len(known) == n_vocab:
    return None
  mask = np.full([n_vocab], -np.inf, np.float32)
  mask[known] = 0
  return mask


def complete(restored, tokenizer, prompts_ids, max_new_tokens, stop=(), choose=greedy):
  """Continues each prompt through `restored`, restored.batch_size prompts at a time.

  The one decoding loop behind bin/sample and lm-eval's generate_until. Ids the tokenizer
  cannot decode (GPT.n_vocab above its vocabulary) are never chosen: their logits are -inf.

  Args:
    restored: an inference.RestoredModel, restored; built with decode=True it decodes
      through the key/value cache, else it reruns the window for every token.
    tokenizer: the model's tokenizer (decodes the completions, finds the stop strings).
    prompts_ids: one list of ids per prompt; a longer one than n_ctx is read from its last
      n_ctx ids (left-truncated, as lm-eval's HF model does).
    max_new_tokens: at most this many new ids per prompt; EOS also ends a prompt.
    stop: strings; a prompt ends once its decoded completion holds one, and its text is
      cut before the earliest occurrence of any of them. Empty: no stop strings.
    choose: function(prompt index, float logits [n_vocab]) -> id; greedy by default.

  Returns:
    one Completion per prompt.
  """
  check_stop(stop)
  mask = decodable_mask(tokenizer, restored.model.n_vocab)
  masked = choose if mask is None else lambda index, logits: choose(index, logits + mask)
  stopped = (lambda ids: any(s in tokenizer.decode(ids) for s in stop)) if stop else None
  new_ids = _continue(restored, prompts_ids, max_new_tokens,
                      tokenizer_lib.eos_id(tokenizer), masked, stopped)
  return [Completion(cut_at_stop(tokenizer.decode(ids), stop), ids, list(prompt))
          for ids, prompt in zip(new_ids, prompts_ids, strict=True)]


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
           cache=True, stop=()):
  """Continues each prompt with the latest checkpoint in `model_dir`.

  Ids the tokenizer cannot decode (GPT.n_vocab padded above its vocabulary) are never
  sampled: their logits are set to -inf before choosing.

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
    stop: strings that end a prompt's continuation once it holds one; the text is cut
      before the earliest of them. [] (the default): none; an empty string is an error.

  Returns:
    one Completion per prompt: the continuation's text (without the prompt) and new ids.
  """
  _validate(max_new_tokens, temperature, top_k, top_p, batch_size)
  check_stop(stop)
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
    return complete(restored, tokenizer, prompts_ids, max_new_tokens, stop, choose)


def _continue(restored, prompts_ids, max_new_tokens, eos_id, choose, stopped):
  """New ids per prompt, restored.batch_size prompts at a time through `restored`."""
  start, extend = ((restored.start, restored.extend) if restored.decodes
                   else (restored.next_logits, restored.next_logits))
  new_ids, batch_size = [], restored.batch_size
  for first in range(0, len(prompts_ids), batch_size):
    new_ids += generate(start, extend, prompts_ids[first:first + batch_size],
                        restored.model.n_ctx, max_new_tokens, eos_id,
                        lambda i, logits, first=first: choose(first + i, logits), stopped)
  return new_ids
