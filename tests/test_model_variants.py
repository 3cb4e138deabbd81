"""The GPT's variants (issue 4): attention per layer, position encodings, GLU feed-forwards,
mixtures of experts, rematerialization and z-loss.

Properties are checked on tiny models through tests/model_harness.py; training runs use the
shared tiny corpus through `train_in_process`.
"""
import glob
import json
import os
import re

import numpy as np
import pytest

from gptneo.compat import tf
from gptneo.model import feedforward
from gptneo.model import gpt as gpt_lib
from gptneo.model import moe as moe_lib
from gptneo.model import ops
from gptneo.model import positions
from tests.conftest import TINY_TEST_BINDINGS, run_binary
from tests.model_harness import Harness
from tests.test_errors import assert_one_line_error
from tests.test_train import logged_losses, train_in_process

N_CTX, VOCAB, WINDOW = 16, 64, 4
SHAPE = dict(n_embd=32, n_head=4, n_ctx=N_CTX, n_vocab=VOCAB)


def tiny(n_layer=2, **variant):
  return gpt_lib.GPT(n_layer=n_layer, **SHAPE, **variant)


def random_tokens(seed, batch=2):
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, N_CTX))


VARIANTS = {
    "global": {},
    "local": dict(attention_layers=[["local", 2]], window_size=WINDOW),
    "linear": dict(attention_layers=["linear", "linear"]),
    "global_local": dict(attention_layers=[[["global", "local"], 1]], window_size=WINDOW),
    "rotary": dict(positions=positions.RotaryPositions(fraction=0.5)),
    "rotary_local": dict(positions=positions.RotaryPositions(), window_size=WINDOW,
                         attention_layers=[["local", 2]]),
    "axial": dict(positions=positions.AxialPositions()),
    "no_positions": dict(positions=positions.NoPositions()),
    "swiglu": dict(feed_forward=feedforward.glu, activation=ops.silu),
    "moe": dict(moe=moe_lib.MoE(layers=[1], num_experts=4)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_later_tokens_never_change_earlier_logits(variant):
  harness = Harness(tiny(**VARIANTS[variant]), batch_size=2)
  tokens = random_tokens(0)
  logits = harness.logits_of(tokens)
  for position in (0, 5, 11):
    changed = tokens.copy()
    changed[:, position + 1:] = random_tokens(position + 1)[:, position + 1:]
    np.testing.assert_allclose(harness.logits_of(changed)[:, :position + 1],
                               logits[:, :position + 1], atol=1e-5, err_msg=variant)
  assert not np.allclose(harness.logits_of(random_tokens(99)), logits)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parameter_count_matches_the_graph(variant):
  model = tiny(**VARIANTS[variant])
  weights = Harness(model, batch_size=1).weights()
  assert sum(w.size for w in weights.values()) == model.num_parameters()


@pytest.mark.parametrize("window_size", [N_CTX, 4 * N_CTX])
def test_local_with_a_window_covering_the_context_equals_global(window_size):
  global_model = Harness(tiny(), batch_size=2)
  local = Harness(tiny(attention_layers=[["local", 2]], window_size=window_size), 2)
  local.load(global_model.weights())
  tokens = random_tokens(1)
  np.testing.assert_allclose(local.logits_of(tokens), global_model.logits_of(tokens),
                             atol=1e-5)


def test_local_position_sees_exactly_its_window():
  """One layer: the receptive field is the window (more layers widen it by a window each)."""
  harness = Harness(tiny(n_layer=1, attention_layers=["local"], window_size=WINDOW), 1)
  tokens = random_tokens(2, batch=1)
  logits = harness.logits_of(tokens)
  for position in (WINDOW - 1, WINDOW, 2 * WINDOW + 1, N_CTX - 1):
    first_seen = position - WINDOW + 1
    for earlier, must_change in ((first_seen - 1, False), (first_seen, True)):
      if earlier < 0:
        continue
      changed = tokens.copy()
      changed[0, earlier] = (tokens[0, earlier] + 1) % VOCAB
      unchanged = np.allclose(harness.logits_of(changed)[0, position], logits[0, position],
                              atol=1e-6)
      assert unchanged != must_change, (position, earlier)


def test_local_equals_global_on_the_window_alone():
  """Without positions, local attention at i is global attention over tokens i-w+1 .. i."""
  no_positions = dict(n_layer=1, positions=positions.NoPositions())
  local = Harness(tiny(attention_layers=["local"], window_size=WINDOW, **no_positions), 1)
  global_model = Harness(tiny(**no_positions), 1)
  global_model.load(local.weights())
  tokens = random_tokens(3, batch=1)
  local_logits = local.logits_of(tokens)
  for position in range(WINDOW - 1, N_CTX):
    window = np.zeros_like(tokens)
    window[0, :WINDOW] = tokens[0, position - WINDOW + 1:position + 1]
    np.testing.assert_allclose(local_logits[0, position],
                               global_model.logits_of(window)[0, WINDOW - 1], atol=1e-5)


@pytest.mark.parametrize("variant", ["global", "moe"])
def test_recompute_grad_gives_the_same_gradients(variant):
  plain = Harness(tiny(**VARIANTS[variant]), batch_size=2)
  remat = Harness(tiny(recompute_grad=True, **VARIANTS[variant]), batch_size=2)
  remat.load(plain.weights())
  windows = np.random.default_rng(4).integers(0, VOCAB, (2, N_CTX + 1))
  expected, actual = plain.gradients_of(windows), remat.gradients_of(windows)
  assert sorted(expected) == sorted(actual)
  for name in expected:
    np.testing.assert_allclose(actual[name], expected[name], atol=1e-6, err_msg=name)


TRAINING_VARIANTS = {
    "linear": ['GPT.attention_layers = ["linear", "global"]'],
    "local_rotary": ['GPT.attention_layers = [[["global", "local"], 1]]', "GPT.window_size = 8",
                     "GPT.positions = @RotaryPositions()", "RotaryPositions.fraction = 0.5"],
    "axial": ["GPT.positions = @AxialPositions()"],
    "geglu_z_loss": ["GPT.feed_forward = @glu", "GPT.activation = @gelu", "GPT.z_loss = 1e-3"],
    "moe": ["GPT.moe = @MoE()", "MoE.layers = [1]", "MoE.num_experts = 4"],
    "recompute": ["GPT.recompute_grad = True", "GPT.scale_by_in = True",
                  "GPT.init_std = 1.0"],
}


@pytest.mark.parametrize("variant", sorted(TRAINING_VARIANTS))
def test_variant_trains(variant, tmp_path, small_dataset):
  train_in_process(tmp_path, small_dataset, 25, *TRAINING_VARIANTS[variant])
  losses = logged_losses(tmp_path)
  assert np.mean([losses[s] for s in range(21, 26)]) < losses[1] - 0.5, losses


def logged_metrics(model_dir):
  with open(os.path.join(model_dir, "train_metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def summary_tags(model_dir):
  tags = set()
  for path in glob.glob(os.path.join(model_dir, "events.out.tfevents.*")):
    for event in tf.train.summary_iterator(path):
      tags.update(value.tag for value in event.summary.value)
  return tags


@pytest.mark.parametrize("bindings, name", [
    (TRAINING_VARIANTS["moe"], "moe_loss"), (["GPT.z_loss = 1e-3"], "z_loss")])
def test_auxiliary_loss_is_logged_and_in_the_objective(tmp_path, small_dataset, bindings, name):
  train_in_process(tmp_path, small_dataset, 3, *bindings)
  records = logged_metrics(tmp_path)
  assert all(record[name] > 0 for record in records)
  assert name in summary_tags(tmp_path)


def test_moe_balancing_loss_is_one_when_router_probabilities_are_uniform():
  """Switch's loss, num_experts * sum(share routed * mean prob), is 1 for a uniform router."""
  model = tiny(moe=moe_lib.MoE(layers=[0, 1], num_experts=4, loss_coef=1.0), init_std=1e-7)
  aux = Harness(model, batch_size=2).aux_losses_of(random_tokens(5))
  assert sorted(aux) == ["moe_loss"]
  assert aux["moe_loss"] == pytest.approx(1.0, abs=1e-4)


def one_line_error(match, **variant):
  """The message is one line (gin appends the configurable's name on a line of its own)."""
  with pytest.raises(ValueError) as error:
    tiny(**variant)
  assert re.search(match, str(error.value).splitlines()[0]), str(error.value)


def test_unknown_attention_type_is_named():
  one_line_error(r"unknown attention type\(s\) \['sparse'\]; use \['global', 'local', 'linear'\]",
                 attention_layers=["global", "sparse"])


def test_pattern_length_must_match_n_layer():
  one_line_error(r"describes 6 layers but GPT.n_layer = 2; change the repeat count",
                 attention_layers=[[["global", "local"], 3]])


def test_window_must_divide_the_context():
  one_line_error(r"GPT.window_size = 5 does not divide GPT.n_ctx = 16",
                 attention_layers=["local", "global"], window_size=5)


def test_rotary_fraction_must_give_an_even_dimension():
  one_line_error(r"RotaryPositions.fraction = 0.3 rotates 2.4 of the 8 dims per head; pick a "
                 r"fraction that gives an even integer",
                 positions=positions.RotaryPositions(fraction=0.3))
  one_line_error(r"rotates 1 of the 8", positions=positions.RotaryPositions(fraction=0.125))


def test_moe_layer_index_must_be_a_block():
  one_line_error(r"MoE.layers = \[1, 2\] has \[2\] outside 0..1 \(GPT.n_layer = 2\)",
                 moe=moe_lib.MoE(layers=[1, 2]))


def test_axial_shape_must_multiply_to_n_ctx():
  one_line_error(r"AxialPositions.shape = \(4, 5\) multiplies to 20, not GPT.n_ctx = 16",
                 positions=positions.AxialPositions(shape=(4, 5)))


def test_gpt_neo_pattern_is_one_binding_or_an_explicit_list():
  short = tiny(n_layer=4, attention_layers=[[["global", "local"], 2]], window_size=WINDOW)
  explicit = tiny(n_layer=4, attention_layers=["global", "local", "global", "local"],
                  window_size=WINDOW)
  assert short.layer_types == explicit.layer_types == ["global", "local"] * 2


def test_bin_train_reports_a_bad_pattern_in_one_line(tmp_path, small_dataset):
  params = TINY_TEST_BINDINGS + [f'DATASET_DIR = "{small_dataset}"', "train.train_steps = 2",
                                 'GPT.attention_layers = ["global", "sparse"]']
  result = run_binary("train", "--gin_file=tiny.gin", f"--model_dir={tmp_path / 'run'}",
                      *[f"--gin_param={p}" for p in params])
  assert_one_line_error(result, "train", "unknown attention type(s) ['sparse']")
  assert not (tmp_path / "run" / "checkpoint").exists()


def test_experts_split_over_two_devices_give_the_single_device_losses(tmp_path, small_dataset):
  moe = TRAINING_VARIANTS["moe"]
  train_in_process(tmp_path / "single", small_dataset, 3, *moe)
  train_in_process(tmp_path / "split", small_dataset, 3, *moe, 'mesh.mesh_shape = "x:2"',
                   'mesh.layout = "experts:x"')
  single, split = logged_losses(tmp_path / "single"), logged_losses(tmp_path / "split")
  np.testing.assert_allclose([split[s] for s in (1, 2, 3)], [single[s] for s in (1, 2, 3)],
                             atol=1e-5)


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "relu", "selu", "silu", "swish"])
def test_every_documented_activation_resolves_in_gin(name):
  import gin  # pylint: disable=g-import-not-at-top
  gin.parse_config(f"GPT.activation = @{name}")
  assert gpt_lib.GPT().activation.__name__ == {"swish": "silu"}.get(name, name)
