"""lm-evaluation-harness: our native LM ("gptneo") against direct computations, bin/eval,
bin/sample and lm-eval's own HF model on the exported weights; offline tasks; bad input."""
import json
import math
import os
import shutil

import numpy as np
import pytest

from gptneo import evaluate as evaluate_lib
from gptneo import gin_utils
from gptneo import inference
from gptneo import mesh as mesh_lib
from gptneo import runtime
from gptneo import sample as sample_lib
from gptneo.data import prepare
from gptneo.harness import run as harness_run
from gptneo.harness import specs as specs_lib
from gptneo.model import gpt as gpt_lib
from tests.conftest import NEO_N_CTX, run_binary

pytest.importorskip("lm_eval", reason="harness tests need lm-eval (pip install -r "
                    "requirements-interop.txt)")
from gptneo.harness import lm as lm_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from lm_eval.api.instance import Instance  # noqa: E402  pylint: disable=g-import-not-at-top

ONE_DEVICE = ['mesh.mesh_shape = ""', 'mesh.layout = ""']
LAMBADA = specs_lib.TASK_DIR / "gptneo_lambada.jsonl"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, neo_model_dir):
  """A copy of the shared model (these tests append to its eval.jsonl)."""
  copy = tmp_path_factory.mktemp("harness") / "run"
  shutil.copytree(neo_model_dir, copy)
  return str(copy)


@pytest.fixture(scope="module")
def native(model_dir):
  """Our LM over the model, 4 windows per run, with the decoding cache."""
  gin_utils.parse([os.path.join(model_dir, "operative_config.gin")], ONE_DEVICE)
  restored = inference.RestoredModel(gpt_lib.GPT(), runtime.Runtime(mesh_lib.mesh()),
                                     model_dir, 4, decode=True)
  restored.restore()
  return lm_lib.GptNeoLM(restored, inference.load_tokenizer(model_dir), max_gen_toks=24)


def requests(kind, args):
  return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def log_softmax(logits):
  logits = logits.astype(np.float64)
  top = logits.max(-1, keepdims=True)
  return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def direct_loglikelihood(lm, context_ids, continuation_ids):
  """From all logits of the window: (context + continuation)'s last n_ctx + 1 ids, shifted."""
  window = (context_ids + continuation_ids)[-(NEO_N_CTX + 1):]
  logits = lm.restored.all_logits(lm.restored.pad([window[:-1]]))[0]
  rows = range(len(window) - 1 - len(continuation_ids), len(window) - 1)
  logprobs = log_softmax(logits)
  total = sum(logprobs[r, window[r + 1]] for r in rows)
  return total, all(int(np.argmax(logits[r])) == window[r + 1] for r in rows)


def test_loglikelihood_equals_a_direct_computation_from_our_logits(native):
  text = LAMBADA.read_text()
  long_context = " ".join(json.loads(line)["text"] for line in text.splitlines()[:8])
  pairs = [("def main(argv):", " return"), ("import", " os"), ("The value of", " self"),
           (long_context, " the end of it"), ("x", " = 1\n"), ("for line in", " lines")]
  tokenizer = native.tokenizer
  assert len(tokenizer.encode(long_context).ids) > 2 * NEO_N_CTX  # left-truncated
  got = native.loglikelihood(requests("loglikelihood", pairs))
  for (context, continuation), (loglikelihood, greedy) in zip(pairs, got, strict=True):
    context_ids = tokenizer.encode(context).ids
    continuation_ids = tokenizer.encode(context + continuation).ids[len(context_ids):]
    want, want_greedy = direct_loglikelihood(native, context_ids, continuation_ids)
    assert loglikelihood == pytest.approx(want, abs=1e-4) and greedy == want_greedy
  assert len({round(ll, 3) for ll, _ in got}) == len(pairs)  # results in request order


def test_short_requests_run_on_shorter_windows_with_the_same_results(native, model_dir):
  gin_utils.parse([os.path.join(model_dir, "operative_config.gin")], ONE_DEVICE)
  rt = runtime.Runtime(mesh_lib.mesh())
  lengths = lm_lib.bucket_lengths(native.restored.model, 3)
  windows = lm_lib.Windows(native.restored, lambda n: inference.RestoredModel(
      gpt_lib.GPT(), rt, model_dir, 4, sequence_length=n), lengths)
  bucketed = lm_lib.GptNeoLM(native.restored, native.tokenizer, 24, windows)
  texts = [json.loads(line)["text"] for line in LAMBADA.read_text().splitlines()]
  pairs = [(t.rpartition(" ")[0][-chars:], " " + t.rpartition(" ")[2])
           for t, chars in zip(texts, [8, 30, 60, 100, 200, 400, 1000, 10**4] * 5, strict=True)]
  got = bucketed.loglikelihood(requests("loglikelihood", pairs))
  want = native.loglikelihood(requests("loglikelihood", pairs))
  assert lengths == [NEO_N_CTX // 2, NEO_N_CTX // 4] and sorted(windows.built) == lengths[::-1]
  for (a, greedy_a), (b, greedy_b) in zip(got, want, strict=True):
    assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b
  rolling = requests("loglikelihood_rolling", [(t[:n],) for t, n in zip(texts[:3], (20, 90, 900), strict=True)])
  np.testing.assert_allclose(bucketed.loglikelihood_rolling(rolling),
                             native.loglikelihood_rolling(rolling), atol=1e-4)


def one_window_text(tokenizer, tokens):
  """A stdlib docstring's longest prefix that encodes to `tokens` ids."""
  source = " ".join(json.loads(line)["page"] for line in
                    (specs_lib.TASK_DIR / "gptneo_wikitext.jsonl").read_text().splitlines())
  assert len(tokenizer.encode(source[:tokens * 8]).ids) > tokens
  for end in range(tokens * 8, 0, -1):
    if len(tokenizer.encode(source[:end]).ids) == tokens:
      return source[:end]
  raise AssertionError("no prefix of that many tokens")


def test_loglikelihood_rolling_equals_bin_eval_token_loss(tmp_path, native, model_dir):
  # A dataset of one window of n_ctx + 1 ids, [EOS, text..., EOS]: bin/eval scores it as
  # lm-eval scores the rolling window of text + EOS (the first window starts after EOS).
  text = one_window_text(native.tokenizer, NEO_N_CTX - 1)
  (tmp_path / "doc.txt").write_text(text + " and more")
  data = tmp_path / "data"
  prepare.prepare_dataset([str(tmp_path / "doc.txt")], str(data), n_ctx=NEO_N_CTX,
                          tokenizer_path=os.path.join(model_dir, "tokenizer.json"),
                          validation_fraction=0)
  eos = native.eot_token_id
  window = np.asarray([eos, *native.tok_encode(text), eos])
  assert prepare.write_windows(window, NEO_N_CTX + 1, 10**6, str(data), "train")[1] == 1
  gin_utils.parse([os.path.join(model_dir, "operative_config.gin"), "runs/eval.gin"],
                  ONE_DEVICE + ["evaluate.batch_size = 1", 'evaluate.split = "train"',
                                f'evaluate.dataset_dir = "{data}"'])
  metrics = evaluate_lib.evaluate(model_dir)
  assert metrics["tokens"] == NEO_N_CTX
  [rolling] = native.loglikelihood_rolling(requests("loglikelihood_rolling",
                                                    [(text + "<|endoftext|>",)]))
  assert -rolling / NEO_N_CTX == pytest.approx(metrics["loss"], abs=1e-5)
  # Longer texts: disjoint windows of n_ctx, each scored once, as lm-eval's HF model does.
  long_text = text * 3
  [total] = native.loglikelihood_rolling(requests("loglikelihood_rolling", [(long_text,)]))
  ids = native.tok_encode(long_text)
  assert total < rolling and len(ids) > 2 * NEO_N_CTX


def test_generate_until_with_a_stop_string_equals_bin_sample_greedy(native, model_dir):
  prompts = ["def ", "import os\n", "class Foo(object):\n    def __init__(self):", "for x"]
  free = native.generate_until(requests("generate_until", [(p, {"until": []}) for p in prompts]))
  stop = [" ", "\n"]
  assert any(s in text for s in stop for text in free)  # the stop strings do cut something
  got = native.generate_until(requests("generate_until", [(p, {"until": stop})
                                                          for p in prompts]))
  gin_utils.parse([os.path.join(model_dir, "operative_config.gin"), "runs/sample.gin"],
                  ONE_DEVICE + ["sample.temperature = 0", "sample.max_new_tokens = 24",
                                f"sample.stop = {stop!r}"])
  sampled = sample_lib.sample(model_dir, prompts)
  assert got == [completion.text for completion in sampled]
  assert [t.split(" ")[0].split("\n")[0] for t in free] == got


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model_dir):
  output = tmp_path_factory.mktemp("export") / "hf"
  run_binary("export", "--format=hf", f"--model_dir={model_dir}", f"--output={output}",
             check=True)
  return str(output)


def test_bin_eval_the_native_model_and_lm_eval_hf_agree_on_the_last_word_task(
    model_dir, native, exported):
  hf_module = pytest.importorskip("lm_eval.models.huggingface")
  evaluator = pytest.importorskip("lm_eval.evaluator")
  gin_utils.parse([os.path.join(model_dir, "operative_config.gin"), "runs/eval.gin"],
                  ONE_DEVICE)
  ours = evaluate_lib.evaluate(model_dir, "lambada", str(LAMBADA))
  gin_utils.parse([os.path.join(model_dir, "operative_config.gin"), "runs/lm_eval.gin"],
                  ONE_DEVICE)
  [harness] = harness_run.lm_eval(model_dir, ["gptneo_lambada"])
  hf = hf_module.HFLM(pretrained=exported, device="cpu", batch_size=8)
  spec = specs_lib.load(specs_lib.TASK_DIR / "gptneo_lambada.yaml")
  hf_result = evaluator.simple_evaluate(model=hf, tasks=[spec], bootstrap_iters=0,
                                        log_samples=False)["results"]["gptneo_lambada"]
  assert ours["examples"] == harness["examples"] == 40
  assert ours["accuracy"] == harness["acc"] == hf_result["acc,none"]
  for perplexity in (harness["perplexity"], hf_result["perplexity,none"]):
    assert math.log(perplexity) == pytest.approx(math.log(ours["perplexity"]), abs=1e-4)
  texts = [json.loads(line)["text"] for line in LAMBADA.read_text().splitlines()]
  pairs = [(t.rpartition(" ")[0], " " + t.rpartition(" ")[2]) for t in texts]
  for (a, greedy_a), (b, greedy_b) in zip(native.loglikelihood(requests("loglikelihood", pairs)),
                                          hf.loglikelihood(requests("loglikelihood", pairs)),
                                          strict=True):
    assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b


def test_bin_lm_eval_runs_offline_tasks_with_no_network(tmp_path, model_dir, monkeypatch):
  # Every socket connect outside this machine fails and is recorded; the proxies lead nowhere.
  (tmp_path / "sitecustomize.py").write_text(
      "import socket\n"
      "_connect = socket.socket.connect\n"
      "def connect(self, address):\n"
      "  if self.family in (socket.AF_INET, socket.AF_INET6):\n"
      f"    open({str(tmp_path / 'attempts')!r}, 'a').write(repr(address) + '\\n')\n"
      "    raise OSError('no network in this test')\n"
      "  return _connect(self, address)\n"
      "socket.socket.connect = connect\n")
  for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
    monkeypatch.setenv(name, "http://127.0.0.1:9")  # a port nothing listens on
  result = run_binary("lm_eval", f"--model_dir={model_dir}", "--limit=5",
                      "--tasks=gptneo_lambada,gptneo_hellaswag,gptneo_wikitext",
                      pythonpath=[tmp_path], check=True)
  assert not (tmp_path / "attempts").exists()
  records = [json.loads(line) for line in result.stdout.splitlines()]
  assert [r["task"] for r in records] == ["gptneo_lambada", "gptneo_hellaswag",
                                          "gptneo_wikitext"]
  assert all(r["examples"] == 5 and r["step"] == 30 for r in records)
  assert {"acc", "perplexity"} <= set(records[0]) and {"acc", "acc_norm"} <= set(records[1])
  assert {"word_perplexity", "byte_perplexity", "bits_per_byte"} <= set(records[2])
  with open(os.path.join(model_dir, "eval.jsonl")) as f:
    assert [json.loads(line) for line in f.readlines()[-3:]] == records


def test_unknown_task_is_one_line_naming_where_tasks_were_looked_for(tmp_path):
  with pytest.raises(ValueError) as error:
    specs_lib.find(["gptneo_lambada", "no_such_task"], [tmp_path])
  assert str(error.value) == (
      f"harness task 'no_such_task' not found in {specs_lib.TASK_DIR}, {tmp_path} nor among "
      f"lm-eval's tasks; name a task: field of a YAML file there (e.g. gptneo_lambada)")


def test_malformed_task_line_is_one_line_naming_the_file_and_line(tmp_path, model_dir):
  yaml = (specs_lib.TASK_DIR / "gptneo_lambada.yaml").read_text()
  (tmp_path / "mine.yaml").write_text(yaml.replace("task: gptneo_lambada", "task: mine"))
  (tmp_path / "gptneo_lambada.jsonl").write_text('{"text": "a b c"}\n{"text": "a b\n')
  result = run_binary("lm_eval", f"--model_dir={model_dir}", "--tasks=mine",
                      f"--task_dir={tmp_path}")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      f"lm_eval: error: {tmp_path / 'gptneo_lambada.jsonl'} line 2 is not JSON (Unterminated "
      f"string starting at); write one JSON object per line")


def test_training_scores_harness_tasks_into_eval_jsonl_and_tensorboard(tmp_path, small_dataset):
  from tensorflow.compat.v1 import train as tf_train  # pylint: disable=g-import-not-at-top
  from tests.test_train import train_in_process  # pylint: disable=g-import-not-at-top
  train_in_process(tmp_path / "run", small_dataset, 5, "train.eval_batches = 0",
                   'train.harness_tasks = ["gptneo_lambada", "gptneo_wikitext"]',
                   "train.harness_every_n_steps = 2", "train.harness_limit = 4",
                   "train.steps_per_checkpoint = 100")
  with open(tmp_path / "run" / "eval.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [(r["step"], r["task"]) for r in records] == [
      (step, task) for step in (2, 4, 5) for task in ("gptneo_lambada", "gptneo_wikitext")]
  assert all(r["harness"] and r["examples"] == 4 for r in records)
  assert records[0]["perplexity"] != records[2]["perplexity"]  # each step's own checkpoint
  events = [e for path in (tmp_path / "run").glob("events.out.tfevents.*")
            for e in tf_train.summary_iterator(str(path))]
  tags = {(e.step, v.tag) for e in events for v in e.summary.value}
  assert {(2, "harness/gptneo_lambada/acc"), (4, "harness/gptneo_lambada/perplexity"),
          (5, "harness/gptneo_wikitext/bits_per_byte")} <= tags


def test_unknown_training_harness_task_is_refused_before_training(tmp_path, small_dataset):
  from tests.test_train import train_in_process  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="harness task 'nope' not found in "):
    train_in_process(tmp_path / "run", small_dataset, 5, 'train.harness_tasks = ["nope"]')
  assert not (tmp_path / "run").exists()


def scored(model_dir, spec, precision="float32"):
  """gptneo_lambada's first 12 examples through a Scorer on mesh `spec`."""
  task = specs_lib.find(["gptneo_lambada"])
  [record] = harness_run.Scorer(gpt_lib.GPT(), runtime.Runtime(spec), model_dir, task, 4,
                                precision, limit=12)()
  return record


def test_a_mesh_of_two_devices_and_bfloat16_score_as_one_device(model_dir):
  gin_utils.parse([os.path.join(model_dir, "operative_config.gin")], ONE_DEVICE)
  one = scored(model_dir, mesh_lib.mesh())
  for mesh_shape, layout in (("x:2", "batch:x"), ("x:2", "heads:x,vocab:x")):
    split = scored(model_dir, mesh_lib.mesh(mesh_shape=mesh_shape, layout=layout))
    assert split["acc"] == one["acc"]
    assert math.log(split["perplexity"]) == pytest.approx(math.log(one["perplexity"]), abs=1e-4)
  bf16 = scored(model_dir, mesh_lib.mesh(), "bfloat16")
  assert math.log(bf16["perplexity"]) == pytest.approx(math.log(one["perplexity"]), rel=0.02)


@pytest.mark.parametrize("content, why", [
    (b"- task: mine\n  dataset_path: json\n", "no top-level task: field"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not text"),
])
def test_a_task_yaml_that_is_no_task_is_named_when_its_task_is_not_found(tmp_path, content,
                                                                          why):
  (tmp_path / "a_group.yaml").write_text("group: mine_all\ntask: []\n")  # no task, no mistake
  (tmp_path / "mine.yaml").write_bytes(content)
  with pytest.raises(ValueError) as error:
    specs_lib.find(["mine"], [tmp_path])
  assert str(error.value) == (
      f"harness task 'mine' not found in {specs_lib.TASK_DIR}, {tmp_path} nor among lm-eval's "
      f"tasks; {tmp_path / 'mine.yaml'} could not be read as a task ({why}); name a task: field "
      f"of a YAML file there (e.g. gptneo_lambada)")


def test_a_comment_after_the_task_name_is_no_part_of_it(tmp_path):
  yaml = (specs_lib.TASK_DIR / "gptneo_lambada.yaml").read_text()
  (tmp_path / "mine.yaml").write_text(yaml.replace(
      "task: gptneo_lambada", "task: mine   # lambada_openai's data, read offline"))
  (tmp_path / "other.yaml").write_text("task: other  # a comment\n"
                                       "process_docs: !function utils.process_docs\n")
  (tmp_path / "gptneo_lambada.jsonl").write_text('{"text": "a b c"}\n')
  [config] = specs_lib.find(["mine"], [tmp_path])
  assert config["task"] == "mine"
  assert specs_lib._index([tmp_path]) == (  # pylint: disable=protected-access
      {"mine": tmp_path / "mine.yaml", "other": tmp_path / "other.yaml"}, [])


def test_a_limited_run_has_its_own_tensorboard_tags_beside_a_full_one(neo_model_dir, tmp_path):
  from tests.test_eval_sample import _tensorboard_scalars  # pylint: disable=g-import-not-at-top
  model_dir = tmp_path / "run"
  shutil.copytree(neo_model_dir, model_dir, ignore=shutil.ignore_patterns("eval"))  # others'
  [record] = [json.loads(line) for line in run_binary(
      "lm_eval", f"--model_dir={model_dir}", "--limit=3", "--tasks=gptneo_lambada",
      check=True).stdout.splitlines()]
  tags = {tag for step, tag in _tensorboard_scalars(model_dir / "eval")
          if step == record["step"]}
  assert "harness_limit3/gptneo_lambada/acc" in tags
  assert not any(tag.startswith("harness/") for tag in tags)
