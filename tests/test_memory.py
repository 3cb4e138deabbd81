"""The analytic training-memory estimate against hand counts (no training)."""
import gin
import pytest

from gptneo import errors
from gptneo import memory
from gptneo import mesh as mesh_lib
from gptneo import runtime
from gptneo.compat import mtf, tf
from gptneo.layout_search import cost_model
from gptneo.model import feedforward
from gptneo.model import gpt
from gptneo.model import ops
from gptneo.optim import optimizers

E, HEADS, T, V, W, B = 64, 4, 128, 1000, 32, 2  # embd, heads, n_ctx, vocab, window, batch
TOKENS, M = B * T, 4 * E
LN = 2 * 4 * TOKENS * E  # ln_1 and ln_2: centered, 2 x centered, normalized, output each
OUT = TOKENS * E  # the heads' output, the out projection's input
MLP = (1 + 4) * TOKENS * M  # gelu_tanh's 4 kept tensors, proj input
SOFTMAX = 4 * TOKENS * V  # float32 in either precision
HEAD = 4 * TOKENS * E  # ln_f


def _model(layers, **kwargs):
  return gpt.GPT(n_layer=len(layers), n_embd=E, n_head=HEADS, n_ctx=T, n_vocab=V,
                 attention_layers=layers, window_size=W, **kwargs)


GLOBAL = 3 * TOKENS * E + B * HEADS * T * T  # q, k, v; probabilities [b, h, s, s]
LOCAL = 5 * TOKENS * E + B * HEADS * T * 2 * W  # q, k and v with the previous block; [b, h, s, 2w]


@pytest.mark.parametrize("layers, attention_elements", [
    (["global", "global"], 2 * GLOBAL),
    (["local", "local"], 2 * LOCAL),
    (["global", "local"], GLOBAL + LOCAL),
])
def test_float32_adam_terms_match_a_hand_count(layers, attention_elements):
  model = _model(layers)
  params = model.num_parameters()
  estimate = memory.training_memory_bytes(model, B)
  assert estimate.persistent == {"weights (float32)": 4 * params,
                                 "optimizer state (float32)": 2 * 4 * params}
  activations = len(layers) * (LN + OUT + MLP) + attention_elements + HEAD
  start = estimate.backward_start
  assert sum(v for k, v in start.items() if k.startswith("activations")) == (
      4 * activations + SOFTMAX)
  assert start["loss gradient [batch, seq, vocab] (float32)"] == 4 * TOKENS * V
  assert estimate.backward_end == {"gradients": 4 * params,
                                   "tied embedding's second partial gradient": 4 * V * E}
  assert estimate.peak == 12 * params + 4 * activations + 2 * SOFTMAX
  assert dict(estimate.items()) == {**estimate.persistent, **start}  # activations dominate


def test_bfloat16_halves_activations_and_keeps_bfloat16_weights():
  model = _model(["global", "local"])
  params = model.num_parameters()
  estimate = memory.training_memory_bytes(model, B, precision="bfloat16")
  activations = 2 * (LN + OUT + MLP) + GLOBAL + LOCAL + HEAD
  start = estimate.backward_start
  assert sum(v for k, v in start.items() if k.startswith("activations")) == (
      2 * activations + SOFTMAX)
  assert start["bfloat16 weight copies"] == 2 * params
  assert estimate.backward_end["gradients"] == 2 * params
  assert estimate.persistent["weights (float32)"] == 4 * params  # the masters stay float32


def test_the_weight_shapes_are_the_graphs_variables():
  """weight_shapes lists what gpt.py creates, name for name and shape for shape."""
  for model in (_model(["global", "local"]), _model(["global"], feed_forward=feedforward.glu,
                                                    tie_embeddings=False),
                _model(["global"], qkv_bias=True, parallel_residual=True,
                       shared_layer_norm=True, tie_embeddings=False, lm_head_bias=True)):
    graph = tf.Graph()
    with graph.as_default():
      mtf_graph, mtf_mesh = runtime.new_mesh()
      dims = model.dims(B)
      tokens = mtf.import_tf_tensor(mtf_mesh, tf.zeros([B, T], tf.int32),
                                    [dims.batch, dims.sequence])
      model(tokens, runtime.variable_dtype("float32"), ops.Dropout(False, 0, 0))
    built = {v.name.removeprefix("gpt/"): tuple(v.shape.to_integer_list)
             for v in mtf_graph.trainable_variables}
    assert built == {name: tuple(size for _, size in shape)
                     for name, shape in memory.weight_shapes(model)}
    assert sum(memory._elements(s) for _, s in memory.weight_shapes(model)) == (  # pylint: disable=protected-access
        model.num_parameters())


def test_the_mlp_variants_dropout_and_recompute():
  base = memory.activation_terms(_model(["global"]), B)
  glu = memory.activation_terms(_model(["global"], feed_forward=feedforward.glu), B)
  assert glu["mlp"] == (3 + 4) * TOKENS * M  # gate and fc outputs, their product
  relu = memory.activation_terms(_model(["global"], activation=ops.relu), B)
  assert relu["mlp"] == (1 + 1) * TOKENS * M  # its input (mtf's gradient reads it), output
  dropped = memory.activation_terms(_model(["global"], attn_dropout=0.1, res_dropout=0.1,
                                           embed_dropout=0.1), B)
  # a mask and its input per site: embeddings, probabilities, two residual branches
  assert dropped["dropout"] == 2 * (TOKENS * E + B * HEADS * T * T + 2 * TOKENS * E)
  assert {k: v for k, v in dropped.items() if k != "dropout"} == base
  remat = memory.activation_terms(_model(["global"] * 3, recompute_grad=True), B)
  assert remat["block inputs (recompute_grad)"] == 3 * TOKENS * E
  assert remat["mlp"] == base["mlp"]  # one block's own activations at a time


def test_the_optimizer_says_what_state_it_keeps():
  model = _model(["global"])
  assert memory.optimizer_state_elements(model) == 2 * model.num_parameters()
  assert memory.optimizer_state_elements(model, optimizers.Adam()) == 2 * model.num_parameters()
  factored = optimizers.Adafactor()
  expected = sum(memory._elements(slot) for _, shape in memory.weight_shapes(model)  # pylint: disable=protected-access
                 for slot in factored.slot_shapes(shape))
  assert memory.optimizer_state_elements(model, factored) == expected
  wide = gpt.GPT(n_layer=1, n_embd=128, n_head=4, n_ctx=T, n_vocab=V)
  wte = dict(memory.weight_shapes(wide))["wte"]
  assert sum(memory._elements(s) for s in factored.slot_shapes(wte)) == V + 128  # pylint: disable=protected-access
  assert memory.optimizer_state_elements(wide, factored) < wide.num_parameters()
  with pytest.raises(ValueError, match="precision"):
    memory.training_memory_bytes(model, B, precision="float16")


def _cpus(count=1, layout=()):
  """A CPU mesh of `count` devices on mesh dimension x (none for one) with `layout`."""
  shape = [("x", count)] if count > 1 else []
  return mesh_lib.MeshSpec(shape, list(layout), [f"/cpu:{i}" for i in range(count)])


def test_decoding_holds_weights_cache_and_one_blocks_activations():
  model = _model(["global", "local"])
  estimate = memory.decoding_memory_bytes(model, B, decode=True)
  assert estimate.persistent == {"weights (float32)": 4 * model.num_parameters(),
                                 "key/value cache": 4 * B * 2 * 2 * (T + 1) * E}
  largest = max(sum(block.values()) for block in memory.block_activations(model, B))
  assert largest == LN + OUT + MLP + GLOBAL  # the global block
  assert estimate.backward_start == {"activations: the largest block": 4 * largest,
                                     "logits and their softmax (float32)": 2 * SOFTMAX}
  # GPT.n_ctx = 100000000 (the 51 GB sample): the position table alone is 51 GB
  long = gpt.GPT(n_layer=2, n_embd=128, n_head=4, n_ctx=100_000_000, n_vocab=V)
  assert memory.decoding_memory_bytes(long, 1).persistent["weights (float32)"] > 51e9


def test_a_layout_splits_what_its_dimensions_divide():
  model = _model(["global", "global"])
  work = cost_model.Workload.of(model, B)
  whole = memory.training_memory_bytes(model, B)
  assert memory.per_device(whole, work, _cpus()) is whole
  data = memory.per_device(whole, work, _cpus(2, [("batch", "x")]))
  assert data.persistent == whole.persistent  # each device holds all the weights
  assert data.backward_end == whole.backward_end
  assert {name: 2 * count for name, count in data.backward_start.items()} == (
      whole.backward_start)  # and half the batch's activations


def _refusal(estimate_bytes, mesh, available):
  gin.bind_parameter("memory_check.available", available)
  estimate = memory.MemoryEstimate({"weights (float32)": estimate_bytes}, {}, {})
  try:
    memory.check(estimate, mesh, "the run", "do less")
  except errors.UserError as error:
    return str(error)
  return None


def test_the_check_compares_the_machines_memory_with_every_cpu_device_it_holds():
  mib = 2 ** 20
  assert _refusal(100 * mib, _cpus(), "140MiB") is None  # 1.3 x 100 MiB fits
  refused = _refusal(100 * mib, _cpus(), "120MiB")
  assert refused == ("the run needs about 0.13 GiB (1.3x the estimate: 0.10 GiB of weights, "
                     "0.00 GiB more at its peak) but 0.12 GiB is available on this machine; do "
                     "less, or set memory_check.enabled = False to try anyway"), refused
  two_cpus = _cpus(2, [("batch", "x")])
  assert "0.25 GiB" in _refusal(100 * mib, two_cpus, "140MiB")  # both in this memory
  gin.bind_parameter("memory_check.enabled", False)
  assert _refusal(100 * mib, _cpus(), "1MiB") is None
  gin.bind_parameter("memory_check.enabled", "no")  # a string would be true
  assert _refusal(100 * mib, _cpus(), "1MiB") == ("memory_check.enabled = 'no'; use True or "
                                                   "False")


def test_an_accelerator_is_checked_against_memory_check_device_memory():
  gpu = mesh_lib.MeshSpec([], [], ["/gpu:0"])
  assert _refusal(2 ** 40, gpu, "1MiB") is None  # the host's memory is not the GPU's
  gin.bind_parameter("memory_check.device_memory", "16GiB")
  assert "16.00 GiB is per gpu (memory_check.device_memory)" in _refusal(2 ** 40, gpu, None)
  gin.bind_parameter("memory_check.device_memory", "lots")
  assert _refusal(1, gpu, None).startswith("memory_check.device_memory='lots' is not a size")


def test_the_knobs_stay_out_of_the_operative_config():
  """A model dir carries its operative config to whoever samples from it: not the memory
  knobs of the machine it was trained on."""
  gin.bind_parameter("memory_check.available", "1TiB")
  assert _refusal(1, _cpus(), "1TiB") is None
  assert "memory_check" not in gin.operative_config_str()


def test_a_sharded_layout_divides_what_it_shards_and_holds_the_gathered_weights():
  model = _model(["global", "global"], recompute_grad=True)
  work = cost_model.Workload.of(model, B)
  whole = memory.training_memory_bytes(model, B)
  fsdp = memory.per_device(whole, work, _cpus(2, [("batch", "x"), ("fsdp", "x")]))
  zero = memory.per_device(whole, work, _cpus(2, [("batch", "x"), ("zero", "x")]))
  for name in ("weights (float32)", "optimizer state (float32)"):
    assert fsdp.persistent[name] == pytest.approx(whole.persistent[name] / 2)
  assert fsdp.backward_end["gradients"] == pytest.approx(whole.backward_end["gradients"] / 2)
  gathered = fsdp.backward_start[memory.GATHERED]
  assert gathered == fsdp.backward_end[memory.GATHERED] > 0  # through the whole pass
  assert memory.GATHERED not in fsdp.persistent
  assert zero.persistent["weights (float32)"] == whole.persistent["weights (float32)"]
  assert zero.persistent["optimizer state (float32)"] == pytest.approx(
      whole.persistent["optimizer state (float32)"] / 2)
  assert zero.backward_end["gradients"] == pytest.approx(whole.backward_end["gradients"] / 2)
  assert memory.GATHERED not in zero.backward_start


def test_the_check_passes_a_sharded_run_that_fits_and_refuses_one_that_does_not():
  """1.3B-like weights on 64 GPUs of 12 GiB: Adam's 16 bytes a weight fit only sharded."""
  model = gpt.GPT(n_layer=24, n_embd=2048, n_head=16, n_ctx=2048, n_vocab=50304,
                  recompute_grad=True)
  work = cost_model.Workload.of(model, 64)
  gpus = [f"/gpu:{i}" for i in range(64)]
  gin.bind_parameter("memory_check.device_memory", "12GiB")

  def refusal(layout):
    mesh = mesh_lib.MeshSpec([("x", 64)], layout, gpus)
    estimate = memory.per_device(memory.training_memory_bytes(model, 64), work, mesh)
    try:
      memory.check(estimate, mesh, "the run", "do less")
    except errors.UserError as error:
      return str(error)
    return None
  assert "12.00 GiB is per gpu" in refusal([("batch", "x")])
  assert refusal([("batch", "x"), ("fsdp", "x")]) is None
  assert refusal([("batch", "x"), ("zero", "x")]) is None
  gin.bind_parameter("memory_check.device_memory", "2GiB")  # too little even sharded
  assert "2.00 GiB is per gpu" in refusal([("batch", "x"), ("fsdp", "x")])
