"""gptneo.data.shard_cache: a gs:// dataset trains through a bounded local cache of its shards.

Against the storage emulator (the `gcs` fixture of conftest.py).
"""
import contextlib
import os
import re

import pytest

from gptneo import storage
from gptneo.data import inputs
from gptneo.data import prepare
from gptneo.data import shard_cache
from gptneo.errors import UserError
from tests.conftest import N_CTX, TINY_TEST_BINDINGS, VOCAB, run_binary, stdlib_files
from tests.test_train import logged_losses, train_in_process

SHARD_BYTES = 1000


@pytest.fixture(scope="module")
def sharded_dataset(tmp_path_factory):
  """12 stdlib files in shards of ~2000 tokens: 12 train shards, 3 validation shards."""
  folder = str(tmp_path_factory.mktemp("data") / "sharded")
  prepare.prepare_dataset(stdlib_files(12), folder, n_ctx=N_CTX, vocab_size=VOCAB,
                          validation_fraction=0.2, tokens_per_shard=2000)
  return folder


def shard_sizes(folder):
  return {name: os.path.getsize(os.path.join(folder, name))
          for name in os.listdir(folder) if shard_cache.is_shard(name)}


def train_losses(model_dir, dataset, steps):
  train_in_process(model_dir, dataset, steps, "train.steps_per_checkpoint = 4",
                   "train.eval_every_n_steps = 4")
  return logged_losses(model_dir)


def bytes_on_disk(folder):
  """Bytes of the shards in folder, half-downloaded (hidden .partial) ones included."""
  total = 0
  for name in os.listdir(folder) if os.path.isdir(folder) else []:
    if shard_cache.is_shard(name) or name.endswith(".partial") and ".tfrecord." in name:
      with contextlib.suppress(FileNotFoundError):  # renamed or evicted meanwhile
        total += os.path.getsize(os.path.join(folder, name))
  return total


def test_a_cache_smaller_than_the_dataset_trains_resumes_and_equals_a_local_run(
    gcs, sharded_dataset, tmp_path, monkeypatch):
  sizes = shard_sizes(sharded_dataset)
  limit = 4 * max(sizes.values())
  assert limit < sum(sizes.values()) / 2
  storage.upload_folder(sharded_dataset, gcs.uri("sharded"))
  monkeypatch.setenv(shard_cache.MAX_BYTES_ENV, str(limit))
  # Measured apart from the cache's own books: the folder's bytes as each download lands.
  peaks, download = [], storage.download_blob

  def measured(blob, path):
    entry = download(blob, path)
    peaks.append(bytes_on_disk(os.path.dirname(path)))
    return entry

  monkeypatch.setattr(storage, "download_blob", measured)
  local = train_losses(tmp_path / "local", sharded_dataset, 8)
  whole = train_losses(tmp_path / "whole", gcs.uri("sharded"), 8)
  cache = shard_cache.current()
  # Another machine resumes: a fresh cache fetches the shard the checkpoint was reading.
  train_losses(tmp_path / "halves", gcs.uri("sharded"), 4)
  monkeypatch.setenv("GPTNEO_CACHE_DIR", str(tmp_path / "another_cache"))
  inputs._local_folder.cache_clear()  # pylint: disable=protected-access  (as a new process)
  halves = train_losses(tmp_path / "halves", gcs.uri("sharded"), 8)
  assert shard_cache.current() is not cache and shard_cache.current().downloads > 0

  assert sorted(whole) == sorted(halves) == list(range(1, 9))
  assert whole == local and halves == local  # exactly
  assert cache.max_bytes == limit and 0 < cache.high_water <= limit
  assert peaks and max(peaks) <= limit
  assert cache.downloads > len(sizes)  # shards evicted and fetched again
  for root in (tmp_path / "cache", tmp_path / "another_cache"):
    folder = storage.mirror_folder(gcs.uri("sharded"), str(root))
    assert 0 < bytes_on_disk(folder) <= limit
    assert {"dataset.json", "tokenizer.json"} <= set(os.listdir(folder))


@pytest.fixture
def four_shards(gcs, tmp_path):
  """A gs:// prefix of four 1000-byte shards a.tfrecord .. d.tfrecord; returns a factory of
  caches over it: limit -> (cache, {name: shard URI})."""
  for name in "abcd":
    gcs.bucket.blob(f"four/{name}.tfrecord").upload_from_string(name.encode() * SHARD_BYTES)

  def make(limit):
    cache = shard_cache.ShardCache(limit)
    cache.add(gcs.uri("four"), str(tmp_path / "four"))
    return cache, {name: gcs.uri(f"four/{name}.tfrecord") for name in "abcd"}

  return make


def on_disk(shards):
  folder = os.path.join(os.path.dirname(os.environ["GPTNEO_CACHE_DIR"]), "four")
  return sorted(name for name in shards if os.path.exists(os.path.join(folder, f"{name}.tfrecord")))


def test_the_least_recently_used_shard_no_pipeline_reads_is_evicted(four_shards):
  cache, paths = four_shards(int(2.5 * SHARD_BYTES))
  reader, other = cache.stream(list(paths.values())), cache.stream(list(paths.values()))
  cache.ensure(other, paths["a"])  # `other` keeps reading a
  cache.ensure(reader, paths["b"])
  assert on_disk(paths) == ["a", "b"]
  cache.ensure(reader, paths["c"])  # a is older, but read: b goes
  assert on_disk(paths) == ["a", "c"]
  cache.ensure(other, paths["d"])  # a is no longer read
  assert on_disk(paths) == ["c", "d"]
  with open(cache.ensure(other, paths["d"]), "rb") as f:
    assert f.read() == b"d" * SHARD_BYTES
  assert cache.downloads == 4 and cache.high_water == 2 * SHARD_BYTES


def test_processes_sharing_a_cache_folder_never_evict_a_shard_the_other_reads(four_shards):
  first, paths = four_shards(None)  # as two processes: each its own books, one folder
  reading = first.stream(list(paths.values()))
  first.ensure(reading, paths["a"])
  second, _ = four_shards(2 * SHARD_BYTES)  # takes a on as cached
  stream = second.stream(list(paths.values()))
  second.ensure(stream, paths["b"])
  second.ensure(stream, paths["c"])  # a is least recently used, but the first one reads it
  assert on_disk(paths) == ["a", "c"]
  first.ensure(reading, paths["d"])
  second.ensure(stream, paths["b"])  # now a goes
  assert on_disk(paths) == ["b", "c", "d"]
  downloads = first.downloads
  with open(first.ensure(reading, paths["a"]), "rb") as f:  # gone under it: fetched again
    assert f.read() == b"a" * SHARD_BYTES
  assert first.downloads == downloads + 1


def test_a_restarted_cache_keeps_what_it_downloaded_and_fetches_only_the_rest(four_shards, gcs):
  cache, paths = four_shards(None)
  stream = cache.stream(list(paths.values()))
  cache.ensure(stream, paths["a"])
  cache.ensure(stream, paths["b"])
  del gcs.downloads[:]
  again, _ = four_shards(None)
  stream = again.stream(list(paths.values()))
  for name in "abc":
    again.ensure(stream, paths[name])
  assert gcs.downloads == ["four/c.tfrecord"]
  assert again.downloads == 1


def test_announced_shards_are_downloaded_in_the_background(four_shards):
  cache, paths = four_shards(2 * SHARD_BYTES)
  stream = cache.stream(list(paths.values()))
  cache.ensure(stream, paths["a"])
  stream.announce(paths["b"])
  stream.announce(paths["c"])  # no room beside a and b without evicting b: not fetched
  cache._queue.join()  # pylint: disable=protected-access  (c was considered too)
  assert on_disk(paths) == ["a", "b"]


@pytest.mark.parametrize("value", ["0", "-5", "lots", "1.5X"])
def test_a_limit_that_is_not_a_positive_size_is_one_line(value, monkeypatch, tmp_path):
  monkeypatch.setenv("GPTNEO_CACHE_DIR", str(tmp_path))
  monkeypatch.setenv(shard_cache.MAX_BYTES_ENV, value)
  with pytest.raises(UserError, match=f"GPTNEO_CACHE_MAX_BYTES='{value}' is not a positive "
                                      "size; set it to bytes or a number with K, M, G or T"):
    shard_cache.current()


def test_sizes_read_with_units():
  assert shard_cache.parse_size("1000") == 1000
  assert shard_cache.parse_size("20G") == 20 * 2**30
  assert shard_cache.parse_size("1.5m") == 3 * 2**19


def test_a_limit_smaller_than_a_shard_or_than_the_shards_read_at_once_is_one_line(four_shards):
  with pytest.raises(UserError, match=r"GPTNEO_CACHE_MAX_BYTES=999 is smaller than shard "
                                      r"a.tfrecord of gs://.*/four \(1000 bytes\)"):
    four_shards(999)
  cache, paths = four_shards(1500)
  first = cache.stream(list(paths.values()))
  with pytest.raises(UserError, match="cannot hold a shard for each of the 2 input pipelines "
                                      "read at once .*: set it to at least 2000"):
    cache.stream(list(paths.values()))
  del first


def test_bin_train_refuses_a_limit_smaller_than_a_shard_in_one_line(gcs, sharded_dataset,
                                                                    tmp_path, monkeypatch):
  uri = gcs.uri("sharded")
  storage.upload_folder(sharded_dataset, uri)
  monkeypatch.setenv(shard_cache.MAX_BYTES_ENV, "1K")
  params = TINY_TEST_BINDINGS + [f"DATASET_DIR = {uri!r}", "train.train_steps = 2"]
  result = run_binary("train", "--gin_file=tiny.gin", f"--model_dir={tmp_path / 'run'}",
                      *(f"--gin_param={p}" for p in params))
  assert result.returncode == 2, result.stderr[-2000:]
  line = result.stderr.strip().splitlines()[-1]
  assert re.fullmatch(rf"train: error: GPTNEO_CACHE_MAX_BYTES=1024 is smaller than shard "
                      rf"\S+\.tfrecord of {uri} \(\d+ bytes\); set it to at least two shards "
                      r"\(training and validation read one each\): \d+", line), line
  assert not os.path.exists(tmp_path / "run" / "checkpoint")
