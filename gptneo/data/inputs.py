"""tf.data pipelines over datasets written by `gptneo.data.prepare`.

A dataset spec (`train.dataset_dir`, `evaluate.dataset_dir`) is a prepared folder, a gs://
URI of one (its shards read through the bounded local cache of `gptneo.data.shard_cache`),
or a dict {folder or URI: weight} mixing several prepared with the same tokenizer and n_ctx.
A dataset is someone else's data: the files its dataset.json names must be files of its own
folder (no path, no link out), and its tokenizer.json must parse as a tokenizer, before
anything reads or copies them.

Every op used here has saveable iterator state, so the trainer can store the iterator in
its checkpoint (`tf.data.experimental.make_saveable_from_iterator`) and a resumed run sees
exactly the batches an uninterrupted run would have seen.
"""
import functools
import json
import os

import tensorflow.compat.v1 as tf

from gptneo import storage
from gptneo.data import prepare
from gptneo.data import shard_cache
from gptneo.data import tokenizer as tokenizer_lib
from gptneo.errors import UserError

_REQUIRED_FIELDS = ("format", "n_ctx", "n_vocab", "eos_id", "tokenizer", "splits")
# fixed: the stored windows of the packed token stream, as written.
# random_chunk: a window of the same length at a random offset into a window and its successor.
# document: starts right after the first end of document in a window (when it has one).
SAMPLINGS = ("fixed", "random_chunk", "document")


def components(dataset_dir):
  """The parts of a dataset spec, each with its local folder, weight and dataset.json.

  Args:
    dataset_dir: a folder written by bin/prepare_data, a gs:// URI of one, or a dict
      {folder or URI: weight} of several.

  Returns:
    list of (spec as given, local folder, weight, info); the weights sum to 1.
  """
  specs = dataset_dir if isinstance(dataset_dir, dict) else {dataset_dir: 1.0}
  if not specs or any(isinstance(w, bool) or not isinstance(w, (int, float)) or w <= 0
                      for w in specs.values()):
    raise UserError(f"dataset mixture {dataset_dir!r} needs positive weights, e.g. "
                    "{'data/a': 3, 'data/b': 1}")
  total = float(sum(specs.values()))
  parts = [(str(spec), _local_folder(str(spec)), weight / total)
           for spec, weight in specs.items()]
  parts = [(spec, folder, weight, _read_one(spec, folder)) for spec, folder, weight in parts]
  for spec, folder, _, info in parts:
    info["tokenizer_sha256"] = _checked_tokenizer_identity(spec, folder, info)
  _check_compatible(parts)
  return parts


@functools.lru_cache(maxsize=None)
def _local_folder(spec):
  # Once per process: a training run reads the dataset's info several times.
  return shard_cache.local_folder(spec) if storage.is_remote(spec) else spec


def read_dataset_info(dataset_dir):
  """Loads and validates a dataset spec's dataset.json (of every part of a mixture).

  Args:
    dataset_dir: a dataset spec (see `components`).

  Returns:
    The dataset.json contents as a dict, with tokenizer_sha256 (`tokenizer.identity`, of
    its tokenizer file if dataset.json predates it). For a mixture: the shared n_ctx,
    n_vocab, eos_id and tokenizer, and the splits all parts have, with their windows summed.
  """
  return _merged_info(components(dataset_dir))


def _merged_info(parts):
  if len(parts) == 1:
    return parts[0][3]
  infos = [info for *_, info in parts]
  shared = set.intersection(*(set(info["splits"]) for info in infos))
  splits = {split: {"windows": sum(info["splits"][split]["windows"] for info in infos)}
            for split in sorted(shared)}
  fields = (*_REQUIRED_FIELDS, "tokenizer_sha256")
  return {**{field: infos[0][field] for field in fields}, "splits": splits}


def tokenizer_path(dataset_dir):
  """The local tokenizer.json of a dataset spec (a mixture's parts share one), checked: a
  file of the dataset's folder that parses as a tokenizer."""
  _, folder, _, info = components(dataset_dir)[0]
  return os.path.join(folder, info["tokenizer"])


def check_model_tokenizer(dataset_dir: str | dict, model_dir: str | None) -> None:
  """Refuses a dataset tokenized otherwise than a model dir's weights were trained: its ids
  would mean other text to the model, and its loss nothing.

  Args:
    dataset_dir: a dataset spec (see `components`).
    model_dir: a model dir; its tokenizer.json, if it has one, must be the dataset's
      (`tokenizer.identity`). None: nothing to compare.
  """
  model_tokenizer = model_dir and os.path.join(model_dir, "tokenizer.json")
  if not model_tokenizer or not tf.io.gfile.exists(model_tokenizer):
    return
  model_identity = tokenizer_lib.file_identity(
      model_tokenizer, f"restore model dir {model_dir!r}'s tokenizer.json from its source")
  dataset_identity = read_dataset_info(dataset_dir)["tokenizer_sha256"]
  if model_identity != dataset_identity:
    raise UserError(
        f"dataset {dataset_dir!r} was tokenized with another tokenizer (sha256 "
        f"{dataset_identity[:12]}) than model dir {model_dir!r} (tokenizer.json sha256 "
        f"{model_identity[:12]}): its loss would mean nothing; use the dataset the model was "
        f"trained on, or prepare one with --tokenizer={model_tokenizer}")


def _read_one(spec, folder):
  path = os.path.join(folder, "dataset.json")
  if not tf.io.gfile.exists(path):
    raise UserError(f"dataset '{spec}' has no dataset.json; "
                    f"run gptneo-prepare-data --output_dir={spec} first")
  with tf.io.gfile.GFile(path, "r") as f:
    try:
      info = json.load(f)
    except json.JSONDecodeError as e:
      raise UserError(f"dataset '{spec}' has a corrupt dataset.json ({e}); "
                      f"rerun gptneo-prepare-data --output_dir={spec} --overwrite") from e
  _validate_info(info, spec)
  return info


def _validate_info(info, dataset_dir):
  rerun = f"rerun gptneo-prepare-data --output_dir={dataset_dir} --overwrite"
  missing = [field for field in _REQUIRED_FIELDS if field not in info]
  if missing:
    raise UserError(f"dataset '{dataset_dir}' dataset.json lacks {missing}; {rerun}")
  if info["format"] not in prepare.READABLE_FORMATS:
    raise UserError(f"dataset '{dataset_dir}' has format {info['format']}, this code reads "
                    f"formats {list(prepare.READABLE_FORMATS)}; {rerun}")
  for split, split_info in info["splits"].items():
    if not split_info.get("files") or "windows" not in split_info:
      raise UserError(f"dataset '{dataset_dir}' split '{split}' lists no files or windows; "
                      f"{rerun}")


def _check_own_file(spec, folder, name, what):
  """Refuses a name in dataset.json that is not a file of the dataset's own folder: a path,
  '..', or a link out of it (a dataset must not make us read or copy other files)."""
  inside = (isinstance(name, str) and name not in ("", ".", "..")
            and name == os.path.basename(name) and "\\" not in name)
  if inside:  # folder is local: a gs:// dataset's is its mirror
    real = os.path.realpath(os.path.join(folder, name))
    inside = os.path.dirname(real) == os.path.realpath(folder)
  if not inside:
    raise UserError(f"dataset '{spec}' dataset.json names {name!r} as {what}, not a file of "
                    f"the dataset's own folder; a dataset reads only its own files: prepare "
                    f"it again (gptneo-prepare-data --output_dir={spec} --overwrite)")


def _checked_tokenizer_identity(spec, folder, info):
  """The identity of a dataset's tokenizer file: one of its own files, a tokenizer, the one
  dataset.json records (datasets prepared before they recorded it: the file's)."""
  for split, split_info in info["splits"].items():
    for name in split_info["files"]:
      _check_own_file(spec, folder, name, f"a {split} file")
  _check_own_file(spec, folder, info["tokenizer"], "its tokenizer")
  path = os.path.join(folder, info["tokenizer"])
  again = f"prepare the dataset again (gptneo-prepare-data --output_dir={spec} --overwrite)"
  if not tf.io.gfile.exists(path) or tf.io.gfile.isdir(path):
    raise UserError(f"dataset '{spec}' has no file {info['tokenizer']}; copy the dataset "
                    f"whole or {again}")
  identity = tokenizer_lib.file_identity(path, again)
  recorded = info.get("tokenizer_sha256", identity)
  if recorded != identity:
    raise UserError(f"dataset '{spec}' {info['tokenizer']} (sha256 {identity[:12]}) is not "
                    f"the tokenizer its ids were made with (sha256 {recorded[:12]}); restore "
                    f"it, or {again}")
  return identity


def _check_compatible(parts):
  """A mixture's parts must share n_ctx, ids and tokenizer: one model reads them all."""
  first_spec, first_folder, _, first = parts[0]
  for spec, _, _, info in parts[1:]:
    for field in ("n_ctx", "n_vocab", "eos_id"):
      if info[field] != first[field]:
        raise UserError(f"mixture parts '{first_spec}' and '{spec}' differ in {field} "
                        f"({first[field]} vs {info[field]}); prepare them alike")
    if info["tokenizer_sha256"] != first["tokenizer_sha256"]:
      raise UserError(f"mixture parts '{first_spec}' and '{spec}' have different tokenizers; "
                      f"prepare '{spec}' with --tokenizer={first_folder}")


def make_dataset(dataset_dir, split, batch_size, seed=0, shuffle=True, repeat=True,
                 shuffle_buffer=10000, sampling="fixed"):
  """Builds the token-window pipeline of one split.

  Args:
    dataset_dir: a dataset spec (see `components`); a mixture's parts are drawn at random
      by weight when repeating, read one after the other otherwise.
    split: 'train' or 'validation' (whatever dataset.json lists).
    batch_size: windows per batch; the last partial batch is dropped.
    seed: fixes the file order, window shuffle, mixture draws and chunk offsets.
    shuffle: shuffle files and windows (training) or read in stored order (evaluation).
    repeat: cycle forever (training) or stop after one pass (evaluation).
    shuffle_buffer: windows held in the shuffle buffer (per mixture part).
    sampling: one of SAMPLINGS; other than "fixed", each file's last window only serves as
      its predecessor's successor.

  Returns:
    A `tf.data.Dataset` of int32 tensors of static shape [batch_size, n_ctx + 1].
  """
  if sampling not in SAMPLINGS:
    raise UserError(f"train.sampling = {sampling!r} is unknown; use one of {list(SAMPLINGS)}")
  parts = components(dataset_dir)
  info = _merged_info(parts)
  windows = _split_info(info, split, dataset_dir)["windows"]
  if not repeat and windows < batch_size:
    raise UserError(f"split '{split}' of dataset '{dataset_dir}' has {windows} windows, "
                    f"fewer than batch_size={batch_size}; lower the batch size or prepare "
                    "more data")
  pairs = sampling != "fixed"
  streams, weights = [], []
  for index, (_, folder, weight, part) in enumerate(parts):
    files = part["splits"][split]["files"]
    streams.append(_records([os.path.join(folder, name) for name in files], seed + index,
                            shuffle, repeat, shuffle_buffer, pairs))
    weights.append(weight)
  records = _mix(streams, weights, seed, repeat)
  batches = records.batch(batch_size, drop_remainder=True)
  window_length = info["n_ctx"] + 1
  if not pairs:
    return batches.map(_window_parser(window_length, batch_size)).prefetch(2)
  draws = tf.data.Dataset.random(seed=seed).batch(batch_size)
  chunk = _chunk_parser(window_length, batch_size, sampling, info["eos_id"])
  return tf.data.Dataset.zip((batches, draws)).map(chunk).prefetch(2)


def evaluation_batches(dataset_dir, split, batch_size, max_batches=0):
  """Validation as bin/eval and training's evaluations both read it: one pass over the split
  in stored order (a mixture's parts one after another), every window once.

  Args:
    dataset_dir: a dataset spec (see `components`).
    split: the split to read, e.g. 'validation'.
    batch_size: rows per batch; the last batch is padded with rows of zeros.
    max_batches: only the first max_batches * batch_size windows (0: the whole split); an
      int, or an int tensor (e.g. a placeholder fed to the iterator's initializer).

  Returns:
    A `tf.data.Dataset` of (windows int32 [batch_size, n_ctx + 1], weights float32
    [batch_size, n_ctx]): weight 1 for a target (window[1:]) of the split, 0 for padding:
    a padding row's, and those past a partial window's real tokens (a split's last).
  """
  parts = components(dataset_dir)
  info = _merged_info(parts)
  _split_info(info, split, dataset_dir)
  streams = [_records([os.path.join(folder, name) for name in part["splits"][split]["files"]],
                      0, False, False, 0, False) for _, folder, _, part in parts]
  records = _mix(streams, [weight for _, _, weight, _ in parts], 0, repeat=False)
  limit = tf.cast(max_batches, tf.int64)  # may be a tensor: fed when an iterator starts
  records = records.take(tf.where(limit > 0, limit * batch_size, -1))
  parse = _window_parser(info["n_ctx"] + 1, None, with_lengths=True)

  def padded(serialized):
    windows, lengths = parse(serialized)
    real = tf.shape(windows)[0]
    # Target j is window[j + 1]: real while j + 1 < the window's length.
    weights = tf.cast(tf.range(info["n_ctx"])[None, :] + 1 < lengths[:, None], tf.float32)
    weights = tf.pad(weights, [[0, batch_size - real], [0, 0]])
    windows = tf.pad(windows, [[0, batch_size - real], [0, 0]])
    windows.set_shape([batch_size, info["n_ctx"] + 1])
    weights.set_shape([batch_size, info["n_ctx"]])
    return windows, weights

  return records.batch(batch_size).map(padded).prefetch(2)


def _records(files, seed, shuffle, repeat, shuffle_buffer, pairs):
  """Serialized windows of one dataset's files (with pairs: each with its successor)."""
  files = shard_cache.names(files)  # a gs:// dataset's shards by URI
  dataset = tf.data.Dataset.from_tensor_slices(files)
  if shuffle:
    dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
  # flat_map reads one file after the other: a fixed record order, unlike parallel reads.
  dataset = shard_cache.flat_map(dataset, files, _successive if pairs else tf.data.TFRecordDataset)
  if shuffle:
    dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  return dataset.repeat() if repeat else dataset


def _successive(path):
  records = tf.data.TFRecordDataset(path)
  return tf.data.Dataset.zip((records, records.skip(1)))


def _mix(streams, weights, seed, repeat):
  if len(streams) == 1:
    return streams[0]
  if repeat:
    return tf.data.Dataset.sample_from_datasets(streams, weights, seed=seed)
  mixed = streams[0]
  for stream in streams[1:]:
    mixed = mixed.concatenate(stream)
  return mixed


def _split_info(info, split, dataset_dir):
  if split not in info["splits"]:
    available = ", ".join(sorted(info["splits"]))
    raise UserError(f"dataset '{dataset_dir}' has no split '{split}'; "
                    f"available splits: {available}")
  return info["splits"][split]


def _window_parser(window_length, batch_size, with_lengths=False):
  """Returns a function parsing a batch of serialized windows into int32 ids; with_lengths,
  into (ids, int32 [batch] real tokens per window: window_length but for a partial one)."""
  features = {prepare.TOKEN_FEATURE: tf.io.FixedLenFeature([window_length], tf.int64)}
  if with_lengths:
    features[prepare.LENGTH_FEATURE] = tf.io.FixedLenFeature([], tf.int64, window_length)

  def parse(serialized):
    # Parsing whole batches is one op per batch instead of one per window.
    parsed = tf.io.parse_example(serialized, features)
    tokens = tf.cast(parsed[prepare.TOKEN_FEATURE], tf.int32)
    tokens.set_shape([batch_size, window_length])
    if with_lengths:
      return tokens, tf.cast(parsed[prepare.LENGTH_FEATURE], tf.int32)
    return tokens

  return parse


def _chunk_parser(window_length, batch_size, sampling, eos_id):
  """Returns a function cutting one window out of each (window, successor) pair."""
  parse = _window_parser(window_length, batch_size)

  def chunk(pair, draws):
    first = parse(pair[0])
    joined = tf.concat([first, parse(pair[1])], axis=1)
    if sampling == "random_chunk":
      start = tf.cast(tf.math.floormod(draws, window_length + 1), tf.int32)
    else:
      start = _after_first_eos(first, eos_id)
    positions = start[:, None] + tf.range(window_length)[None, :]
    tokens = tf.gather(joined, positions, batch_dims=1)
    tokens.set_shape([batch_size, window_length])
    return tokens

  return chunk


def _after_first_eos(windows, eos_id):
  """Position after each row's first EOS, or 0 if the row has none (mid-document)."""
  is_eos = tf.cast(tf.equal(windows, eos_id), tf.int32)
  first = tf.cast(tf.argmax(is_eos, axis=1), tf.int32)
  return tf.where(tf.reduce_any(is_eos > 0, axis=1), first + 1, tf.zeros_like(first))
