"""tf.data pipelines over a dataset folder written by `gptneo.data.prepare`.

Every op used here has saveable iterator state, so the trainer can store the iterator in
its checkpoint (`tf.data.experimental.make_saveable_from_iterator`) and a resumed run sees
exactly the batches an uninterrupted run would have seen.
"""
import json
import os

import tensorflow.compat.v1 as tf

from gptneo.data import prepare

_REQUIRED_FIELDS = ("format", "n_ctx", "n_vocab", "eos_id", "tokenizer", "splits")


def read_dataset_info(dataset_dir):
  """Loads and validates a prepared dataset's dataset.json.

  Args:
    dataset_dir: folder written by `prepare.prepare_dataset` / bin/prepare_data.

  Returns:
    The dataset.json contents as a dict.
  """
  dataset_dir = str(dataset_dir)
  path = os.path.join(dataset_dir, "dataset.json")
  if not tf.io.gfile.exists(path):
    raise ValueError(f"dataset '{dataset_dir}' has no dataset.json; "
                     f"run bin/prepare_data --output_dir={dataset_dir} first")
  with tf.io.gfile.GFile(path, "r") as f:
    try:
      info = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"dataset '{dataset_dir}' has a corrupt dataset.json ({e}); "
                       f"rerun bin/prepare_data --output_dir={dataset_dir} --overwrite") from e
  _validate_info(info, dataset_dir)
  return info


def _validate_info(info, dataset_dir):
  rerun = f"rerun bin/prepare_data --output_dir={dataset_dir} --overwrite"
  missing = [field for field in _REQUIRED_FIELDS if field not in info]
  if missing:
    raise ValueError(f"dataset '{dataset_dir}' dataset.json lacks {missing}; {rerun}")
  if info["format"] != prepare.FORMAT_VERSION:
    raise ValueError(f"dataset '{dataset_dir}' has format {info['format']}, this code reads "
                     f"format {prepare.FORMAT_VERSION}; {rerun}")
  for split, split_info in info["splits"].items():
    if not split_info.get("files") or "windows" not in split_info:
      raise ValueError(f"dataset '{dataset_dir}' split '{split}' lists no files or windows; "
                       f"{rerun}")


def make_dataset(dataset_dir, split, batch_size, seed=0, shuffle=True, repeat=True,
                 shuffle_buffer=10000):
  """Builds the token-window pipeline of one split.

  Args:
    dataset_dir: folder written by bin/prepare_data.
    split: 'train' or 'validation' (whatever dataset.json lists).
    batch_size: windows per batch; the last partial batch is dropped.
    seed: fixes the file order and window shuffle, so runs are reproducible.
    shuffle: shuffle files and windows (training) or read in stored order (evaluation).
    repeat: cycle forever (training) or stop after one pass (evaluation).
    shuffle_buffer: windows held in the shuffle buffer.

  Returns:
    A `tf.data.Dataset` of int32 tensors of static shape [batch_size, n_ctx + 1].
  """
  info = read_dataset_info(dataset_dir)
  split_info = _split_info(info, split, dataset_dir)
  if not repeat and split_info["windows"] < batch_size:
    raise ValueError(f"split '{split}' of dataset '{dataset_dir}' has "
                     f"{split_info['windows']} windows, fewer than batch_size={batch_size}; "
                     "lower the batch size or prepare more data")
  files = [os.path.join(str(dataset_dir), name) for name in split_info["files"]]
  dataset = tf.data.Dataset.from_tensor_slices(files)
  if shuffle:
    dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
  # flat_map reads one file after the other: a fixed record order, unlike parallel reads.
  dataset = dataset.flat_map(tf.data.TFRecordDataset)
  if shuffle:
    dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  if repeat:
    dataset = dataset.repeat()
  dataset = dataset.batch(batch_size, drop_remainder=True)
  dataset = dataset.map(_window_parser(info["n_ctx"] + 1, batch_size))
  return dataset.prefetch(2)


def _split_info(info, split, dataset_dir):
  if split not in info["splits"]:
    available = ", ".join(sorted(info["splits"]))
    raise ValueError(f"dataset '{dataset_dir}' has no split '{split}'; "
                     f"available splits: {available}")
  return info["splits"][split]


def _window_parser(window_length, batch_size):
  """Returns a function parsing a batch of serialized windows into int32 ids."""
  features = {prepare.TOKEN_FEATURE: tf.io.FixedLenFeature([window_length], tf.int64)}

  def parse(serialized):
    # Parsing whole batches is one op per batch instead of one per window.
    tokens = tf.io.parse_example(serialized, features)[prepare.TOKEN_FEATURE]
    tokens = tf.cast(tokens, tf.int32)
    tokens.set_shape([batch_size, window_length])
    return tokens

  return parse
