"""The harness's `LM` over our restored model, registered with lm-eval as "gptneo".

Requests are scored as lm-eval's HF model (`--model hf`) scores them, so numbers compare:
- loglikelihood: context and continuation encoded together and split (TemplateLM), the
  window (context + continuation)[-(n_ctx + 1):][:-1] (left-truncated to n_ctx), longest
  first, `batch_size` windows per run of the graph; a batch runs on the shortest of a few
  window lengths (`Windows`) that holds its longest window, as HF pads to its longest;
- loglikelihood_rolling: lm-eval's disjoint rolling windows of n_ctx, the first after EOS;
- generate_until: the context's last n_ctx - max_gen_toks ids, greedy (or sampled at the
  request's temperature) through sample.complete, cut at the request's `until` strings.
"""
from gptneo import harness

import numpy as np  # noqa: E402  (lm-eval after the offline switches)

from gptneo import sample as sample_lib  # noqa: E402
from gptneo.data import tokenizer as tokenizer_lib  # noqa: E402
from gptneo.errors import UserError  # noqa: E402

api_model = harness.import_lm_eval("lm_eval.api.model")
registry = harness.import_lm_eval("lm_eval.api.registry")
lm_utils = harness.import_lm_eval("lm_eval.utils")
model_utils = harness.import_lm_eval("lm_eval.models.utils")


MIN_BUCKET = 16  # no window length shorter than this: the graph's overhead would dominate


def bucket_lengths(model, count):
  """Up to `count` window lengths below n_ctx: n_ctx / 2, n_ctx / 4, ... (at least MIN_BUCKET
  and each one GPT.window_fits, i.e. cut into whole local-attention blocks)."""
  halvings = (model.n_ctx >> k for k in range(1, count + 1) if model.n_ctx % (1 << k) == 0)
  return [n for n in halvings if n >= MIN_BUCKET and model.window_fits(n)]


class Windows:
  """RestoredModels of one checkpoint for windows of a few lengths: `full` (n_ctx, restored by
  the caller) and, for each of `lengths`, `build(length)`'s, built and restored on first use
  and kept: each holds its own copy of the weights."""

  def __init__(self, full, build=None, lengths=()):
    self.full, self.build, self.lengths = full, build, sorted(lengths)
    self.built, self.path = {}, None

  def restore(self):
    """Restores the newest intact checkpoint into every model built so far; returns its path."""
    self.path = self.full.restore()
    for restored in self.built.values():
      restored.checkpoints.restore(restored.session, self.path)
    return self.path

  def holding(self, length):
    """The model of the shortest windows that hold `length` ids."""
    fits = [n for n in self.lengths if n >= length]
    if not fits:
      return self.full
    if fits[0] not in self.built:
      restored = self.build(fits[0])
      restored.checkpoints.restore(restored.session, self.path)
      self.built[fits[0]] = restored
    return self.built[fits[0]]


@registry.register_model("gptneo")
class GptNeoLM(api_model.TemplateLM):
  """lm-eval's LM for `restored` (an inference.RestoredModel, restored) and its tokenizer;
  `windows` (a Windows over `restored`, restored) adds shorter windows for short requests."""

  def __init__(self, restored, tokenizer, max_gen_toks=256, windows=None):
    super().__init__()
    self.restored, self.tokenizer, self.max_gen_toks = restored, tokenizer, max_gen_toks
    self.windows = windows or Windows(restored)
    self.n_ctx = restored.model.n_ctx

  @property
  def eot_token_id(self):
    return tokenizer_lib.eos_id(self.tokenizer)

  @property
  def max_length(self):
    return self.n_ctx

  def tok_encode(self, string, add_special_tokens=None, **kwargs):
    del add_special_tokens, kwargs  # our tokenizer adds no special tokens
    return self.tokenizer.encode(string).ids

  def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
    """(log p(continuation | context), greedy) per (strings, context ids, continuation ids)."""
    del disable_tqdm, kwargs
    order = sorted(range(len(requests)),
                   key=lambda i: (-len(requests[i][1] + requests[i][2]),
                                  tuple(requests[i][1] + requests[i][2])))
    results = [None] * len(requests)
    for first in range(0, len(order), self.restored.batch_size):
      batch = order[first:first + self.restored.batch_size]
      for index, result in zip(batch, self._score([requests[i][1:] for i in batch]), strict=True):
        results[index] = result
    return results

  def _score(self, pairs):
    """(log-likelihood, greedy) of each (context ids, continuation ids) in one run."""
    windows = []
    for context, continuation in pairs:
      if not continuation or len(continuation) > self.n_ctx:
        raise UserError(f"a harness request's continuation is {len(continuation)} tokens; it "
                        f"must be 1 to GPT.n_ctx = {self.n_ctx}")
      windows.append((context + continuation)[-(self.n_ctx + 1):])
    restored = self.windows.holding(max(len(w) - 1 for w in windows))
    targets = restored.pad([w[1:] for w in windows])
    out = restored.score(restored.pad([w[:-1] for w in windows]), targets)
    results = []
    for row, (window, (_, continuation)) in enumerate(zip(windows, pairs, strict=True)):
      span = slice(len(window) - 1 - len(continuation), len(window) - 1)
      results.append((-float(out.token_nll[row, span].astype(np.float64).sum()),
                      bool((out.argmax[row, span] == targets[row, span]).all())))
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm=False):
    """Each string's total log-likelihood, over lm-eval's disjoint windows of n_ctx."""
    pieces, owners = [], []
    for index, (string,) in enumerate(request.args for request in requests):
      windows = lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
          max_seq_len=self.n_ctx, context_len=1)
      for context, continuation in map(lm_utils.make_disjoint_window, windows):
        pieces.append((None, context, continuation))
        owners.append(index)
    totals = [0.0] * len(requests)
    for owner, (loglikelihood, _) in zip(owners, self._loglikelihood_tokens(pieces), strict=True):
      totals[owner] += loglikelihood
    return totals

  def generate_until(self, requests, disable_tqdm=False):
    """Each context's continuation, longest contexts first, requests with the same
    generation arguments batched together."""
    groups = {}
    for index, (context, gen_kwargs) in enumerate(request.args for request in requests):
      groups.setdefault(repr(sorted(gen_kwargs.items())), []).append((index, context))
    results = [None] * len(requests)
    for members in groups.values():
      gen_kwargs = requests[members[0][0]].args[1]
      members.sort(key=lambda member: -len(self.tok_encode(member[1])))
      texts = self._generate([context for _, context in members], gen_kwargs)
      for (index, _), text in zip(members, texts, strict=True):
        results[index] = text
    return results

  def _generate(self, contexts, gen_kwargs):
    kwargs = model_utils.normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
    eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
    until = model_utils.handle_stop_sequences(kwargs.pop("until", None), eos=eos)
    max_gen_toks = kwargs.pop("max_gen_toks")
    if max_gen_toks >= self.n_ctx:
      raise UserError(f"a harness task asks for max_gen_toks = {max_gen_toks}, not less than "
                      f"GPT.n_ctx = {self.n_ctx}")
    keep = self.n_ctx - max_gen_toks
    prompts = [(self.tok_encode(c) or [self.eot_token_id])[-keep:] for c in contexts]
    choose = sample_lib.greedy
    if kwargs.get("do_sample") and kwargs.get("temperature", 0) > 0:
      rng = np.random.default_rng(0)
      choose = lambda i, logits: sample_lib.choose_token(  # noqa: E731
          logits, kwargs["temperature"], 0, kwargs.get("top_p", 1.0), rng)
    completions = sample_lib.complete(self.restored, self.tokenizer, prompts, max_gen_toks,
                                      until, choose)
    return [c.text for c in completions]
