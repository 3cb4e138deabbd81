"""A dataset is someone else's data: it reads and copies only its own files, its tokenizer must
be a tokenizer, and a dataset meets a model dir (bin/eval, a resumed run, train.init_from) only
if both have the same tokenizer."""
import json
import os
import shutil

import pytest
from tokenizers import Tokenizer

from gptneo import storage
from gptneo.data import inputs, prepare
from gptneo.data import tokenizer as tokenizer_lib
from tests.conftest import N_CTX, TINY_TEST_BINDINGS, run_binary, stdlib_files
from tests.test_errors import assert_one_line_error, snapshot
from tests.test_train import train_in_process

SECRET = "-----BEGIN OPENSSH PRIVATE KEY-----\nSECRET-KEY-MATERIAL\n"


@pytest.fixture(scope="module")
def other_dataset(tmp_path_factory):
  """Same n_ctx as conftest's small_dataset, a tokenizer trained on other files."""
  folder = str(tmp_path_factory.mktemp("other") / "other")
  prepare.prepare_dataset(stdlib_files(12)[6:], folder, n_ctx=N_CTX, vocab_size=400,
                          validation_fraction=0.2)
  return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_dataset):
  model_dir = tmp_path_factory.mktemp("trained") / "run"
  train_in_process(model_dir, small_dataset, 1)
  return str(model_dir)


def copy_dataset(source, folder, **changes):
  """A copy of dataset `source` in `folder`, its dataset.json updated with changes (None:
  the field removed)."""
  shutil.copytree(source, folder)
  with open(os.path.join(folder, "dataset.json")) as f:
    info = json.load(f)
  for field, value in changes.items():
    if value is None:
      info.pop(field)
    else:
      info[field] = value
  with open(os.path.join(folder, "dataset.json"), "w") as f:
    json.dump(info, f)
  return str(folder)


def holds_secret(folder):
  return any(SECRET.encode() in content for _, _, content in snapshot(folder).values())


# --------------------------------------------------------------------------- own files only


def test_a_tokenizer_outside_the_dataset_never_reaches_the_model_dir(tmp_path, small_dataset):
  """The exploit: dataset.json names a secret as its tokenizer; train would copy it into the
  model dir (and from there to a bucket)."""
  (tmp_path / "id_rsa").write_text(SECRET)
  dataset = copy_dataset(small_dataset, tmp_path / "data", tokenizer=str(tmp_path / "id_rsa"))
  params = TINY_TEST_BINDINGS + [f'DATASET_DIR = "{dataset}"', "train.train_steps = 1"]
  result = run_binary("train", "--gin_file=tiny.gin", f"--model_dir={tmp_path / 'run'}",
                      *[f"--gin_param={p}" for p in params])
  assert_one_line_error(result, "train", str(tmp_path / "id_rsa"), "own folder", "prepare")
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("how", ["relative path", "link out", "not a tokenizer"])
def test_a_tokenizer_that_is_not_the_datasets_own_tokenizer_is_refused(tmp_path, small_dataset,
                                                                       how):
  (tmp_path / "id_rsa").write_text(SECRET)
  dataset = copy_dataset(small_dataset, tmp_path / "data")
  tokenizer = os.path.join(dataset, "tokenizer.json")
  os.remove(tokenizer)
  if how == "relative path":
    dataset = copy_dataset(small_dataset, tmp_path / "data2", tokenizer="../id_rsa")
  elif how == "link out":
    os.symlink(tmp_path / "id_rsa", tokenizer)
  else:
    shutil.copy(tmp_path / "id_rsa", tokenizer)
  with pytest.raises(ValueError, match="own folder|not a valid tokenizer.json"):
    train_in_process(tmp_path / "run", dataset, 1)
  assert not (tmp_path / "run").exists() or not holds_secret(tmp_path / "run")


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "link.tfrecord"])
def test_a_shard_outside_the_dataset_is_refused(tmp_path, small_dataset, name):
  dataset = copy_dataset(small_dataset, tmp_path / "data")
  os.symlink("/etc/passwd", os.path.join(dataset, "link.tfrecord"))
  with open(os.path.join(dataset, "dataset.json")) as f:
    info = json.load(f)
  info["splits"]["train"]["files"].append(name)
  with open(os.path.join(dataset, "dataset.json"), "w") as f:
    json.dump(info, f)
  with pytest.raises(ValueError, match=f"names '{name}' as a train file, not a file of the "
                                       "dataset's own folder"):
    inputs.read_dataset_info(dataset)


@pytest.mark.parametrize("field", ["tokenizer", "a shard"])
def test_a_gs_dataset_names_no_file_of_another_prefix(tmp_path, small_dataset, gcs, field):
  storage.upload_folder(small_dataset, gcs.uri("other"))
  evil = copy_dataset(small_dataset, tmp_path / "evil")
  with open(os.path.join(evil, "dataset.json")) as f:
    info = json.load(f)
  if field == "tokenizer":
    info["tokenizer"] = "../other/tokenizer.json"
  else:
    info["splits"]["train"]["files"][0] = "../other/train-00000.tfrecord"
  with open(os.path.join(evil, "dataset.json"), "w") as f:
    json.dump(info, f)
  storage.upload_folder(evil, gcs.uri("evil"))
  with pytest.raises(ValueError, match="not a file of the dataset's own folder"):
    inputs.read_dataset_info(gcs.uri("evil"))


# --------------------------------------------------------------------------- same tokenizer


def test_prepare_records_the_tokenizer_identity(small_dataset):
  with open(os.path.join(small_dataset, "dataset.json")) as f:
    recorded = json.load(f)["tokenizer_sha256"]
  tokenizer = tokenizer_lib.load_tokenizer(small_dataset)
  assert recorded == tokenizer_lib.identity(tokenizer)
  # The same tokenizer written otherwise (indented, as Tokenizer.save does) is the same.
  pretty = Tokenizer.from_str(tokenizer.to_str(pretty=True))
  assert tokenizer_lib.identity(pretty) == recorded


def test_eval_on_a_dataset_of_another_tokenizer_is_refused(trained, other_dataset):
  before = snapshot(trained)
  result = run_binary("eval", f"--model_dir={trained}",
                      f'--gin_param=evaluate.dataset_dir = "{other_dataset}"')
  assert_one_line_error(result, "eval", other_dataset, trained,
                        f"--tokenizer={trained}/tokenizer.json")
  assert snapshot(trained) == before  # no meaningless loss in eval.jsonl


def test_resuming_or_fine_tuning_on_another_tokenizer_is_refused(tmp_path, trained,
                                                                other_dataset):
  before = snapshot(trained)
  with pytest.raises(ValueError, match="another tokenizer"):
    train_in_process(trained, other_dataset, 2)
  assert snapshot(trained) == before
  with pytest.raises(ValueError, match=f"than model dir '{trained}'"):
    train_in_process(tmp_path / "tuned", other_dataset, 1, f'train.init_from = "{trained}"')
  assert not (tmp_path / "tuned").exists() or not os.listdir(tmp_path / "tuned")


def test_a_dataset_prepared_before_it_recorded_its_tokenizer_still_works(tmp_path, trained,
                                                                        small_dataset,
                                                                        other_dataset):
  old = copy_dataset(small_dataset, tmp_path / "old", format=1, tokenizer_sha256=None)
  inputs.check_model_tokenizer(old, trained)  # the identity of its own tokenizer file
  other_old = copy_dataset(other_dataset, tmp_path / "other", tokenizer_sha256=None)
  with pytest.raises(ValueError, match="another tokenizer"):
    inputs.check_model_tokenizer(other_old, trained)
  result = run_binary("eval", f"--model_dir={trained}",
                      f'--gin_param=evaluate.dataset_dir = "{old}"', check=True)
  assert json.loads(result.stdout)["dataset_dir"] == old


def test_a_tokenizer_file_other_than_the_one_recorded_is_refused(tmp_path, small_dataset,
                                                                 other_dataset):
  dataset = copy_dataset(small_dataset, tmp_path / "data")
  shutil.copy(os.path.join(other_dataset, "tokenizer.json"), dataset)
  with pytest.raises(ValueError, match="is not the tokenizer its ids were made with"):
    inputs.read_dataset_info(dataset)
