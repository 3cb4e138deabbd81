"""bin/eval (dataset metrics, last-word task) and bin/sample (batched prompts), plus bad input."""
import json
import math
import os
import re

import numpy as np
import pytest

from gptneo import evaluate as evaluate_lib
from gptneo import gin_utils
from gptneo import inference
from gptneo import sample as sample_lib
from tests.conftest import run_binary
from tests.test_errors import assert_one_line_error

ONE_DEVICE = ['mesh.mesh_shape = ""', 'mesh.layout = ""']
LAST_WORD_TEXTS = ["def main(argv): return the value of self", "import os and then import sys",
                   "for line in lines: print the line", "class Parser(object): pass"]


def parse_model_config(model_dir, runs_gin, *bindings):
  gin_utils.parse([os.path.join(model_dir, "operative_config.gin"), runs_gin],
                  ONE_DEVICE + list(bindings))


def test_lm_eval_reports_metrics_and_appends_them(neo_model_dir):
  result = run_binary("eval", f"--model_dir={neo_model_dir}", check=True)
  metrics = json.loads(result.stdout)
  assert metrics["step"] == 30 and metrics["task"] == "lm" and metrics["split"] == "validation"
  assert 0 < metrics["loss"] < math.log(512) + 1
  assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
  bits_per_token = metrics["loss"] / math.log(2)
  assert metrics["bits_per_byte"] == pytest.approx(
      bits_per_token * metrics["tokens"] / metrics["bytes"])
  assert 0 <= metrics["accuracy"] <= 1
  with open(os.path.join(neo_model_dir, "eval.jsonl")) as f:
    assert json.loads(f.readlines()[-1]) == metrics


@pytest.mark.parametrize("max_batches", [0, 3])
def test_evaluation_batches_hold_each_window_once_the_last_batch_padded(small_dataset,
                                                                       max_batches):
  from gptneo.data import inputs  # pylint: disable=g-import-not-at-top
  stored = np.concatenate([w for w, _ in evaluate_lib._windows(small_dataset, "validation", 1, 0)])
  batches = list(evaluate_lib._windows(small_dataset, "validation", 7, max_batches))
  windows = np.concatenate([w for w, _ in batches])
  weights = np.concatenate([w for _, w in batches])
  count = min(len(stored), 7 * max_batches) if max_batches else len(stored)
  validation = inputs.read_dataset_info(small_dataset)["splits"]["validation"]
  assert len(stored) == validation["windows"] and len(stored) % 7
  assert len(batches) == -(-count // 7) and weights.shape == (len(windows), 32)
  # Every target of a stored window counts but the padding of the split's last (partial) one.
  padding = validation["windows"] * 33 - validation["tokens"] if count == len(stored) else 0
  assert weights.sum() == count * 32 - padding and not weights[count:].any()
  np.testing.assert_array_equal(windows[:count], stored[:count])
  assert not windows[count:].any()


def test_token_byte_lengths_count_the_decoded_bytes(neo_model_dir):
  tokenizer = inference.load_tokenizer(neo_model_dir)
  lengths = evaluate_lib.token_byte_lengths(tokenizer)
  text = "naïve café — ✓ 日本\n\tdef f(x): return x<|endoftext|>"
  ids = tokenizer.encode(text).ids
  assert lengths[ids].sum() == len(tokenizer.decode(ids).encode("utf-8"))
  assert lengths[tokenizer.token_to_id("<|endoftext|>")] == 0


def test_lambada_task_scores_the_last_word(tmp_path, neo_model_dir):
  task_file = tmp_path / "lambada.jsonl"
  task_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in LAST_WORD_TEXTS))
  parse_model_config(neo_model_dir, "runs/eval.gin", "evaluate.batch_size = 3")
  result = evaluate_lib.evaluate(neo_model_dir, "lambada", str(task_file))
  assert result["examples"] == 4 and 0 <= result["accuracy"] <= 1
  assert result["perplexity"] > 1 and result["step"] == 30


def test_last_word_targets_are_the_space_and_the_word(neo_model_dir):
  tokenizer = inference.load_tokenizer(neo_model_dir)
  path = os.path.join(os.path.dirname(neo_model_dir), "one.jsonl")
  with open(path, "w") as f:
    f.write(json.dumps({"text": "import os and then import sys"}) + "\n")
  [(ids, word_length)] = evaluate_lib.read_last_word_examples(path, tokenizer, 64)
  assert tokenizer.decode(ids[-word_length:]) == " sys"
  assert tokenizer.decode(ids[:-word_length]) == "import os and then import"


@pytest.mark.parametrize("line, problem", [
    ("{not json", "line 2 is not JSON"),
    ('{"txt": "a b"}', 'line 2 has no string "text" field'),
    ('{"text": "oneword"}', "line 2: the text needs a context and a last word"),
])
def test_malformed_task_file_names_the_line(tmp_path, neo_model_dir, line, problem):
  task_file = tmp_path / "bad.jsonl"
  task_file.write_text(json.dumps({"text": "a good line"}) + "\n" + line + "\n")
  tokenizer = inference.load_tokenizer(neo_model_dir)
  with pytest.raises(ValueError, match=problem):
    evaluate_lib.read_last_word_examples(str(task_file), tokenizer, 64)


def test_malformed_task_file_is_one_line_from_the_binary(tmp_path, neo_model_dir):
  task_file = tmp_path / "bad.jsonl"
  task_file.write_text('{"text": "a b"}\n\n[1, 2]\n')
  result = run_binary("eval", f"--model_dir={neo_model_dir}", "--task=lambada",
                      f"--task_file={task_file}")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      f'eval: error: {task_file} line 3 has no string "text" field; write one '
      '{"text": ...} object per line')


PROMPTS = ["def ", "import os\n", "class Foo(object):\n    def __init__(self):", "", "for x"]


def sampled(model_dir, batch_size, *bindings):
  parse_model_config(model_dir, "runs/sample.gin", "sample.max_new_tokens = 12",
                     f"sample.batch_size = {batch_size}", *bindings)
  return sample_lib.sample(model_dir, PROMPTS)


@pytest.mark.parametrize("bindings", [
    ["sample.temperature = 0"],
    ["sample.temperature = 1.0", "sample.top_k = 20", "sample.top_p = 0.9", "sample.seed = 7"],
])
def test_batched_prompts_give_the_one_at_a_time_tokens(neo_model_dir, bindings):
  one_at_a_time = sampled(neo_model_dir, 1, *bindings)
  batched = sampled(neo_model_dir, 3, *bindings)
  assert batched == one_at_a_time
  assert len(batched) == len(PROMPTS) and any(c.text for c in batched)


def test_sample_writes_jsonl_from_a_prompt_file(tmp_path, neo_model_dir):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text('{"prompt": "def "}\n\n{"prompt": "import"}\n')
  output = tmp_path / "out.jsonl"
  run_binary("sample", f"--model_dir={neo_model_dir}", f"--prompt_file={prompts}",
             f"--output={output}", "--gin_param=sample.max_new_tokens = 8", check=True)
  records = [json.loads(line) for line in output.read_text().splitlines()]
  assert [r["prompt"] for r in records] == ["def ", "import"]
  tokenizer = inference.load_tokenizer(neo_model_dir)
  for record in records:
    assert record["prompt_ids"] == tokenizer.encode(record["prompt"]).ids
    assert 0 < len(record["completion_ids"]) <= 8
    assert tokenizer.decode(record["completion_ids"]) == record["completion"]


def test_rows_that_stopped_are_no_longer_stepped():
  calls = []

  def next_logits(windows):  # every prompt counts up from its last id
    calls.append([list(w) for w in windows])
    return np.eye(10)[[(w[-1] + 1) % 10 for w in windows]]

  new_ids = sample_lib.generate(next_logits, next_logits, [[1], [5]], n_ctx=8,
                                max_new_tokens=6, eos_id=-1, choose=sample_lib.greedy,
                                stopped=lambda ids: 7 in ids)
  assert new_ids == [[2, 3, 4, 5, 6, 7], [6, 7]]
  assert calls[3] == [[1, 2, 3, 4], [5, 6, 7]]  # the stopped row stays as it was
  assert len(calls) == 6  # the batch ends when the last row ends


def test_a_prompt_longer_than_n_ctx_is_read_from_its_last_ids():
  seen = []

  def next_logits(windows):
    seen.append([list(w) for w in windows])
    return np.eye(10)[[(w[-1] + 1) % 10 for w in windows]]

  restored = FakeRestored(10, favourite=0, n_ctx=4)
  restored.next_logits = next_logits
  [completion] = sample_lib.complete(restored, Tokenizer10(), [[1, 2, 3, 4, 5, 6]], 2)
  assert seen == [[[3, 4, 5, 6]], [[4, 5, 6, 7]]] and completion.ids == [7, 8]
  assert completion.prompt_ids == [1, 2, 3, 4, 5, 6]


class Tokenizer10:
  """A tokenizer of ids 0-9 (0 is EOS), each decoding to its digit."""

  def get_vocab(self, with_added_tokens=True):
    del with_added_tokens
    return {"<|endoftext|>": 0, **{str(i): i for i in range(1, 10)}}

  def token_to_id(self, token):
    return self.get_vocab().get(token)

  def decode(self, ids):
    return "".join(map(str, ids))


def test_an_empty_stop_list_stops_nothing_and_the_earliest_stop_cuts():
  sample_lib.check_stop([])
  assert sample_lib.cut_at_stop("a\n\nb", []) == "a\n\nb"
  assert sample_lib.cut_at_stop("ab--cd--", ["cd", "--"]) == "ab"


@pytest.mark.parametrize("stop, problem", [
    ('["ok", ""]', "holds an empty string"), ('"x"', "must be a list of strings")])
def test_bad_stop_is_one_line(neo_model_dir, stop, problem):
  result = run_binary("sample", f"--model_dir={neo_model_dir}", "--prompt=x",
                      f"--gin_param=sample.stop = {stop}")
  assert result.returncode == 2
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith("sample: error: sample.stop = ") and problem in line


class FakeRestored:
  """A RestoredModel's decoding interface over given logits: the largest at `favourite`."""

  def __init__(self, n_vocab, favourite, batch_size=2, n_ctx=16):
    self.model = type("Model", (), {"n_vocab": n_vocab, "n_ctx": n_ctx})()
    self.batch_size, self.decodes, self.favourite = batch_size, False, favourite

  def next_logits(self, windows):
    logits = np.tile(np.linspace(0, 1, self.model.n_vocab, dtype=np.float32),
                     [len(windows), 1])
    logits[:, self.favourite] = 10.0
    return logits


def test_ids_the_tokenizer_cannot_decode_are_never_chosen(neo_model_dir):
  tokenizer = inference.load_tokenizer(neo_model_dir)
  size = tokenizer.get_vocab_size()
  mask = sample_lib.decodable_mask(tokenizer, size + 64)
  assert np.isinf(mask[size:]).all() and not mask[:size].any()
  assert sample_lib.decodable_mask(tokenizer, size) is None
  padded = FakeRestored(size + 64, favourite=size + 3)  # the model prefers an unknown id
  completions = sample_lib.complete(padded, tokenizer, [[1], [2, 3], [4]], 5)
  assert [c.ids for c in completions] == [[size - 1] * 5] * 3  # the best decodable one
  rng = np.random.default_rng(0)
  sampled_ids = sample_lib.complete(
      padded, tokenizer, [[1]] * 4, 20,
      choose=lambda i, logits: sample_lib.choose_token(logits, 5.0, 0, 1.0, rng))
  assert max(i for c in sampled_ids for i in c.ids) < size
  exact = FakeRestored(size, favourite=3)
  assert sample_lib.complete(exact, tokenizer, [[1]], 2)[0].ids == [3, 3]


def test_each_prompt_stops_at_its_own_eos():
  eos = 0

  def next_logits(windows):  # prompt [5] says EOS at once; the others count up
    logits = np.zeros([len(windows), 10])
    for row, window in enumerate(windows):
      logits[row, eos if window[0] == 5 else window[-1] + 1] = 1.0
    return logits

  new_ids = sample_lib.generate(next_logits, next_logits, [[1], [5], [3, 4]], n_ctx=4,
                                max_new_tokens=3, eos_id=eos,
                                choose=lambda i, logits: int(np.argmax(logits)))
  assert new_ids == [[2, 3, 4], [], [5, 6, 7]]


def test_top_k_one_and_tiny_top_p_are_greedy():
  logits = np.random.default_rng(0).normal(size=50)
  rng = np.random.default_rng(0)
  for top_k, top_p in ((1, 1.0), (0, 1e-9)):
    assert sample_lib.choose_token(logits, 1.0, top_k, top_p, rng) == int(np.argmax(logits))


def test_prompt_longer_than_n_ctx_is_an_error(neo_model_dir):
  parse_model_config(neo_model_dir, "runs/sample.gin")
  with pytest.raises(ValueError, match=r"prompt 2 is \d+ tokens, more than GPT.n_ctx = 64"):
    sample_lib.sample(neo_model_dir, ["ok", "word " * 200])


def test_top_p_outside_the_unit_interval_is_one_line(neo_model_dir):
  result = run_binary("sample", f"--model_dir={neo_model_dir}", "--gin_param=sample.top_p = 0")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      "sample: error: sample.top_p = 0; it must be in (0, 1] (1: off)")
  parse_model_config(neo_model_dir, "runs/sample.gin", "sample.top_p = 1.5")
  with pytest.raises(ValueError, match=r"sample.top_p = 1.5; it must be in \(0, 1\]"):
    sample_lib.sample(neo_model_dir, ["x"])


def test_model_dir_without_checkpoint_is_one_line(tmp_path, neo_model_dir):
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "operative_config.gin").write_text(
      open(os.path.join(neo_model_dir, "operative_config.gin")).read())
  message = (f"model dir '{empty}' has no checkpoint; train one with "
             f"gptneo-train --model_dir={empty} first")
  result = run_binary("sample", f"--model_dir={empty}", "--prompt=x")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == f"sample: error: {message}"
  parse_model_config(neo_model_dir, "runs/eval.gin")  # bin/eval and bin/export: same check
  with pytest.raises(ValueError, match=re.escape(message)):
    evaluate_lib.evaluate(str(empty))


def test_training_evaluates_periodically(tmp_path, small_dataset):
  from tests.test_train import train_in_process  # pylint: disable=g-import-not-at-top
  from tensorflow.compat.v1 import train as tf_train  # pylint: disable=g-import-not-at-top
  train_in_process(tmp_path / "run", small_dataset, 6, "train.eval_every_n_steps = 3",
                   "train.eval_steps = 2", "train.eval_batches = 0")
  with open(tmp_path / "run" / "eval.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [3, 6]
  assert all(r["tokens"] == 2 * 8 * 32 and 0 < r["bits_per_byte"] for r in records)
  events = [e for path in (tmp_path / "run").glob("events.out.tfevents.*")
            for e in tf_train.summary_iterator(str(path))]
  tags = {(e.step, v.tag) for e in events for v in e.summary.value}
  assert {(3, "eval/loss"), (6, "eval/bits_per_byte"), (6, "eval/accuracy")} <= tags


def _tensorboard_scalars(logdir):
  """{(step, tag): value} of every events file in logdir."""
  from tensorflow.compat.v1 import train as tf_train  # pylint: disable=g-import-not-at-top
  return {(e.step, v.tag): v.simple_value for path in logdir.glob("events.out.tfevents.*")
          for e in tf_train.summary_iterator(str(path)) for v in e.summary.value}


def test_eval_results_reach_tensorboard_a_partial_one_under_its_own_tag(neo_model_dir, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  model_dir = tmp_path / "run"
  shutil.copytree(neo_model_dir, model_dir, ignore=shutil.ignore_patterns("eval"))  # others'
  record = json.loads(run_binary("eval", f"--model_dir={model_dir}",
                                 "--gin_param=evaluate.max_batches = 2", check=True).stdout)
  scalars = _tensorboard_scalars(model_dir / "eval")
  assert scalars[(30, "evaluate/lm/data_validation_first2/loss")] == pytest.approx(
      record["loss"])
  assert {tag for _, tag in scalars} == {f"evaluate/lm/data_validation_first2/{name}" for name in
                                         ("loss", "perplexity", "bits_per_byte", "accuracy")}


def test_checkpoint_step_chooses_the_checkpoint_read(tmp_path, small_dataset):
  from tests.test_train import logged_losses, train_in_process  # pylint: disable=g-import-not-at-top
  run = tmp_path / "run"
  train_in_process(run, small_dataset, 4, "train.steps_per_checkpoint = 2")
  result = run_binary("eval", f"--model_dir={run}", "--checkpoint_step=2", check=True)
  assert json.loads(result.stdout)["step"] == 2
  assert f"evaluating {run} (lm) on {small_dataset} validation (whole split" in result.stderr
  for program, args in (("eval", []), ("sample", ["--prompt=x"])):
    result = run_binary(program, f"--model_dir={run}", "--checkpoint_step=3", *args)
    assert_one_line_error(result, program, "--checkpoint_step = 3: model dir",
                          "has no checkpoint of that step; it has [2, 4]")
  from_2 = train_in_process(tmp_path / "from_2", small_dataset, 1, f'train.init_from = "{run}"',
                            "train.init_from_step = 2")
  from_4 = train_in_process(tmp_path / "from_4", small_dataset, 1, f'train.init_from = "{run}"')
  assert from_2["loss"] != from_4["loss"]
  assert logged_losses(tmp_path / "from_4") != logged_losses(tmp_path / "from_2")
  with pytest.raises(ValueError, match=r"train.init_from_step = 3: .* it has \[2, 4\]"):
    train_in_process(tmp_path / "from_3", small_dataset, 1, f'train.init_from = "{run}"',
                     "train.init_from_step = 3")
