"""GPT-Neo's Mesh-TF training checkpoints: bin/import_gpt_neo and bin/export --format=gpt_neo.

The reference for GPT-Neo's names, shapes and transposes is not our code but HF's converter of
these checkpoints (transformers 4.x `load_tf_weights_in_gpt_neo`, copied below) and GPT-Neo's
models/gpt2/gpt2.py: a random HF GPT-Neo is written as a GPT-Neo checkpoint by that mapping's
inverse (checked: the reference reads it back into the same weights), with Adam's moments and a
step; our import must give HF's logits, continue training from that state, and export back the
same tensors.
"""
import json
import os
import re
import shlex
import subprocess
import sys

import gin
import ml_dtypes
import numpy as np
import pytest

from gptneo import checkpoints
from gptneo import gin_utils
from gptneo import gpt_neo_checkpoint
from gptneo import inference
from gptneo import mesh as mesh_lib
from gptneo import runtime
from gptneo import train
from gptneo.compat import tf
from gptneo.data import inputs
from gptneo.data import prepare
from gptneo.errors import UserError
from gptneo.model import gpt as gpt_lib
from tests.conftest import REPO, VOCAB, run_binary, stdlib_files
from tests.test_docs import doc_commands
from tests.test_errors import assert_one_line_error
from tests.test_interop import ONE_DEVICE, hf_libraries, our_logits

N_CTX, STEP, HF_VOCAB = 64, 7, 500  # GPT-Neo's n_vocab (VOCAB) pads HF's vocabulary
CONFIG = {  # a GPT-Neo config (configs/*.json's keys) of a tiny model
    "n_head": 4, "n_vocab": VOCAB, "n_embd": 32, "n_layer": 2, "n_ctx": N_CTX,
    "attention_types": [[["global", "local"], 1]], "local_attention_radius": 16,
    "embed_dropout": 0, "attn_dropout": 0, "res_dropout": 0, "lr": 3e-3, "lr_decay": "cosine",
    "warmup_steps": 2, "opt_name": "adam", "beta1": 0.9, "beta2": 0.95, "epsilon": 1e-8,
    "weight_decay": 0.1, "train_batch_size": 4, "train_steps": 20,
    "datasets": ["tiny"], "precision": "float32"}


# --- The reference: transformers 4.x's load_tf_weights_in_gpt_neo
# (src/transformers/models/gpt_neo/modeling_gpt_neo.py at commit
# 002fb3e7a2db86cef2160e206c878ff895b74ef0), Copyright 2021 The Eleuther AI and HuggingFace
# Inc. team, Apache License 2.0. Changed: TF's eager cast (graph mode here) is numpy's, the
# import of tf and the logging are dropped.

def load_tf_weights_in_gpt_neo(model, config, gpt_neo_checkpoint_path):
  """Load tf checkpoints in a pytorch model"""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  tf_path = os.path.abspath(gpt_neo_checkpoint_path)
  init_vars = tf.train.list_variables(tf_path)
  names = []
  arrays = []
  for name, shape in init_vars:  # noqa: B007  (the reference, as written)
    if "global_step" not in name and "adam" not in name:
      array = tf.train.load_variable(tf_path, name)
      array = np.asarray(array.squeeze(), np.float32)  # was tf.dtypes.cast(...).numpy()
      name = name.replace("attn/q", "attn/attention/q_proj/w")
      name = name.replace("attn/k", "attn/attention/k_proj/w")
      name = name.replace("attn/v", "attn/attention/v_proj/w")
      name = name.replace("attn/o", "attn/attention/out_proj/w")
      name = name.replace("norm_1", "ln_1")
      name = name.replace("norm_2", "ln_2")
      name = name.replace("attn/compute_output_bias/o_b", "attn/attention/out_proj/b")
      name = name.replace("conv1d_main/c_fc/kernel", "c_fc/w")
      name = name.replace("conv1d_main/c_fc/bias", "c_fc/b")
      name = name.replace("conv1d_main/c_proj/kernel", "c_proj/w")
      name = name.replace("conv1d_main/c_proj/bias", "c_proj/b")

      names.append(name)
      arrays.append(array)

  for name, array in zip(names, arrays):  # noqa: B905  (the reference, as written)
    name = name[5:]  # skip "gpt2/"
    name = name.split("/")
    pointer = model.transformer
    for m_name in name:
      if re.fullmatch(r"[A-Za-z]+\d+", m_name):
        scope_names = re.split(r"(\d+)", m_name)
      else:
        scope_names = [m_name]
      if scope_names[0] == "w" or scope_names[0] == "g":
        pointer = getattr(pointer, "weight")  # noqa: B009  (the reference, as written)
      elif scope_names[0] == "b":
        pointer = getattr(pointer, "bias")  # noqa: B009  (the reference, as written)
      elif scope_names[0] == "wpe" or scope_names[0] == "wte":
        pointer = getattr(pointer, scope_names[0])
        pointer = getattr(pointer, "weight")  # noqa: B009  (the reference, as written)
      else:
        pointer = getattr(pointer, scope_names[0])
      if len(scope_names) >= 2:
        num = int(scope_names[1])
        pointer = pointer[num]

    if name[-1] == "w" and name[-2] in ["out_proj", "k_proj", "q_proj", "v_proj", "c_proj", "c_fc"]:
      array = array.transpose()

    if name == ["wte"]:
      # if vocab is padded, then trim off the padding embeddings
      array = array[: config.vocab_size]

    assert pointer.shape == array.shape, (pointer.shape, array.shape, name)
    pointer.data = torch.from_numpy(array)

  # init the final linear layer using word embeddings
  embs = model.transformer.wte.weight
  lin = nn.Linear(embs.size()[1], embs.size()[0], bias=False)
  lin.weight = embs
  model.set_output_embeddings(lin)
  return model


# --- Writing a GPT-Neo checkpoint: the reference's inverse.

def hf_gpt_neo(vocab_size, seed=0):
  torch, transformers = hf_libraries()
  torch.manual_seed(seed)
  return transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(
      vocab_size=vocab_size, max_position_embeddings=N_CTX, hidden_size=CONFIG["n_embd"],
      num_layers=CONFIG["n_layer"], num_heads=CONFIG["n_head"], window_size=16,
      attention_types=CONFIG["attention_types"], activation_function="gelu_new",
      embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0, initializer_range=0.2,
      bos_token_id=0, eos_token_id=0)).eval()


def gpt_neo_weights(hf_model, padding):
  """{GPT-Neo variable: array} of an HF GPT-Neo, as models/gpt2/gpt2.py names and shapes them:
  the renames of the reference reversed, its transposed matrices transposed back, `padding`
  rows appended to wte (the reference trims them)."""
  state = {name: value.detach().numpy() for name, value in hf_model.state_dict().items()}
  weights = {"gpt2/wte": np.concatenate([state["transformer.wte.weight"], padding]),
             "gpt2/wpe": state["transformer.wpe.weight"],
             "gpt2/ln_f/g": state["transformer.ln_f.weight"],
             "gpt2/ln_f/b": state["transformer.ln_f.bias"]}
  for i in range(CONFIG["n_layer"]):
    hf, neo = f"transformer.h.{i}.", f"gpt2/h{i}/"
    weights.update({
        neo + "norm_1/g": state[hf + "ln_1.weight"], neo + "norm_1/b": state[hf + "ln_1.bias"],
        **{neo + f"attn/{n}": state[hf + f"attn.attention.{n}_proj.weight"].T for n in "qkv"},
        neo + "attn/o": state[hf + "attn.attention.out_proj.weight"].T,
        neo + "attn/compute_output_bias/o_b": state[hf + "attn.attention.out_proj.bias"],
        neo + "norm_2/g": state[hf + "ln_2.weight"], neo + "norm_2/b": state[hf + "ln_2.bias"],
        neo + "mlp/conv1d_main/c_fc/kernel": state[hf + "mlp.c_fc.weight"].T,
        neo + "mlp/conv1d_main/c_fc/bias": state[hf + "mlp.c_fc.bias"],
        neo + "mlp/conv1d_main/c_proj/kernel": state[hf + "mlp.c_proj.weight"].T,
        neo + "mlp/conv1d_main/c_proj/bias": state[hf + "mlp.c_proj.bias"]})
  return {name: np.ascontiguousarray(array, np.float32) for name, array in weights.items()}


def training_state(weights, master_dtype=np.float32, seed=0):
  """The weights (masters in `master_dtype`), AdamWeightDecayOptimizer's float32 adam_m and
  adam_v of each (random: a run's state), and global_step."""
  rng = np.random.default_rng(seed)
  state = {"global_step": np.int64(STEP)}
  for name, array in weights.items():
    state[name] = array.astype(master_dtype)
    state[name + "/adam_m"] = rng.normal(0, 1e-3, array.shape).astype(np.float32)
    state[name + "/adam_v"] = rng.uniform(1e-6, 1e-4, array.shape).astype(np.float32)
  return state


def write_tf_checkpoint(prefix, arrays):
  """TF's checkpoint of {name: array} (SaveV2, as mtf's Saver writes its masters)."""
  names = sorted(arrays)
  with tf.Graph().as_default(), tf.Session() as session:
    session.run(tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names,
                                  shape_and_slices=[""] * len(names),
                                  tensors=[tf.constant(arrays[n]) for n in names]))


def read_tf_checkpoint(prefix):
  reader = tf.train.load_checkpoint(prefix)
  return {name: reader.get_tensor(name) for name, dtype in
          reader.get_variable_to_dtype_map().items() if dtype != tf.variant}  # not the data


def write_run(folder, state, config=None):
  """A GPT-Neo run's model_path (model.ckpt-STEP) and its config; returns (dir, config path)."""
  os.makedirs(folder / "run")
  write_tf_checkpoint(str(folder / "run" / f"model.ckpt-{STEP}"), state)
  (folder / "config.json").write_text(json.dumps(config or CONFIG))
  return str(folder / "run"), str(folder / "config.json")


@pytest.fixture(scope="module")
def neo_run(tmp_path_factory):
  """(HF model, GPT-Neo run dir, config path, the state written) of a random HF GPT-Neo."""
  torch, _ = hf_libraries()
  folder = tmp_path_factory.mktemp("neo")
  hf_model = hf_gpt_neo(HF_VOCAB)
  padding = np.random.default_rng(1).normal(0, 0.2, [VOCAB - HF_VOCAB, CONFIG["n_embd"]])
  state = training_state(gpt_neo_weights(hf_model, padding))
  run_dir, config = write_run(folder, state)
  # The reference reads the checkpoint back into the HF model's weights.
  reference = load_tf_weights_in_gpt_neo(hf_gpt_neo(HF_VOCAB, seed=1), hf_model.config,
                                         os.path.join(run_dir, f"model.ckpt-{STEP}"))
  for name, value in hf_model.state_dict().items():
    assert torch.equal(reference.state_dict()[name], value), name
  return hf_model, run_dir, config, state


@pytest.fixture(scope="module")
def imported(neo_run, tmp_path_factory):
  """neo_run imported (the programs: test_docs_commands_work_as_written)."""
  _, run_dir, config, _ = neo_run
  model_dir = str(tmp_path_factory.mktemp("ours") / "neo")
  gpt_neo_checkpoint.import_checkpoint(run_dir, config, model_dir)
  return model_dir


def test_import_gives_hf_logits_and_greedy_tokens(neo_run, imported):
  hf_model, *_ = neo_run
  ids = np.random.default_rng(0).integers(0, HF_VOCAB, [2, N_CTX])
  ours = our_logits(imported, ids)
  hf = _hf_logits(hf_model, ids)
  assert ours.shape[-1] == VOCAB  # the padded rows kept, as GPT-Neo trains them
  np.testing.assert_allclose(ours[..., :HF_VOCAB], hf, atol=1e-4)
  # Greedy over the tokenizer's ids (sample.complete masks the padding ids): the same tokens.
  gin_utils.parse([os.path.join(imported, "operative_config.gin")], ONE_DEVICE)
  restored = inference.RestoredModel(gpt_lib.GPT(), runtime.Runtime(mesh_lib.mesh()), imported, 1)
  restored.restore()
  ours_ids, hf_ids = list(ids[0, :8]), list(ids[0, :8])
  for _ in range(24):
    window = np.zeros([1, N_CTX], np.int32)  # causal: the padding after the ids changes nothing
    window[0, :len(ours_ids)] = ours_ids
    ours_ids.append(int(np.argmax(restored.all_logits(window)[0, len(ours_ids) - 1, :HF_VOCAB])))
    hf_ids.append(int(np.argmax(_hf_logits(hf_model, [hf_ids])[0, -1])))
  assert ours_ids == hf_ids


def _hf_logits(hf_model, ids):
  torch, _ = hf_libraries()
  with torch.no_grad():
    return hf_model(torch.tensor(np.asarray(ids))).logits.numpy()


def test_import_carries_step_and_adam_slots_and_export_gives_the_same_tensors(
    neo_run, imported, tmp_path):
  *_, config, state = neo_run
  assert checkpoints.require(imported).path.endswith(f"model.ckpt-{STEP}")
  output = tmp_path / "back"
  gpt_neo_checkpoint.export_checkpoint(imported, str(output), config)
  assert tf.train.latest_checkpoint(str(output)).endswith(f"model.ckpt-{STEP}")
  _assert_same_tensors(read_tf_checkpoint(str(output / f"model.ckpt-{STEP}")), state)


def _assert_same_tensors(got, expected):
  assert sorted(got) == sorted(expected)
  for name, array in expected.items():
    assert got[name].dtype == array.dtype, name
    np.testing.assert_array_equal(got[name], array, err_msg=name)


def test_bfloat16_masters_import_and_export_back(neo_run, tmp_path):
  hf_model, *_ = neo_run
  padding = np.zeros([VOCAB - HF_VOCAB, CONFIG["n_embd"]])
  state = training_state(gpt_neo_weights(hf_model, padding), ml_dtypes.bfloat16)
  run_dir, config = write_run(tmp_path, state, {**CONFIG, "precision": "bfloat16"})
  gpt_neo_checkpoint.import_checkpoint(run_dir, config, str(tmp_path / "ours"))
  reader = tf.train.load_checkpoint(checkpoints.require(str(tmp_path / "ours")).path)
  assert reader.get_variable_to_dtype_map()["gpt/wte"] == tf.float32  # our masters: widened
  gpt_neo_checkpoint.export_checkpoint(str(tmp_path / "ours"), str(tmp_path / "back"), config)
  _assert_same_tensors(read_tf_checkpoint(str(tmp_path / "back" / f"model.ckpt-{STEP}")), state)


def test_training_continues_from_the_imported_step_and_adam_state(neo_run, imported,
                                                                  tmp_path_factory):
  """One step of ours from the import is Adam's step from GPT-Neo's state: the gradient of
  the same loss (torch, on the HF model with the padded vocabulary), the moments carried, the
  learning rate and bias correction of step STEP + 1."""
  torch, _ = hf_libraries()
  *_, state = neo_run
  root = tmp_path_factory.mktemp("data")
  prepare.prepare_dataset(stdlib_files(4), str(root / "data"), n_ctx=N_CTX, vocab_size=VOCAB,
                          validation_fraction=0.0)
  # One step more: the run stops there, its schedule still GPT-Neo's (train_steps long).
  bindings = [f'DATASET_DIR = "{root / "data"}"', f"train.train_steps = {STEP + 1}",
              f"learning_rate_schedule.decay_steps = {CONFIG['train_steps']}",
              'mesh.mesh_shape = ""', 'mesh.layout = ""', "mesh.implementation = 'placement'"]
  gin_utils.parse([os.path.join(imported, "model.gin")], bindings)
  settings = train.settings()
  with tf.Graph().as_default(), tf.Session() as session:
    tf.set_random_seed(settings.seed)  # as the training graph (train_graph.build_placement)
    iterator = tf.data.make_initializable_iterator(inputs.make_dataset(
        settings.dataset_dir, "train", settings.batch_size, seed=settings.seed,
        sampling=settings.sampling))
    session.run(iterator.initializer)
    batch = session.run(iterator.get_next())  # the first batch: the data starts anew
  train.train(imported)
  after = read_tf_checkpoint(checkpoints.require(imported).path)
  assert int(after["global_step"]) == STEP + 1

  full = hf_gpt_neo(VOCAB)  # GPT-Neo's model: the padded rows in the softmax
  reference = {n: np.asarray(v, np.float32) for n, v in state.items() if "adam" not in n}
  full_path = str(tmp_path_factory.mktemp("full") / f"model.ckpt-{STEP}")
  write_tf_checkpoint(full_path, reference)
  load_tf_weights_in_gpt_neo(full, full.config, full_path)
  tokens = torch.tensor(batch.astype(np.int64))
  logits = full(tokens[:, :-1]).logits.reshape(-1, VOCAB)
  # GPT-Neo's loss: mtf's softmax cross-entropy with its z-loss (1e-4 * log_z^2 per token)
  loss = (torch.nn.functional.cross_entropy(logits, tokens[:, 1:].reshape(-1))
          + 1e-4 * torch.logsumexp(logits, -1).square().mean())
  loss.backward()
  with open(os.path.join(imported, "train_metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  assert [entry["step"] for entry in logged] == [STEP + 1]
  np.testing.assert_allclose(logged[0]["loss"], loss.item(), rtol=1e-5)
  grads = {"gpt2/wte": full.transformer.wte.weight.grad.numpy(),
           "gpt2/h0/attn/q": full.transformer.h[0].attn.attention.q_proj.weight.grad.numpy().T,
           "gpt2/h1/attn/o": full.transformer.h[1].attn.attention.out_proj.weight.grad.numpy().T,
           "gpt2/h1/mlp/conv1d_main/c_fc/bias": full.transformer.h[1].mlp.c_fc.bias.grad.numpy()}
  b1, b2, eps, wd = CONFIG["beta1"], CONFIG["beta2"], CONFIG["epsilon"], CONFIG["weight_decay"]
  lr = _learning_rate(STEP)
  ours = _as_gpt_neo(after)
  for name, grad in grads.items():
    m = b1 * state[name + "/adam_m"] + (1 - b1) * grad
    v = b2 * state[name + "/adam_v"] + (1 - b2) * grad ** 2
    np.testing.assert_allclose(ours[name + "/adam_m"], m, rtol=1e-3, atol=1e-8, err_msg=name)
    np.testing.assert_allclose(ours[name + "/adam_v"], v, rtol=1e-3, atol=1e-10, err_msg=name)
    t = STEP + 1  # ours corrects the moments' bias (GPT-Neo's Adam does not)
    update = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    decay = wd * state[name] if state[name].ndim >= 2 else 0.0
    np.testing.assert_allclose(ours[name], state[name] - lr * (update + decay), rtol=1e-4,
                               atol=2e-6, err_msg=name)


def _learning_rate(step):
  """learning_rate_schedule's rate at `step` for CONFIG: warmup done, cosine to 10%."""
  progress = (step - CONFIG["warmup_steps"]) / (CONFIG["train_steps"] - CONFIG["warmup_steps"])
  return CONFIG["lr"] * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress)))


def _as_gpt_neo(ours):
  """Our checkpoint's arrays under GPT-Neo's names (the export's mapping)."""
  arrays = {}
  for name, names, kind in gpt_neo_checkpoint.weight_pairs(CONFIG["n_layer"]):
    for suffix in ("", "/adam_m", "/adam_v"):
      for neo, part in zip(names, gpt_neo_checkpoint.CONVERSIONS[kind][0](ours[name + suffix]),
                           strict=True):
        arrays[neo + suffix] = part
  return arrays


# --- Bad input: one line naming the culprit, nothing written.

def _without(name):
  return lambda state, config: ({n: a for n, a in state.items() if n != name}, config)


def _reshaped(name, shape):
  return lambda state, config: ({**state, name: np.zeros(shape, state[name].dtype)}, config)


BAD_RUNS = {
    "missing slot": (_without("gpt2/h1/attn/k/adam_v"), ["lacks gpt2/h1/attn/k/adam_v"]),
    "missing step": (_without("global_step"), ["no integer scalar global_step"]),
    "misshapen": (_reshaped("gpt2/wpe", [N_CTX // 2, 32]), ["gpt2/wpe has shape [32, 32]",
                                                             "needs [64, 32]"]),
    "unpadded vocab": (_reshaped("gpt2/wte", [HF_VOCAB, 32]), ["gpt2/wte has shape [500, 32]"]),
    "extra weight": (lambda state, config: ({**state, "gpt2/h2/attn/q": state["gpt2/h1/attn/q"]},
                                            config), ["holds gpt2/h2/attn/q"]),
    "slot of another dtype": (lambda state, config: (
        {**state, "gpt2/wte/adam_m": state["gpt2/wte/adam_m"].astype(np.float16)}, config),
        ["gpt2/wte/adam_m holds float16"]),
    "unknown config key": (lambda state, config: (state, {**config, "mlp_glu": True}),
                           ["config key 'mlp_glu' has no equivalent"]),
    "adafactor": (lambda state, config: (state, {**config, "opt_name": "adafactor"}),
                  ["opt_name 'adafactor'", "adam_m, adam_v"]),
}


@pytest.mark.parametrize("case", sorted(BAD_RUNS))
def test_bad_run_is_one_line_and_writes_nothing(case, neo_run, tmp_path):
  change, fragments = BAD_RUNS[case]
  state, config = change(dict(neo_run[3]), dict(CONFIG))
  run_dir, config_path = write_run(tmp_path, state, config)
  with pytest.raises(UserError) as error:
    gpt_neo_checkpoint.import_checkpoint(run_dir, config_path, str(tmp_path / "ours"))
  for fragment in fragments:
    assert fragment in str(error.value)
  assert "\n" not in str(error.value)
  assert not (tmp_path / "ours").exists()


def test_folder_without_checkpoint_is_one_line_exit_2(neo_run, tmp_path):
  """bin/import_gpt_neo: exit 2, one line, nothing written; TF's `checkpoint` file, which may
  name any path (here another run's checkpoint), is never followed."""
  *_, config, _ = neo_run
  (tmp_path / "run").mkdir()
  other = os.path.join(neo_run[1], f"model.ckpt-{STEP}")
  (tmp_path / "run" / "checkpoint").write_text(f'model_checkpoint_path: "{other}"\n')
  result = run_binary("import_gpt_neo", f"--checkpoint_dir={tmp_path / 'run'}",
                      f"--config={config}", f"--model_dir={tmp_path / 'ours'}")
  assert_one_line_error(result, "import_gpt_neo", "holds no TF checkpoint (model.ckpt-N.index)")
  assert not (tmp_path / "ours").exists()


def test_export_refuses_a_config_of_another_model(neo_run, imported, tmp_path):
  config = tmp_path / "wider.json"
  config.write_text(json.dumps({**CONFIG, "n_embd": 64}))
  with pytest.raises(UserError, match=r"has gpt/wte of shape \[512, 32\], but the model of "
                                      r".* needs \[512, 64\]"):
    gpt_neo_checkpoint.export_checkpoint(imported, str(tmp_path / "back"), str(config))
  assert not (tmp_path / "back").exists()
  result = run_binary("export", "--format=gpt_neo", f"--model_dir={imported}",
                      f"--output={tmp_path / 'back'}")
  assert_one_line_error(result, "export", "--config goes with --format=gpt_neo")


def test_docs_commands_work_as_written(tmp_path):
  """docs/import_models.md's GPT-Neo checkpoint commands, run as written from a folder holding
  neo_run/ (a random state of the config's model), neo_config.json and data/tiny: import,
  one more training step, export; the export holds the step after GPT-Neo's."""
  doc = (REPO / "docs" / "import_models.md").read_text()
  section = doc[doc.index("## GPT-Neo's own training checkpoints"):]
  commands = doc_commands(section[:section.index("\n## ", 1) if "\n## " in section[1:] else None])
  config = {**CONFIG, "train_steps": STEP + 1}
  (tmp_path / "neo_config.json").write_text(json.dumps(config))
  _, _, model = gpt_neo_checkpoint.read_model(str(tmp_path / "neo_config.json"))
  gin.clear_config()
  rng = np.random.default_rng(0)
  weights = {name: rng.normal(0, 0.2, shape).astype(np.float32)
             for name, shape in gpt_neo_checkpoint.neo_shapes(model).items()}
  os.makedirs(tmp_path / "neo_run")
  write_tf_checkpoint(str(tmp_path / "neo_run" / f"model.ckpt-{STEP}"), training_state(weights))
  prepare.prepare_dataset(stdlib_files(2), str(tmp_path / "data" / "tiny"), n_ctx=N_CTX,
                          vocab_size=VOCAB, validation_fraction=0.0)
  assert [command.split()[0] for command in commands] == [
      "gptneo-import-gpt-neo", "gptneo-train", "gptneo-export"]
  for command in commands:
    program, *args = shlex.split(command)
    result = subprocess.run(
        [sys.executable, str(REPO / "bin" / program.removeprefix("gptneo-").replace("-", "_")),
         *args], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
        text=True, check=False)
    assert result.returncode == 0, (command, result.stderr[-3000:])
  back = read_tf_checkpoint(str(tmp_path / "neo_run_back" / f"model.ckpt-{STEP + 1}"))
  assert int(back["global_step"]) == STEP + 1 and sorted(back) == sorted(training_state(weights))
