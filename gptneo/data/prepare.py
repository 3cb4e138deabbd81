"""Turns text files into a tokenized, windowed, sharded TFRecord dataset.

Layout of a prepared dataset folder:

  dataset.json              what the trainer needs to know (see `prepare_dataset`)
  tokenizer.json            the tokenizer that produced the ids
  train-00000.tfrecord      tf.train.Examples, each one int64 feature "tokens" of n_ctx+1 ids
  validation-00000.tfrecord ...

One file is one document. Every document is followed by EOS, the documents of a split are
concatenated into one token stream, and that stream is cut into non-overlapping windows of
n_ctx+1 tokens (inputs are window[:-1], targets window[1:]).
"""
import functools
import glob
import json
import os
import random
import sysconfig
import tempfile
import time
import uuid

import numpy as np
import tensorflow.compat.v1 as tf
import tqdm

from gptneo import storage
from gptneo.data import tokenizer as tokenizer_lib
from gptneo.errors import UserError

FORMAT_VERSION = 1
TOKEN_FEATURE = "tokens"
STDLIB_SPEC = "stdlib"
_ENCODE_BATCH_DOCUMENTS = 64  # Enough for encode_batch to use every core, small in memory.
_SKIPPED_STDLIB_DIRS = ("site-packages", "dist-packages")  # Third-party code, not stdlib.


# --------------------------------------------------------------------------- inputs


def resolve_inputs(specs):
  """Expands input specs into the text files they name.

  Args:
    specs: iterable of specs, each a file, a folder (every UTF-8 text file below it,
      hidden entries skipped), a glob pattern, or 'stdlib' (the running Python's standard
      library `.py` files, without site-packages/dist-packages).

  Returns:
    Sorted list of unique file paths.
  """
  if isinstance(specs, str):
    specs = [specs]
  paths = set()
  for spec in specs:
    matched = _resolve_spec(str(spec))
    if not matched:
      raise UserError(f"input '{spec}' matched no files; pass an existing file, folder, "
                      f"glob or '{STDLIB_SPEC}'")
    paths.update(matched)
  if not paths:
    raise UserError("no inputs given; pass an existing file, folder, glob "
                    f"or '{STDLIB_SPEC}'")
  return sorted(paths)


def _resolve_spec(spec):
  """Returns the text files one spec names, raising if a named file is not text."""
  if spec == STDLIB_SPEC:
    return _stdlib_files()
  if os.path.isfile(spec):
    if not _is_utf8_text(spec):
      raise UserError(f"input '{spec}' is not UTF-8 text; pass text files only")
    return [os.path.normpath(spec)]
  if os.path.isdir(spec):
    return _text_files_under(spec)
  matched = []
  for path in glob.glob(spec, recursive=True):
    if os.path.isdir(path):
      matched.extend(_text_files_under(path))
    elif os.path.isfile(path) and _is_utf8_text(path):
      matched.append(os.path.normpath(path))
  return matched


def _stdlib_files():
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for directory, subdirs, names in os.walk(root):
    subdirs[:] = [d for d in subdirs if d not in _SKIPPED_STDLIB_DIRS]
    files.extend(os.path.join(directory, name) for name in names if name.endswith(".py"))
  # A few test modules are deliberately Latin-1 or broken; they are not usable text.
  return [path for path in files if _is_utf8_text(path)]


def _text_files_under(folder):
  files = []
  for directory, subdirs, names in os.walk(folder):
    # Hidden folders (.git, .venv, ...) hold tool state, not corpus text.
    subdirs[:] = [d for d in subdirs if not d.startswith(".")]
    files.extend(os.path.join(directory, name) for name in names if not name.startswith("."))
  return [os.path.normpath(path) for path in files
          if os.path.isfile(path) and _is_utf8_text(path)]


def _is_utf8_text(path):
  with open(path, "rb") as f:
    data = f.read()
  if b"\0" in data:  # Valid UTF-8, but a NUL byte means a binary format.
    return False
  try:
    data.decode("utf-8")
  except UnicodeDecodeError:
    return False
  return True


# --------------------------------------------------------------------------- splitting


def split_documents(paths, validation_fraction, seed):
  """Assigns whole documents to train/validation, deterministically for a seed.

  Args:
    paths: document paths.
    validation_fraction: share of documents for validation, in [0, 1). Any positive value
      yields at least one validation document when there are two or more documents.
    seed: seeds both the assignment and the (shuffled) order of documents in each split.

  Returns:
    Dict split name -> list of paths in stream order; 'validation' only when non-empty.
  """
  if not 0 <= validation_fraction < 1:
    raise UserError(f"validation_fraction={validation_fraction} is outside [0, 1); "
                     "pass e.g. --validation_fraction=0.05, or 0 for no validation split")
  order = list(paths)
  # Shuffled stream order keeps neighbouring windows from being the same package.
  random.Random(seed).shuffle(order)
  num_validation = 0
  if validation_fraction > 0 and len(order) >= 2:
    num_validation = min(len(order) - 1, max(1, round(validation_fraction * len(order))))
  splits = {"train": order[num_validation:]}
  if num_validation:
    splits["validation"] = order[:num_validation]
  return splits


# --------------------------------------------------------------------------- encoding


def encode_documents(tokenizer, paths, description):
  """Encodes documents into one token stream, each document followed by EOS.

  Args:
    tokenizer: a `tokenizers.Tokenizer` with EOS_TOKEN.
    paths: UTF-8 text files, in stream order.
    description: label of the progress bar.

  Returns:
    (int32 numpy array of token ids, number of UTF-8 bytes of source text).
  """
  eos = tokenizer_lib.eos_id(tokenizer)
  pieces = []
  num_bytes = 0
  with tqdm.tqdm(total=len(paths), desc=description, unit="doc") as progress:
    for start in range(0, len(paths), _ENCODE_BATCH_DOCUMENTS):
      texts = [_read_text(path) for path in paths[start:start + _ENCODE_BATCH_DOCUMENTS]]
      texts = [text for text in texts if text]  # An empty file would only add a stray EOS.
      num_bytes += sum(len(text.encode("utf-8")) for text in texts)
      for encoding in _encode_literally(tokenizer, texts):
        pieces.append(np.asarray(encoding.ids, dtype=np.int32))
        pieces.append(np.asarray([eos], dtype=np.int32))
      progress.update(min(_ENCODE_BATCH_DOCUMENTS, len(paths) - start))
  if not pieces:
    return np.zeros([0], dtype=np.int32), num_bytes
  return np.concatenate(pieces), num_bytes


def _read_text(path):
  with open(path, "rb") as f:
    return f.read().decode("utf-8")


def _encode_literally(tokenizer, texts):
  """encode_batch, but a literal '<|endoftext|>' in a source stays text, not EOS."""
  # Otherwise a file that merely mentions the token would forge a document boundary.
  saved = tokenizer.encode_special_tokens
  tokenizer.encode_special_tokens = True
  try:
    return tokenizer.encode_batch(texts, add_special_tokens=False)
  finally:
    tokenizer.encode_special_tokens = saved


# --------------------------------------------------------------------------- writing


def write_windows(tokens, window_length, tokens_per_shard, folder, split):
  """Cuts a token stream into windows and writes them as sharded TFRecords.

  Args:
    tokens: 1-D int array; the tail shorter than a window is dropped.
    window_length: tokens per window (n_ctx + 1).
    tokens_per_shard: approximate tokens per TFRecord file (at least one window each).
    folder: where to write `{split}-NNNNN.tfrecord`.
    split: split name, the file name prefix.

  Returns:
    (list of shard basenames, number of windows).
  """
  num_windows = len(tokens) // window_length
  windows = tokens[:num_windows * window_length].reshape(num_windows, window_length)
  windows_per_shard = max(1, tokens_per_shard // window_length)
  files = []
  with tqdm.tqdm(total=num_windows, desc=f"writing {split}", unit="window") as progress:
    for start in range(0, num_windows, windows_per_shard):
      files.append(f"{split}-{len(files):05d}.tfrecord")
      with tf.io.TFRecordWriter(os.path.join(folder, files[-1])) as writer:
        for window in windows[start:start + windows_per_shard]:
          writer.write(_window_example(window))
      progress.update(min(windows_per_shard, num_windows - start))
  return files, num_windows


def _window_example(window):
  feature = tf.train.Feature(int64_list=tf.train.Int64List(value=window.tolist()))
  example = tf.train.Example(features=tf.train.Features(feature={TOKEN_FEATURE: feature}))
  return example.SerializeToString()


def _write_text(path, text):
  with tf.io.gfile.GFile(path, "w") as f:
    f.write(text)


# --------------------------------------------------------------------------- atomic output


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
  if not tf.io.gfile.exists(output_dir):
    tf.io.gfile.rename(staging_dir, output_dir)
    return
  retired_dir = f"{output_dir}.old-{uuid.uuid4().hex[:8]}"
  tf.io.gfile.rename(output_dir, retired_dir)
  tf.io.gfile.rename(staging_dir, output_dir)
  tf.io.gfile.rmtree(retired_dir)


# --------------------------------------------------------------------------- entry point


def prepare_dataset(inputs, output_dir, n_ctx, vocab_size=None, tokenizer_path=None,
                    validation_fraction=0.05, tokens_per_shard=1_000_000, seed=1234,
                    overwrite=False):
  """Tokenizes text files into a windowed TFRecord dataset in output_dir, atomically.

  dataset.json holds: format (1), n_ctx, n_vocab, eos_id, tokenizer ("tokenizer.json"),
  sources (number of documents), tokens_per_shard, seed, seconds, and splits: for 'train'
  and, when non-empty, 'validation': files (shard basenames), windows, tokens (in the
  stream, incl. the dropped tail), bytes (UTF-8 bytes of source text, for bits-per-byte)
  and documents (source paths in stream order).

  Args:
    inputs: input specs, see `resolve_inputs`.
    output_dir: folder to create, or a gs://bucket/prefix to upload to (prepared in a
      temporary folder first); must be absent or empty unless overwrite is True.
    n_ctx: context length; windows hold n_ctx + 1 tokens.
    vocab_size: train a byte-level BPE of this size on the train documents (exclusive
      with tokenizer_path).
    tokenizer_path: load this tokenizer instead, see `tokenizer.load_tokenizer`.
    validation_fraction: share of documents held out for validation, in [0, 1).
    tokens_per_shard: approximate tokens per TFRecord file.
    seed: seeds the train/validation assignment and document order.
    overwrite: replace a non-empty output_dir, once the new dataset is complete.

  Returns:
    The dataset.json contents as a dict.
  """
  started = time.time()
  _check_arguments(n_ctx, vocab_size, tokenizer_path, tokens_per_shard)
  if storage.is_remote(output_dir):  # Before stripping: 'gs://' must not become 'gs:'.
    return _prepare_and_upload(str(output_dir), overwrite, functools.partial(
        prepare_dataset, inputs, n_ctx=n_ctx, vocab_size=vocab_size,
        tokenizer_path=tokenizer_path, validation_fraction=validation_fraction,
        tokens_per_shard=tokens_per_shard, seed=seed))
  output_dir = str(output_dir).rstrip("/")
  paths = resolve_inputs(inputs)
  splits = split_documents(paths, validation_fraction, seed)
  _check_output_dir(output_dir, overwrite)
  if tokenizer_path is not None:
    tokenizer = tokenizer_lib.load_tokenizer(tokenizer_path)
  else:
    # Held-out documents stay unseen by every learned part, the merges included.
    tokenizer = tokenizer_lib.train_bpe(splits["train"], vocab_size)
  staging_dir = f"{output_dir}.tmp-{uuid.uuid4().hex[:8]}"
  tf.io.gfile.makedirs(staging_dir)
  try:
    info = _write_dataset(tokenizer, splits, staging_dir, n_ctx, tokens_per_shard)
    info.update(sources=len(paths), tokens_per_shard=tokens_per_shard, seed=seed,
                seconds=round(time.time() - started, 1))
    _write_text(os.path.join(staging_dir, "dataset.json"), json.dumps(info, indent=2) + "\n")
    _publish(staging_dir, output_dir, overwrite)
  finally:
    if tf.io.gfile.exists(staging_dir):
      tf.io.gfile.rmtree(staging_dir)
  return info


def _prepare_and_upload(uri, overwrite, prepare_into):
  """Prepares a dataset with prepare_into(output_dir=...) in a temporary folder, uploads it."""
  # An occupied prefix is refused now, not after the (possibly long) tokenization.
  storage.check_upload_target(uri, overwrite)
  with tempfile.TemporaryDirectory(prefix="gptneo-prepare-") as local_root:
    local_dir = os.path.join(local_root, "dataset")
    info = prepare_into(output_dir=local_dir)
    storage.upload_folder(local_dir, uri, overwrite=overwrite)
  return info


def _check_arguments(n_ctx, vocab_size, tokenizer_path, tokens_per_shard):
  if (vocab_size is None) == (tokenizer_path is None):
    raise UserError("give exactly one of vocab_size (train a tokenizer) and tokenizer_path "
                    "(load one); pass --vocab_size or --tokenizer")
  if n_ctx < 1:
    raise UserError(f"n_ctx={n_ctx} must be positive; pass e.g. --n_ctx=256")
  if tokens_per_shard < 1:
    raise UserError(f"tokens_per_shard={tokens_per_shard} must be positive; "
                    "pass e.g. --tokens_per_shard=1000000")


def _write_dataset(tokenizer, splits, folder, n_ctx, tokens_per_shard):
  """Writes every split's shards and tokenizer.json; returns the dataset.json fields."""
  window_length = n_ctx + 1
  split_infos = {}
  for split, paths in splits.items():
    tokens, num_bytes = encode_documents(tokenizer, paths, f"tokenizing {split}")
    if len(tokens) < window_length:
      raise UserError(_too_few_tokens_message(split, len(tokens), n_ctx))
    files, num_windows = write_windows(tokens, window_length, tokens_per_shard, folder, split)
    split_infos[split] = {"files": files, "windows": num_windows, "tokens": int(len(tokens)),
                          "bytes": num_bytes, "documents": paths}
  _write_text(os.path.join(folder, "tokenizer.json"), tokenizer.to_str())
  return {"format": FORMAT_VERSION, "n_ctx": n_ctx, "n_vocab": tokenizer.get_vocab_size(),
          "eos_id": tokenizer_lib.eos_id(tokenizer), "tokenizer": "tokenizer.json",
          "splits": split_infos}


def _too_few_tokens_message(split, num_tokens, n_ctx):
  if split == "train":
    return (f"corpus has {num_tokens} tokens, fewer than n_ctx+1={n_ctx + 1}; "
            "add more input or lower --n_ctx")
  return (f"validation split has {num_tokens} tokens, fewer than n_ctx+1={n_ctx + 1}; "
          "raise --validation_fraction, add more input, lower --n_ctx "
          "or pass --validation_fraction=0")
