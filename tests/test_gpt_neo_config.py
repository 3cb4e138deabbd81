"""bin/convert_config: GPT-Neo's own configs (tests/data/gpt_neo_configs/, pinned copies of
EleutherAI/gpt-neo configs/*.json) as gin files that parse, build a training graph and count
the parameters GPT-Neo's code makes; keys we can't convert refused in one line."""
import json
import pathlib

import gin
import pytest

from gptneo import gin_utils
from gptneo import gpt_neo_config
from gptneo.model import gpt as gpt_lib
from tests import test_presets
from tests.conftest import run_binary
from tests.test_errors import assert_one_line_error
from tests.test_presets import preset_dataset  # noqa: F401  (the fixture: a tiny dataset)

CONFIGS = pathlib.Path(__file__).parent / "data" / "gpt_neo_configs"
MODEL_CONFIGS = sorted(path.name for path in CONFIGS.glob("*.json"))
# Its 'none' blocks (x + x, no attention) have no equivalent here: refused, see below.
REFUSED = {"gpt3_PAR_small_256.json": "'attention_types' names 'none'"}
CONVERTED = [name for name in MODEL_CONFIGS if name not in REFUSED]
# Their layouts split memory_length, which ours can't: refused unless --layout replaces it,
# by the layout the refusal proposes (test_unsplittable_layout_is_refused...). Their embd
# splits are kept (2.7B and 6.7B convert as written: batch:x,embd:y).
LAYOUTS = {"gpt3_13B_256.json": "batch:x,embd:y", "gpt3_13B_256_Pile.json": "batch:x,embd:y",
           "gpt3_XL_256_Pile.json": "batch:x,embd:y"}
NO_DATASET = test_presets.NO_DATASET
SMALL_LAYERS = 2
SMALL_BATCH = 8


@pytest.fixture(autouse=True)
def clean_gin():
  yield
  gin.clear_config()


def load(name):
  return json.loads((CONFIGS / name).read_text())


def converted(name, tmp_path, config=None):
  """The gin file bin/convert_config's library writes for config `name`."""
  path = tmp_path / (pathlib.Path(name).stem + ".gin")
  path.write_text(gpt_neo_config.convert(config or load(name), name, layout=LAYOUTS.get(name)))
  return str(path)


def gpt_neo_parameters(config):
  """The parameters models/gpt2/gpt2.py creates, from its variables' shapes (not our code)."""
  embd, layers = config["n_embd"], config["n_layer"]
  hidden = 4 * embd  # mlp's intermediate_expanded, no mlp_glu
  shapes = [(config["n_vocab"], embd), (config["n_ctx"], embd),  # gpt2/wte, gpt2/wpe
            (embd,), (embd,)]  # gpt2/ln_f/g, b
  block = [(embd,), (embd,),  # norm_1/g, b
           (embd, embd), (embd, embd), (embd, embd), (embd, embd),  # attn/q, k, v, o
           (embd,),  # attn/compute_output_bias/o_b
           (embd,), (embd,),  # norm_2/g, b
           (embd, hidden), (hidden,),  # mlp/conv1d_main/c_fc/kernel, bias
           (hidden, embd), (embd,)]  # mlp/conv1d_main/c_proj/kernel, bias
  count = 0
  for shape in shapes + block * layers:
    size = 1
    for dim in shape:
      size *= dim
    count += size
  return count


def small_overrides(config):
  """Small dims (test_presets.SMALL_SHAPE) and every mesh dimension of size 2: the same
  layout rules, lowered on 2-4 CPU devices instead of a 256-core TPU."""
  kinds = config["attention_types"][0][0]
  mesh_shape = ",".join(f"{item.split(':')[0]}:2" for item in config["mesh_shape"].split(","))
  overrides = test_presets.SMALL_SHAPE + [
      f"train.batch_size = {SMALL_BATCH}",
      f"GPT.attention_layers = [[{json.dumps(kinds)}, {SMALL_LAYERS // len(kinds)}]]",
      f"mesh.mesh_shape = {mesh_shape!r}", "mesh.implementation = 'placement'",
      "train.steps_per_loop = 1"]
  if "tokens_per_mb_per_replica" in config:  # 4 to 64 microbatches at full size
    overrides.append("train.microbatches_per_batch = 2")
  return overrides


@pytest.mark.parametrize("name", CONVERTED)
def test_config_converts_parses_and_builds_its_graph(name, tmp_path, monkeypatch, request):
  config = load(name)
  gin_file = converted(name, tmp_path)
  gin_utils.parse([gin_file], [NO_DATASET, "mesh.tpu = 'local'"])
  model = gpt_lib.GPT()
  assert (model.n_layer, model.n_embd, model.n_head, model.n_ctx, model.n_vocab) == tuple(
      config[key] for key in ("n_layer", "n_embd", "n_head", "n_ctx", "n_vocab"))
  assert model.layer_types == [kind for kinds, count in config["attention_types"]
                               for kind in kinds * count]
  assert not model.scale_attention and model.tie_embeddings and model.window_size == 256
  assert gin.query_parameter("train.batch_size") == config["train_batch_size"]
  assert gin.query_parameter("learning_rate_schedule.learning_rate") == config["lr"]
  gin.clear_config()
  gin_utils.parse([gin_file], small_overrides(config) + [
      f'DATASET_DIR = "{request.getfixturevalue("preset_dataset")}"'])
  graph, model = test_presets.build_train_graph(monkeypatch, tmp_path / "run")
  assert graph.loss.graph is graph.graph
  assert test_presets.mesh_parameter_count(graph.graph) == model.num_parameters()


@pytest.mark.parametrize("name", CONVERTED)
def test_parameter_count_is_gpt_neos(name, tmp_path):
  gin_utils.parse([converted(name, tmp_path)], [NO_DATASET])
  assert gpt_lib.GPT().num_parameters() == gpt_neo_parameters(load(name))


def test_xl_pile_maps_optimizer_schedule_precision_mesh_and_microbatches(tmp_path):
  gin_utils.parse([converted("gpt3_XL_256_Pile.json", tmp_path)], [NO_DATASET])
  assert gpt_lib.GPT().num_parameters() == gpt_neo_parameters(load("gpt3_XL_256_Pile.json"))
  expected = {
      "Adam.beta1": 0.9, "Adam.beta2": 0.95, "Adam.epsilon": 1e-8, "Adam.weight_decay": 0.1,
      "learning_rate_schedule.warmup_steps": 3000, "learning_rate_schedule.decay": "cosine",
      "learning_rate_schedule.min_ratio": 0.1, "train.clip_norm": 1.0,
      "train.train_steps": 286150, "train.precision": "bfloat16",
      "mesh.implementation": "simd", "mesh.mesh_shape": "x:128,y:2",
      "mesh.layout": "batch:x,embd:y", "GPT.recompute_grad": True,
      # 512 / 128 replicas = 4 sequences of 2048 tokens, 2048 tokens per microbatch
      "train.microbatches_per_batch": 4, "train.eval_batches": 10,
      "train.steps_per_loop": 500, "train.sampling": "fixed",
      "GPT.z_loss": 1e-4,  # absent from the config: models/gpt2/gpt2.py's default
  }
  assert {key: gin.query_parameter(key) for key in expected} == expected


def test_generic_text_datasets_keep_their_modes_and_weights(tmp_path):
  config = dict(load("gpt2_small.json"), input_fn="generic_text",
                datasets=[["pile", 25, "documents_random", 2.0], ["owt", 10,
                                                                  "documents_random", 1.0]])
  text = gpt_neo_config.convert(config, "mix.json", {"pile": "data/pile", "owt": "data/owt"})
  (tmp_path / "mix.gin").write_text(text)
  gin_utils.parse([str(tmp_path / "mix.gin")], [])
  assert gin.query_parameter("train.sampling") == "random_chunk"
  assert gin.query_parameter("%DATASET_DIR") == {"data/pile": 2.0, "data/owt": 1.0}


@pytest.mark.parametrize("change, fragment", [
    ({"mlp_glu": True}, "config key 'mlp_glu' has no equivalent here"),
    ({"n_layer": "24"}, "config key 'n_layer' = \"24\": expected a positive integer"),
    ({"attention_types": [[["global", "local"], 12]]}, "describes 24 layers but n_layer = 12"),
    ({"layout": "batch:x,foo:y"}, "'layout' names tensor dimension 'foo'"),
    ({"activation_function": "relu"}, "never read by GPT-Neo (it trains with 'gelu'); write "
                                      "'activation_fn'"),
    ({"opt_name": "sgd"}, "'opt_name' = \"sgd\""),
    ({"z_loss": -1}, "config key 'z_loss' = -1"),
    ({"datasets": [["pile", 25, "documents_random", 1.0], ["owt", 25, "chunks", 1.0]],
      "input_fn": "generic_text"}, "mixes sampling modes"),
])
def test_bad_key_or_value_is_one_line(change, fragment):
  config = dict(load("gpt3_small_256.json"), **change)
  with pytest.raises(gin_utils.UserError, match=None) as error:
    gpt_neo_config.convert(config, "bad.json")
  assert fragment in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_config_is_one_line_and_writes_nothing(name, tmp_path):
  output = tmp_path / "out.gin"
  result = run_binary("convert_config", f"--config={CONFIGS / name}", f"--output={output}")
  assert_one_line_error(result, "convert_config", REFUSED[name])
  assert not output.exists()


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_unsplittable_layout_is_refused_with_the_layout_to_write(name, tmp_path):
  output = tmp_path / "out.gin"
  result = run_binary("convert_config", f"--config={CONFIGS / name}", f"--output={output}")
  unsplit = [dim for dim in ("memory_length",) if f"{dim}:y" in load(name)["layout"]]
  assert_one_line_error(result, "convert_config", *(f"{dim} over 'y'" for dim in unsplit),
                        f"--layout='{LAYOUTS[name]}'")
  assert not output.exists()
  run_binary("convert_config", f"--config={CONFIGS / name}", f"--output={output}",
             f"--layout={LAYOUTS[name]}", check=True)
  assert f"mesh.layout = '{LAYOUTS[name]}'" in output.read_text()


def test_unknown_key_from_the_program_is_one_line_and_writes_nothing(tmp_path):
  config = tmp_path / "neo.json"
  config.write_text(json.dumps(dict(load("gpt3_small_256.json"), rotary_emb=True)))
  output = tmp_path / "out.gin"
  result = run_binary("convert_config", f"--config={config}", f"--output={output}")
  assert_one_line_error(result, "convert_config", "'rotary_emb'")
  assert not output.exists()
  run_binary("convert_config", f"--config={CONFIGS / 'gpt3_small_256.json'}",
             f"--output={output}", check=True)
  assert "GPT.n_embd = 768" in output.read_text()
