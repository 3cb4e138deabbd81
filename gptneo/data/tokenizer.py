"""Byte-level BPE tokenizers with GPT-2's conventions, trained or loaded from disk.

Byte-level means every string can be encoded (the 256 byte symbols are always in the
vocabulary), so decode(encode(text)) == text for any text: no unknown tokens, no
normalisation.
"""
import functools
import hashlib
import json
import os
import sys

import tensorflow.compat.v1 as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from gptneo.errors import UserError

EOS_TOKEN = "<|endoftext|>"
_MIN_VOCAB_SIZE = 256 + 1  # Every byte plus EOS; below this some text is unencodable.


def _byte_level_tokenizer(model):
  """Wraps a BPE model in GPT-2's byte-level pre-tokenizer, decoder and post-processor."""
  tokenizer = Tokenizer(model)
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  # trim_offsets=False keeps offsets pointing at the exact source bytes, as GPT-2 does.
  tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
  return tokenizer


def train_bpe(paths, vocab_size):
  """Trains a byte-level BPE tokenizer over text files, each file one text; see train_bpe_on.

  Args:
    paths: UTF-8 text files to learn the merges from.
    vocab_size: size of the final vocabulary, including the 256 byte symbols and EOS.
  """
  def texts():
    for path in paths:
      with open(path, encoding="utf-8") as f:
        yield f.read()
  return train_bpe_on(texts(), vocab_size)


def train_bpe_on(texts, vocab_size):
  """Trains a byte-level BPE tokenizer on texts, with EOS_TOKEN as its special token.

  Args:
    texts: iterable of documents (streamed: the trainer keeps word counts, not the texts).
    vocab_size: size of the final vocabulary, including the 256 byte symbols and EOS.

  Returns:
    A trained `tokenizers.Tokenizer`.
  """
  if vocab_size < _MIN_VOCAB_SIZE:
    raise UserError(f"vocab_size={vocab_size} is too small for a byte-level BPE; "
                    f"use --vocab_size >= {_MIN_VOCAB_SIZE}")
  tokenizer = _byte_level_tokenizer(models.BPE())
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      # Off a terminal the bars degrade to blank lines on stdout, polluting piped output.
      show_progress=sys.stderr.isatty(),
      special_tokens=[EOS_TOKEN],
      # Seeding all 256 bytes guarantees any later text is encodable, even unseen bytes.
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(texts, trainer)
  return tokenizer


def load_tokenizer(path):
  """Loads a tokenizer saved as tokenizer.json or as GPT-2 style vocab.json + merges.txt.

  Args:
    path: a `tokenizer.json` file, or a folder holding `tokenizer.json`, or a folder
      holding GPT-2 style `vocab.json` and `merges.txt`.

  Returns:
    A `tokenizers.Tokenizer`.
  """
  path = str(path)
  if not tf.io.gfile.isdir(path):
    if not tf.io.gfile.exists(path):
      raise UserError(f"tokenizer '{path}' does not exist; pass a tokenizer.json file "
                      "or a folder with tokenizer.json or vocab.json + merges.txt")
    return _load_tokenizer_json(path)
  if tf.io.gfile.exists(os.path.join(path, "tokenizer.json")):
    return _load_tokenizer_json(os.path.join(path, "tokenizer.json"))
  vocab_path = os.path.join(path, "vocab.json")
  merges_path = os.path.join(path, "merges.txt")
  if tf.io.gfile.exists(vocab_path) and tf.io.gfile.exists(merges_path):
    return _load_vocab_and_merges(vocab_path, merges_path)
  raise UserError(f"tokenizer folder '{path}' has neither tokenizer.json nor "
                  "vocab.json + merges.txt; pass a folder holding one of them")


_SAVE_FIX = "pass a file written by tokenizers' Tokenizer.save"


def _load_tokenizer_json(path):
  with tf.io.gfile.GFile(path, "rb") as f:
    text = f.read()
  try:
    return Tokenizer.from_str(text.decode("utf-8"))
  except Exception as e:  # tokenizers raises a bare Exception on malformed json.
    raise _not_a_tokenizer(path, e, _SAVE_FIX) from e


def _not_a_tokenizer(path, error, fix):
  first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
  return UserError(f"tokenizer '{path}' is not a valid tokenizer.json ({first_line}); {fix}")


def _load_vocab_and_merges(vocab_path, merges_path):
  """Builds a byte-level BPE tokenizer from GPT-2's vocab.json and merges.txt files."""
  with tf.io.gfile.GFile(vocab_path, "r") as f:
    vocab = json.load(f)
  with tf.io.gfile.GFile(merges_path, "r") as f:
    merges = _parse_merges(f.read(), merges_path)
  tokenizer = _byte_level_tokenizer(models.BPE(vocab, merges))
  if EOS_TOKEN in vocab:
    # Marking EOS special keeps the BPE from splitting it into bytes, as GPT-2 expects.
    tokenizer.add_special_tokens([EOS_TOKEN])
  return tokenizer


def _parse_merges(text, merges_path):
  merges = []
  for line_number, line in enumerate(text.splitlines(), start=1):
    if not line or line.startswith("#version"):
      continue
    pair = line.split(" ")
    if len(pair) != 2:
      raise UserError(f"merges file '{merges_path}' line {line_number} is not two "
                      "space-separated tokens; pass a GPT-2 style merges.txt")
    merges.append(tuple(pair))
  return merges


# The parts of a tokenizer.json that decide a text's ids (not truncation, padding, decoder).
_IDENTITY_PARTS = ("normalizer", "pre_tokenizer", "model", "added_tokens", "post_processor")


def file_identity(path: str, fix: str) -> str:
  """`identity` of the tokenizer.json file at path, parsed once per content.

  Args:
    path: a tokenizer.json file (local or gs://).
    fix: what the user should do if it is not one (the UserError's end).
  """
  with tf.io.gfile.GFile(path, "rb") as f:
    text = f.read()
  try:
    return _identity_of_json(text)
  except Exception as e:  # not UTF-8, or tokenizers' bare Exception on malformed json
    raise _not_a_tokenizer(path, e, fix) from e


@functools.lru_cache(maxsize=8)  # a run checks its dataset's and model's tokenizer often
def _identity_of_json(text):
  return identity(Tokenizer.from_str(text.decode("utf-8")))


def identity(tokenizer: Tokenizer) -> str:
  """The sha256 (hex) of what decides a text's ids, in canonical JSON: the same for two
  tokenizers that give every text the same ids, however their files are laid out.

  Args:
    tokenizer: a `tokenizers.Tokenizer`.
  """
  parsed = json.loads(tokenizer.to_str())
  parts = {part: parsed.get(part) for part in _IDENTITY_PARTS}
  canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
  return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def eos_id(tokenizer):
  """Returns the id of EOS_TOKEN, the separator appended after every document.

  Args:
    tokenizer: a `tokenizers.Tokenizer`.
  """
  token_id = tokenizer.token_to_id(EOS_TOKEN)
  if token_id is None:
    raise UserError(f"tokenizer has no '{EOS_TOKEN}' token; use a tokenizer trained "
                    "with it as a special token (e.g. drop --tokenizer to train one)")
  return token_id
