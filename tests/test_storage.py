"""Tests of gptneo.storage and bin/prepare_data --output_dir=gs://..., against the emulator.

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
  real_download = gcs_lib.Blob.download_to_filename

  def half_then_interrupted(blob, filename, *args, **kwargs):
    if blob.name.endswith("dataset.json"):
      with open(filename, "wb") as f:
        f.write(b'{"form')
      raise KeyboardInterrupt
    return real_download(blob, filename, *args, **kwargs)

  with monkeypatch.context() as patch:
    patch.setattr(gcs_lib.Blob, "download_to_filename", half_then_interrupted)
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
                              f"bin/prepare_data --output_dir={uri}")


def test_unreachable_storage_is_one_line(monkeypatch, tmp_path):
  with socket.socket() as probe:  # A loopback port nothing listens on.
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
  monkeypatch.setattr(storage, "_RETRY", storage._RETRY.with_timeout(1))  # Not 2 minutes.
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
    with storage._gcs_errors("gs://b/p"):  # pylint: disable=protected-access
      raise error
  line = only_line(str(raised.value))
  assert line.startswith("gs://b/p: ") and fix in line
  assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_uri_without_bucket_is_refused_and_nothing_written(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # 'gs://' stripped of its slashes would be a local 'gs:'.
  with pytest.raises(ValueError, match="'gs://' is not a gs://bucket/prefix URI"):
    prepare.prepare_dataset(stdlib_files(2), "gs://", n_ctx=N_CTX, vocab_size=VOCAB)
  assert os.listdir(tmp_path) == []
