"""HF interop: exported models of ours and imported HF models compute the same logits.

Every architecture we export (GPT-Neo, GPT-2, GPT-NeoX) is checked on random weights: HF's
logits equal ours (< 1e-4, fp32), 32 greedy tokens are the same, and bin/import_hf reads the
folder back into the same logits. The tests that run HF's model need torch and transformers
(requirements-interop.txt); they skip without them. The refusals need neither.
"""
import ast
import json
import math
import os
import shutil

import gin
import numpy as np
import pytest

from gptneo import checkpoints
from gptneo import gin_utils
from gptneo import hf
from gptneo import inference
from gptneo import mesh as mesh_lib
from gptneo import runtime
from gptneo import sample as sample_lib
from gptneo.compat import tf
from gptneo.errors import UserError
from gptneo.model import gpt as gpt_lib
from gptneo.model import positions as positions_lib
from tests.conftest import REPO, VOCAB, run_binary
from tests.test_errors import assert_one_line_error

ONE_DEVICE = ['mesh.mesh_shape = ""', 'mesh.layout = ""']


def hf_libraries():
  torch = pytest.importorskip("torch", reason="HF interop tests need torch "
                              "(pip install -r requirements-interop.txt)")
  transformers = pytest.importorskip("transformers", reason="HF interop tests need "
                                     "transformers (pip install -r requirements-interop.txt)")
  return torch, transformers


def our_logits(model_dir, ids):
  gin_utils.parse([os.path.join(model_dir, "operative_config.gin")], ONE_DEVICE)
  restored = inference.RestoredModel(gpt_lib.GPT(), runtime.Runtime(mesh_lib.mesh()), model_dir,
                                     len(ids))
  restored.restore()
  return restored.all_logits(np.asarray(ids, np.int32))


def hf_logits(hf_model, ids):
  torch, _ = hf_libraries()
  with torch.no_grad():
    return hf_model(torch.tensor(np.asarray(ids))).logits.float().numpy()


def random_ids(n_ctx, rows=2, seed=0):
  return np.random.default_rng(seed).integers(0, VOCAB, [rows, n_ctx])


@pytest.fixture(scope="module")
def exported(tmp_path_factory, neo_model_dir):
  output = tmp_path_factory.mktemp("export") / "hf"
  run_binary("export", "--format=hf", f"--model_dir={neo_model_dir}", f"--output={output}",
             check=True)
  return str(output)


def import_random_hf_gpt_neo(tmp_path, exported, seed, max_shard_size="5GB", **config):
  """A random GPT-Neo (std 0.2) saved in tmp_path/hf and imported by bin/import_hf into
  tmp_path/ours, with the exported model's tokenizer; returns the HF model."""
  torch, transformers = hf_libraries()
  torch.manual_seed(seed)
  hf_model = transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(
      vocab_size=VOCAB, max_position_embeddings=64, num_heads=4, window_size=8,
      bos_token_id=0, eos_token_id=0, initializer_range=0.2, **config)).eval()
  hf_model.save_pretrained(tmp_path / "hf", max_shard_size=max_shard_size)
  shutil.copy(os.path.join(exported, "tokenizer.json"), tmp_path / "hf")
  run_binary("import_hf", f"--hf_dir={tmp_path / 'hf'}", f"--model_dir={tmp_path / 'ours'}",
             check=True)
  return hf_model


def test_import_of_a_random_hf_gpt_neo_gives_its_logits_and_tokens(tmp_path, exported):
  _, transformers = hf_libraries()
  hf_model = import_random_hf_gpt_neo(
      tmp_path, exported, seed=0, hidden_size=48, num_layers=3, intermediate_size=96,
      attention_types=[[["global", "local"], 1], [["local"], 1]])
  ids = random_ids(64)
  difference = np.abs(our_logits(str(tmp_path / "ours"), ids) - hf_logits(hf_model, ids))
  assert difference.max() < 1e-4
  # Random weights (std 0.2) continue with varied tokens: a stronger check than a tiny
  # trained model, whose greedy text repeats one token.
  hf_ids = _hf_greedy(hf_model, transformers.AutoTokenizer.from_pretrained(exported), "def ")
  assert len(set(hf_ids)) > 8
  ours = inference.load_tokenizer(str(tmp_path / "ours"))
  assert _our_greedy(str(tmp_path / "ours"), "def ") == ours.decode(hf_ids)


def test_exported_model_gives_our_logits_and_greedy_tokens(exported, neo_model_dir):
  _, transformers = hf_libraries()
  hf_model, info = transformers.GPTNeoForCausalLM.from_pretrained(exported,
                                                                  output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  ids = random_ids(64)
  difference = np.abs(our_logits(neo_model_dir, ids) - hf_logits(hf_model.eval(), ids))
  assert difference.max() < 1e-4
  tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
  assert tokenizer.is_fast
  prompt = "def main(argv):\n"
  ours = inference.load_tokenizer(neo_model_dir)
  assert tokenizer(prompt).input_ids == ours.encode(prompt).ids
  hf_ids = _hf_greedy(hf_model, tokenizer, prompt)
  assert _our_greedy(neo_model_dir, prompt) == ours.decode(hf_ids)


def _hf_greedy(hf_model, tokenizer, prompt):
  torch, _ = hf_libraries()
  prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
  out = hf_model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                          max_new_tokens=32, do_sample=False)[0, prompt_ids.shape[1]:]
  out = out.tolist()
  return out[:out.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in out else out


def _our_greedy(model_dir, prompt, ids=False):
  gin_utils.parse([os.path.join(model_dir, "operative_config.gin"), "runs/sample.gin"],
                  ONE_DEVICE + ["sample.temperature = 0", "sample.max_new_tokens = 32"])
  [completion] = sample_lib.sample(model_dir, [prompt])
  return completion.ids if ids else completion.text


def test_bfloat16_export_loads_as_bfloat16(tmp_path, neo_model_dir, exported):
  torch, transformers = hf_libraries()
  run_binary("export", f"--model_dir={neo_model_dir}", f"--output={tmp_path / 'bf16'}",
             '--gin_param=export_hf.dtype = "bfloat16"', check=True)
  model = transformers.GPTNeoForCausalLM.from_pretrained(tmp_path / "bf16")
  assert model.transformer.wte.weight.dtype == torch.bfloat16
  f32 = transformers.GPTNeoForCausalLM.from_pretrained(exported)
  ids = random_ids(64, rows=1)
  assert np.abs(hf_logits(model, ids) - hf_logits(f32, ids)).max() < 0.25


def test_export_writes_gpt_neo_config(exported):
  with open(os.path.join(exported, "config.json")) as f:
    config = json.load(f)
  assert config["model_type"] == "gpt_neo" and config["attention_types"] == [
      [["global"], 1], [["local"], 1]]
  assert config["window_size"] == 16 and config["activation_function"] == "gelu_new"


@pytest.mark.parametrize("args, line", [
    (["--gin_param=GPT.activation = @selu", "--gin_param=GPT.feed_forward = @glu"],
     "HF GPT-Neo cannot express this model: GPT.activation = selu (HF GPT-Neo: ['gelu', "
     "'gelu_tanh', 'relu', 'silu']); GPT.feed_forward = @glu (HF GPT-Neo: @mlp)"),
    (["--architecture=gpt2"], "HF GPT-2 (--architecture=gpt2) cannot express this model: "
     "GPT.attention_layers uses ['local'] (HF GPT-2: ['global'])"),
    (["--architecture=gpt_neox"], "HF GPT-NeoX (--architecture=gpt_neox) cannot express this "
     "model: GPT.positions = @LearnedPositions() (HF GPT-Neo and GPT-2: @LearnedPositions(), "
     "HF GPT-NeoX and GPT-J: @RotaryPositions()); GPT.attention_layers uses ['local'] (HF "
     "GPT-NeoX: ['global'])"),
    (["--gin_param=GPT.positions = @AxialPositions()"], "HF GPT-Neo cannot express this "
     "model: GPT.positions = @AxialPositions() (HF GPT-Neo and GPT-2: @LearnedPositions(), "
     "HF GPT-NeoX and GPT-J: @RotaryPositions())"),
])
def test_export_refuses_what_the_architecture_cannot_compute(tmp_path, neo_model_dir, args,
                                                            line):
  result = run_binary("export", f"--model_dir={neo_model_dir}", f"--output={tmp_path / 'x'}",
                      *args)
  assert_one_line_error(result, "export")
  assert result.stderr.strip().splitlines()[-1] == f"export: error: {line}"
  assert not (tmp_path / "x").exists()


_ROTARY = positions_lib.RotaryPositions
FEATURE_REFUSALS = [  # (GPT knobs beyond tiny ones, --architecture, the line)
    ({"parallel_residual": True}, "auto", "HF GPT-Neo cannot express this model: "
     "GPT.parallel_residual = True (HF GPT-Neo: False)"),
    ({"qkv_bias": True}, "gpt_neo", "HF GPT-Neo (--architecture=gpt_neo) cannot express this "
     "model: GPT.qkv_bias = True (HF GPT-Neo: False)"),
    ({"positions": _ROTARY(), "attention_layers": ["global", "local"]}, "gptj", "HF GPT-J "
     "(--architecture=gptj) cannot express this model: RotaryPositions.interleaved = False "
     "(HF GPT-J: True); GPT.attention_layers uses ['local'] (HF GPT-J: ['global']); "
     "GPT.parallel_residual = False (HF GPT-J: True); GPT.shared_layer_norm = False (HF "
     "GPT-J: True); GPT.tie_embeddings = True (HF GPT-J: False); GPT.lm_head_bias = False "
     "(HF GPT-J: True)"),
    ({"positions": _ROTARY(interleaved=True, base=500.0), "parallel_residual": True,
      "shared_layer_norm": True}, "auto", "HF GPT-J cannot express this model: "
     "RotaryPositions.base = 500.0 (HF GPT-J: 10000); GPT.tie_embeddings = True (HF GPT-J: "
     "False); GPT.lm_head_bias = False (HF GPT-J: True)"),
    ({"positions": _ROTARY(), "parallel_residual": True, "shared_layer_norm": True}, "auto",
     "HF GPT-NeoX cannot express this model: GPT.shared_layer_norm = True (HF GPT-NeoX: "
     "False)"),
]


@pytest.mark.parametrize("knobs, architecture, line", FEATURE_REFUSALS)
def test_export_refuses_a_feature_the_family_lacks(knobs, architecture, line):
  model = gpt_lib.GPT(n_layer=2, n_embd=32, n_head=4, n_ctx=64, n_vocab=VOCAB, window_size=8,
                      **knobs)
  with pytest.raises(UserError) as error:
    hf.check_exportable(model, architecture)
  assert str(error.value) == line


def test_import_refuses_another_architecture(tmp_path):
  (tmp_path / "llama").mkdir()
  (tmp_path / "llama" / "config.json").write_text(json.dumps(
      {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2}))
  result = run_binary("import_hf", f"--hf_dir={tmp_path / 'llama'}",
                      f"--model_dir={tmp_path / 'ours'}")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      f"import_hf: error: {tmp_path / 'llama'} holds a 'llama' model (LlamaForCausalLM); only "
      f"HF GPT-Neo, HF GPT-2, HF GPT-NeoX, HF GPT-J (model_type 'gpt_neo', 'gpt2', "
      f"'gpt_neox', 'gptj') can be imported")


def test_import_without_weights_is_one_line(tmp_path, exported):
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  shutil.copy(os.path.join(exported, "config.json"), hf_dir)
  result = run_binary("import_hf", f"--hf_dir={hf_dir}", f"--model_dir={tmp_path / 'ours'}")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      f"import_hf: error: {hf_dir} has neither model.safetensors nor "
      f"model.safetensors.index.json; save the HF model with safe_serialization=True (.bin "
      f"weights are not supported)")
  assert not (tmp_path / "ours").exists()


def test_import_reads_sharded_weights(tmp_path, exported):
  hf_model = import_random_hf_gpt_neo(
      tmp_path, exported, seed=1, hidden_size=32, num_layers=2,
      attention_types=[[["global", "local"], 1]], max_shard_size="40KB")
  assert (tmp_path / "hf" / hf.WEIGHTS_INDEX).exists()
  assert not (tmp_path / "hf" / hf.WEIGHTS_FILE).exists()
  ids = random_ids(64)
  difference = np.abs(our_logits(str(tmp_path / "ours"), ids) - hf_logits(hf_model, ids))
  assert difference.max() < 1e-4


def test_imported_model_fine_tunes_with_init_from(tmp_path, exported, neo_model_dir):
  imported = tmp_path / "imported"
  run_binary("import_hf", f"--hf_dir={exported}", f"--model_dir={imported}", check=True)
  data = os.path.join(os.path.dirname(neo_model_dir), "data")
  run_binary("train", "--gin_file=tiny.gin", f"--gin_file={imported / 'model.gin'}",
             f"--model_dir={tmp_path / 'tuned'}", f'--gin_param=DATASET_DIR = "{data}"',
             "--gin_param=train.train_steps = 2", "--gin_param=train.log_every_n_steps = 1",
             "--gin_param=train.eval_batches = 0",
             f'--gin_param=train.init_from = "{imported}"', check=True)
  with open(tmp_path / "tuned" / "train_metrics.jsonl") as f:
    first_loss = json.loads(f.readline())["loss"]
  assert first_loss < math.log(VOCAB) - 0.5  # a fresh model starts near ln(vocab)


# A hand-written GPT-Neo config.json (what GPTNeoConfig().to_dict() holds that import reads).
NEO_CONFIG = {"model_type": "gpt_neo", "architectures": ["GPTNeoForCausalLM"],
              "vocab_size": VOCAB, "max_position_embeddings": 64, "hidden_size": 32,
              "num_layers": 2, "num_heads": 4, "intermediate_size": None,
              "attention_types": [[["global", "local"], 1]], "window_size": 8,
              "activation_function": "gelu_new", "layer_norm_epsilon": 1e-05,
              "initializer_range": 0.02, "embed_dropout": 0.0, "attention_dropout": 0.0,
              "resid_dropout": 0.0, "tie_word_embeddings": True}


def test_import_writes_config_values_as_gin_literals():
  assert hf.gin_bindings(NEO_CONFIG) == [
      "GPT.n_layer = 2", "GPT.n_embd = 32", "GPT.n_head = 4", "GPT.n_ctx = 64",
      f"GPT.n_vocab = {VOCAB}", "GPT.mlp_ratio = 4", "GPT.feed_forward = @mlp",
      "GPT.activation = @gelu_tanh", "GPT.attention_layers = [[['global', 'local'], 1]]",
      "GPT.window_size = 8", "GPT.scale_attention = False",
      "GPT.positions = @LearnedPositions()", "GPT.tie_embeddings = True",
      "GPT.layer_norm_epsilon = 1e-05", "GPT.embed_dropout = 0.0", "GPT.attn_dropout = 0.0",
      "GPT.res_dropout = 0.0", "GPT.init_std = 0.02"]


@pytest.mark.parametrize("key, value, expected", [
    ("layer_norm_epsilon", "1e-5\nsample.temperature = 9.0", "(a JSON string), expected a "
     "positive number"),
    ("num_layers", True, "(a JSON boolean), expected a positive integer"),
    ("num_heads", 0, "(a JSON integer), expected a positive integer"),
    ("window_size", 8.0, "(a JSON number), expected a positive integer"),
    ("embed_dropout", 1.5, "expected a number in [0, 1)"),
    ("activation_function", ["relu"], "expected one of ['gelu', 'gelu_new', 'relu'"),
    ("attention_types", [[["global", "linear"], 1]], "the names among ['global', 'local']"),
    ("attention_types", [["global", 2]], "expected a list of [[type names], count] pairs"),
    ("attention_types", [[["global"], "2\nsample.x = 1"]], "a list of [[type names], count]"),
    ("tie_word_embeddings", "false", "(a JSON string), expected true or false"),
])
def test_import_refuses_a_config_value_of_the_wrong_type(tmp_path, key, value, expected):
  path = tmp_path / "config.json"
  path.write_text(json.dumps(dict(NEO_CONFIG, **{key: value})))
  with pytest.raises(UserError) as error:
    hf.gin_bindings(hf.read_hf_config(str(tmp_path)), str(path))
  message = str(error.value)
  assert message.startswith(f"{path}: {key} = {value!r} ") and expected in message
  assert "\n" not in message and message.endswith("; fix config.json")


def test_a_folder_name_reaches_gin_as_a_string_not_a_line(tmp_path, exported):
  hf_dir = tmp_path / "hf\nimport os\n"  # a name a download or an archive can give a folder
  shutil.copytree(exported, hf_dir)
  run_binary("import_hf", f"--hf_dir={hf_dir}", f"--model_dir={tmp_path / 'ours'}", check=True)
  for name in (hf.MODEL_GIN, "operative_config.gin"):
    text = (tmp_path / "ours" / name).read_text()
    assert "import os" not in text.splitlines()
    comment = text.splitlines()[0]
    assert comment.startswith("# Imported from the HF GPT-Neo folder ")
    written = comment.removeprefix("# Imported from the HF GPT-Neo folder ").removesuffix(
        " by bin/import_hf.")
    assert ast.literal_eval(written) == str(hf_dir)
    gin_utils.check_model_config(name, text)  # and it is read as the model dir it is


def test_import_refuses_a_config_value_that_would_inject_gin(tmp_path):
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  (hf_dir / "config.json").write_text(json.dumps(
      dict(NEO_CONFIG, layer_norm_epsilon="1e-5\nsample.temperature = 9.0")))
  result = run_binary("import_hf", f"--hf_dir={hf_dir}", f"--model_dir={tmp_path / 'ours'}")
  assert_one_line_error(result, "import_hf", (
      f"{hf_dir / 'config.json'}: layer_norm_epsilon = '1e-5\\nsample.temperature = 9.0' (a "
      f"JSON string), expected a positive number; fix config.json"))
  assert not (tmp_path / "ours").exists() or not os.listdir(tmp_path / "ours")


# --- Every architecture we export, on random weights: HF computes our logits and greedy
# tokens, and bin/import_hf reads the folder back into the same logits.

def random_model_dir(root, gin_files, bindings, tokenizer_file, std=0.2, seed=0):
  """A model dir of random weights: its operative config from gin_files + bindings (and
  GPT.n_vocab = VOCAB), step 0 drawn from N(0, std) (LayerNorm gains from N(1, std), so
  biases and norms matter too), and `tokenizer_file`."""
  model_dir = os.path.join(root, "ours")
  os.makedirs(model_dir)
  gin_utils.parse(gin_files, ONE_DEVICE + [f"GPT.n_vocab = {VOCAB}"] + bindings)
  model = gpt_lib.GPT()
  with open(os.path.join(model_dir, inference.OPERATIVE_CONFIG), "w") as f:
    f.write(gin.operative_config_str())
  shutil.copy(tokenizer_file, os.path.join(model_dir, inference.TOKENIZER_FILE))
  restored = inference.RestoredModel(model, runtime.Runtime(mesh_lib.mesh()), model_dir, 1)
  rng = np.random.default_rng(seed)
  with restored.graph.as_default():
    restored.checkpoints.restore_or_initialize(restored.session)
    for variable in tf.global_variables():
      mean = 1.0 if variable.op.name.endswith("/g") else 0.0
      variable.load(rng.normal(mean, std, variable.shape.as_list()).astype(np.float32),
                    restored.session)
    restored.session.run(restored.lowering.copy_masters_to_slices())
    restored.checkpoints.save(restored.session, 0)
  return model_dir


def export(model_dir, output, architecture="auto"):
  """bin/export's code, in this process: the model dir as an HF folder at `output`."""
  gin_utils.parse([os.path.join(model_dir, inference.OPERATIVE_CONFIG)],
                  ONE_DEVICE + ["export_hf.model = @GPT()"])
  hf.export_hf(model_dir, str(output), architecture)
  return str(output)


SMALL_GPT3 = ["GPT.n_layer = 2", "GPT.n_embd = 64", "GPT.n_head = 4", "GPT.n_ctx = 64",
              'DATASET_DIR = "unused"']
ROTARY = ["GPT.positions = @RotaryPositions()", "RotaryPositions.fraction = 0.25"]
MIXED = ['GPT.attention_layers = [[["global", "local"], 2]]', "GPT.window_size = 64"]
GPTJ_KNOBS = ["RotaryPositions.interleaved = True", "GPT.parallel_residual = True",
              "GPT.shared_layer_norm = True", "GPT.tie_embeddings = False",
              "GPT.lm_head_bias = True"]
MUP = ['GPT.parametrization = "mup"', "GPT.mup_base_width = 32"]
EXPORTS = {  # name: (gin files, bindings, --architecture, HF class, greedy check[, std])
    "make demo's tiny.gin": (["tiny.gin"], [], "auto", "GPTNeoForCausalLM", True),
    "tiny.gin as GPT-2": (["tiny.gin"], [], "gpt2", "GPT2LMHeadModel", True),
    "gpt3_small.gin, small dims": (["gpt3_small.gin"], SMALL_GPT3, "auto", "GPTNeoForCausalLM",
                                   False),
    "gpt3_small.gin as GPT-2": (["gpt3_small.gin"], SMALL_GPT3, "gpt2", "GPT2LMHeadModel",
                                True),
    "global + local, scaled": (["tiny.gin"], MIXED, "auto", "GPTNeoForCausalLM", False),
    "rotary": (["tiny.gin"], ROTARY, "auto", "GPTNeoXForCausalLM", True),
    "rotary, untied": (["tiny.gin"], ROTARY + ["GPT.tie_embeddings = False"], "gpt_neox",
                       "GPTNeoXForCausalLM", False),
    "untied GPT-2": (["tiny.gin"], ["GPT.tie_embeddings = False"], "gpt2", "GPT2LMHeadModel",
                     False),
    # GPT-NeoX always scales q·k: sqrt(d_head) is folded into the queries. Unscaled scores of
    # std-0.2 weights saturate the softmax, where fp32 rounding alone moves logits by 1e-3.
    "rotary, unscaled": (["tiny.gin"], ROTARY + ["GPT.scale_attention = False"], "auto",
                         "GPTNeoXForCausalLM", False, 0.05),
    # GPT-J's features trained by us: our attention output bias (random, where an imported
    # one is zero) is carried by fc_out's. (The families' import and export back: below.)
    "GPT-J's features": (["tiny.gin"], ROTARY + GPTJ_KNOBS, "auto", "GPTJForCausalLM", True),
    # muP (width 4x its base): the q·k scale folded into the queries, the logits' multiplier
    # into ln_f (and the output bias); HF computes the standard model these weights make.
    "muP": (["tiny.gin"], MUP, "auto", "GPTNeoForCausalLM", True),
    # (and a tuned output multiplier, folded with the width's)
    "muP, GPT-J's features": (["tiny.gin"], MUP + ["GPT.mup_output_multiplier = 4.0"] + ROTARY
                              + GPTJ_KNOBS, "auto", "GPTJForCausalLM", False),
}


@pytest.mark.parametrize("name", EXPORTS)
def test_export_gives_our_logits_and_greedy_tokens_and_imports_back(tmp_path, small_dataset,
                                                                    name):
  _, transformers = hf_libraries()
  gin_files, bindings, architecture, hf_class, greedy, *std = EXPORTS[name]
  ours = random_model_dir(tmp_path, gin_files, bindings,
                          os.path.join(small_dataset, "tokenizer.json"), *std)
  output = export(ours, tmp_path / "hf", architecture)
  hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(output,
                                                                     output_loading_info=True)
  assert type(hf_model).__name__ == hf_class
  assert not any(info.values()), info  # no missing, unexpected or mismatched weights
  ids = random_ids(gpt_lib.GPT().n_ctx)
  logits = our_logits(ours, ids)
  assert np.abs(logits - hf_logits(hf_model.eval(), ids)).max() < 1e-4
  if greedy:  # random weights (std 0.2) continue with varied tokens
    hf_ids = _hf_greedy(hf_model, transformers.AutoTokenizer.from_pretrained(output), "def ")
    assert len(set(hf_ids)) > 4 and _our_greedy(ours, "def ", ids=True) == hf_ids
  _import_in_process(output, tmp_path / "back")
  assert np.abs(our_logits(str(tmp_path / "back"), ids) - logits).max() < 1e-4


def test_make_demo_model_exports_with_bin_export(tmp_path, small_dataset):
  """As a user after make demo: bin/export with no --architecture, then transformers."""
  _, transformers = hf_libraries()
  ours = random_model_dir(tmp_path, ["tiny.gin"], [],
                          os.path.join(small_dataset, "tokenizer.json"), std=0.02)
  run_binary("export", "--format=hf", f"--model_dir={ours}", f"--output={tmp_path / 'hf'}",
             check=True)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
  with open(tmp_path / "hf" / "config.json") as f:
    assert json.load(f)["architectures"] == ["GPTNeoForCausalLM"]
  ids = random_ids(256)
  assert np.abs(our_logits(ours, ids) - hf_logits(hf_model.eval(), ids)).max() < 1e-4


def text_lines(count):
  """`count` non-blank lines of our docs and README: text the tokenizer was not trained on."""
  lines = []
  for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
    lines += [line for line in path.read_text().splitlines() if line.strip()]
  assert len(lines) >= count
  return lines[:count]


def test_exported_tokenizer_gives_our_ids(exported, neo_model_dir):
  _, transformers = hf_libraries()
  tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
  assert isinstance(tokenizer, transformers.PreTrainedTokenizerFast)
  ours = inference.load_tokenizer(neo_model_dir)
  lines = text_lines(300)
  assert [tokenizer(line).input_ids for line in lines] == [ours.encode(line).ids
                                                           for line in lines]
  assert tokenizer("\n".join(lines)).input_ids == ours.encode("\n".join(lines)).ids


def save_random_hf(tmp_path, exported, config, zero=()):
  """A random HF model of `config` (std 0.2, biases and norms too; the weights named in
  `zero` zeroed) saved in tmp_path/hf with the exported model's tokenizer."""
  torch, transformers = hf_libraries()
  torch.manual_seed(0)
  hf_model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for name, parameter in hf_model.named_parameters():
      parameter.normal_(1.0 if "norm" in name or "ln" in name else 0.0, 0.2)
      if any(name.endswith(z) for z in zero):
        parameter.zero_()
  hf_model.save_pretrained(tmp_path / "hf")
  shutil.copy(os.path.join(exported, "tokenizer.json"), tmp_path / "hf")
  return hf_model


def hf_test_configs():
  _, transformers = hf_libraries()
  shape = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 0}
  return {
      "gpt2": transformers.GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=64,
                                      resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, **shape),
      "gpt_neox": transformers.GPTNeoXConfig(
          hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
          max_position_embeddings=64, use_parallel_residual=False, hidden_act="gelu_new",
          rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                           "partial_rotary_factor": 0.5}, **shape),
      "gptj": transformers.GPTJConfig(n_embd=48, n_layer=2, n_head=4, n_positions=64,
                                      rotary_dim=4, **shape)}


@pytest.mark.parametrize("model_type, qkv_bias", [("gpt2", "attn.c_attn.bias"),
                                                  ("gpt_neox", "query_key_value.bias")])
def test_import_of_a_random_hf_model_gives_its_logits(tmp_path, exported, model_type,
                                                      qkv_bias):
  hf_model = save_random_hf(tmp_path, exported, hf_test_configs()[model_type], [qkv_bias])
  run_binary("import_hf", f"--hf_dir={tmp_path / 'hf'}", f"--model_dir={tmp_path / 'ours'}",
             check=True)
  ids = random_ids(64)
  difference = np.abs(our_logits(str(tmp_path / "ours"), ids) - hf_logits(hf_model, ids))
  assert difference.max() < 1e-4


@pytest.mark.parametrize("model_type, change, line", [
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "config.json: "
     "scale_attn_by_inverse_layer_idx = True, but ours computes only false (ours scales q·k "
     "the same in every layer); this model can't be imported (yet)"),
    ("gptj", {"tie_word_embeddings": True}, "config.json: tie_word_embeddings = True, but "
     "ours computes only false (ours ties no output projection that has a bias); this model "
     "can't be imported (yet)"),
])
def test_import_refuses_what_ours_cannot_compute(tmp_path, exported, model_type, change, line):
  config = hf_test_configs()[model_type]
  for key, value in change.items():
    setattr(config, key, value)
  save_random_hf(tmp_path, exported, config)
  result = run_binary("import_hf", f"--hf_dir={tmp_path / 'hf'}",
                      f"--model_dir={tmp_path / 'ours'}")
  assert_one_line_error(result, "import_hf", line)
  assert not (tmp_path / "ours").exists() or not os.listdir(tmp_path / "ours")


# --- Weights that are not the model config.json describes, and models ours can't compute:
# refused in one line naming the file or tensor, before anything is written.

@pytest.fixture(scope="module")
def random_hf_neo(tmp_path_factory, small_dataset):
  """A tiny random HF GPT-Neo folder of NEO_CONFIG (save_pretrained), with the small
  dataset's tokenizer."""
  torch, transformers = hf_libraries()
  folder = tmp_path_factory.mktemp("random_hf") / "neo"
  torch.manual_seed(0)
  shape = {k: v for k, v in NEO_CONFIG.items() if k not in ("model_type", "architectures")}
  transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(
      bos_token_id=0, eos_token_id=0, **shape)).save_pretrained(folder)
  shutil.copy(os.path.join(small_dataset, "tokenizer.json"), folder)
  return folder


def _edit_config(folder, **changes):
  path = folder / "config.json"
  path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))


def _edit_weights(folder, edit):
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  path = folder / hf.WEIGHTS_FILE
  tensors = dict(safetensors.numpy.load_file(path))
  edit(tensors)
  safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


def _index(folder, text):
  (folder / hf.WEIGHTS_INDEX).write_text(text)


WTE = "transformer.wte.weight"
BAD_HF_FOLDERS = {  # name: (edit of the folder, fragments of the one line ({hf}: the folder))
    "wte as [V/2, 2E]": (
        lambda f: _edit_weights(f, lambda t: t.update({WTE: t[WTE].reshape(VOCAB // 2, 64)})),
        ["{hf}/model.safetensors: transformer.wte.weight has shape [256, 64], but the model "
         "{hf}/config.json describes needs [512, 32]; is {hf}/config.json the one saved "
         "with these weights?"]),
    "a tensor missing": (
        lambda f: _edit_weights(f, lambda t: t.pop("transformer.h.1.ln_2.bias")),
        ["{hf}'s weights lack ['transformer.h.1.ln_2.bias']", "every shard"]),
    "config.json one layer short": (
        lambda f: _edit_config(f, num_layers=1, attention_types=[[["global"], 1]]),
        ["{hf}'s weights hold ['transformer.h.1.attn.attention.k_proj.weight'", "no place for"]),
    "int8 weights": (
        lambda f: _edit_weights(f, lambda t: t.update({WTE: t[WTE].astype(np.int8)})),
        ["transformer.wte.weight holds int8 values, not floating point"]),
    "NaN weights": (
        lambda f: _edit_weights(f, lambda t: t.update({WTE: np.full_like(t[WTE], np.nan)})),
        ["transformer.wte.weight holds NaN or infinite values"]),
    "config.json not JSON": (lambda f: (f / "config.json").write_text("{not json"),
                             ["{hf}/config.json is not readable JSON (Expecting property"]),
    "config.json not UTF-8": (lambda f: (f / "config.json").write_bytes(b"\xff\xfe\x00"),
                              ["{hf}/config.json is not readable JSON ('utf-8' codec"]),
    "config.json's model_type a list": (lambda f: _edit_config(f, model_type=["gpt_neo"]),
                                        ["holds a ['gpt_neo'] model", "can be imported"]),
    "index not JSON": (lambda f: _index(f, "{oops"),
                       ["{hf}/model.safetensors.index.json is not readable JSON"]),
    "index without weight_map": (lambda f: _index(f, "[]"), ["has no weight_map object"]),
    "index naming a file outside": (
        lambda f: _index(f, json.dumps({"weight_map": {WTE: "../neo/model.safetensors"}})),
        ["lists the shard '../neo/model.safetensors', not a file name in {hf}"]),
    "index naming a missing shard": (
        lambda f: _index(f, json.dumps({"weight_map": {WTE: "model-00002.safetensors"}})),
        ["lists the shard model-00002.safetensors, which {hf} lacks"]),
    "tokenizer larger than the vocabulary": (
        lambda f: (_edit_config(f, vocab_size=256),
                   _edit_weights(f, lambda t: t.update({WTE: t[WTE][:256]}))),
        ["its tokenizer has 512 tokens, more than the model's vocab_size = 256"]),
    "tokenizer not JSON": (lambda f: (f / "tokenizer.json").write_text("{oops"),
                           ["{hf} has no usable tokenizer (", "copy the model's tokenizer"]),
}


def _import_in_process(hf_dir, model_dir):
  """bin/import_hf's code, in this process."""
  source = hf.read_source(str(hf_dir))
  gin_utils.parse(["layouts/single.gin"], list(source.bindings))
  return hf.import_hf(source, hf.build_model(source), str(model_dir))



def test_import_reads_no_gin_the_program_parses_the_folders_bindings(tmp_path, random_hf_neo):
  """gin is read at the edge: import_hf writes the model it is given, its config untouched."""
  source = hf.read_source(str(random_hf_neo))
  assert gin.config_str() == ""  # reading the folder bound nothing
  gin_utils.parse(["layouts/single.gin"], list(source.bindings))
  model = hf.build_model(source)
  parsed = gin.config_str()
  hf.import_hf(source, model, str(tmp_path / "ours"))
  assert gin.config_str() == parsed
  written = (tmp_path / "ours" / hf.MODEL_GIN).read_text().splitlines()
  assert written[1:] == list(source.bindings) and "GPT.n_layer = 2" in written


@pytest.mark.parametrize("case", BAD_HF_FOLDERS)
def test_import_refuses_weights_that_are_not_the_configs_model(tmp_path, random_hf_neo, case):
  edit, fragments = BAD_HF_FOLDERS[case]
  hf_dir = tmp_path / "neo"
  shutil.copytree(random_hf_neo, hf_dir)
  edit(hf_dir)
  with pytest.raises(UserError) as error:
    _import_in_process(hf_dir, tmp_path / "ours")
  message = str(error.value)
  assert "\n" not in message
  for fragment in fragments:
    assert fragment.format(hf=hf_dir) in message, message
  assert not (tmp_path / "ours").exists()


def test_import_of_a_wrong_shape_is_one_line_exit_2(tmp_path, random_hf_neo):
  """Issue 21's case as a user ran it: exit 0 into a scrambled model."""
  edit, [line] = BAD_HF_FOLDERS["wte as [V/2, 2E]"]
  hf_dir = tmp_path / "neo"
  shutil.copytree(random_hf_neo, hf_dir)
  edit(hf_dir)
  result = run_binary("import_hf", f"--hf_dir={hf_dir}", f"--model_dir={tmp_path / 'ours'}")
  assert_one_line_error(result, "import_hf", line.format(hf=hf_dir))
  assert not (tmp_path / "ours").exists()


def test_import_reads_bfloat16_weights_and_skips_saved_buffers(tmp_path, random_hf_neo):
  """What save_pretrained writes too: bfloat16 weights, older versions' attention-mask
  buffers, a tied lm_head.weight (HF ties it to wte, as ours does)."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  hf_dir = tmp_path / "neo"
  shutil.copytree(random_hf_neo, hf_dir)

  def edit(tensors):
    tensors.update({name: array.astype(ml_dtypes.bfloat16) for name, array in tensors.items()})
    tensors["lm_head.weight"] = tensors[WTE]
    tensors["transformer.h.0.attn.attention.bias"] = np.tril(np.ones((64, 64), bool))
    tensors["transformer.h.0.attn.attention.masked_bias"] = np.array(-1e9, np.float32)
  _edit_weights(hf_dir, edit)
  checkpoint = _import_in_process(hf_dir, tmp_path / "ours")
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  wte = safetensors.numpy.load_file(hf_dir / hf.WEIGHTS_FILE)[WTE].astype(np.float32)
  np.testing.assert_array_equal(tf.train.load_checkpoint(checkpoint).get_tensor("gpt/wte"), wte)


GPT2_CONFIG = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64,
               "vocab_size": VOCAB}
NEOX_CONFIG = {"model_type": "gpt_neox", "hidden_size": 32, "num_hidden_layers": 2,
               "num_attention_heads": 4, "max_position_embeddings": 64, "vocab_size": VOCAB,
               "use_parallel_residual": False}
GPTJ_CONFIG = {"model_type": "gptj", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64,
               "vocab_size": VOCAB, "rotary_dim": 4}
UNSUPPORTED = {  # name: (config.json, the start of what the line says)
    "GPT-J tied": (dict(GPTJ_CONFIG, tie_word_embeddings=True),
                   "tie_word_embeddings = True, but ours computes only false"),
    "GPT-J rotating more than a head": (dict(GPTJ_CONFIG, rotary_dim=16),
                                        "ours can't build the model it describes "
                                        "(RotaryPositions.fraction = 2.0"),
    "no attention bias": (dict(NEOX_CONFIG, attention_bias=False),
                          "attention_bias = False, but ours computes only true"),
    "scaled RoPE": (dict(NEOX_CONFIG, rope_parameters={"rope_type": "linear", "factor": 2.0}),
                    "rope_type = 'linear', but ours computes only \"default\""),
    "transformers 4's scaled RoPE": (dict(NEOX_CONFIG, rope_scaling={"type": "dynamic"}),
                                     "rope_scaling = {'type': 'dynamic'}, but ours computes "
                                     "only null"),
    "rotary dims not even": (dict(NEOX_CONFIG, rotary_pct=0.1),
                             "ours can't build the model it describes (RotaryPositions."
                             "fraction = 0.1 rotates 0.8 of the 8 dims per head)"),
    "another activation": (dict(NEO_CONFIG, activation_function="quick_gelu"),
                           "activation_function = 'quick_gelu', but ours computes only one of"),
    "a window not dividing the context": (dict(NEO_CONFIG, window_size=7),
                                          "ours can't build the model it describes "
                                          "(GPT.window_size = 7 does not divide GPT.n_ctx = 64)"),
    "a feed-forward width not a multiple": (dict(GPT2_CONFIG, n_inner=50),
                                            "n_inner = 50 is not a multiple of the hidden size "
                                            "32, but ours needs one"),
    "attention scaled per layer": (dict(GPT2_CONFIG, scale_attn_by_inverse_layer_idx=True),
                                   "scale_attn_by_inverse_layer_idx = True, but ours computes "
                                   "only false"),
}


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_import_refuses_a_model_ours_cannot_compute_without_asking_to_edit_it(tmp_path, case):
  """Editing config.json would import a different model: the line says it can't be
  imported, and suggests no edit."""
  config, problem = UNSUPPORTED[case]
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  (hf_dir / "config.json").write_text(json.dumps(config))
  with pytest.raises(UserError) as error:
    _import_in_process(hf_dir, tmp_path / "ours")
  message = str(error.value)
  where = f"{hf_dir / 'config.json'}{' rope_parameters' if 'rope_type' in problem else ''}"
  assert message.startswith(f"{where}: {problem}"), message
  assert message.endswith("; this model can't be imported (yet)"), message
  assert not any(word in message for word in ("fix", "set ", "change", "pick")), message
  assert not (tmp_path / "ours").exists()


# --- The families researchers fine-tune, from their published config.json (pinned below: the
# Hub's gpt2, EleutherAI/pythia-160m and EleutherAI/gpt-j-6b) with only the size keys scaled
# down: a random HF model of each imports exactly (logits, greedy tokens), exports back to
# the same tensors, and fine-tunes with train.init_from on data prepared with the HF
# folder's tokenizer.

GPT2_124M = {  # q/k/v bias, sequential residual, tied, learned positions
    "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
    "attn_pdrop": 0.1, "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256,
    "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2",
    "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024,
    "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1,
    "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
    "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
    "vocab_size": 50257}
PYTHIA_160M = {  # rotary_pct 0.25 (rotate-half), parallel residual with two norms, untied
    "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0,
    "hidden_act": "gelu", "hidden_size": 768, "initializer_range": 0.02,
    "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048,
    "model_type": "gpt_neox", "num_attention_heads": 12, "num_hidden_layers": 12,
    "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.24.0", "use_cache": True,
    "use_parallel_residual": True, "vocab_size": 50304}
GPTJ_6B = {  # interleaved rotary on 64 of 256 dims, parallel residual with one norm, lm_head bias
    "activation_function": "gelu_new", "architectures": ["GPTJForCausalLM"], "attn_pdrop": 0.0,
    "bos_token_id": 50256, "embd_pdrop": 0.0, "eos_token_id": 50256,
    "gradient_checkpointing": False, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05,
    "model_type": "gptj", "n_embd": 4096, "n_head": 16, "n_inner": None, "n_layer": 28,
    "n_positions": 2048, "resid_pdrop": 0.0, "rotary": True, "rotary_dim": 64,
    "scale_attn_weights": True, "summary_activation": None, "summary_first_dropout": 0.1,
    "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
    "tie_word_embeddings": False, "tokenizer_class": "GPT2Tokenizer",
    "transformers_version": "4.18.0.dev0", "use_cache": True, "vocab_size": 50400}
TOKENS = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 0}  # the test tokenizer's
FAMILIES = {  # name: (published config.json, its size keys scaled down, HF class)
    "GPT-2 124M": (GPT2_124M, {"n_layer": 2, "n_embd": 48, "n_head": 4, "n_ctx": 64,
                               "n_positions": 64}, "GPT2LMHeadModel"),
    "Pythia 160M": (PYTHIA_160M, {"num_hidden_layers": 2, "hidden_size": 64,
                                  "num_attention_heads": 4, "intermediate_size": 256,
                                  "max_position_embeddings": 64}, "GPTNeoXForCausalLM"),
    # 16 heads of 256, 64 rotated -> 4 heads of 16, 4 rotated (the same quarter)
    "GPT-J 6B": (GPTJ_6B, {"n_embd": 64, "n_head": 4, "n_layer": 2, "rotary_dim": 4,
                           "n_positions": 64}, "GPTJForCausalLM"),
}


def family_config(name):
  """The transformers config object of a family's scaled-down published config.json."""
  _, transformers = hf_libraries()
  published, scaled, _ = FAMILIES[name]
  # torch_dtype: Pythia's weights are float16; the comparisons need float32 ones.
  values = {k: v for k, v in {**published, **scaled, **TOKENS}.items()
            if k not in ("model_type", "architectures", "transformers_version", "torch_dtype")}
  return transformers.AutoConfig.for_model(published["model_type"], **values)


@pytest.fixture(scope="module", params=list(FAMILIES))
def imported_family(request, tmp_path_factory, exported):
  """(name, HF model, HF folder, our model dir imported by bin/import_hf) of each family."""
  root = tmp_path_factory.mktemp("family")
  hf_model = save_random_hf(root, exported, family_config(request.param))
  run_binary("import_hf", f"--hf_dir={root / 'hf'}", f"--model_dir={root / 'ours'}",
             check=True)
  return request.param, hf_model, root / "hf", str(root / "ours")


def test_import_of_each_family_gives_its_logits_and_greedy_tokens(imported_family, exported):
  name, hf_model, _, ours = imported_family
  _, transformers = hf_libraries()
  assert type(hf_model).__name__ == FAMILIES[name][2]
  ids = random_ids(64)
  assert np.abs(our_logits(ours, ids) - hf_logits(hf_model, ids)).max() < 1e-4
  hf_ids = _hf_greedy(hf_model, transformers.AutoTokenizer.from_pretrained(exported), "def ")
  assert len(hf_ids) == 32 and _our_greedy(ours, "def ", ids=True) == hf_ids


def test_each_family_exports_back_to_the_same_tensors(imported_family, tmp_path):
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  name, hf_model, hf_dir, ours = imported_family
  _, transformers = hf_libraries()
  output = export(ours, tmp_path / "back")  # "auto" picks the family's architecture
  back, info = transformers.AutoModelForCausalLM.from_pretrained(output,
                                                                 output_loading_info=True)
  assert type(back).__name__ == FAMILIES[name][2] and not any(info.values()), info
  original = safetensors.numpy.load_file(hf_dir / hf.WEIGHTS_FILE)
  exported_back = safetensors.numpy.load_file(os.path.join(output, hf.WEIGHTS_FILE))
  assert exported_back.keys() == original.keys()
  for key, array in original.items():
    np.testing.assert_array_equal(exported_back[key], array, err_msg=key)
  ids = random_ids(64, rows=1)
  assert np.abs(hf_logits(back.eval(), ids) - hf_logits(hf_model, ids)).max() < 1e-5


def test_each_family_fine_tunes_on_data_prepared_with_its_tokenizer(imported_family,
                                                                    tmp_path):
  _, _, hf_dir, ours = imported_family
  run_binary("prepare_data", f"--input={REPO / 'README.md'}", f"--tokenizer={hf_dir}",
             f"--output_dir={tmp_path / 'data'}", "--n_ctx=64", "--validation_fraction=0",
             "--workers=1", check=True)
  run_binary("train", "--gin_file=tiny.gin", f"--gin_file={os.path.join(ours, hf.MODEL_GIN)}",
             f"--model_dir={tmp_path / 'tuned'}", f'--gin_param=DATASET_DIR = "{tmp_path / "data"}"',
             "--gin_param=train.batch_size = 4", "--gin_param=train.train_steps = 2",
             "--gin_param=train.log_every_n_steps = 1", "--gin_param=train.eval_batches = 0",
             f'--gin_param=train.init_from = "{ours}"', check=True)
  with open(tmp_path / "tuned" / "train_metrics.jsonl") as f:
    losses = [json.loads(line)["loss"] for line in f]
  assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
  # Every imported weight (std 0.2) started the run: 2 Adam steps move each by ~1e-3, where
  # a fresh init (std 0.02, LayerNorms 1, biases 0) would be ~0.2 away.
  imported = tf.train.load_checkpoint(checkpoints.require(ours).path)
  tuned = tf.train.load_checkpoint(checkpoints.require(str(tmp_path / "tuned")).path)
  names = [name for name in imported.get_variable_to_shape_map() if name.startswith("gpt/")]
  assert names and all(
      np.abs(tuned.get_tensor(name) - imported.get_tensor(name)).max() < 0.02
      for name in names)


@pytest.mark.parametrize("name, expected", [
    ("GPT-2 124M", {"GPT.n_layer": "12", "GPT.n_ctx": "1024", "GPT.n_vocab": "50257",
                    "GPT.qkv_bias": "True", "GPT.tie_embeddings": "True",
                    "GPT.positions": "@LearnedPositions()", "GPT.res_dropout": "0.1"}),
    ("Pythia 160M", {"GPT.n_ctx": "2048", "GPT.n_vocab": "50304", "GPT.qkv_bias": "True",
                     "GPT.parallel_residual": "True", "GPT.tie_embeddings": "False",
                     "RotaryPositions.fraction": "0.25", "RotaryPositions.interleaved": "False",
                     "GPT.activation": "@gelu"}),
    ("GPT-J 6B", {"GPT.n_layer": "28", "GPT.n_embd": "4096", "GPT.n_head": "16",
                  "GPT.mlp_ratio": "4", "GPT.n_vocab": "50400",
                  "RotaryPositions.fraction": "0.25", "RotaryPositions.interleaved": "True",
                  "RotaryPositions.base": "10000.0", "GPT.parallel_residual": "True",
                  "GPT.shared_layer_norm": "True", "GPT.tie_embeddings": "False",
                  "GPT.lm_head_bias": "True", "GPT.qkv_bias": None}),
])
def test_each_published_config_maps_to_our_knobs(name, expected):
  """The full-size published configs (no torch needed): each family's features as knobs."""
  bindings = dict(line.split(" = ", 1) for line in hf.gin_bindings(FAMILIES[name][0]))
  assert {key: bindings.get(key) for key in expected} == expected
