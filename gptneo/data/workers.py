"""What bin/prepare_data does to each document, in worker processes: fix, filter, hash, encode.

Imports no TensorFlow: workers are spawned fresh (not forked from a process holding TF's or
tokenizers' threads) and start in a fraction of a second. `map_ordered` feeds them batches
with a bounded number in flight and returns the results in input order, so the output does
not depend on how many workers there are.
"""
import collections
import contextlib
import dataclasses
import hashlib
import multiprocessing
import os
import sys

import numpy as np

from gptneo.errors import UserError

_IN_FLIGHT_PER_WORKER = 3  # Batches queued per worker: keeps them busy, memory bounded.
_worker = None  # This process's Encoder, set by _start_worker.


@dataclasses.dataclass(frozen=True)
class Filters:
  """Which documents are kept, and how their text is fixed first.

  Args:
    min_chars: drop documents shorter than this many characters (after ftfy).
    ftfy: repair mojibake and other Unicode problems with `ftfy.fix_text` first, as
      GPT-Neo's preprocessing did.
    dedup: drop a document whose exact text (after ftfy) came before.
    meta_filter: ((dotted field, allowed values), ...): keep a JSONL/Parquet record only if
      each field's value (as a string) is one of its allowed values; plain text passes.
  """
  min_chars: int = 0
  ftfy: bool = False
  dedup: bool = False
  meta_filter: tuple = ()

  def as_dict(self):
    return {"min_chars": self.min_chars, "ftfy": self.ftfy, "dedup": self.dedup,
            "meta_filter": {name: sorted(values) for name, values in self.meta_filter}}


def parse_meta_filters(specs):
  """Meta filters given as 'FIELD=V1,V2' strings, as Filters.meta_filter expects them."""
  parsed = []
  for spec in specs:
    name, _, values = spec.partition("=")
    if not name or not values:
      raise UserError(f"--meta_filter={spec} is not FIELD=VALUE[,VALUE...]; pass e.g. "
                      "--meta_filter=meta.pile_set_name=Github,ArXiv")
    parsed.append((name, frozenset(values.split(","))))
  return tuple(parsed)


def clean(text, filters):
  """(text, None) for a document to keep, (None, reason) for one to drop."""
  if filters.ftfy:
    import ftfy  # pylint: disable=import-outside-toplevel
    text = ftfy.fix_text(text)
  if not text:  # An empty document would only add a stray EOS.
    return None, "empty"
  if len(text) < filters.min_chars:
    return None, "short"
  return text, None


def content_hash(text):
  """16 bytes identifying a document's text: the dedup key, and the split's coin."""
  return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def encode_literally(tokenizer, texts):
  """encode_batch, but a literal '<|endoftext|>' in a source stays text, not EOS."""
  # Otherwise a file that merely mentions the token would forge a document boundary.
  saved = tokenizer.encode_special_tokens
  tokenizer.encode_special_tokens = True
  try:
    return tokenizer.encode_batch(texts, add_special_tokens=False)
  finally:
    tokenizer.encode_special_tokens = saved


def token_hash(ids):
  """content_hash of a document given as token ids (a tfrecord's): over the ids."""
  return hashlib.blake2b(np.asarray(ids, "<i4").tobytes(), digest_size=16).digest()


class Encoder:
  """Turns a batch of texts into Results: the kept ones hashed and tokenized. A text that is
  an int array (a tfrecord's document) is tokenized already: kept as is, its text's size
  decoded for the statistics."""

  def __init__(self, tokenizer_json, filters):
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
    self.tokenizer, self.filters = Tokenizer.from_str(tokenizer_json), filters

  def __call__(self, texts):
    if any(isinstance(text, np.ndarray) for text in texts):
      return [self._tokenized(text) if isinstance(text, np.ndarray) else self([text])[0]
              for text in texts]
    cleaned = [clean(text, self.filters) for text in texts]
    kept = [text for text, _ in cleaned if text is not None]
    encodings = iter(encode_literally(self.tokenizer, kept))
    results = []
    for text, reason in cleaned:
      if text is None:
        results.append(Result(reason, None, 0, None))
      else:
        ids = np.asarray(next(encodings).ids, dtype=np.int32)
        results.append(Result(None, content_hash(text), len(text.encode("utf-8")), ids))
    return results


  def _tokenized(self, ids):
    """The Result of a document's ids: dropped if empty or shorter than min_chars."""
    text = self.tokenizer.decode(ids.tolist(), skip_special_tokens=False)
    if not ids.size:
      return Result("empty", None, 0, None)
    if len(text) < self.filters.min_chars:
      return Result("short", None, 0, None)
    return Result(None, token_hash(ids), len(text.encode("utf-8")), ids.astype(np.int32))


Result = collections.namedtuple("Result", "dropped digest num_bytes ids")


def _start_worker(tokenizer_json, filters):
  # One thread per worker: N workers are the N cores, not N times tokenizers' thread pool.
  os.environ["TOKENIZERS_PARALLELISM"] = "false"
  global _worker  # pylint: disable=global-statement
  _worker = Encoder(tokenizer_json, filters)


def _encode_in_worker(texts):
  return _worker(texts)


def map_ordered(batches, workers, tokenizer_json, filters):
  """Yields (tag, results) for each (tag, texts) of `batches`, in order, from `workers`
  spawned processes, at most a few batches per worker read ahead; one worker is this
  process, on one thread."""
  if workers == 1:
    yield from _map_here(batches, Encoder(tokenizer_json, filters))
    return
  context = multiprocessing.get_context("spawn")
  with _main_module_hidden():
    pool = context.Pool(workers, _start_worker, (tokenizer_json, filters))
  with pool:
    pending = collections.deque()
    for tag, texts in batches:
      pending.append((tag, pool.apply_async(_encode_in_worker, (texts,))))
      if len(pending) >= workers * _IN_FLIGHT_PER_WORKER:
        tag, result = pending.popleft()
        yield tag, result.get()
    while pending:
      tag, result = pending.popleft()
      yield tag, result.get()


def _map_here(batches, encoder):
  saved = os.environ.get("TOKENIZERS_PARALLELISM")
  for tag, texts in batches:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # tokenizers reads it at every call
    try:
      results = encoder(texts)
    finally:
      if saved is None:
        del os.environ["TOKENIZERS_PARALLELISM"]
      else:
        os.environ["TOKENIZERS_PARALLELISM"] = saved
    yield tag, results


@contextlib.contextmanager
def _main_module_hidden():
  """Spawned workers import nothing of the program that started them.

  A spawned child imports the parent's __main__ (by path or module name) before running
  anything: for bin/prepare_data that is TensorFlow, seconds and hundreds of MB per worker.
  The workers need only this module, so the main module's name and file are hidden while
  the pool starts them.
  """
  main = sys.modules["__main__"]
  saved = {name: main.__dict__[name] for name in ("__file__", "__spec__") if name in vars(main)}
  main.__dict__.pop("__file__", None)
  main.__spec__ = None
  try:
    yield
  finally:
    main.__dict__.update(saved)
    if "__spec__" not in saved:
      del main.__spec__
