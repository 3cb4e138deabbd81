"""Bad input: one line naming the culprit and the fix, exit code 2, the model dir untouched."""
import os
import random
import shutil
import struct
import subprocess
import sys

import pytest

from gptneo import checkpoints
from tests.conftest import REPO, TINY_TEST_BINDINGS, run_binary
from tests.test_train import train_in_process


def snapshot(folder):
  """name -> (size, mtime, bytes) of every file under `folder`."""
  state = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        state[path] = (os.path.getsize(path), os.path.getmtime(path), f.read())
  return state


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, small_dataset):
  model_dir = tmp_path_factory.mktemp("trained") / "run"
  train_in_process(model_dir, small_dataset, 2)
  return model_dir


def assert_one_line_error(result, program, *fragments):
  """Exit code 2; the error is one line, the last (progress bars may come before it)."""
  assert result.returncode == 2, result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert [line for line in lines if "error" in line.lower()] == lines[-1:], result.stderr[-2000:]
  assert lines[-1].startswith(f"{program}: error: ")
  for fragment in fragments:
    assert fragment in lines[-1], lines[-1]


BAD_BINDINGS = {
    "unknown binding": (["GPT.n_embed = 64"], ["n_embed"]),
    "n_embd not divisible by n_head": (["GPT.n_head = 5"], ["n_embd", "n_head = 5"]),
    "layout not dividing": (['mesh.mesh_shape = "x:3"', 'mesh.layout = "heads:x"'],
                            ["heads", "doesn't divide"]),
    "layout naming an unknown dimension": (['mesh.mesh_shape = "x:2"', 'mesh.layout = "head:x"'],
                                           ["'head'"]),
    "mesh larger than the devices": (['mesh.mesh_shape = "x:2"', "mesh.cpu_devices = 1"],
                                     ["2 cpu devices", "1 are available"]),
    "missing data path": (['DATASET_DIR = "/nonexistent/data"'],
                          ["/nonexistent/data", "gptneo-prepare-data"]),
    "dataset vocab larger than n_vocab": (["GPT.n_vocab = 100"], ["GPT.n_vocab = 100", "512"]),
    "missing required value": (["train.train_steps = %gin.REQUIRED"],
                               ["train.train_steps", "--gin_param"]),
    "resuming with another model shape": (["GPT.n_embd = 64"],
                                          ["of shape [", "needs [", "operative_config.gin"]),
    "unknown sampling": (['train.sampling = "docs"'], ["train.sampling = 'docs'", "document"]),
    "mixture with a zero weight": (['DATASET_DIR = {"/nonexistent/a": 0}'],
                                   ["positive weights"]),
    "gs:// dataset without a bucket": (['DATASET_DIR = "gs://"'], ["gs://", "gs://my-bucket"]),
    "unknown parametrization": (['GPT.parametrization = "mu"'], ["'mu'", '"mup"']),
    "muP base width not dividing n_embd": (['GPT.parametrization = "mup"',
                                            "GPT.mup_base_width = 12"],
                                           ["GPT.mup_base_width = 12", "n_embd = 32", "divide"]),
    "muP with Adafactor's relative step": (['GPT.parametrization = "mup"',
                                            "GPT.mup_base_width = 16",
                                            "train.optimizer = @Adafactor()",
                                            "Adafactor.multiply_by_parameter_scale = True"],
                                           ['"mup" with Adafactor', "multiply_by_parameter_scale"]),
    "muP output multiplier not positive": (['GPT.parametrization = "mup"',
                                            "GPT.mup_base_width = 16",
                                            "GPT.mup_output_multiplier = 0"],
                                           ["GPT.mup_output_multiplier = 0", "> 0"]),
}


@pytest.mark.parametrize("case", sorted(BAD_BINDINGS))
def test_bad_training_input(case, trained_dir, small_dataset):
  bindings, fragments = BAD_BINDINGS[case]
  before = snapshot(trained_dir)
  params = TINY_TEST_BINDINGS + [f'DATASET_DIR = "{small_dataset}"', "train.train_steps = 4",
                                 *bindings]
  result = run_binary("train", "--gin_file=tiny.gin", f"--model_dir={trained_dir}",
                      *[f"--gin_param={p}" for p in params])
  assert_one_line_error(result, "train", *fragments)
  assert snapshot(trained_dir) == before


def test_empty_corpus(tmp_path):
  (tmp_path / "empty.txt").write_text("")
  result = run_binary("prepare_data", f"--input={tmp_path / 'empty.txt'}",
                      f"--output_dir={tmp_path / 'out'}", "--vocab_size=300")
  assert_one_line_error(result, "prepare_data", "0 tokens")
  assert not (tmp_path / "out").exists()


def test_sample_without_checkpoint(tmp_path):
  result = run_binary("sample", f"--model_dir={tmp_path}")
  assert_one_line_error(result, "sample", "operative_config.gin")


def _run_main(body):
  """Runs `body` (code raising an exception) as a binary's main, through gin_utils.run."""
  script = ("import sys\nfrom gptneo import gin_utils\nfrom gptneo.errors import UserError\n"
            "import numpy as np\n"
            f"def main(argv):\n  {body}\n"
            "sys.argv[0] = 'prog'\ngin_utils.run(main)\n")
  return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=str(REPO)), check=False)


def test_a_user_error_is_one_line_and_exit_code_2():
  result = _run_main("raise UserError('train.batch_size = 0; use a positive integer')")
  assert_one_line_error(result, "prog", "train.batch_size = 0")


def test_a_bug_keeps_its_traceback_says_it_is_a_bug_and_exits_1():
  """numpy's ValueError is no user error: it must not pass as one."""
  result = _run_main("np.zeros(2).reshape(3)")
  assert result.returncode == 1, result.stderr
  assert "Traceback" in result.stderr and "ValueError: cannot reshape" in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("prog: internal error: this is a bug in gptneo"), last


BAD_PROGRAM_INPUT = {  # program, its arguments ({model} the trained dir, {tmp} a scratch dir)
    "missing prompt file": ("sample", ["--prompt_file={tmp}/missing.txt"],
                            ["--prompt_file=", "missing.txt: not found"]),
    "empty prompt file": ("sample", ["--prompt_file={tmp}/empty.txt"], ["empty.txt is empty"]),
    "output an existing folder": ("sample", ["--output={tmp}/folder"],
                                  ["--output=", "is a folder"]),
    "output under a file": ("sample", ["--output={tmp}/file/x.jsonl"], ["is a file"]),
    "output exists": ("sample", ["--output={tmp}/file"], ["exists", "--overwrite"]),
    "sample batch size 0": ("sample", ["--gin_param=sample.batch_size = 0"],
                            ["sample.batch_size = 0"]),
    "missing task file": ("eval", ["--task=lambada", "--task_file={tmp}/missing.jsonl"],
                          ["--task_file=", "not found"]),
    "eval batch size 0": ("eval", ["--gin_param=evaluate.batch_size = 0"],
                          ["evaluate.batch_size = 0"]),
    "export over a file": ("export", ["--output={tmp}/file"], ["is a file; name a folder"]),
    "export into a full folder": ("export", ["--output={tmp}/folder"], ["--overwrite"]),
    "unknown flag": ("eval", ["--bogus_flag"], ["bogus_flag"]),
    "sample past memory": ("sample", ["--gin_param=GPT.n_ctx = 100000000"],
                           ["windows of 100000000 tokens", "is available on this machine",
                            "keep GPT.n_ctx as the model was trained",
                            "memory_check.enabled = False"]),
    "export to an empty --output": ("export", ["--output="], ["--output must name a folder"]),
    "export into the model dir": ("export", ["--output={model}/hf", "--overwrite"],
                                  ["is inside --model_dir=", "another folder"]),
    "export with a stray argument": ("export", ["--output={tmp}/hf", "--overwrite", "false"],
                                     ["unexpected arguments ['false']"]),
    "import with a stray argument": ("import_hf", ["--hf_dir={tmp}", "extra"],
                                     ["unexpected arguments ['extra']"]),
    "import from an empty --hf_dir": ("import_hf", ["--hf_dir="],
                                      ["--hf_dir must name a folder"]),
    "lm_eval with a stray argument": ("lm_eval", ["--tasks=gptneo_lambada", "extra"],
                                      ["unexpected arguments ['extra']"]),
    "sample with a stray argument": ("sample", ["extra"], ["unexpected arguments ['extra']"]),
    "sample with a gin_param gin cannot parse": (
        "sample", ["--gin_param=sample.max_new_tokens = ("],
        ["--gin_param='sample.max_new_tokens = ('", "gin syntax error"]),
}


@pytest.mark.parametrize("case", sorted(BAD_PROGRAM_INPUT))
def test_bad_program_input(case, trained_dir, tmp_path):
  program, args, fragments = BAD_PROGRAM_INPUT[case]
  (tmp_path / "empty.txt").write_text("\n\n")
  (tmp_path / "file").write_text("keep me\n")
  (tmp_path / "folder").mkdir()
  (tmp_path / "folder" / "kept.txt").write_text("keep me too\n")
  before = snapshot(trained_dir), snapshot(tmp_path)
  prompted = program == "sample" and not any(a.startswith("--prompt_file") for a in args)
  prompt = ["--prompt=x"] if prompted else []
  result = run_binary(program, f"--model_dir={trained_dir}", *prompt,
                      *[arg.format(tmp=tmp_path, model=trained_dir) for arg in args])
  assert_one_line_error(result, program, *fragments)
  assert (snapshot(trained_dir), snapshot(tmp_path)) == before


def test_a_missing_required_flag_names_it_last():
  result = run_binary("eval")
  assert_one_line_error(result, "eval", "--model_dir")


def _train(model_dir, dataset, *bindings, gin_file="tiny.gin"):
  params = TINY_TEST_BINDINGS + [f'DATASET_DIR = "{dataset}"', "train.train_steps = 4",
                                 *bindings]
  return run_binary("train", f"--gin_file={gin_file}", f"--model_dir={model_dir}",
                    *[f"--gin_param={p}" for p in params])


def test_a_run_that_would_not_fit_is_refused_before_anything_is_built(tmp_path, small_dataset):
  """The issue's line, gpt3_xl on a 24 GiB machine: refused from the analytic estimate (no
  graph is built: nothing is allocated), the model dir not even made."""
  result = run_binary("train", "--gin_file=gin/gpt3_xl.gin", f"--model_dir={tmp_path / 'run'}",
                      f'--gin_param=DATASET_DIR = "{small_dataset}"',
                      '--gin_param=memory_check.available = "24GiB"')
  assert_one_line_error(result, "train", "training 1316M parameters on batches of 512 x 2048",
                        "24.00 GiB is available on this machine", "train.microbatches_per_batch",
                        "GPT.recompute_grad", "gptneo-search-layout",
                        "memory_check.enabled = False")
  assert not (tmp_path / "run").exists()


def test_memory_check_enabled_false_lets_a_refused_run_proceed(tmp_path, small_dataset):
  tight = 'memory_check.available = "1MiB"'  # tiny's step needs more than that
  result = _train(tmp_path / "run", small_dataset, tight)
  assert_one_line_error(result, "train", "0.00 GiB is available on this machine")
  assert not (tmp_path / "run").exists()
  result = _train(tmp_path / "run", small_dataset, tight, "memory_check.enabled = False",
                  "train.train_steps = 1", "train.eval_batches = 0")
  assert result.returncode == 0, result.stderr[-2000:]
  assert checkpoints.newest(str(tmp_path / "run")).path.endswith("model.ckpt-1")


def test_train_without_a_config_names_what_to_bind(tmp_path):
  result = run_binary("train", f"--model_dir={tmp_path / 'run'}")
  assert_one_line_error(result, "train", "train.model, train.dataset_dir, train.train_steps, "
                        "train.optimizer, train.mesh not bound", "--gin_file=tiny.gin")
  assert not (tmp_path / "run").exists()


def _scramble(path, keep=0):
  """Overwrites `path` after its first `keep` bytes with random ones (the same size)."""
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.seek(keep)
    f.write(random.Random(path.name).randbytes(size - keep))


def _first_record_size(path):
  """Bytes of a TFRecord file's first record: length, its CRC, the data, the data's CRC."""
  with open(path, "rb") as f:
    return 8 + 4 + struct.unpack("<Q", f.read(8))[0] + 4


def test_corrupt_shards_are_named_before_the_model_dir_is_touched(tmp_path, small_dataset):
  data = tmp_path / "data"
  shutil.copytree(small_dataset, data)
  for shard in data.glob("*.tfrecord"):
    _scramble(shard)
  result = _train(tmp_path / "run", data)
  assert_one_line_error(result, "train", f"dataset shard {data}/train-00000.tfrecord is corrupt",
                        "gptneo-prepare-data --overwrite")
  assert not (tmp_path / "run").exists()


def test_a_corrupt_shard_met_mid_run_is_named_and_the_checkpoints_kept(tmp_path, small_dataset):
  """The start-up check reads each shard's first record; one corrupt further in is met by
  the run (here the periodic evaluation at step 2, right after its checkpoint)."""
  data = tmp_path / "data"
  shutil.copytree(small_dataset, data)
  validation = data / "validation-00000.tfrecord"
  _scramble(validation, keep=_first_record_size(validation))
  result = _train(tmp_path / "run", data, "train.steps_per_checkpoint = 2",
                  "train.eval_every_n_steps = 2", "train.eval_steps = 2")
  assert_one_line_error(result, "train", f"dataset shard {validation} is corrupt", "at step 2",
                        f"the last checkpoint ({tmp_path / 'run'}/model.ckpt-2) is intact")
  assert checkpoints.newest(str(tmp_path / "run")).path == f"{tmp_path / 'run'}/model.ckpt-2"
def test_a_dataset_without_its_tokenizer_leaves_the_model_dir_untouched(tmp_path, small_dataset):
  data = tmp_path / "data"
  shutil.copytree(small_dataset, data)
  os.remove(data / "tokenizer.json")
  result = _train(tmp_path / "run", data)
  assert_one_line_error(result, "train", "tokenizer.json")
  assert not (tmp_path / "run").exists()


def test_a_binary_tokenizer_is_one_line(tmp_path):
  (tmp_path / "corpus.txt").write_text("some words to tokenize\n" * 50)
  (tmp_path / "tokenizer.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" * 8)
  result = run_binary("prepare_data", f"--input={tmp_path / 'corpus.txt'}",
                      f"--tokenizer={tmp_path / 'tokenizer.json'}",
                      f"--output_dir={tmp_path / 'out'}")
  assert_one_line_error(result, "prepare_data", "tokenizer.json")
  assert not (tmp_path / "out").exists()


def test_export_without_a_tokenizer_writes_nothing(trained_dir, tmp_path):
  """Everything export reads is read before the first file is written."""
  model_dir = tmp_path / "model"
  shutil.copytree(trained_dir, model_dir)
  os.remove(model_dir / "tokenizer.json")
  result = run_binary("export", f"--model_dir={model_dir}", f"--output={tmp_path / 'hf'}")
  assert_one_line_error(result, "export", "tokenizer.json' does not exist")
  assert not (tmp_path / "hf").exists()
