"""Tests of bin/prepare_data on real corpus formats: JSONL(.gz/.zst), Parquet, text with
separators; filters; workers; resuming after SIGKILL; bad input. Small generated corpora,
a tiny BPE."""
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import time

import numpy as np
import pyarrow
import pyarrow.parquet
import pytest
import tensorflow.compat.v1 as tf
import zstandard

from gptneo.data import prepare, sources, workers
from gptneo.data import tokenizer as tokenizer_lib
from gptneo.errors import UserError
from tests.conftest import run_binary
from tests.test_errors import assert_one_line_error

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = sysconfig.get_paths()["stdlib"]
N_CTX = 16
SUBSETS = ("Github", "ArXiv", "Pile-CC")


def stdlib_paragraphs(names, limit):
  """Up to `limit` distinct non-empty paragraphs of some stdlib modules: small documents."""
  texts = []
  for name in names:
    with open(os.path.join(STDLIB, name), encoding="utf-8") as f:
      texts += [p for p in f.read().split("\n\n") if p.strip()]
  return list(dict.fromkeys(texts))[:limit]


TEXTS = stdlib_paragraphs(["bisect.py", "colorsys.py", "copy.py", "glob.py", "fnmatch.py"], 120)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
  tokenizer_lib.train_bpe_on(TEXTS, 300).save(path)
  return path


def write_zst_jsonl(path, records):
  data = "".join(json.dumps(r) + "\n" for r in records).encode()
  with open(path, "wb") as f:
    f.write(zstandard.ZstdCompressor().compress(data))


def pile_folder(folder, texts, shards=3):
  """A Pile-like folder: jsonl.zst shards of {"text", "meta": {"pile_set_name"}} lines."""
  os.makedirs(folder)
  for shard in range(shards):
    write_zst_jsonl(os.path.join(folder, f"{shard:02d}.jsonl.zst"), [
        {"text": text, "meta": {"pile_set_name": SUBSETS[i % 3]}}
        for i, text in enumerate(texts) if i % shards == shard])
  return folder


def read_split(dataset_dir, split):
  """The split's windows joined back into its token stream, in stored order (of a partial
  window, its real tokens)."""
  info = json.load(open(os.path.join(dataset_dir, "dataset.json")))
  ids = []
  for name in info["splits"][split]["files"]:
    for record in tf.io.tf_record_iterator(os.path.join(dataset_dir, name)):
      features = tf.train.Example.FromString(record).features.feature
      length = features["length"].int64_list.value if "length" in features else [N_CTX + 1]
      ids += features["tokens"].int64_list.value[:length[0]]
  return np.array(ids, dtype=np.int64)


def expected_streams(tokenizer_path, documents, fraction, seed=1234):
  """Each split's token stream from tokenizing `documents` (in stream order) directly."""
  tokenizer = tokenizer_lib.load_tokenizer(tokenizer_path)
  eos = tokenizer_lib.eos_id(tokenizer)
  streams = {"train": [], "validation": []}
  for text in documents:
    split = prepare.split_of(workers.content_hash(text), fraction, seed)
    tokenizer.encode_special_tokens = True
    streams[split] += tokenizer.encode(text, add_special_tokens=False).ids + [eos]
  if fraction and not streams["validation"] and len(documents) > 1:
    last = tokenizer.encode(documents[-1], add_special_tokens=False).ids + [eos]
    streams["train"], streams["validation"] = streams["train"][:-len(last)], last
  return {split: np.array(ids) for split, ids in streams.items()}


def assert_splits_equal(dataset_dir, expected):
  for split, stream in expected.items():
    stored = read_split(dataset_dir, split)
    kept = len(stream) if split == "validation" else len(stream) // (N_CTX + 1) * (N_CTX + 1)
    assert len(stored) == kept  # train drops its tail under a window, validation keeps it
    np.testing.assert_array_equal(stored, stream[:len(stored)])


def folder_bytes(folder):
  return {name: open(os.path.join(folder, name), "rb").read()
          for name in sorted(os.listdir(folder))}


# --------------------------------------------------------------------------- formats


def test_pile_folder_with_meta_filter_equals_direct_tokenization(tmp_path, tokenizer_path):
  folder = pile_folder(str(tmp_path / "pile"), TEXTS)
  keep = {"Github", "ArXiv"}
  info = prepare.prepare_dataset(
      [folder], str(tmp_path / "out"), N_CTX, tokenizer_path=tokenizer_path,
      validation_fraction=0.2, tokens_per_shard=500,
      filters=workers.Filters(meta_filter=(("meta.pile_set_name", frozenset(keep)),)))
  documents = []
  for source in info["sources"]:  # stream order
    assert source["format"] == "jsonl" and source["path"].endswith(".jsonl.zst")
    shard = int(os.path.basename(source["path"])[:2])
    documents += [t for i, t in enumerate(TEXTS) if i % 3 == shard and SUBSETS[i % 3] in keep]
  assert info["documents"] == len(documents) and info["dropped"] == {"meta": len(TEXTS) // 3}
  assert len(info["splits"]["train"]["files"]) > 1
  assert_splits_equal(str(tmp_path / "out"), expected_streams(tokenizer_path, documents, 0.2))


def test_nested_field_gz_parquet_and_text_mixed_in_one_run(tmp_path, tokenizer_path):
  nested, rows, plain = TEXTS[:40], TEXTS[40:80], TEXTS[80:]
  with gzip.open(tmp_path / "nested.jsonl.gz", "wt") as f:
    f.writelines(json.dumps({"doc": {"body": t}, "id": i}) + "\n" for i, t in enumerate(nested))
  pyarrow.parquet.write_table(pyarrow.table({"doc": [{"body": t} for t in rows]}),
                              tmp_path / "rows.parquet", row_group_size=7)
  (tmp_path / "plain.txt").write_text("<|endoftext|>".join(plain))
  reading = sources.Reading(text_field="doc.body", document_separator="<|endoftext|>")
  info = prepare.prepare_dataset(
      [str(tmp_path / "nested.jsonl.gz"), str(tmp_path / "rows.parquet"),
       str(tmp_path / "plain.txt")], str(tmp_path / "out"), N_CTX,
      tokenizer_path=tokenizer_path, validation_fraction=0.2, reading=reading)
  by_name = {"nested.jsonl.gz": nested, "rows.parquet": rows, "plain.txt": plain}
  documents = []
  for source in info["sources"]:
    texts = by_name[os.path.basename(source["path"])]
    assert source["documents"] == len(texts)
    documents += texts
  assert [s["format"] for s in sorted(info["sources"], key=lambda s: s["path"])] == [
      "jsonl", "text", "parquet"]
  assert_splits_equal(str(tmp_path / "out"), expected_streams(tokenizer_path, documents, 0.2))


def test_blank_lines_separate_documents_across_read_chunks(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "_CHUNK_BYTES", 7)  # separators straddle the chunks
  (tmp_path / "t.txt").write_text("first doc\nline two\n\n\n  \nsecond\n\nthird one\n\n")
  source = sources.Source(str(tmp_path / "t.txt"), "text")
  texts = [r.text for r in sources.records(source, sources.Reading(document_separator="blank_lines"))]
  assert texts == ["first doc\nline two", "second", "third one", ""]


def test_one_file_many_documents_and_the_empty_validation_split(tmp_path, tokenizer_path):
  (tmp_path / "book.txt").write_text("<|endoftext|>".join(TEXTS))
  with pytest.raises(ValueError, match=r"validation_fraction=0.05 needs two or more "
                                       r"documents, the corpus has 1; .*--document_separator"):
    prepare.prepare_dataset([str(tmp_path / "book.txt")], str(tmp_path / "out"), N_CTX,
                            tokenizer_path=tokenizer_path)
  assert os.listdir(tmp_path) == ["book.txt"]  # nothing half-written
  info = prepare.prepare_dataset(
      [str(tmp_path / "book.txt")], str(tmp_path / "out"), N_CTX,
      tokenizer_path=tokenizer_path, validation_fraction=0.1,
      reading=sources.Reading(document_separator="<|endoftext|>"))
  assert info["documents"] == len(TEXTS) and info["splits"]["validation"]["documents"] > 0
  assert_splits_equal(str(tmp_path / "out"), expected_streams(tokenizer_path, TEXTS, 0.1))


def test_a_tiny_corpus_drawing_no_validation_document_gets_its_last(tmp_path, tokenizer_path):
  texts = TEXTS[:3]
  assert not any(prepare.split_of(workers.content_hash(t), 0.05, 1234) == "validation"
                 for t in texts)
  for i, text in enumerate(texts):
    (tmp_path / f"{i}.txt").write_text(text)
  info = prepare.prepare_dataset([str(tmp_path)], str(tmp_path / "out"), N_CTX,
                                 tokenizer_path=tokenizer_path, tokens_per_shard=50)
  documents = [open(s["path"]).read() for s in info["sources"]]
  assert info["splits"]["validation"]["documents"] == 1
  assert_splits_equal(str(tmp_path / "out"), expected_streams(tokenizer_path, documents, 0.05))


def _documents_in_tail(documents, tokenizer_path, fraction, seed):
  """Documents wholly in the train stream's tail under a window, and the validation
  stream's tail length (both as `prepare` splits `documents`)."""
  tokenizer = tokenizer_lib.load_tokenizer(tokenizer_path)
  lengths = {"train": [], "validation": []}
  for text in documents:
    split = prepare.split_of(workers.content_hash(text), fraction, seed)
    lengths[split].append(len(tokenizer.encode(text).ids) + 1)
  tail, whole = sum(lengths["train"]) % (N_CTX + 1), 0
  for length in reversed(lengths["train"]):
    if length > tail:
      break
    tail, whole = tail - length, whole + 1
  return whole, sum(lengths["validation"]) % (N_CTX + 1)


def test_dataset_json_counts_what_the_windows_hold(tmp_path, tokenizer_path):
  """The last documents don't fill a window: validation keeps them (a partial last window),
  train leaves them out of its windows and of its counts (dropped_tail says what)."""
  documents = TEXTS[:30] + [f"v{i} = {i}" for i in range(12)]  # short ones last
  seed = next(s for s in range(100)
              if all(_documents_in_tail(documents, tokenizer_path, 0.3, s)))
  (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                 for t in documents))
  output_dir = str(tmp_path / "out")
  info = prepare.prepare_dataset([str(tmp_path / "corpus.jsonl")], output_dir, N_CTX,
                                 tokenizer_path=tokenizer_path, validation_fraction=0.3,
                                 tokens_per_shard=100, seed=seed)
  eos = info["eos_id"]
  train, validation = info["splits"]["train"], info["splits"]["validation"]
  stored = {split: read_split(output_dir, split) for split in ("train", "validation")}
  lost = _documents_in_tail(documents, tokenizer_path, 0.3, seed)[0]
  assert train["dropped_tail"]["documents"] == lost > 0
  assert train["tokens"] == len(stored["train"]) == train["windows"] * (N_CTX + 1)
  cut = stored["train"][-1] != eos  # a document the tail cut has its start stored
  assert train["documents"] == np.count_nonzero(stored["train"] == eos) + cut
  assert validation["tokens"] == len(stored["validation"])
  assert validation["tokens"] % (N_CTX + 1) and stored["validation"][-1] == eos
  assert validation["documents"] == np.count_nonzero(stored["validation"] == eos)
  assert train["documents"] + lost + validation["documents"] == info["documents"] == 42
  assert f"its last {train['dropped_tail']['tokens']} tokens ({lost} whole documents)" in (
      prepare.describe(info, output_dir)[1])


def test_a_partial_window_is_the_same_bytes_in_every_process():
  """Its Example holds two features, a protobuf map: unsorted, their order (so the shard's
  bytes) followed a per-process hash seed, and a resumed prepare wrote another
  validation shard than an uninterrupted one (seen once in CI)."""
  code = ("import sys; import numpy as np; from gptneo.data import prepare; "
          "sys.stdout.write(prepare._window_example(np.arange(17), 6).hex())")
  blobs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout for _ in range(6)}
  expected = prepare._window_example(np.arange(17), 6)
  assert blobs == {tf.train.Example.FromString(expected).SerializeToString(
      deterministic=True).hex()}


def test_filters_min_chars_dedup_and_ftfy(tmp_path, tokenizer_path):
  mojibake = "The cafÃ© is open"  # "café" mis-decoded as Latin-1
  records = [{"text": t} for t in [*TEXTS[:30], TEXTS[3], TEXTS[5], "tiny", mojibake]]
  with open(tmp_path / "c.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  info = prepare.prepare_dataset(
      [str(tmp_path / "c.jsonl")], str(tmp_path / "out"), N_CTX,
      tokenizer_path=tokenizer_path, validation_fraction=0.2,
      filters=workers.Filters(min_chars=5, ftfy=True, dedup=True))
  assert info["dropped"] == {"duplicate": 2, "short": 1}
  assert info["filters"] == {"min_chars": 5, "ftfy": True, "dedup": True, "meta_filter": {}}
  kept = [t for t in TEXTS[:30] if len(t) >= 5] + ["The café is open"]
  assert_splits_equal(str(tmp_path / "out"), expected_streams(tokenizer_path, kept, 0.2))


def test_the_bpe_trains_on_at_most_tokenizer_sample_bytes_of_train_text(tmp_path):
  for name, texts in (("a", TEXTS[:40]), ("b", TEXTS[40:80])):
    with open(tmp_path / f"{name}.jsonl", "w") as f:
      f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
  info = prepare.prepare_dataset([str(tmp_path)], str(tmp_path / "out"), N_CTX,
                                 vocab_size=300, validation_fraction=0.3,
                                 tokenizer_sample_bytes=1)
  first_train = []  # a budget of 1 byte: each file's first train document
  for source in info["sources"]:
    texts = [json.loads(line)["text"] for line in open(source["path"])]
    first_train.append(next(t for t in texts if prepare.split_of(
        workers.content_hash(t), 0.3, 1234) == "train"))
  expected = tokenizer_lib.train_bpe_on(first_train, 300)
  assert open(tmp_path / "out" / "tokenizer.json").read() == expected.to_str()
  assert tokenizer_lib.train_bpe_on(TEXTS[:80], 300).to_str() != expected.to_str()


# --------------------------------------------------------------------------- bad lines


def test_malformed_line_names_file_and_line_or_is_skipped_and_counted(tmp_path, tokenizer_path):
  lines = [json.dumps({"text": t}) for t in TEXTS[:20]]
  lines[6] = '{"text": "unterminated'
  lines[11] = json.dumps({"body": "no text key"})
  path = tmp_path / "bad.jsonl"
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=rf"^{path} line 7 is not JSON \(.*\); pass "):
    prepare.prepare_dataset([str(path)], str(tmp_path / "out"), N_CTX,
                            tokenizer_path=tokenizer_path, validation_fraction=0)
  info = prepare.prepare_dataset([str(path)], str(tmp_path / "out"), N_CTX,
                                 tokenizer_path=tokenizer_path, validation_fraction=0,
                                 reading=sources.Reading(skip_bad_lines=True))
  assert info["dropped"] == {"bad_line": 2} and info["documents"] == 18


@pytest.mark.parametrize("line, problem", [
    ({"body": "x"}, 'has no "text" field (has: body)'),
    ({"text": 12}, 'has a "text" that is a int, not a string'),
    ({"text": ["a"]}, 'has a "text" that is a list, not a string')])
def test_jsonl_line_without_a_string_text_field(tmp_path, tokenizer_path, line, problem):
  path = tmp_path / "c.jsonl.zst"
  write_zst_jsonl(path, [{"text": "fine"}, line])
  with pytest.raises(ValueError, match="^" + re.escape(f"{path} line 2 {problem}; pass --text_field=")):
    prepare.prepare_dataset([str(path)], str(tmp_path / "out"), N_CTX,
                            tokenizer_path=tokenizer_path)
  assert os.listdir(tmp_path) == ["c.jsonl.zst"]


def test_corrupt_zst_is_one_line_naming_the_file(tmp_path, tokenizer_path):
  path = tmp_path / "c.jsonl.zst"
  write_zst_jsonl(path, [{"text": t} for t in TEXTS])
  data = bytearray(path.read_bytes())
  data[len(data) // 2:len(data) // 2 + 64] = b"\xff" * 64
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match=rf"^{path} is damaged after line \d+ \(.*\); replace"):
    prepare.prepare_dataset([str(path)], str(tmp_path / "out"), N_CTX,
                            tokenizer_path=tokenizer_path)
  assert os.listdir(tmp_path) == ["c.jsonl.zst"]


def test_parquet_without_the_column_or_with_a_non_string_one(tmp_path, tokenizer_path):
  path = tmp_path / "p.parquet"
  pyarrow.parquet.write_table(pyarrow.table({"content": ["a b c"], "n": [1]}), path)
  with pytest.raises(ValueError, match=rf"^{path} has no column 'text' \(columns: content, "
                                       "n\\); pass --text_field="):
    prepare.prepare_dataset([str(path)], str(tmp_path / "out"), N_CTX,
                            tokenizer_path=tokenizer_path)
  with pytest.raises(ValueError, match=rf"^{path} row 1 has a int, not a string, in 'n'"):
    prepare.prepare_dataset([str(path)], str(tmp_path / "out"), N_CTX,
                            tokenizer_path=tokenizer_path,
                            reading=sources.Reading(text_field="n"))
  assert os.listdir(tmp_path) == ["p.parquet"]


def test_workers_must_be_positive(tmp_path, tokenizer_path):
  with pytest.raises(ValueError, match="workers=0 must be at least 1"):
    prepare.prepare_dataset(["stdlib"], str(tmp_path / "out"), N_CTX,
                            tokenizer_path=tokenizer_path, workers=0)


# --------------------------------------------------------------------------- workers, resume


def run_cli(*args, env=None):
  return subprocess.Popen(
      [sys.executable, os.path.join(REPO_ROOT, "bin", "prepare_data"), *args],
      env=dict(os.environ, **(env or {})), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A Pile-like folder of ~1 MB with duplicates, and its dataset prepared in process by one
  worker, with a trained BPE, dedup and ftfy on."""
  root = tmp_path_factory.mktemp("corpus")
  texts = stdlib_paragraphs(sorted(n for n in os.listdir(STDLIB) if n.endswith(".py"))[:80],
                            6000)
  folder = pile_folder(str(root / "pile"), texts + texts[:300], shards=4)
  reference = str(root / "reference")
  prepare.prepare_dataset([folder], reference, N_CTX, vocab_size=400, tokens_per_shard=4000,
                          validation_fraction=0.1, filters=workers.Filters(dedup=True, ftfy=True),
                          workers=1)
  return folder, reference


def cli_args(folder, output_dir):
  return [f"--input={folder}", f"--output_dir={output_dir}", f"--n_ctx={N_CTX}",
          "--vocab_size=400", "--tokens_per_shard=4000", "--validation_fraction=0.1",
          "--dedup", "--ftfy"]


def test_two_workers_give_the_same_bytes_as_one(corpus, tmp_path):
  folder, reference = corpus
  info = prepare.prepare_dataset(
      [folder], str(tmp_path / "two"), N_CTX, vocab_size=400, tokens_per_shard=4000,
      validation_fraction=0.1, filters=workers.Filters(dedup=True, ftfy=True), workers=2)
  assert info["dropped"]["duplicate"] == 300 and len(info["splits"]["train"]["files"]) > 10
  assert folder_bytes(str(tmp_path / "two")) == folder_bytes(reference)


def test_sigkill_after_a_shard_then_rerun_equals_uninterrupted(corpus, tmp_path):
  folder, reference = corpus
  output_dir = str(tmp_path / "out")
  killed = run_cli(*cli_args(folder, output_dir),
                   env={"GPTNEO_PREPARE_KILL_AFTER_SHARDS": "5"})
  killed.communicate()
  assert killed.returncode == -signal.SIGKILL
  assert not os.path.exists(output_dir)
  shards = [n for n in os.listdir(output_dir + ".partial") if n.endswith(".tfrecord")]
  assert len(shards) == 5  # the fifth on disk, but not in the saved state
  rerun = run_cli(*cli_args(folder, output_dir))
  stdout, stderr = rerun.communicate()
  assert rerun.returncode == 0, stderr
  assert "resuming" in stdout
  assert folder_bytes(output_dir) == folder_bytes(reference)
  assert not os.path.exists(output_dir + ".partial")


def test_sigkill_at_any_moment_then_rerun_equals_uninterrupted(corpus, tmp_path):
  folder, reference = corpus
  output_dir = str(tmp_path / "out")
  running = run_cli(*cli_args(folder, output_dir), "--workers=2")
  partial, deadline = output_dir + ".partial", time.time() + 120
  while not os.path.exists(os.path.join(partial, "train-00003.tfrecord")):
    assert running.poll() is None and time.time() < deadline, running.communicate()
    time.sleep(0.01)  # polling for the file, not waiting a guessed time
  running.send_signal(signal.SIGKILL)
  running.communicate()
  assert not os.path.exists(output_dir)
  rerun = run_cli(*cli_args(folder, output_dir), "--workers=1")
  stdout, stderr = rerun.communicate()
  assert rerun.returncode == 0, stderr
  assert "resuming" in stdout
  assert folder_bytes(output_dir) == folder_bytes(reference)
  stats = run_cli(f"--stats={output_dir}")
  stdout, stderr = stats.communicate()
  assert stats.returncode == 0, stderr
  info = json.load(open(os.path.join(output_dir, "dataset.json")))
  lines = stdout.splitlines()
  assert lines[0].startswith(f"{output_dir}: {info['documents']:,} documents, vocab 400")
  assert info["inputs_hash"] in lines[0]
  assert sum(f"({s['format']}): {s['documents']:,} documents" in stdout
             for s in info["sources"]) == 4


def test_stats_of_a_dataset_prepared_before_sources_were_recorded_is_one_line():
  old = {"format": 1, "n_ctx": 16, "n_vocab": 300, "sources": 3, "splits": {}}
  with pytest.raises(ValueError, match="'d' was prepared before datasets recorded their "
                                       r"sources; prepare it again \(--overwrite\)"):
    prepare.describe(old, "d")


# --------------------------------------------------------------------------- GPT-Neo's tfrecords


def write_neo_tfrecords(path, tokenizer, documents, chunk_size=N_CTX + 1, feature="text"):
  """What GPT-Neo's data/create_tfrecords.py writes: each document's ids and EOS, the stream
  cut into chunk_size records of one int64 feature `text` (the last one shorter)."""
  eos = tokenizer_lib.eos_id(tokenizer)
  stream = []
  for text in documents:
    tokenizer.encode_special_tokens = True
    stream += tokenizer.encode(text, add_special_tokens=False).ids + [eos]
  with tf.io.TFRecordWriter(str(path)) as writer:
    for start in range(0, len(stream), chunk_size):
      chunk = stream[start:start + chunk_size]
      writer.write(tf.train.Example(features=tf.train.Features(feature={
          feature: tf.train.Feature(int64_list=tf.train.Int64List(value=chunk))}))
                   .SerializeToString())
  return path


def test_gpt_neo_tfrecords_are_packed_without_retokenizing(tmp_path, tokenizer_path):
  """Records cut documents anywhere (chunks of 17, 5 and 40 ids): the documents are found
  again at each EOS, split by their ids' hash and packed as if tokenized here."""
  tokenizer = tokenizer_lib.load_tokenizer(tokenizer_path)
  parts = [TEXTS[:50], TEXTS[50:80], TEXTS[80:]]
  for index, (part, chunk) in enumerate(zip(parts, (N_CTX + 1, 5, 40), strict=True)):
    write_neo_tfrecords(tmp_path / f"neo_{index}.tfrecords", tokenizer, part, chunk)
  info = prepare.prepare_dataset([str(tmp_path / "neo_*.tfrecords")], str(tmp_path / "out"),
                                 N_CTX, tokenizer_path=tokenizer_path, validation_fraction=0.2,
                                 tokens_per_shard=500, workers=2)
  streams = {"train": [], "validation": []}
  documents = 0
  for source in info["sources"]:  # stream order
    assert source["format"] == "tfrecord"
    index = int(os.path.basename(source["path"])[4])
    for text in parts[index]:
      ids = tokenizer.encode(text, add_special_tokens=False).ids
      split = prepare.split_of(workers.token_hash(np.array(ids)), 0.2, 1234)
      streams[split] += ids + [tokenizer_lib.eos_id(tokenizer)]
      documents += 1
  assert info["documents"] == documents == len(TEXTS) and streams["validation"]
  assert_splits_equal(str(tmp_path / "out"), {k: np.array(v) for k, v in streams.items()})
  assert info["splits"]["train"]["bytes"] > 0


BAD_NEO_TFRECORDS = {  # case: fragments of the one line ({path}: the file)
    "no text feature": ["{path} record 1 has no int64 feature 'text' (has: tokens "
                        "(int64_list)); pass GPT-Neo's tfrecords"],
    "ids beyond the vocabulary": ["{path} record 1 holds the token id 300", "outside the "
                                  "tokenizer's", "pass the --tokenizer the tfrecords were "
                                  "made with"],
    "not a tfrecord": ["{path} is damaged after record 0"],
    "no tokenizer": ["{path} holds token ids, not text; pass the --tokenizer"],
}


def bad_neo_tfrecord(case, path, tokenizer):
  """A GPT-Neo tfrecord file with the problem `case` names."""
  if case == "no text feature":
    write_neo_tfrecords(path, tokenizer, TEXTS[:3], feature="tokens")
  elif case == "ids beyond the vocabulary":
    with tf.io.TFRecordWriter(str(path)) as writer:
      writer.write(tf.train.Example(features=tf.train.Features(feature={
          "text": tf.train.Feature(int64_list=tf.train.Int64List(value=[1, 300, 2]))}))
                   .SerializeToString())
  elif case == "not a tfrecord":
    path.write_bytes(b"this is not a TFRecord file at all")
  else:
    write_neo_tfrecords(path, tokenizer, TEXTS[:3])
  return path


@pytest.mark.parametrize("case", BAD_NEO_TFRECORDS)
def test_bad_gpt_neo_tfrecords_are_one_line_and_no_dataset(tmp_path, tokenizer_path, case):
  path = bad_neo_tfrecord(case, tmp_path / "neo.tfrecords",
                          tokenizer_lib.load_tokenizer(tokenizer_path))
  with pytest.raises(UserError) as error:
    prepare.prepare_dataset([str(path)], str(tmp_path / "out"), N_CTX,
                            vocab_size=300 if case == "no tokenizer" else None,
                            tokenizer_path=None if case == "no tokenizer" else tokenizer_path)
  line = str(error.value)
  assert "\n" not in line
  for fragment in BAD_NEO_TFRECORDS[case]:
    assert fragment.format(path=path) in line, line
  assert not (tmp_path / "out").exists()


def test_a_tfrecord_without_text_stops_bin_prepare_data_with_exit_2(tmp_path, tokenizer_path):
  path = bad_neo_tfrecord("no text feature", tmp_path / "neo.tfrecords",
                          tokenizer_lib.load_tokenizer(tokenizer_path))
  result = run_binary("prepare_data", f"--input={path}", f"--output_dir={tmp_path / 'out'}",
                      "--n_ctx=16", "--workers=1", f"--tokenizer={tokenizer_path}")
  assert_one_line_error(result, "prepare_data", BAD_NEO_TFRECORDS["no text feature"][0].format(
      path=path))
  assert sorted(os.listdir(tmp_path)) == ["neo.tfrecords"]  # no dataset, no partial one


def test_gpt_neo_tfrecords_resume_after_sigkill_to_the_same_bytes(tmp_path, tokenizer_path):
  tokenizer = tokenizer_lib.load_tokenizer(tokenizer_path)
  for index, part in enumerate([TEXTS[:60], TEXTS[60:]]):
    write_neo_tfrecords(tmp_path / f"neo_{index}.tfrecords", tokenizer, part, chunk_size=23)
  pattern = str(tmp_path / "neo_*.tfrecords")
  prepare.prepare_dataset([pattern], str(tmp_path / "reference"), N_CTX,
                          tokenizer_path=tokenizer_path, validation_fraction=0.2,
                          tokens_per_shard=300, workers=1)
  flags = [f"--input={pattern}", f"--output_dir={tmp_path / 'out'}", f"--n_ctx={N_CTX}",
           f"--tokenizer={tokenizer_path}", "--validation_fraction=0.2",
           "--tokens_per_shard=300", "--workers=1"]
  killed = run_cli(*flags, env={"GPTNEO_PREPARE_KILL_AFTER_SHARDS": "2"})
  killed.communicate()
  assert killed.returncode == -signal.SIGKILL and not (tmp_path / "out").exists()
  rerun = run_cli(*flags)
  stdout, stderr = rerun.communicate()
  assert rerun.returncode == 0, stderr
  assert "resuming" in stdout
  assert folder_bytes(str(tmp_path / "out")) == folder_bytes(str(tmp_path / "reference"))
