"""A link inside a model dir never makes a program write or read outside it (issue 21, item 2).

Each case copies one trained model dir, puts in place of one entry a link to a file outside it,
and runs the real program: refused in one line naming the entry, exit 2, the link and the file
it points to as they were, nothing written into the model dir.
"""
import os
import pathlib
import shutil

import pytest

from gptneo import checkpoints
from gptneo import model_dir as model_dir_lib
from gptneo import storage
from gptneo.errors import UserError
from tests.conftest import NEO_TEST_BINDINGS, run_binary
from tests.test_errors import assert_one_line_error

PRECIOUS = "the user's own file, e.g. ~/.bashrc\n"
DATA = "model.ckpt-30.data-00000-of-00001"


def resume(model_dir, dataset):
  """bin/train one step past the 30 the model dir holds, as it was trained."""
  params = NEO_TEST_BINDINGS + [f'DATASET_DIR = "{dataset}"', "train.train_steps = 31"]
  return ["--gin_file=tiny.gin", f"--model_dir={model_dir}", *(f"--gin_param={p}" for p in params)]


PROGRAMS = {
    "train": resume,
    "eval": lambda model_dir, dataset: [f"--model_dir={model_dir}"],
    "sample": lambda model_dir, dataset: [f"--model_dir={model_dir}", "--prompt=def "],
    "lm_eval": lambda model_dir, dataset: [f"--model_dir={model_dir}",
                                           "--tasks=gptneo_lambada", "--limit=2"],
}

# (entry, program, what the file outside holds: PRECIOUS, or a copy of the entry, so that a
# read through the link would succeed and only a refusal stops the program)
CASES = [
    (".lock", "train", PRECIOUS),  # was: overwritten by the lock record, then the link deleted
    ("operative_config.gin", "train", PRECIOUS),  # was: overwritten
    ("command.txt", "train", PRECIOUS),  # was: appended to
    ("train_metrics.jsonl", "train", "copy"),  # was: appended to (its lines are all kept)
    ("tokenizer.json", "train", PRECIOUS),  # was: overwritten by the dataset's
    ("checkpoint", "train", "copy"),  # was: the link replaced by a new index
    ("eval.jsonl", "eval", PRECIOUS),  # was: appended to
    ("model.ckpt-30.index", "eval", "copy"),  # was: read
    (DATA, "sample", "copy"),  # was: read
    ("eval.jsonl", "lm_eval", PRECIOUS),  # was: appended to
]


def linked_copy(neo_model_dir, tmp_path, entry, content):
  """A copy of the trained model dir whose `entry` links to a file outside; returns (model
  dir, the file outside)."""
  model_dir = tmp_path / "run"
  shutil.copytree(neo_model_dir, model_dir)
  outside = tmp_path / "home" / entry.lstrip(".")
  outside.parent.mkdir()
  if content == "copy":
    shutil.copyfile(model_dir / entry, outside)
  else:
    outside.write_text(content)
  if (model_dir / entry).exists():
    os.remove(model_dir / entry)
  os.symlink(outside, model_dir / entry)
  return model_dir, outside


def snapshot(folder):
  """Every entry under folder: name -> its link target or its bytes."""
  return {str(path.relative_to(folder)): os.readlink(path) if path.is_symlink() else
          path.read_bytes() if path.is_file() else None for path in folder.rglob("*")}


@pytest.mark.parametrize("entry, program, content", CASES,
                         ids=[f"{entry} {program}" for entry, program, _ in CASES])
def test_a_link_in_a_model_dir_is_refused_and_what_it_points_to_untouched(
    tmp_path, neo_model_dir, entry, program, content):
  model_dir, outside = linked_copy(neo_model_dir, tmp_path, entry, content)
  before, held = snapshot(model_dir), outside.read_bytes()
  dataset = pathlib.Path(neo_model_dir).parent / "data"  # where conftest prepared it
  result = run_binary(program, *PROGRAMS[program](model_dir, dataset))
  assert_one_line_error(result, program, f"{model_dir / entry} is a link to {outside}",
                        "remove the link")
  assert outside.read_bytes() == held
  assert snapshot(model_dir) == before  # nothing written, the link itself kept


def test_a_linked_folder_in_a_model_dir_is_refused_the_model_dir_itself_may_be_one(
    tmp_path, neo_model_dir):
  """lm_eval writes TensorBoard events into model_dir/eval: a link there is refused too. The
  path the user passes is theirs to choose: a model dir that is a link is read and locked."""
  model_dir = tmp_path / "run"
  shutil.copytree(neo_model_dir, model_dir)
  shutil.rmtree(model_dir / "eval", ignore_errors=True)  # an earlier gptneo-eval's events
  os.symlink(model_dir, tmp_path / "link")
  (tmp_path / "home").mkdir()
  os.symlink(tmp_path / "home", model_dir / "eval")
  for given in (model_dir, tmp_path / "link"):
    with pytest.raises(UserError, match=f"{given / 'eval'} is a link to .*remove the link"):
      checkpoints.newest(str(given))  # what every program reading a checkpoint asks first
    with pytest.raises(UserError, match=f"{given / 'eval'} is a link to .*remove the link"):
      model_dir_lib.lock(str(given))  # what every program writing a model dir asks first
  assert list((tmp_path / "home").iterdir()) == [] and not (model_dir / ".lock").exists()
  os.remove(model_dir / "eval")
  assert checkpoints.newest(str(tmp_path / "link")).path == str(tmp_path / "link" /
                                                                "model.ckpt-30")
  with model_dir_lib.lock(str(tmp_path / "link")):
    assert (model_dir / ".lock").is_file() and not (model_dir / ".lock").is_symlink()


def test_a_link_made_after_the_check_is_not_followed(tmp_path, monkeypatch):
  """What we open ourselves is opened without following a link (O_NOFOLLOW): a link made
  between the check and the write is refused too, and its target left alone."""
  outside = tmp_path / "bashrc"
  outside.write_text(PRECIOUS)
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  for name, mode in (("eval.jsonl", "a"), ("operative_config.gin", "w"), ("index", "rb")):
    os.symlink(outside, model_dir / name)
    with pytest.raises(UserError, match=f"{model_dir / name} is a link to {outside}"):
      model_dir_lib.open_file(str(model_dir / name), mode)
  os.symlink(outside, model_dir / ".lock")
  monkeypatch.setattr(model_dir_lib, "check_links", lambda folder: None)  # made after it
  with pytest.raises(UserError, match=f"{model_dir / '.lock'} is a link to {outside}"):
    model_dir_lib.lock(str(model_dir))
  assert (model_dir / ".lock").is_symlink()
  assert outside.read_text() == PRECIOUS


def test_a_link_in_a_gs_model_dirs_mirror_is_never_uploaded(gcs, tmp_path):
  """sync_up reads the mirror's files to upload them: a link there would send the file it
  points to (a key, say) to the bucket."""
  uri = gcs.uri("runs/a")
  local = storage.working_copy(uri)
  (tmp_path / "id_rsa").write_text("a key\n")
  (pathlib.Path(local) / "operative_config.gin").write_text("x = 1\n")
  os.symlink(tmp_path / "id_rsa", os.path.join(local, "tokenizer.json"))
  with pytest.raises(UserError, match="tokenizer.json is a link to .*remove the link"):
    storage.sync_up(local, uri)
  assert gcs.objects("runs/a") == {}
