"""Checkpoints that can be trusted, one writer per model dir, a model dir that knows what it
holds (issue 14 items 2-4).

A damaged, truncated, uncommitted or index-less newest checkpoint is skipped with its reason,
by training, bin/sample and bin/eval alike; leftovers of interrupted writes go once a later
checkpoint is committed; a full disk is one line; a second writer is refused; a model of
another shape and an import into a model dir that holds one are refused before anything is
written.
"""
import http
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy

from gptneo import checkpoints
from gptneo import hf
from gptneo import model_dir as model_dir_lib
from gptneo import storage
from gptneo.errors import UserError
from tests.conftest import REPO, TINY_TEST_BINDINGS, run_binary
from tests.test_errors import assert_one_line_error
from tests.test_interop import NEO_CONFIG
from tests.test_train import logged_losses, train_in_process

EVERY_2 = ["train.steps_per_checkpoint = 2", "train.eval_batches = 0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_dataset):
  """A model dir trained 6 steps, checkpoints at 2, 4 and 6."""
  model_dir = tmp_path_factory.mktemp("trained") / "run"
  train_in_process(model_dir, small_dataset, 6, *EVERY_2)
  return str(model_dir)


@pytest.fixture
def run(tmp_path, trained):
  """A copy of `trained` for a test to damage."""
  return str(shutil.copytree(trained, tmp_path / "run"))


def path(model_dir, step, suffix=""):
  return os.path.join(model_dir, f"model.ckpt-{step}{suffix}")


DATA = ".data-00000-of-00001"


def flip_a_bit(file, offset=1000):
  with open(file, "r+b") as f:
    f.seek(offset)
    byte = f.read(1)[0]
    f.seek(offset)
    f.write(bytes([byte ^ 1]))


def truncate(file):
  os.truncate(file, os.path.getsize(file) // 2)


def scribble(file):
  """Garbage of the same size, as a disk that lost a block might hand back."""
  with open(file, "r+b") as f:
    f.write(b"\0" * os.path.getsize(file))


DAMAGES = {  # what is done to checkpoint 6, and why it is skipped
    "bit-flipped": (lambda d: flip_a_bit(path(d, 6, DATA)),
                    f"model.ckpt-6{DATA} fails its checksum"),
    "truncated": (lambda d: truncate(path(d, 6, DATA)),
                  rf"model.ckpt-6{DATA} holds \d+ bytes, its manifest says \d+ \(truncated\)"),
    "index unreadable": (lambda d: scribble(path(d, 6, ".index")),
                         "model.ckpt-6.index fails its checksum"),
    "index deleted": (lambda d: os.remove(path(d, 6, ".index")), "model.ckpt-6.index is missing"),
    "uncommitted": (lambda d: os.remove(path(d, 6, ".manifest.json")),
                    "no manifest: its write was interrupted"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_bad_newest_checkpoint_is_skipped_for_the_one_before_with_its_reason(run, damage):
  do, why = DAMAGES[damage]
  do(run)
  found = checkpoints.newest(run)
  assert found.path == path(run, 4) and not found.legacy
  [(skipped, reason)] = found.skipped
  assert skipped == path(run, 6) and re.fullmatch(why, reason), reason
  assert checkpoints.describe(found) == (
      f"resumed from {path(run, 4)} (the newest intact checkpoint; skipped model.ckpt-6: "
      f"{reason})")


def test_tf_s_checkpoint_index_is_not_needed(run):
  os.remove(os.path.join(run, "checkpoint"))
  assert checkpoints.newest(run) == checkpoints.Newest(path(run, 6), False, ())
  with open(os.path.join(run, "checkpoint"), "w") as f:
    f.write("model_checkpoint_path: 'model.ckpt-2'\n~garbage~")
  assert checkpoints.newest(run).path == path(run, 6)


@pytest.mark.parametrize("damage", ["bit-flipped", "index deleted"])
def test_training_resumes_from_the_newest_intact_checkpoint_exactly(run, small_dataset, trained,
                                                                   damage, caplog):
  DAMAGES[damage][0](run)
  os.remove(os.path.join(run, "checkpoint"))  # TF's index too: it must not matter
  caplog.set_level(logging.INFO)
  train_in_process(run, small_dataset, 6, *EVERY_2)
  [line] = [r.getMessage() for r in caplog.records if "at step" in r.getMessage()]
  assert line.startswith(f"resumed from {path(run, 4)} (the newest intact checkpoint; "
                         f"skipped model.ckpt-6: ") and line.endswith(") at step 4"), line
  resumed, whole = logged_losses(run), logged_losses(trained)
  assert sorted(resumed) == list(range(1, 7))
  np.testing.assert_allclose([resumed[s] for s in (5, 6)], [whole[s] for s in (5, 6)], rtol=0,
                             atol=1e-6)
  assert checkpoints.newest(run) == checkpoints.Newest(path(run, 6), False, ())
  with open(os.path.join(run, "checkpoint")) as f:
    assert f.readline() == 'model_checkpoint_path: "model.ckpt-6"\n'


def test_sample_uses_the_newest_intact_checkpoint_and_says_so_once(run):
  flip_a_bit(path(run, 6, DATA))
  result = run_binary("sample", f"--model_dir={run}", "--prompt=def ",
                      "--gin_param=sample.max_new_tokens = 4", check=True)
  line = (f"loading {path(run, 4)} (the newest intact checkpoint; skipped model.ckpt-6: "
          f"model.ckpt-6{DATA} fails its checksum)")
  assert result.stderr.count(line) == 1, result.stderr[-2000:]
  assert result.stdout.startswith("def ")


def test_eval_without_tf_s_index_and_a_truncated_newest_evaluates_the_one_before(run):
  os.remove(os.path.join(run, "checkpoint"))
  truncate(path(run, 6, DATA))
  result = run_binary("eval", f"--model_dir={run}", "--gin_param=evaluate.max_batches = 1",
                      check=True)
  assert json.loads(result.stdout.splitlines()[-1])["step"] == 4


def test_a_model_dir_with_no_intact_checkpoint_is_refused_in_one_line(run):
  for step in (2, 4, 6):
    flip_a_bit(path(run, step, DATA))
  result = run_binary("sample", f"--model_dir={run}", "--prompt=x")
  assert_one_line_error(result, "sample", (
      f"model dir '{run}' has no intact checkpoint (model.ckpt-6: model.ckpt-6{DATA} fails "
      f"its checksum; model.ckpt-4: model.ckpt-4{DATA} fails its checksum; model.ckpt-2: "
      f"model.ckpt-2{DATA} fails its checksum); restore one from a copy, or train afresh in "
      f"another --model_dir"))


def test_checkpoints_without_manifests_load_as_legacy_with_a_line(run, small_dataset, caplog):
  for step in (2, 4, 6):
    os.remove(path(run, step, ".manifest.json"))
  found = checkpoints.newest(run)
  assert found == checkpoints.Newest(path(run, 6), True, ())
  caplog.set_level(logging.INFO)
  train_in_process(run, small_dataset, 8, *EVERY_2)
  assert (f"resumed from {path(run, 6)} (written before checkpoints had manifests: "
          f"unverified) at step 6") in caplog.messages
  assert os.path.exists(path(run, 8, ".manifest.json"))
  assert all(os.path.exists(path(run, step, ".index")) for step in (2, 4, 6))  # keep = 5


def test_leftovers_of_interrupted_writes_go_once_a_later_checkpoint_is_committed(
    run, small_dataset):
  for name in ("model.ckpt-5.index", f"model.ckpt-5{DATA}"):  # written, never committed
    shutil.copy(os.path.join(run, name.replace("-5", "-4")), os.path.join(run, name))
  partial = [f"model.ckpt-7{DATA}.tempstate123", "model.ckpt-6.index.tempstate99",
             "checkpoint.tmp" + "0" * 32, ".model.ckpt-6.manifest.json.0123abcd.tmp"]
  theirs = ["notes.txt", "model.ckpt-notes"]
  for name in partial + theirs:
    with open(os.path.join(run, name), "w") as f:
      f.write("x")
  checkpoints.newest(run)  # finding deletes nothing
  assert all(os.path.exists(os.path.join(run, name)) for name in partial + theirs)

  train_in_process(run, small_dataset, 8, *EVERY_2)
  left = set(os.listdir(run))
  assert not left & set(partial + ["model.ckpt-5.index", f"model.ckpt-5{DATA}"])
  assert set(theirs) <= left
  assert {f"model.ckpt-{step}.manifest.json" for step in (2, 4, 6, 8)} <= left


def test_pruning_keeps_the_new_checkpoint_and_leaves_a_newer_damaged_one(run, small_dataset):
  flip_a_bit(path(run, 6, DATA))
  train_in_process(run, small_dataset, 5, *EVERY_2, "train.keep_checkpoints = 1")
  names = set(os.listdir(run))
  assert not any(name.startswith(("model.ckpt-2.", "model.ckpt-4.")) for name in names)
  found = checkpoints.newest(run)
  assert found.path == path(run, 5) and [p for p, _ in found.skipped] == [path(run, 6)]


@pytest.mark.parametrize("binding, refusal", [
    ("GPT.n_layer = 1", r"holds gpt/h1/attn/out/b and \d+ more that the model lacks"),
    ("GPT.n_layer = 3", r"has no gpt/h2/\S+, the model needs"),
    ("GPT.n_embd = 64", r"has gpt/\S+ of shape \[[\d, ]+\], the model needs"),
])
def test_resuming_with_another_shape_is_refused_before_anything_is_written(
    run, small_dataset, binding, refusal):
  before = listing(run)
  with pytest.raises(UserError, match=rf"^checkpoint {re.escape(path(run, 6))} {refusal}.*"
                                      rf"use the gin config that wrote it"):
    train_in_process(run, small_dataset, 8, *EVERY_2, binding)
  assert listing(run) == before


def listing(folder):
  """name -> (size, mtime) of what a model dir holds (its hidden lock aside)."""
  return {entry.name: (entry.stat().st_size, entry.stat().st_mtime_ns)
          for entry in os.scandir(folder) if not entry.name.startswith(".")}


# --------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
  """A tmpfs of 8 MiB, room for two checkpoints of the tiny model; skips where mounting is
  not allowed (it needs root)."""
  folder = tmp_path / "disk"
  folder.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)],
                           capture_output=True, text=True, check=False)
  if mounted.returncode:
    pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip() or 'not root'})")
  try:
    yield str(folder)
  finally:
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_is_one_line_and_the_checkpoints_before_stay_intact(small_disk,
                                                                         small_dataset):
  model_dir = os.path.join(small_disk, "run")
  params = TINY_TEST_BINDINGS + EVERY_2 + [f"DATASET_DIR = {small_dataset!r}",
                                           "train.train_steps = 10"]
  result = run_binary("train", "--gin_file=tiny.gin", f"--model_dir={model_dir}",
                      *(f"--gin_param={p}" for p in params))
  saved = re.findall(r"saved checkpoint (\S+)", result.stderr)
  step = int(saved[-1].rsplit("-", 1)[1]) + 2 if saved else 2
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == (
      f"train: error: no space left in model dir {model_dir} writing checkpoint {step}: free "
      f"space there (the checkpoints before it are intact) and resume")
  assert "Traceback" not in result.stderr
  assert checkpoints.newest(model_dir) == checkpoints.Newest(saved[-1], False, ())
  assert not [name for name in os.listdir(model_dir) if f"ckpt-{step}." in name]


# --------------------------------------------------------------------------- one writer


def test_a_second_train_is_refused_while_the_first_runs_and_not_once_it_is_killed(
    tmp_path, small_dataset):
  model_dir = str(tmp_path / "run")
  params = TINY_TEST_BINDINGS + [f"DATASET_DIR = {small_dataset!r}",
                                 "train.train_steps = 1000000", "train.log_every_n_steps = 1000"]
  command = [sys.executable, str(REPO / "bin" / "train"), "--gin_file=tiny.gin",
             f"--model_dir={model_dir}", *(f"--gin_param={p}" for p in params)]
  first = subprocess.Popen(command, env=dict(os.environ, PYTHONPATH=str(REPO)),
                           stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
  try:
    for line in first.stderr:  # blocks on the trainer's own log: no sleeping
      if "started at step 0" in line:
        break
    second = run_binary("train", "--gin_file=tiny.gin", f"--model_dir={model_dir}",
                        *(f"--gin_param={p}" for p in params))
    assert_one_line_error(second, "train", f"model dir {model_dir} is being written by train "
                          f"(pid {first.pid} on {socket.gethostname()}, since ",
                          "); wait for it to end, or use another --model_dir")
  finally:
    first.kill()
    first.wait()
  with model_dir_lib.lock(model_dir):  # the kernel freed it
    pass
  assert not os.path.exists(os.path.join(model_dir, model_dir_lib.LOCK_NAME))


def test_import_into_a_model_dir_being_written_is_refused(tmp_path, hf_dir):
  model_dir = str(tmp_path / "run")
  with model_dir_lib.lock(model_dir):
    result = run_binary("import_hf", f"--hf_dir={hf_dir}", f"--model_dir={model_dir}")
    assert_one_line_error(result, "import_hf", f"model dir {model_dir} is being written by ")
  assert not os.path.exists(model_dir)  # made for the lock, and empty: gone with it


# --------------------------------------------------------------------------- imports


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, small_dataset):
  """An HF GPT-Neo folder of random weights (NEO_CONFIG's shape) with a tokenizer."""
  folder = tmp_path_factory.mktemp("hf")
  c = NEO_CONFIG
  embd, heads, layers = c["hidden_size"], c["num_heads"], c["num_layers"]
  shapes = {"wte": [c["vocab_size"], embd], "wpe": [c["max_position_embeddings"], embd],
            "/g": [embd], "/b": [embd], "qkv/w": [embd, 3, heads, embd // heads],
            "out/w": [heads, embd // heads, embd], "fc/w": [embd, 4 * embd], "fc/b": [4 * embd],
            "proj/w": [4 * embd, embd]}
  rng, tensors = np.random.default_rng(0), {}
  for ours, names, kind in hf.weight_pairs(layers):
    shape = next(shapes[end] for end in sorted(shapes, key=len, reverse=True)
                 if ours.endswith(end))
    arrays = hf.to_hf(kind, rng.normal(0, 0.02, shape).astype(np.float32))
    tensors.update({name: np.ascontiguousarray(a) for name, a in zip(names, arrays, strict=True)})
  safetensors.numpy.save_file(tensors, str(folder / hf.WEIGHTS_FILE))
  (folder / "config.json").write_text(json.dumps(NEO_CONFIG))
  shutil.copy(os.path.join(small_dataset, "tokenizer.json"), folder)
  return str(folder)


def test_import_into_a_trained_model_dir_is_refused_unless_overwrite(run, hf_dir):
  before = listing(run)
  result = run_binary("import_hf", f"--hf_dir={hf_dir}", f"--model_dir={run}")
  assert_one_line_error(result, "import_hf", f"model dir {run} is not empty (it holds "
                        "checkpoint, command.txt, ", "; pass --overwrite to replace the model "
                        "in it, or choose another --model_dir")
  assert listing(run) == before

  run_binary("import_hf", f"--hf_dir={hf_dir}", f"--model_dir={run}", "--overwrite",
             check=True)
  assert checkpoints.newest(run) == checkpoints.Newest(path(run, 0), False, ())
  assert sorted(name for name in os.listdir(run) if name.startswith("model.")) == [
      f"model.ckpt-0{DATA}", "model.ckpt-0.index", "model.ckpt-0.manifest.json", "model.gin"]
  assert not os.path.exists(os.path.join(run, "train_metrics.jsonl"))


def test_import_without_a_tokenizer_leaves_no_model_dir(tmp_path, hf_dir):
  without = shutil.copytree(hf_dir, tmp_path / "hf", ignore=shutil.ignore_patterns("tok*"))
  result = run_binary("import_hf", f"--hf_dir={without}", f"--model_dir={tmp_path / 'run'}")
  assert_one_line_error(result, "import_hf", f"{without} has no usable tokenizer")
  assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- gs:// leases


@pytest.fixture
def preconditions(gcs, monkeypatch):
  """The emulator, enforcing ifGenerationMatch on uploads and deletes as GCS does.

  gcp-storage-emulator ignores preconditions (test_the_emulator_ignores_preconditions): with
  it alone, no lease write could ever fail. This is our reading of GCS's documented
  behaviour, not GCS: the lease never ran against a real bucket.
  """
  from gcp_storage_emulator import exceptions  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top

  def guarded(handler, object_name):
    def handle(request, response, backend, *args, **kwargs):
      wanted = request.query.get("ifGenerationMatch")
      try:
        generation = backend.get_file_obj(request.params["bucket_name"],
                                          object_name(request))["generation"]
      except exceptions.NotFound:
        generation = "0"
      if wanted and wanted[0] != str(generation):
        response.status = http.HTTPStatus.PRECONDITION_FAILED
        response.json({"error": {"code": 412, "message": "conditionNotMet"}})
        return None
      return handler(request, response, backend, *args, **kwargs)
    return handle

  monkeypatch.setattr(objects, "_multipart_upload", guarded(
      objects._multipart_upload,  # pylint: disable=protected-access
      lambda r: r.query["name"][0] if "name" in r.query else r.data["meta"]["name"]))
  for _, handlers in server.HANDLERS:
    if handlers.get(server.DELETE) is objects.delete:
      monkeypatch.setitem(handlers, server.DELETE,
                          guarded(objects.delete, lambda r: r.params["object_id"]))
  return gcs


def test_the_emulator_ignores_preconditions(gcs):
  blob = gcs.bucket.blob("p/.lease")
  blob.upload_from_string(b"one", if_generation_match=0)
  gcs.bucket.blob("p/.lease").upload_from_string(b"two", if_generation_match=0)  # GCS: 412
  assert blob.download_as_bytes() == b"two"


def holder(host, pid=1, mirror="/mirror"):
  return {"program": "train", "pid": pid, "host": host, "since": "then", "mirror": mirror}


def write_lease(gcs, prefix, record):
  gcs.bucket.blob(f"{prefix}/.lease").upload_from_string(json.dumps(record))


def test_a_live_lease_is_refused_a_stale_one_or_this_machine_s_is_taken(preconditions):
  gcs, uri = preconditions, preconditions.uri("runs/a")
  live = {**holder("elsewhere", pid=7), "renewed": time.time(), "seconds": 300}
  write_lease(gcs, "runs/a", live)
  with pytest.raises(UserError, match=re.escape(
      f"{uri} is being written by train (pid 7 on elsewhere), its lease renewed 0s ago; if "
      f"that run is dead, wait 300s for the lease to go stale, or pass --force")):
    storage.Lease(uri, holder("here")).acquire()
  for record, force in [(live, True), ({**live, "renewed": time.time() - 301}, False),
                        ({**live, "host": "here", "mirror": "/mirror"}, False)]:
    write_lease(gcs, "runs/a", record)
    lease = storage.Lease(uri, holder("here")).acquire(force)
    assert json.loads(gcs.objects("runs/a")[".lease"][1])["host"] == "here"
    lease.release()
    assert ".lease" not in gcs.objects("runs/a")


def test_of_two_claims_at_once_one_fails(preconditions, monkeypatch):
  uri = preconditions.uri("runs/b")
  late = storage.Lease(uri, holder("late"))
  reads = iter([(None, 0)])  # it saw no lease, and then another run claimed it
  real_read = late._read  # pylint: disable=protected-access
  monkeypatch.setattr(late, "_read", lambda: next(reads, None) or real_read())
  first = storage.Lease(uri, holder("first", pid=2)).acquire()
  with pytest.raises(UserError, match=r"is being written by train \(pid 2 on first\).* \(it "
                                      r"claimed it just now\)$"):
    late.acquire()
  first.release()


def test_a_run_that_lost_its_lease_stops_writing(preconditions, tmp_path):
  uri = preconditions.uri("runs/c")
  mine = storage.Lease(uri, holder("here"), seconds=0.4).acquire()
  # Another machine's bin/train --force:
  write_lease(preconditions, "runs/c", {**holder("elsewhere", pid=9), "renewed": time.time(),
                                        "seconds": 300})
  deadline = time.monotonic() + 10
  while not mine.lost and time.monotonic() < deadline:
    time.sleep(0.05)  # the renewing thread finds out within seconds / 4
  with pytest.raises(UserError, match=re.escape(
      f"{uri}: this run lost its lease (train (pid 9 on elsewhere) took it over) and stops "
      f"writing there; its work since the last sync stays in /mirror")):
    storage.sync_up(str(tmp_path), uri)
  mine.release()
  assert json.loads(preconditions.objects("runs/c")[".lease"][1])["host"] == "elsewhere"


def test_train_on_a_gs_model_dir_another_machine_writes_is_refused_unless_forced(
    preconditions, small_dataset):
  gcs, uri = preconditions, preconditions.uri("runs/d")
  write_lease(gcs, "runs/d", {**holder("elsewhere", pid=7), "renewed": time.time(),
                              "seconds": 300})
  params = TINY_TEST_BINDINGS + EVERY_2 + [f"DATASET_DIR = {small_dataset!r}",
                                           "train.train_steps = 2"]
  args = ["--gin_file=tiny.gin", f"--model_dir={uri}", *(f"--gin_param={p}" for p in params)]
  assert_one_line_error(run_binary("train", *args), "train",
                        f"{uri} is being written by train (pid 7 on elsewhere)", "--force")
  assert set(gcs.objects("runs/d")) == {".lease"}
  run_binary("train", *args, "--force", check=True)
  assert {".lease", "model.ckpt-2.manifest.json"} & set(gcs.objects("runs/d")) == {
      "model.ckpt-2.manifest.json"}


def test_import_of_a_truncated_safetensors_file_is_one_line_and_writes_nothing(tmp_path, hf_dir):
  damaged = shutil.copytree(hf_dir, tmp_path / "hf")
  weights = damaged / hf.WEIGHTS_FILE
  weights.write_bytes(weights.read_bytes()[:1000])
  result = run_binary("import_hf", f"--hf_dir={damaged}", f"--model_dir={tmp_path / 'run'}")
  assert_one_line_error(result, "import_hf", f"{weights} is not a readable safetensors file")
  assert not (tmp_path / "run").exists()
