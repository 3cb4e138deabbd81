"""Tests of gptneo.storage and gptneo-prepare-data --output_dir=gs://..., against the emulator.

The `gcs` fixture (conftest.py) runs gcp-storage-emulator and points the client at it.
"""
import json
import os
import socket

from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
from google.cloud import storage as gcs_lib
import pytest
import requests

from gptneo import storage
from gptneo.data import prepare
from tests.conftest import run_binary, stdlib_files

N_CTX = 32
VOCAB = 512


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """A small prepared dataset, in several shards."""
  folder = str(tmp_path_factory.mktemp("data") / "small")
  prepare.prepare_dataset(stdlib_files(4), folder, n_ctx=N_CTX, vocab_size=VOCAB,
                          validation_fraction=0.25, tokens_per_shard=3000)
  return folder


def local_files(folder):
  """{relative path: bytes} of the visible files under folder (a mirror's manifest is hidden)."""
  found = {}
  for directory, _, names in os.walk(folder):
    for name in names:
      if not name.startswith("."):
        path = os.path.join(directory, name)
        with open(path, "rb") as f:
          found[os.path.relpath(path, folder)] = f.read()
  return found


def only_line(text):
  lines = text.strip().splitlines()
  assert len(lines) == 1, f"expected one line, got:\n{text}"
  return lines[0]


# --------------------------------------------------------------------------- local_copy


def test_local_copy_mirrors_byte_for_byte_then_downloads_nothing(gcs, dataset, tmp_path):
  storage.upload_folder(dataset, gcs.uri("sets/small"))
  folder = storage.local_copy(gcs.uri("sets/small"))
  assert folder == str(tmp_path / "cache" / "gcs" / gcs.bucket.name / "sets" / "small")
  expected = local_files(dataset)
  assert len(expected) > 4 and local_files(folder) == expected
  assert sorted(gcs.downloads) == sorted(f"sets/small/{name}" for name in expected)

  inodes = {name: os.stat(os.path.join(folder, name)).st_ino for name in expected}
  del gcs.downloads[:]
  assert storage.local_copy(gcs.uri("sets/small/")) == folder
  assert gcs.downloads == []
  assert {name: os.stat(os.path.join(folder, name)).st_ino for name in expected} == inodes


def test_local_copy_follows_changed_and_removed_objects(gcs, dataset):
  uri = gcs.uri("small")
  storage.upload_folder(dataset, uri)
  folder = storage.local_copy(uri)
  shards = sorted(name for name in os.listdir(folder) if name.endswith(".tfrecord"))
  gcs.bucket.blob(f"small/{shards[0]}").upload_from_string(b"new shard bytes")
  gcs.bucket.blob(f"small/{shards[1]}").delete()
  del gcs.downloads[:]

  assert storage.local_copy(uri) == folder
  assert gcs.downloads == [f"small/{shards[0]}"]
  with open(os.path.join(folder, shards[0]), "rb") as f:
    assert f.read() == b"new shard bytes"
  assert not os.path.exists(os.path.join(folder, shards[1]))
  expected = local_files(dataset)
  expected[shards[0]] = b"new shard bytes"
  del expected[shards[1]]
  assert local_files(folder) == expected


def test_interrupted_download_leaves_no_complete_looking_file(gcs, dataset, monkeypatch):
  uri = gcs.uri("small")
  storage.upload_folder(dataset, uri)
  folder = os.path.join(storage.cache_dir_of(), "gcs", gcs.bucket.name, "small")
  # What transfer_manager.download_many calls for each (blob, filename) pair.
  real_download = gcs_lib.Blob._handle_filename_and_download  # pylint: disable=protected-access

  def half_then_interrupted(blob, filename, *args, **kwargs):
    if blob.name.endswith("dataset.json"):
      with open(filename, "wb") as f:
        f.write(b'{"form')
      raise KeyboardInterrupt
    return real_download(blob, filename, *args, **kwargs)

  with monkeypatch.context() as patch:
    patch.setattr(gcs_lib.Blob, "_handle_filename_and_download", half_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
      storage.local_copy(uri)
  assert not os.path.exists(os.path.join(folder, "dataset.json"))
  assert [name for name in os.listdir(folder) if name.endswith(".partial")] == []
  del gcs.downloads[:]

  assert storage.local_copy(uri) == folder
  assert gcs.downloads == ["small/dataset.json"]  # What came before it was kept.
  assert local_files(folder) == local_files(dataset)


def test_local_path_is_returned_unchanged(tmp_path):
  assert storage.local_copy(str(tmp_path)) == str(tmp_path)
  assert not storage.is_remote(str(tmp_path)) and storage.is_remote("gs://b/p")


# --------------------------------------------------------------------------- upload_folder


def test_upload_refuses_an_occupied_prefix_and_leaves_it_intact(gcs, dataset, tmp_path):
  uri = gcs.uri("small")
  storage.upload_folder(dataset, uri)
  before = gcs.objects("small")
  other = tmp_path / "other"
  other.mkdir()
  (other / "dataset.json").write_text("{}")

  with pytest.raises(ValueError, match="already holds .* objects; pass --overwrite") as error:
    storage.upload_folder(str(other), uri)
  only_line(str(error.value))
  assert gcs.objects("small") == before


def test_upload_with_overwrite_replaces_everything_dataset_json_last(gcs, dataset):
  gcs.bucket.blob("small/train-00099.tfrecord").upload_from_string(b"stale shard")
  gcs.bucket.blob("small/dataset.json").upload_from_string(b'{"stale": true}')

  storage.upload_folder(dataset, gcs.uri("small"), overwrite=True)
  remote = gcs.objects("small")
  assert {name: data for name, (_, data) in remote.items()} == local_files(dataset)
  generations = {name: generation for name, (generation, _) in remote.items()}
  assert max(generations, key=generations.get) == "dataset.json"


# --------------------------------------------------------------------------- bin/prepare_data


def test_prepare_data_to_gcs_then_refuses_to_overwrite(gcs):
  uri = gcs.uri("datasets/stdlib")
  args = [*(f"--input={path}" for path in stdlib_files(4)), f"--output_dir={uri}",
          f"--n_ctx={N_CTX}", f"--vocab_size={VOCAB}", "--tokens_per_shard=3000"]
  run_binary("prepare_data", *args, check=True)
  remote = gcs.objects("datasets/stdlib")
  info = json.loads(remote["dataset.json"][1])
  shards = [name for split in info["splits"].values() for name in split["files"]]
  assert len(shards) > 2 and info["n_ctx"] == N_CTX
  assert set(remote) == {"dataset.json", "tokenizer.json", *shards}

  result = run_binary("prepare_data", *args)
  assert result.returncode == 2
  line = only_line(result.stderr)  # Refused before tokenizing: no progress bars either.
  assert line.startswith("prepare_data: error: ") and uri in line and "--overwrite" in line
  assert gcs.objects("datasets/stdlib") == remote


# --------------------------------------------------------------------------- model dirs


def test_sync_up_sends_what_changed_index_last_and_deletes_what_went(gcs, tmp_path):
  uri = gcs.uri("runs/a")
  local = storage.working_copy(uri)  # Nothing there yet: an empty mirror, no error.
  assert local_files(local) == {}
  for name, data in {"model.ckpt-4.index": b"i4", "model.ckpt-4.data": b"d4",
                     "checkpoint": b"ckpt-4", "operative_config.gin": b"x = 1"}.items():
    with open(os.path.join(local, name), "wb") as f:
      f.write(data)
  storage.sync_up(local, uri)
  first = gcs.objects("runs/a")
  assert {name: data for name, (_, data) in first.items()} == local_files(local)
  generations = {name: generation for name, (generation, _) in first.items()}
  assert max(generations, key=generations.get) == "checkpoint"

  storage.sync_up(local, uri)  # Nothing changed: nothing sent again.
  assert gcs.objects("runs/a") == first

  os.remove(os.path.join(local, "model.ckpt-4.index"))
  os.remove(os.path.join(local, "model.ckpt-4.data"))
  for name, data in {"model.ckpt-8.index": b"i8", "checkpoint": b"ckpt-8"}.items():
    with open(os.path.join(local, name), "wb") as f:
      f.write(data)
  storage.sync_up(local, uri)
  second = gcs.objects("runs/a")
  assert {name: data for name, (_, data) in second.items()} == local_files(local)
  assert second["operative_config.gin"] == first["operative_config.gin"]


def write_files(folder, files):
  for name, data in files.items():
    with open(os.path.join(folder, name), "wb") as f:
      f.write(data)


def test_work_left_unsynced_goes_up_first_unless_the_remote_moved_on(gcs):
  uri = gcs.uri("runs/b")
  local = storage.working_copy(uri)
  write_files(local, {"model.ckpt-4.index": b"i4", "checkpoint": b"ckpt-4"})
  storage.sync_up(local, uri)
  # A run here saved checkpoint 8, then died before syncing it.
  write_files(local, {"model.ckpt-8.index": b"i8", "checkpoint": b"ckpt-8"})
  assert storage.working_copy(uri) == local
  remote = {name: data for name, (_, data) in gcs.objects("runs/b").items()}
  assert remote == {"model.ckpt-4.index": b"i4", "model.ckpt-8.index": b"i8",
                    "checkpoint": b"ckpt-8"}

  # Another machine trained on and synced checkpoint 9; this mirror has unsynced work again.
  gcs.bucket.blob("runs/b/checkpoint").upload_from_string(b"ckpt-9")
  write_files(local, {"checkpoint": b"ckpt-7"})  # same size as the remote's
  storage.working_copy(uri)
  assert gcs.objects("runs/b")["checkpoint"][1] == b"ckpt-9"
  assert local_files(local)["checkpoint"] == b"ckpt-9"


def test_a_gs_model_dir_trains_resumes_from_a_fresh_cache_and_samples(gcs, dataset, tmp_path,
                                                                      monkeypatch):
  from tests.conftest import TINY_TEST_BINDINGS  # pylint: disable=g-import-not-at-top
  uri = gcs.uri("runs/tiny")

  def train(steps):
    params = TINY_TEST_BINDINGS + [f"DATASET_DIR = {dataset!r}", f"train.train_steps = {steps}",
                                   "train.steps_per_checkpoint = 4"]
    return run_binary("train", "--gin_file=tiny.gin", f"--model_dir={uri}",
                      *(f"--gin_param={p}" for p in params))

  assert train(8).returncode == 0
  remote = gcs.objects("runs/tiny")
  assert {"checkpoint", "model.ckpt-8.index", "operative_config.gin", "tokenizer.json",
          "train_metrics.jsonl"} <= set(remote)
  assert b'"model.ckpt-8"' in remote["checkpoint"][1]

  monkeypatch.setenv("GPTNEO_CACHE_DIR", str(tmp_path / "another_machine"))
  resumed = train(12)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from" in resumed.stderr and "at step 8" in resumed.stderr
  metrics = gcs.objects("runs/tiny")["train_metrics.jsonl"][1].decode().splitlines()
  assert [json.loads(line)["step"] for line in metrics] == list(range(1, 13))

  monkeypatch.setenv("GPTNEO_CACHE_DIR", str(tmp_path / "a_third_machine"))
  sampled = run_binary("sample", f"--model_dir={uri}", "--prompt=def ",
                       "--gin_param=sample.max_new_tokens = 8")
  assert sampled.returncode == 0 and sampled.stdout.startswith("def "), sampled.stderr[-2000:]
  evaluated = run_binary("eval", f"--model_dir={uri}", f"--dataset_dir={dataset}")
  assert evaluated.returncode == 0, evaluated.stderr[-2000:]
  record = json.loads(gcs.objects("runs/tiny")["eval.jsonl"][1])
  assert record["step"] == 12 and record["loss"] > 0


# --------------------------------------------------------------------------- errors


def test_missing_bucket_is_one_line(gcs, dataset):
  with pytest.raises(ValueError, match="bucket gs://no-such-bucket does not exist") as error:
    storage.local_copy("gs://no-such-bucket/data")
  only_line(str(error.value))
  with pytest.raises(ValueError, match="bucket gs://no-such-bucket does not exist"):
    storage.upload_folder(dataset, "gs://no-such-bucket/data")


def test_empty_prefix_is_one_line(gcs):
  gcs.bucket.blob("data2/dataset.json").upload_from_string(b"{}")  # 'data' is not 'data2'.
  uri = gcs.uri("data")
  with pytest.raises(ValueError) as error:
    storage.local_copy(uri)
  assert str(error.value) == (f"{uri} holds no files; check the path or run "
                              f"gptneo-prepare-data --output_dir={uri}")


def test_unreachable_storage_is_one_line(monkeypatch, tmp_path):
  with socket.socket() as probe:  # A loopback port nothing listens on.
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
  monkeypatch.setattr(storage.gcs, "RETRY", storage.gcs.RETRY.with_timeout(1))  # Not 2 minutes.
  with pytest.raises(ValueError, match="gs://b/p: cannot reach Cloud Storage") as error:
    storage.local_copy("gs://b/p", cache_dir=str(tmp_path))
  only_line(str(error.value))


@pytest.mark.parametrize("error,fix", [
    (api_exceptions.Forbidden("no storage.objects.list"), "gcloud auth application-default"),
    (api_exceptions.Unauthorized("login required"), "gcloud auth application-default"),
    (auth_exceptions.DefaultCredentialsError("not found"), "gcloud auth application-default"),
    (auth_exceptions.RefreshError("token expired"), "gcloud auth application-default"),
    (requests.ConnectionError("refused\nmore"), "check the network"),
    (api_exceptions.InternalServerError("boom\ndetails"), "Cloud Storage refused"),
])
def test_client_errors_become_one_line_naming_the_uri_and_fix(error, fix):
  with pytest.raises(ValueError) as raised:
    with storage.gcs.errors("gs://b/p"):
      raise error
  line = only_line(str(raised.value))
  assert line.startswith("gs://b/p: ") and fix in line
  assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_uri_without_bucket_is_refused_and_nothing_written(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # 'gs://' stripped of its slashes would be a local 'gs:'.
  with pytest.raises(ValueError, match="'gs://' is not a gs://bucket/prefix URI"):
    prepare.prepare_dataset(stdlib_files(2), "gs://", n_ctx=N_CTX, vocab_size=VOCAB)
  assert os.listdir(tmp_path) == []
