"""Turns a corpus into a tokenized, windowed, sharded TFRecord dataset, streaming.

Layout of a prepared dataset folder:

  dataset.json              what the trainer needs to know (see `prepare_dataset`)
  tokenizer.json            the tokenizer that produced the ids
  train-00000.tfrecord      tf.train.Examples, each one int64 feature "tokens" of n_ctx+1 ids
  validation-00000.tfrecord ... (the last one may be a partial window: see below)

The inputs (`sources.py`: text, JSONL(.gz/.zst), Parquet) are read in a fixed order (the
files sorted, then shuffled by the seed; each file's documents in file order). Each document
is fixed and filtered (`workers.Filters`) and goes to validation when its content hash, keyed
by the seed, falls below validation_fraction, so the same text always lands in the same split
(when no document does, the last one does: a tiny corpus still gets a validation split).
Documents are tokenized in worker processes, each followed by EOS; each split's token stream
is cut into non-overlapping windows of n_ctx+1 tokens (inputs window[:-1], targets
window[1:]) and written shard by shard. The tail shorter than a window is kept in validation
(a last window padded with zeros, its real length in an int64 feature "length": evaluation
scores its real tokens only) and left out of train (training reads whole windows), its
tokens and the documents it held uncounted. Nothing holds the corpus: memory is a shard's
tokens per split plus the batches in flight (and, with dedup, a 16-byte hash per distinct
document).

Work happens in `<output_dir>.partial`; after every shard its state (input position, counts,
the unwritten tokens) is saved there, so a run killed at any moment and started again with
the same arguments continues from the last shard and ends with the same bytes. The folder
becomes output_dir, dataset.json included, only when everything is written.
"""
import collections
import hashlib
import json
import os
import random
import shutil
import signal
import tempfile

import numpy as np
import tensorflow.compat.v1 as tf
import tqdm

from gptneo import storage
from gptneo.data import sources as sources_lib
from gptneo.data import tokenizer as tokenizer_lib
from gptneo.data import workers as workers_lib
from gptneo.errors import UserError

# 2: validation keeps its last, partial window; a split counts what its windows hold.
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # 1: every split's tail under a window dropped, yet counted
TOKEN_FEATURE = "tokens"
LENGTH_FEATURE = "length"  # only on a partial window: how many of its tokens are real
STDLIB_SPEC = sources_lib.STDLIB_SPEC
SPLITS = ("train", "validation")
_BATCH_BYTES = 1 << 20  # Text per worker batch: enough for encode_batch, small in memory.
_STATE = ".prepare_state.npz"
_DEDUP = ".dedup_hashes"
_KILL_HOOK = "GPTNEO_PREPARE_KILL_AFTER_SHARDS"  # Tests: SIGKILL itself after shard k.


def resolve_inputs(specs):
  """The paths of the sources that input specs name; see `sources.resolve`."""
  return [source.path for source in sources_lib.resolve(specs)]


def stream_order(sources, seed):
  """The sources in the order they are read: shuffled by seed, so neighbouring windows
  are not all one package."""
  order = list(sources)
  random.Random(seed).shuffle(order)
  return order


def split_of(digest, validation_fraction, seed):
  """'validation' when the document's content hash (keyed by seed) is below the fraction.

  Args:
    digest: `workers.content_hash` of the document's text.
    validation_fraction: share of documents for validation, in [0, 1).
    seed: another seed draws another split.
  """
  keyed = hashlib.blake2b(digest, digest_size=8, key=seed.to_bytes(8, "little", signed=True))
  coin = int.from_bytes(keyed.digest(), "little") / 2**64
  return "validation" if coin < validation_fraction else "train"


# --------------------------------------------------------------------------- writing


def write_windows(tokens, window_length, tokens_per_shard, folder, split):
  """Cuts a token stream into windows and writes them as sharded TFRecords.

  Args:
    tokens: 1-D int array; the tail shorter than a window is dropped (not counted).
    window_length: tokens per window (n_ctx + 1).
    tokens_per_shard: approximate tokens per TFRecord file (at least one window each).
    folder: where to write `{split}-NNNNN.tfrecord`.
    split: split name, the file name prefix.

  Returns:
    (list of shard basenames, number of windows).
  """
  writer = ShardWriter(folder, split, window_length, tokens_per_shard, _new_split_info())
  writer.add(np.asarray(tokens, dtype=np.int32))
  writer.finish()
  return writer.info["files"], writer.info["windows"]


def _new_split_info():
  return {"files": [], "windows": 0, "tokens": 0, "bytes": 0, "documents": 0}


class ShardWriter:
  """One split's token stream, written as shards of whole windows as soon as one is full.

  info counts the documents, tokens and bytes added (the caller's) and the windows and files
  written; `finish` takes out of it what the stream's tail held unless keep_tail stores it.
  """

  def __init__(self, folder, split, window_length, tokens_per_shard, info, pending=None,
               recent=None, keep_tail=False):
    self.folder, self.split, self.info = folder, split, info
    self.window_length, self.keep_tail = window_length, keep_tail
    self.shard_tokens = max(1, tokens_per_shard // window_length) * window_length
    self.pieces = [] if pending is None or not len(pending) else [pending]
    self.pending_tokens = sum(len(piece) for piece in self.pieces)
    # [tokens, bytes] of the latest documents, covering at least the stream's last window:
    # what a dropped tail held (a list in the prepare state, saved with it).
    self.recent = [] if recent is None else recent
    self._recent_tokens = sum(length for length, _ in self.recent)

  def add(self, ids, num_bytes=0):
    """Appends one document's ids (num_bytes of text) to the stream; returns the number of
    shards this completed."""
    self.pieces.append(ids)
    self.pending_tokens += len(ids)
    self._remember(len(ids), num_bytes)
    written = 0
    while self.pending_tokens >= self.shard_tokens:
      stream = self.pending()
      self._write(stream[:self.shard_tokens])
      self.pieces, self.pending_tokens = [stream[self.shard_tokens:]], len(stream) - self.shard_tokens
      written += 1
    return written

  def pending(self):
    """The tokens not yet in a shard."""
    return np.concatenate(self.pieces) if self.pieces else np.zeros([0], np.int32)

  def _remember(self, length, num_bytes):
    self.recent.append([int(length), int(num_bytes)])
    self._recent_tokens += length
    while self._recent_tokens - self.recent[0][0] >= self.window_length:
      self._recent_tokens -= self.recent.pop(0)[0]

  def finish(self):
    """Writes the last, shorter shard of the windows left. The tail under a window: with
    keep_tail, a last window padded with zeros; else dropped, and taken out of info."""
    stream = self.pending()
    whole = len(stream) // self.window_length * self.window_length
    tail = len(stream) - whole
    if tail and self.keep_tail:
      padding = np.zeros([self.window_length - tail], np.int32)
      self._write(np.concatenate([stream, padding]), tail)
    elif whole:
      self._write(stream[:whole])
    if tail and not self.keep_tail:
      self._uncount(tail)
    self.pieces, self.pending_tokens = [], 0

  def _uncount(self, tail):
    """Takes the tail's tokens, and the documents wholly in it, out of info; a document it
    cuts is counted (its start is stored), its bytes whole."""
    self.info["tokens"] -= tail
    self.info["dropped_tail"] = {"tokens": tail, "documents": 0}
    for length, num_bytes in reversed(self.recent):
      if length > tail:
        break
      tail -= length
      self.info["documents"] -= 1
      self.info["bytes"] -= num_bytes
      self.info["dropped_tail"]["documents"] += 1

  def _write(self, tokens, last_length=None):
    """Writes tokens as one shard of windows; with last_length, the last is that partial."""
    name = f"{self.split}-{len(self.info['files']):05d}.tfrecord"
    windows = tokens.reshape(-1, self.window_length)
    lengths = [None] * len(windows)
    lengths[-1] = last_length

    def write(temporary):
      with tf.io.TFRecordWriter(temporary) as writer:
        for window, length in zip(windows, lengths, strict=True):
          writer.write(_window_example(window, length))
    storage.atomic_write(os.path.join(self.folder, name), write)
    self.info["files"].append(name)
    self.info["windows"] += len(windows)


def _window_example(window, length=None):
  """A window as a tf.train.Example; a partial one (length real tokens) says its length."""
  features = {TOKEN_FEATURE: tf.train.Feature(int64_list=tf.train.Int64List(value=window.tolist()))}
  if length is not None:
    features[LENGTH_FEATURE] = tf.train.Feature(int64_list=tf.train.Int64List(value=[length]))
  example = tf.train.Example(features=tf.train.Features(feature=features))
  return example.SerializeToString(deterministic=True)  # map keys sorted: same bytes in every process


def _write_text(path, text):
  with tf.io.gfile.GFile(path, "w") as f:
    f.write(text)


# --------------------------------------------------------------------------- output folders


def _check_output_dir(output_dir, overwrite):
  if not tf.io.gfile.exists(output_dir):
    return
  if not tf.io.gfile.isdir(output_dir):
    raise UserError(f"output_dir '{output_dir}' is a file; "
                    "pass a folder path as --output_dir")
  if tf.io.gfile.listdir(output_dir) and not overwrite:
    raise UserError(f"output_dir '{output_dir}' is not empty; pass --overwrite to replace "
                    "it or choose another --output_dir")


def _publish(staging_dir, output_dir, overwrite):
  """Moves the finished staging folder to output_dir, replacing the old one only now."""
  _check_output_dir(output_dir, overwrite)  # Another process may have written meanwhile.
  if os.path.exists(output_dir):
    retired_dir = f"{output_dir}.old-{os.getpid()}"
    os.rename(output_dir, retired_dir)
    os.rename(staging_dir, output_dir)
    shutil.rmtree(retired_dir)
  else:
    os.rename(staging_dir, output_dir)


# --------------------------------------------------------------------------- entry point


def prepare_dataset(inputs, output_dir, n_ctx, vocab_size=None, tokenizer_path=None,
                    validation_fraction=0.05, tokens_per_shard=1_000_000, seed=1234,
                    overwrite=False, reading=None, filters=None, workers=1,
                    tokenizer_sample_bytes=sources_lib.TOKENIZER_SAMPLE_BYTES):
  """Tokenizes a corpus into a windowed TFRecord dataset in output_dir, atomically, resumably.

  dataset.json holds: format (2), n_ctx, n_vocab, eos_id, tokenizer ("tokenizer.json"),
  documents (kept), tokens_per_shard, seed, validation_fraction, reading and filters (the
  settings that chose the documents), dropped (documents dropped, by reason), inputs_hash
  (of every input file's bytes), tokenizer_sha256 (`tokenizer.identity`), sources (per
  input file in stream order, as read: path, format, documents, tokens, bytes, dropped,
  blake2b of the file), and splits: for 'train' and 'validation', what their windows hold:
  files (shard basenames), windows, tokens, documents (with a token stored) and bytes (UTF-8
  bytes of those documents' texts); validation stores its partial last window, train drops
  it and says what it held in dropped_tail {tokens, documents (wholly in it)}.

  Args:
    inputs: input specs, see `sources.resolve`.
    output_dir: folder to create, or a gs://bucket/prefix to upload to (prepared in a
      temporary folder first); must be absent or empty unless overwrite is True.
    n_ctx: context length; windows hold n_ctx + 1 tokens.
    vocab_size: train a byte-level BPE of this size on train documents (exclusive with
      tokenizer_path).
    tokenizer_path: load this tokenizer instead, see `tokenizer.load_tokenizer`.
    validation_fraction: share of documents held out for validation, in [0, 1), each
      drawn by its content hash; when none is drawn, the last document is (one document
      and a positive fraction are refused).
    tokens_per_shard: approximate tokens per TFRecord file.
    seed: seeds the order of the input files and which documents are held out.
    overwrite: replace a non-empty output_dir, once the new dataset is complete.
    reading: a `sources.Reading` (text field, document separator, bad lines); None: the
      defaults.
    filters: a `workers.Filters` (ftfy, min_chars, dedup, meta filter); None: keep all.
    workers: processes tokenizing in parallel; the output is the same for any number.
    tokenizer_sample_bytes: at most this much train text (UTF-8 bytes) trains the BPE,
      shared among the input files by file size, each share read from the file's start.

  Returns:
    The dataset.json contents as a dict.
  """
  plan = _Plan(inputs, n_ctx, vocab_size, tokenizer_path, validation_fraction,
               tokens_per_shard, seed, reading or sources_lib.Reading(),
               filters or workers_lib.Filters(), workers, tokenizer_sample_bytes)
  if storage.is_remote(output_dir):  # Before stripping: 'gs://' must not become 'gs:'.
    return _prepare_and_upload(str(output_dir), overwrite, plan)
  return _prepare_locally(plan, str(output_dir).rstrip("/"), overwrite)


def _prepare_and_upload(uri, overwrite, plan):
  """Prepares a dataset in a local folder named after uri and the plan (so a rerun resumes
  the prepare, or only the upload), then uploads it."""
  # An occupied prefix is refused now, not after the (possibly long) tokenization.
  storage.check_upload_target(uri, overwrite)
  key = hashlib.sha256(f"{uri} {plan.fingerprint()}".encode()).hexdigest()[:12]
  local_root = os.path.join(tempfile.gettempdir(), f"gptneo-prepare-{key}")
  local_dir = os.path.join(local_root, "dataset")
  if os.path.exists(os.path.join(local_dir, "dataset.json")):  # prepared, upload interrupted
    with open(os.path.join(local_dir, "dataset.json")) as f:
      info = json.load(f)
  else:
    info = _prepare_locally(plan, local_dir, True)
  storage.upload_folder(local_dir, uri, overwrite=overwrite)
  shutil.rmtree(local_root)
  return info


def _prepare_locally(plan, output_dir, overwrite):
  _check_output_dir(output_dir, overwrite)
  staging_dir = f"{output_dir}.partial"
  try:
    info = _Run(plan, staging_dir).run()
    _publish(staging_dir, output_dir, overwrite)
  except UserError:
    shutil.rmtree(staging_dir, ignore_errors=True)  # Bad input: nothing half-written stays.
    raise
  return info


class _Plan:
  """The arguments of one prepare, checked; their fingerprint says when a rerun may resume."""

  def __init__(self, inputs, n_ctx, vocab_size, tokenizer_path, validation_fraction,
               tokens_per_shard, seed, reading, filters, workers, tokenizer_sample_bytes):
    _check_arguments(n_ctx, vocab_size, tokenizer_path, tokens_per_shard, validation_fraction,
                     workers, tokenizer_sample_bytes)
    self.n_ctx, self.vocab_size, self.tokenizer_path = n_ctx, vocab_size, tokenizer_path
    self.validation_fraction, self.tokens_per_shard = validation_fraction, tokens_per_shard
    self.seed, self.reading, self.filters, self.workers = seed, reading, filters, workers
    self.tokenizer_sample_bytes = tokenizer_sample_bytes
    self.sources = stream_order(sources_lib.resolve(inputs), seed)
    _check_tokenized(self.sources, tokenizer_path, filters)
    sources_lib.check(self.sources, reading)

  def settings(self):
    """What dataset.json records of how the documents were chosen."""
    return {"validation_fraction": self.validation_fraction,
            "reading": {"text_field": self.reading.text_field,
                        "document_separator": self.reading.document_separator,
                        "skip_bad_lines": self.reading.skip_bad_lines},
            "filters": self.filters.as_dict()}

  def fingerprint(self):
    files = [(s.path, os.path.getsize(s.path), os.stat(s.path).st_mtime_ns)
             for s in self.sources]
    arguments = [FORMAT_VERSION, self.n_ctx, self.vocab_size, self.tokenizer_path,
                 self.tokens_per_shard, self.seed, self.tokenizer_sample_bytes,
                 self.settings(), files]
    return hashlib.sha256(json.dumps(arguments).encode()).hexdigest()


def _check_tokenized(sources, tokenizer_path, filters):
  """Token ids (GPT-Neo's tfrecords) are kept as they are: their vocabulary must be named,
  and their text can't be fixed."""
  tokenized = [source.path for source in sources if source.format == "tfrecord"]
  if tokenized and tokenizer_path is None:
    raise UserError(f"{tokenized[0]} holds token ids, not text; pass the --tokenizer they "
                    f"were made with (GPT-Neo's default: GPT-2's, a folder with its "
                    f"vocab.json + merges.txt)")
  if tokenized and filters.ftfy:
    raise UserError(f"--ftfy can't fix {tokenized[0]}, which holds token ids, not text; leave "
                    f"--ftfy out, or prepare the tfrecords apart")


def _check_arguments(n_ctx, vocab_size, tokenizer_path, tokens_per_shard, validation_fraction,
                     workers, tokenizer_sample_bytes):
  if (vocab_size is None) == (tokenizer_path is None):
    raise UserError("give exactly one of vocab_size (train a tokenizer) and tokenizer_path "
                    "(load one); pass --vocab_size or --tokenizer")
  if n_ctx < 1:
    raise UserError(f"n_ctx={n_ctx} must be positive; pass e.g. --n_ctx=256")
  if tokens_per_shard < 1:
    raise UserError(f"tokens_per_shard={tokens_per_shard} must be positive; "
                    "pass e.g. --tokens_per_shard=1000000")
  if not 0 <= validation_fraction < 1:
    raise UserError(f"validation_fraction={validation_fraction} is outside [0, 1); "
                    "pass e.g. --validation_fraction=0.05, or 0 for no validation split")
  if workers < 1:
    raise UserError(f"workers={workers} must be at least 1; pass e.g. --workers=1, "
                    "or leave it out for one per core")
  if tokenizer_sample_bytes < 1:
    raise UserError(f"tokenizer_sample_bytes={tokenizer_sample_bytes} must be positive; "
                    "pass e.g. --tokenizer_sample_bytes=256000000")


# --------------------------------------------------------------------------- one run


class _Run:
  """One prepare into staging_dir: resumes its saved state when the plan is the same."""

  def __init__(self, plan, staging_dir):
    self.plan, self.folder = plan, staging_dir
    self.shards_written = 0

  def run(self):
    tokenizer, state, pending = self._start()
    self.eos = tokenizer_lib.eos_id(tokenizer)
    self.token_ids = (self.eos, tokenizer.get_vocab_size(with_added_tokens=True))
    window_length = self.plan.n_ctx + 1
    self.writers = {split: ShardWriter(self.folder, split, window_length,
                                       self.plan.tokens_per_shard, state["splits"][split],
                                       pending[split], state["recent"][split],
                                       keep_tail=split == "validation") for split in SPLITS}
    self.state = state
    self.seen = _load_seen(self.folder, state["dedup_count"]) if self.plan.filters.dedup else None
    with open(os.path.join(self.folder, _DEDUP), "ab") as self.dedup_file:
      self._tokenize(tokenizer.to_str())
    self._release("validation" if state["documents"] > 1 else "train")
    self._check_sizes()
    for writer in self.writers.values():
      writer.finish()
    return self._finish(tokenizer)

  def _start(self):
    """(tokenizer, state, pending tokens per split): saved ones, or new ones."""
    saved = _load_state(self.folder, self.plan.fingerprint())
    if saved is not None:
      state, pending, self.held = saved
      tokenizer = tokenizer_lib.load_tokenizer(os.path.join(self.folder, "tokenizer.json"))
      print(f"prepare_data: resuming {self.folder} after {_shard_count(state)} shards")
      return tokenizer, state, pending
    if os.path.exists(self.folder):
      shutil.rmtree(self.folder)  # another prepare's leftovers
    os.makedirs(self.folder)
    tokenizer = self._tokenizer()
    _write_text(os.path.join(self.folder, "tokenizer.json"), tokenizer.to_str())
    state = _new_state(self.plan)
    pending = {split: np.zeros([0], np.int32) for split in SPLITS}
    self.held = np.zeros([0], np.int32)
    _save_state(self.folder, state, pending, self.held)
    return tokenizer, state, pending

  def _tokenizer(self):
    if self.plan.tokenizer_path is not None:
      return tokenizer_lib.load_tokenizer(self.plan.tokenizer_path)
    # Held-out documents stay unseen by every learned part, the merges included.
    return tokenizer_lib.train_bpe_on(_train_sample(self.plan), self.plan.vocab_size)

  def _tokenize(self, tokenizer_json):
    plan, state = self.plan, self.state
    total = sum(os.path.getsize(source.path) for source in plan.sources)
    done = sum(os.path.getsize(s.path) for s in plan.sources[:state["position"][0]])
    with tqdm.tqdm(total=total, initial=done, desc="preparing", unit="B", unit_scale=True,
                   unit_divisor=1024, smoothing=0.1) as progress:
      batches = _batches(plan, state["position"], self.token_ids)
      for items, results in workers_lib.map_ordered(batches, plan.workers, tokenizer_json,
                                                     plan.filters):
        results = iter(results)
        for item in items:
          self._consume(item, results)
          progress.update(max(0, done + item.offset - progress.n))
          done += os.path.getsize(plan.sources[item.source].path) if item.end else 0
        progress.set_postfix(documents=f"{state['documents']:,}", refresh=False)

  def _consume(self, item, results):
    """Accounts for one record (or a source's end), in stream order; checkpoints on shards."""
    state, stats = self.state, self.state["sources"][item.source]
    if item.end:
      stats["blake2b"] = _file_digest(self.plan.sources[item.source].path)
      state["position"] = [item.source + 1, 0]
      return
    state["position"] = [item.source, state["position"][1] + 1]
    reason = item.dropped
    result = next(results) if reason is None else None
    if result is not None:
      reason = result.dropped or self._duplicate(result.digest)
    if reason is not None:
      stats["dropped"][reason] = stats["dropped"].get(reason, 0) + 1
      return
    self._add(result, stats)

  def _duplicate(self, digest):
    if self.seen is None:
      return None
    if digest in self.seen:
      return "duplicate"
    self.seen.add(digest)
    self.dedup_file.write(digest)
    self.state["dedup_count"] += 1
    return None

  def _add(self, result, stats):
    """Sends a kept document to its split. While no document went to validation, the
    latest train document waits: at the end it is the validation split (of a tiny corpus)."""
    split = split_of(result.digest, self.plan.validation_fraction, self.plan.seed)
    ids = np.append(result.ids, np.int32(self.eos))
    for counts in (stats, self.state):
      counts["documents"] += 1
    stats["tokens"] += len(ids)
    stats["bytes"] += result.num_bytes
    waiting = self.plan.validation_fraction > 0 and not self.state["splits"]["validation"]["documents"]
    written = self._release()
    if split == "train" and waiting:
      self.held, self.state["held_bytes"] = ids, result.num_bytes
    else:
      written += self._write(split, ids, result.num_bytes)
    if written:
      self._checkpoint(written)

  def _release(self, split="train"):
    """Writes the waiting train document (into `split`); returns the shards completed."""
    if self.state["held_bytes"] is None:
      return 0
    ids, num_bytes = self.held, self.state["held_bytes"]
    self.held, self.state["held_bytes"] = np.zeros([0], np.int32), None
    return self._write(split, ids, num_bytes)

  def _write(self, split, ids, num_bytes):
    info = self.state["splits"][split]
    info["documents"] += 1
    info["tokens"] += len(ids)
    info["bytes"] += num_bytes
    return self.writers[split].add(ids, num_bytes)

  def _checkpoint(self, written):
    self.shards_written += written
    if os.environ.get(_KILL_HOOK) and self.shards_written >= int(os.environ[_KILL_HOOK]):
      os.kill(os.getpid(), signal.SIGKILL)  # the shard is on disk, its state not yet
    self.dedup_file.flush()
    pending = {split: writer.pending() for split, writer in self.writers.items()}
    _save_state(self.folder, self.state, pending, self.held)

  def _check_sizes(self):
    """Each split must fill a window (counted before the train tail is dropped)."""
    state, window_length = self.state, self.plan.n_ctx + 1
    train_tokens = state["splits"]["train"]["tokens"]
    if train_tokens < window_length:
      raise UserError(f"corpus has {train_tokens} tokens, fewer than "
                      f"n_ctx+1={window_length}; add more input or lower --n_ctx")
    if self.plan.validation_fraction > 0:
      _check_validation(state, window_length, self.plan.validation_fraction)

  def _finish(self, tokenizer):
    state, plan = self.state, self.plan
    splits = {split: state["splits"][split] for split in SPLITS if state["splits"][split]["documents"]}
    for name in os.listdir(self.folder):  # the state, dedup hashes, any temporary file
      if name.startswith("."):
        os.remove(os.path.join(self.folder, name))
    info = {"format": FORMAT_VERSION, "n_ctx": plan.n_ctx, "n_vocab": tokenizer.get_vocab_size(),
            "eos_id": self.eos, "tokenizer": "tokenizer.json", "documents": state["documents"],
            "tokens_per_shard": plan.tokens_per_shard, "seed": plan.seed, **plan.settings(),
            "dropped": _total_dropped(state["sources"]),
            "inputs_hash": _inputs_hash(state["sources"]),
            "tokenizer_sha256": tokenizer_lib.identity(tokenizer), "sources": state["sources"],
            "splits": splits}
    _write_text(os.path.join(self.folder, "dataset.json"), json.dumps(info, indent=2) + "\n")
    return info


def _check_validation(state, window_length, fraction):
  validation = state["splits"]["validation"]
  if not validation["documents"]:
    raise UserError(
        f"validation_fraction={fraction} needs two or more documents, the corpus has "
        f"{state['documents']}; split the text into documents (--document_separator), "
        "add input, or pass --validation_fraction=0 for no validation split")
  if validation["tokens"] < window_length:
    raise UserError(f"validation split has {validation['tokens']} tokens, fewer than "
                    f"n_ctx+1={window_length}; raise --validation_fraction, add more input, "
                    "lower --n_ctx or pass --validation_fraction=0")


def _total_dropped(source_stats):
  total = collections.Counter()
  for stats in source_stats:
    total.update(stats["dropped"])
  return dict(sorted(total.items()))


def _inputs_hash(source_stats):
  digests = [[stats["path"], stats["blake2b"]] for stats in source_stats]
  return hashlib.blake2b(json.dumps(digests).encode(), digest_size=16).hexdigest()


def _file_digest(path):
  with open(path, "rb") as f:
    return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def _shard_count(state):
  return sum(len(state["splits"][split]["files"]) for split in SPLITS)


def describe(info, dataset_dir):
  """Lines for bin/prepare_data --stats: per split and per source counts, the settings that
  chose the documents, the inputs' hash."""
  if "inputs_hash" not in info:
    raise UserError(f"dataset '{dataset_dir}' was prepared before datasets recorded their "
                    "sources; prepare it again (--overwrite) to see them")
  lines = [f"{dataset_dir}: {info['documents']:,} documents, vocab {info['n_vocab']}, "
           f"n_ctx {info['n_ctx']}, inputs_hash {info['inputs_hash']}"]
  for split, split_info in info["splits"].items():
    tail = split_info.get("dropped_tail")
    left_out = (f"; its last {tail['tokens']:,} tokens ({tail['documents']:,} whole documents), "
                "under a window, not stored" if tail else "")
    lines.append(f"  {split}: {split_info['documents']:,} documents, "
                 f"{split_info['tokens']:,} tokens, {split_info['windows']:,} windows, "
                 f"{len(split_info['files'])} files{left_out}")
  settings = ("validation_fraction", "reading", "filters", "dropped")
  lines.append("  " + json.dumps({key: info[key] for key in settings}))
  for source in info["sources"]:
    dropped = "".join(f", dropped {n:,} {why}" for why, n in source["dropped"].items())
    lines.append(f"  {source['path']} ({source['format']}): {source['documents']:,} "
                 f"documents, {source['tokens']:,} tokens{dropped}")
  return lines


# --------------------------------------------------------------------------- reading


_Item = collections.namedtuple("_Item", "source dropped offset end")


def _batches(plan, position, token_ids):
  """Yields (items, texts) batches from `position` on: every record is an item (its text
  in texts unless a meta filter or a bad line dropped it), every source's end one too.
  token_ids: (EOS id, vocabulary size), for tokenized sources."""
  items, texts, size = [], [], 0
  for index in range(position[0], len(plan.sources)):
    skip = position[1] if index == position[0] else 0
    for record in _records_from(plan, plan.sources[index], skip, token_ids):
      dropped = _meta_dropped(record, plan.filters)
      items.append(_Item(index, dropped, record.offset, False))
      if dropped is None:
        texts.append(record.text)
        size += len(record.text) if record.text is not None else 0
      if size >= _BATCH_BYTES:
        yield items, texts
        items, texts, size = [], [], 0
    items.append(_Item(index, None, os.path.getsize(plan.sources[index].path), True))
  yield items, texts


def _records_from(plan, source, skip, token_ids=None):
  columns = [name.split(".")[0] for name, _ in plan.filters.meta_filter]
  records = sources_lib.records(source, plan.reading, columns, token_ids)
  for number, record in enumerate(records):
    if number >= skip:
      yield record


def _meta_dropped(record, filters):
  if record.text is None:
    return "bad_line"
  if record.fields is None:  # plain text: no meta to filter on
    return None
  for name, allowed in filters.meta_filter:
    if str(sources_lib.field(record.fields, name)) not in allowed:
      return "meta"
  return None


def _train_sample(plan):
  """Train documents for the BPE: up to tokenizer_sample_bytes, shared by file size."""
  total = sum(os.path.getsize(source.path) for source in plan.sources) or 1
  for source in plan.sources:
    budget = plan.tokenizer_sample_bytes * os.path.getsize(source.path) // total + 1
    for record in _records_from(plan, source, 0):
      if budget <= 0:
        break
      if _meta_dropped(record, plan.filters) is not None:
        continue
      text, _ = workers_lib.clean(record.text, plan.filters)
      digest = text is not None and workers_lib.content_hash(text)
      if text and split_of(digest, plan.validation_fraction, plan.seed) == "train":
        budget -= len(text.encode("utf-8"))
        yield text


# --------------------------------------------------------------------------- state


def _new_state(plan):
  return {"fingerprint": plan.fingerprint(), "position": [0, 0], "documents": 0,
          "dedup_count": 0, "held_bytes": None, "splits": {split: _new_split_info() for split in SPLITS},
          "recent": {split: [] for split in SPLITS},
          "sources": [{"path": s.path, "format": s.format, "documents": 0, "tokens": 0,
                       "bytes": 0, "dropped": {}, "blake2b": None} for s in plan.sources]}


def _save_state(folder, state, pending, held):
  """Writes the state, the unwritten tokens and the waiting document in one file,
  atomically (rename)."""
  encoded = np.frombuffer(json.dumps(state).encode(), np.uint8)

  def write(temporary):
    with open(temporary, "wb") as f:  # a file object: savez would append .npz to a name
      np.savez(f, state=encoded, held=held, **pending)
  storage.atomic_write(os.path.join(folder, _STATE), write)


def _load_state(folder, fingerprint):
  """(state, pending, held) saved for this fingerprint, or None."""
  path = os.path.join(folder, _STATE)
  if not os.path.exists(path):
    return None
  with np.load(path) as saved:
    state = json.loads(saved["state"].tobytes())
    pending = {split: saved[split] for split in SPLITS}
    held = saved["held"]
  if state["fingerprint"] != fingerprint:
    print(f"prepare_data: {folder} is another prepare's (other arguments or inputs); "
          "starting over")
    return None
  for split in SPLITS:  # shards written after the state was saved are written again
    for name in os.listdir(folder):
      if name.startswith(f"{split}-") and name not in state["splits"][split]["files"]:
        os.remove(os.path.join(folder, name))
  return state, pending, held


def _load_seen(folder, count):
  """The dedup hashes saved with the state (later ones, of a killed run, cut off)."""
  path = os.path.join(folder, _DEDUP)
  with open(path, "ab") as f:
    f.truncate(16 * count)
  with open(path, "rb") as f:
    data = f.read()
  return {data[i:i + 16] for i in range(0, len(data), 16)}
