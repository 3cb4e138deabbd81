"""Tests of gptneo.data: tokenizer, dataset preparation, input pipeline and bin/prepare_data.

Pipelines are always run in a fresh tf.Graph with a v1 Session, the way the graph-mode
trainer runs them.
"""
import os
import re
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import tensorflow.compat.v1 as tf
from tokenizers import Tokenizer, models

from gptneo.data import inputs, prepare, workers
from gptneo.data import tokenizer as tokenizer_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = sysconfig.get_paths()["stdlib"]
SMALL_FILES = [os.path.join(STDLIB, name) for name in (
    "bisect.py", "colorsys.py", "copy.py", "glob.py", "fnmatch.py", "stat.py",
    "__future__.py")]
N_CTX = 64
VOCAB_SIZE = 400


@pytest.fixture(scope="module")
def small_tokenizer():
  return tokenizer_lib.train_bpe(SMALL_FILES, VOCAB_SIZE)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
  output_dir = str(tmp_path_factory.mktemp("data") / "small")
  prepare.prepare_dataset(SMALL_FILES, output_dir, N_CTX, vocab_size=VOCAB_SIZE,
                          validation_fraction=0.3, tokens_per_shard=3000, seed=1)
  return output_dir


def run_batches(make_dataset, max_batches=None):
  """Runs a dataset in graph mode; returns up to max_batches batches (all when None)."""
  with tf.Graph().as_default():
    next_batch = tf.data.make_one_shot_iterator(make_dataset()).get_next()
    batches = []
    with tf.Session() as session:
      while max_batches is None or len(batches) < max_batches:
        try:
          batches.append(session.run(next_batch))
        except tf.errors.OutOfRangeError:
          break
  return batches


def read_windows(dataset_dir, split, files=None):
  """Windows of a split (or of some of its files), in stored order, as [windows, n_ctx+1]."""
  info = inputs.read_dataset_info(dataset_dir)
  files = [os.path.join(dataset_dir, name) for name in files or info["splits"][split]["files"]]
  features = {"tokens": tf.io.FixedLenFeature([info["n_ctx"] + 1], tf.int64)}
  def parse(record):
    return tf.io.parse_single_example(record, features)["tokens"]
  records = run_batches(lambda: tf.data.TFRecordDataset(files).map(parse))
  return np.stack(records)


def split_paths(info, split):
  """The paths of a split's documents (one file each), in stream order."""
  paths = []
  for source in info["sources"]:
    with open(source["path"], encoding="utf-8") as f:
      digest = workers.content_hash(f.read())
    if prepare.split_of(digest, info["validation_fraction"], info["seed"]) == split:
      paths.append(source["path"])
  return paths


def encode_stream(tokenizer, paths):
  eos = tokenizer_lib.eos_id(tokenizer)
  stream = []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      stream += tokenizer.encode(f.read()).ids + [eos]
  return np.array(stream)


# --------------------------------------------------------------------------- tokenizer


def test_bpe_round_trips_unseen_and_non_ascii_text(small_tokenizer):
  with open(os.path.join(STDLIB, "textwrap.py"), encoding="utf-8") as f:
    source = f.read()
  for text in (source, "naïve café ✓ 日本語 🐍\r\n\ttabs"):
    assert small_tokenizer.decode(small_tokenizer.encode(text).ids) == text
  assert small_tokenizer.get_vocab_size() == VOCAB_SIZE
  assert small_tokenizer.token_to_id(tokenizer_lib.EOS_TOKEN) == tokenizer_lib.eos_id(
      small_tokenizer)


def test_load_tokenizer_from_json_file_folder_and_gpt2_files(small_tokenizer, tmp_path):
  text = "def f(x):\n    return x + 1  # café\n"
  expected = small_tokenizer.encode(text).ids
  (tmp_path / "json").mkdir()
  (tmp_path / "gpt2").mkdir()
  small_tokenizer.save(str(tmp_path / "json" / "tokenizer.json"))
  small_tokenizer.model.save(str(tmp_path / "gpt2"))
  for path in (tmp_path / "json" / "tokenizer.json", tmp_path / "json", tmp_path / "gpt2"):
    loaded = tokenizer_lib.load_tokenizer(path)
    assert loaded.encode(text).ids == expected
    assert loaded.decode(expected) == text
    assert tokenizer_lib.eos_id(loaded) == tokenizer_lib.eos_id(small_tokenizer)


def test_load_tokenizer_rejects_folder_without_tokenizer_files(tmp_path):
  with pytest.raises(ValueError, match="neither tokenizer.json nor vocab.json"):
    tokenizer_lib.load_tokenizer(tmp_path)
  with pytest.raises(ValueError, match="does not exist"):
    tokenizer_lib.load_tokenizer(tmp_path / "missing.json")


def test_eos_id_requires_eos_token():
  with pytest.raises(ValueError, match="no '<|endoftext|>' token"):
    tokenizer_lib.eos_id(Tokenizer(models.BPE()))


# --------------------------------------------------------------------------- prepare


def test_resolve_inputs_expands_folders_globs_and_skips_binary(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "a.txt").write_text("alpha")
  (tmp_path / "b.md").write_text("beta")
  (tmp_path / "blob.bin").write_bytes(b"\x00\x01\xff")
  (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  expected = sorted([str(tmp_path / "sub" / "a.txt"), str(tmp_path / "b.md")])
  assert prepare.resolve_inputs([str(tmp_path)]) == expected
  assert prepare.resolve_inputs([str(tmp_path / "**" / "*.txt"), str(tmp_path / "b.md")]) == [
      str(tmp_path / "b.md"), str(tmp_path / "sub" / "a.txt")]
  with pytest.raises(ValueError, match="not UTF-8 text"):
    prepare.resolve_inputs([str(tmp_path / "blob.bin")])


def test_resolve_inputs_stdlib_is_python_sources_without_site_packages():
  paths = prepare.resolve_inputs(["stdlib"])
  assert len(paths) > 500
  assert all(path.endswith(".py") and "site-packages" not in path for path in paths)
  assert os.path.join(STDLIB, "bisect.py") in paths


def test_dataset_json_describes_the_dataset(small_dataset, small_tokenizer):
  info = inputs.read_dataset_info(small_dataset)
  assert info["format"] == 2 and info["n_ctx"] == N_CTX and info["n_vocab"] == VOCAB_SIZE
  assert info["eos_id"] == tokenizer_lib.eos_id(small_tokenizer)
  assert info["tokenizer"] == "tokenizer.json" and info["documents"] == len(SMALL_FILES)
  assert info["tokens_per_shard"] == 3000 and info["seed"] == 1
  assert sorted(source["path"] for source in info["sources"]) == sorted(SMALL_FILES)
  train, validation = info["splits"]["train"], info["splits"]["validation"]
  assert train["documents"] == len(split_paths(info, "train")) > 0
  assert validation["documents"] == len(split_paths(info, "validation")) > 0
  assert train["documents"] + validation["documents"] == len(SMALL_FILES)
  assert len(train["files"]) > 1 and train["files"][0] == "train-00000.tfrecord"
  assert sum(os.path.getsize(path) for path in split_paths(info, "train")) == train["bytes"]
  assert train["windows"] == train["tokens"] / (N_CTX + 1)  # its tail is not stored
  assert validation["windows"] == -(-validation["tokens"] // (N_CTX + 1))  # its tail is
  for split in (train, validation):
    assert all(os.path.exists(os.path.join(small_dataset, name)) for name in split["files"])
  assert os.path.exists(os.path.join(small_dataset, "tokenizer.json"))


def test_record_count_equals_windows(small_dataset):
  info = inputs.read_dataset_info(small_dataset)
  for split in ("train", "validation"):
    windows = read_windows(small_dataset, split)
    assert windows.shape == (info["splits"][split]["windows"], N_CTX + 1)


def test_train_windows_are_the_token_stream_with_eos_between_documents(small_dataset):
  info = inputs.read_dataset_info(small_dataset)
  tokenizer = tokenizer_lib.load_tokenizer(small_dataset)
  documents = split_paths(info, "train")
  stream = encode_stream(tokenizer, documents)
  windows = read_windows(small_dataset, "train").reshape(-1)
  np.testing.assert_array_equal(windows, stream[:len(windows)])
  first_document_length = len(tokenizer.encode(open(documents[0]).read()).ids)
  assert windows[first_document_length] == info["eos_id"]
  assert np.count_nonzero(stream == info["eos_id"]) == len(documents)
  decoded = tokenizer.decode(windows[:first_document_length + 50].tolist(),
                             skip_special_tokens=False)
  assert decoded.startswith(open(documents[0]).read() + tokenizer_lib.EOS_TOKEN)


def test_literal_eos_text_in_a_document_is_not_a_document_boundary(tmp_path):
  (tmp_path / "doc.txt").write_text("we split on <|endoftext|> here. " * 40)
  info = prepare.prepare_dataset([str(tmp_path / "doc.txt")], str(tmp_path / "out"), 16,
                                 vocab_size=300, validation_fraction=0)
  windows = read_windows(str(tmp_path / "out"), "train").reshape(-1)
  assert list(info["splits"]) == ["train"]  # validation_fraction=0 -> no validation split.
  # The document's own EOS ends the stream, so it can only be the very last token.
  assert np.count_nonzero(windows[:-1] == info["eos_id"]) == 0


def test_overwrite_is_refused_and_leaves_existing_content_untouched(small_dataset, tmp_path):
  output_dir = tmp_path / "existing"
  output_dir.mkdir()
  (output_dir / "keep.txt").write_text("precious")
  with pytest.raises(ValueError, match="not empty; pass --overwrite"):
    prepare.prepare_dataset(SMALL_FILES[:2], str(output_dir), 16, vocab_size=300)
  assert os.listdir(output_dir) == ["keep.txt"]
  assert (output_dir / "keep.txt").read_text() == "precious"
  prepare.prepare_dataset(SMALL_FILES[:2], str(output_dir), 16, vocab_size=300,
                          validation_fraction=0, overwrite=True)
  assert "keep.txt" not in os.listdir(output_dir)
  assert os.listdir(tmp_path) == ["existing"]  # No staging or retired folders left.


def test_failure_midway_leaves_no_output(tmp_path):
  (tmp_path / "big.txt").write_text("some words to tokenize. " * 200)
  (tmp_path / "tiny.txt").write_text("x")
  def split(text, seed):
    return prepare.split_of(workers.content_hash(text), 0.5, seed)
  seed = next(s for s in range(100)
              if split("x", s) == "validation" and split((tmp_path / "big.txt").read_text(),
                                                         s) == "train")
  paths = prepare.resolve_inputs([str(tmp_path)])
  with pytest.raises(ValueError, match="validation split has 2 tokens"):
    prepare.prepare_dataset(paths, str(tmp_path / "out"), 32, vocab_size=300,
                            validation_fraction=0.5, seed=seed)
  assert sorted(os.listdir(tmp_path)) == ["big.txt", "tiny.txt"]


@pytest.mark.parametrize("spec", ["no/such/file.txt", "no/such/*.txt"])
def test_missing_input_names_the_spec(spec, tmp_path):
  with pytest.raises(ValueError, match=re.escape(f"input '{spec}' matched no files")):
    prepare.prepare_dataset([spec], str(tmp_path / "out"), 16, vocab_size=300)


def test_empty_corpus_is_refused(tmp_path):
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ValueError, match=r"corpus has 0 tokens, fewer than n_ctx\+1=17"):
    prepare.prepare_dataset([str(tmp_path / "empty.txt")], str(tmp_path / "out"), 16,
                            vocab_size=300)
  assert not os.path.exists(tmp_path / "out")


def test_exactly_one_of_vocab_size_and_tokenizer(tmp_path):
  with pytest.raises(ValueError, match="exactly one of vocab_size"):
    prepare.prepare_dataset(SMALL_FILES, str(tmp_path / "out"), 16)


# --------------------------------------------------------------------------- inputs


def test_make_dataset_yields_static_int32_batches(small_dataset):
  with tf.Graph().as_default():
    dataset = inputs.make_dataset(small_dataset, "train", batch_size=4)
    assert tf.data.get_output_types(dataset) == tf.int32
    assert tf.data.get_output_shapes(dataset).as_list() == [4, N_CTX + 1]
  batches = run_batches(lambda: inputs.make_dataset(small_dataset, "train", 4), 3)
  assert all(batch.shape == (4, N_CTX + 1) and batch.dtype == np.int32 for batch in batches)


def test_eval_pipeline_reads_each_window_once_in_stored_order(small_dataset):
  windows = read_windows(small_dataset, "validation")
  batches = run_batches(lambda: inputs.make_dataset(
      small_dataset, "validation", batch_size=5, shuffle=False, repeat=False))
  assert len(batches) == len(windows) // 5
  np.testing.assert_array_equal(np.concatenate(batches), windows[:len(batches) * 5])


def test_same_seed_same_batches_other_seed_other_batches(small_dataset):
  def first(seed):
    return np.stack(run_batches(
        lambda: inputs.make_dataset(small_dataset, "train", 8, seed=seed), 3))
  np.testing.assert_array_equal(first(3), first(3))
  assert not np.array_equal(first(3), first(4))


@pytest.mark.parametrize("sampling,mixed", [("fixed", False), ("random_chunk", True),
                                             ("document", False)])
def test_iterator_state_saves_and_restores(small_dataset, other_dataset, tmp_path, sampling,
                                           mixed):
  """A resumed run continues with the batches the uninterrupted run would have seen."""
  checkpoint = str(tmp_path / "ckpt")
  spec = {small_dataset: 2, other_dataset: 1} if mixed else small_dataset

  def run(restore):
    with tf.Graph().as_default():
      dataset = inputs.make_dataset(spec, "train", 8, seed=5, shuffle_buffer=50,
                                    sampling=sampling)
      iterator = tf.data.make_initializable_iterator(dataset)
      saveable = tf.data.experimental.make_saveable_from_iterator(iterator)
      tf.add_to_collection(tf.GraphKeys.SAVEABLE_OBJECTS, saveable)
      saver, next_batch = tf.train.Saver(), iterator.get_next()
      with tf.Session() as session:
        session.run(iterator.initializer)
        if restore:
          saver.restore(session, checkpoint)
        else:
          [session.run(next_batch) for _ in range(40)]  # Past one epoch of the train split.
          saver.save(session, checkpoint)
        return [session.run(next_batch) for _ in range(3)]

  np.testing.assert_array_equal(run(restore=False), run(restore=True))


def test_unknown_split_lists_available_splits(small_dataset):
  with pytest.raises(ValueError, match="no split 'test'; available splits: train, validation"):
    inputs.make_dataset(small_dataset, "test", 4)


def test_too_few_windows_for_one_pass(small_dataset):
  with pytest.raises(ValueError, match="fewer than batch_size=100000"):
    inputs.make_dataset(small_dataset, "validation", 100000, repeat=False)


def test_missing_dataset_json(tmp_path):
  with pytest.raises(ValueError, match="has no dataset.json; run gptneo-prepare-data"):
    inputs.read_dataset_info(tmp_path / "nowhere")


# --------------------------------------------------------------------------- mixtures, sampling

OTHER_FILES = [os.path.join(STDLIB, name) for name in (
    "abc.py", "keyword.py", "nturl2path.py", "this.py", "types.py", "numbers.py")]


@pytest.fixture(scope="module")
def other_dataset(tmp_path_factory, small_dataset):
  """Other documents, encoded with small_dataset's tokenizer: a valid mixture partner."""
  output_dir = str(tmp_path_factory.mktemp("data") / "other")
  prepare.prepare_dataset(OTHER_FILES, output_dir, N_CTX,
                          tokenizer_path=os.path.join(small_dataset, "tokenizer.json"),
                          validation_fraction=0.3, tokens_per_shard=3000, seed=1)
  return output_dir


def window_keys(dataset_dir, split):
  return {tuple(window) for window in read_windows(dataset_dir, split)}


def file_streams(dataset_dir, split):
  """Each file's windows joined back into its token stream."""
  files = inputs.read_dataset_info(dataset_dir)["splits"][split]["files"]
  return [read_windows(dataset_dir, split, [name]).reshape(-1) for name in files]


def locate(row, streams):
  """Every (file, position) where the row's ids are in the streams; fails if nowhere."""
  places = []
  for index, stream in enumerate(streams):
    views = np.lib.stride_tricks.sliding_window_view(stream, len(row))
    places += [(index, int(p)) for p in np.flatnonzero((views == row).all(axis=1))]
  assert places, f"row {row[:8]}... is no slice of the split's token stream"
  return places


def test_mixture_draws_parts_by_weight(small_dataset, other_dataset):
  small, other = window_keys(small_dataset, "train"), window_keys(other_dataset, "train")
  assert not small & other
  mixture = {small_dataset: 3, other_dataset: 1}
  rows = np.concatenate(run_batches(
      lambda: inputs.make_dataset(mixture, "train", 8, seed=2), 100))
  from_small = sum(tuple(row) in small for row in rows)
  from_other = sum(tuple(row) in other for row in rows)
  assert from_small + from_other == len(rows)
  assert 0.70 < from_small / len(rows) < 0.80


def test_mixture_evaluation_reads_every_part_once(small_dataset, other_dataset):
  mixture = {small_dataset: 3, other_dataset: 1}
  info = inputs.read_dataset_info(mixture)
  expected = sum(inputs.read_dataset_info(d)["splits"]["validation"]["windows"]
                 for d in (small_dataset, other_dataset))
  assert info["splits"]["validation"]["windows"] == expected
  rows = np.concatenate(run_batches(lambda: inputs.make_dataset(
      mixture, "validation", 1, shuffle=False, repeat=False)))
  np.testing.assert_array_equal(rows, np.concatenate(
      [read_windows(small_dataset, "validation"), read_windows(other_dataset, "validation")]))


def test_mixture_of_other_tokenizers_is_refused(small_dataset, tmp_path):
  own = str(tmp_path / "own")
  prepare.prepare_dataset(OTHER_FILES, own, N_CTX, vocab_size=VOCAB_SIZE - 1,
                          validation_fraction=0.3)
  with pytest.raises(ValueError, match="differ in n_vocab|different tokenizers"):
    inputs.make_dataset({small_dataset: 1, own: 1}, "train", 8)


def test_mixture_weights_must_be_positive(small_dataset):
  with pytest.raises(ValueError, match="needs positive weights"):
    inputs.make_dataset({small_dataset: 0}, "train", 8)


def test_random_chunks_are_slices_of_the_stream_at_many_offsets(small_dataset):
  streams = file_streams(small_dataset, "train")
  rows = np.concatenate(run_batches(lambda: inputs.make_dataset(
      small_dataset, "train", 8, seed=3, sampling="random_chunk"), 10))
  offsets = {locate(row, streams)[0][1] % (N_CTX + 1) for row in rows}
  assert len(offsets) > 20  # of 65 possible, in 80 rows


@pytest.fixture(scope="module")
def short_documents(tmp_path_factory, small_dataset):
  """Documents of 120 characters: most windows hold the start of one."""
  folder = tmp_path_factory.mktemp("short")
  for name in sorted(os.listdir(STDLIB))[:60]:
    if name.endswith(".py"):
      with open(os.path.join(STDLIB, name), encoding="utf-8") as source:
        (folder / f"{name}.txt").write_text(source.read()[:120], encoding="utf-8")
  output_dir = str(tmp_path_factory.mktemp("data") / "short")
  prepare.prepare_dataset([str(folder)], output_dir, N_CTX,
                          tokenizer_path=os.path.join(small_dataset, "tokenizer.json"),
                          validation_fraction=0.1, tokens_per_shard=3000, seed=1)
  return output_dir


def test_document_sampling_starts_after_an_end_of_document(short_documents):
  eos = inputs.read_dataset_info(short_documents)["eos_id"]
  streams = file_streams(short_documents, "train")
  rows = np.concatenate(run_batches(lambda: inputs.make_dataset(
      short_documents, "train", 8, seed=3, sampling="document"), 10))
  starts_after_eos = 0
  for row in rows:
    # Some files repeat a passage: the row need only be right at one of its places.
    kinds = {_document_start_kind(streams[index], position, eos)
             for index, position in locate(row, streams)}
    assert kinds - {"wrong"}, f"row {row[:8]}... starts neither a document nor a window"
    starts_after_eos += "after_eos" in kinds
  assert starts_after_eos > len(rows) // 2


def _document_start_kind(stream, position, eos):
  if position and stream[position - 1] == eos:
    return "after_eos"
  in_window = position % (N_CTX + 1) == 0 and eos not in stream[position:position + N_CTX]
  return "inside_a_document" if in_window else "wrong"


def test_unknown_sampling_is_refused(small_dataset):
  with pytest.raises(ValueError, match="train.sampling = 'shuffled' is unknown"):
    inputs.make_dataset(small_dataset, "train", 8, sampling="shuffled")


# --------------------------------------------------------------------------- CLI


def run_cli(*args):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [REPO_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "bin", "prepare_data"),
                         *args], env=env, capture_output=True, text=True, check=False)


def test_cli_prepares_three_files(tmp_path):
  output_dir = tmp_path / "cli"
  result = run_cli(*[f"--input={path}" for path in SMALL_FILES[:3]],
                   f"--output_dir={output_dir}", "--n_ctx=32", "--vocab_size=300",
                   "--validation_fraction=0")
  assert result.returncode == 0, result.stderr
  assert "3 documents" in result.stdout and "vocab 300" in result.stdout
  assert inputs.read_dataset_info(output_dir)["documents"] == 3


def test_cli_missing_input_is_one_line_error(tmp_path):
  result = run_cli("--input=does/not/exist.txt", f"--output_dir={tmp_path / 'out'}")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "prepare_data: error: input 'does/not/exist.txt' matched no files; pass an existing "
      "file, folder, glob or 'stdlib'"]
