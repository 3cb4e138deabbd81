"""The key/value cache: decoding through it equals rerunning the whole window, token by token."""
import numpy as np
import pytest

from gptneo import gin_utils
from gptneo import inference
from gptneo import mesh as mesh_lib
from gptneo import runtime
from gptneo import sample as sample_lib
from gptneo.compat import tf
from gptneo.model import gpt as gpt_lib
from tests.test_eval_sample import parse_model_config

N_CTX, VOCAB = 16, 50
SMALL = ["GPT.n_layer = 2", "GPT.n_embd = 32", "GPT.n_head = 4", f"GPT.n_ctx = {N_CTX}",
         f"GPT.n_vocab = {VOCAB}", "GPT.init_std = 0.3"]  # large weights: logits far apart
VARIANTS = {
    "global": [],
    "global+local": ['GPT.attention_layers = [[["global", "local"], 1]]', "GPT.window_size = 4"],
    "linear+local": ['GPT.attention_layers = ["linear", "local"]', "GPT.window_size = 4"],
    "rotary": ["GPT.positions = @RotaryPositions()"],
    "axial": ["GPT.positions = @AxialPositions()"],
    "no positions": ["GPT.positions = @NoPositions()", "GPT.tie_embeddings = False"],
    "glu": ["GPT.feed_forward = @glu", "GPT.activation = @silu"],
    "GPT-J's features": ["GPT.positions = @RotaryPositions()", "RotaryPositions.fraction = 0.5",
                         "RotaryPositions.interleaved = True", "GPT.parallel_residual = True",
                         "GPT.shared_layer_norm = True", "GPT.tie_embeddings = False",
                         "GPT.lm_head_bias = True"],
    "Pythia's features": ["GPT.positions = @RotaryPositions()", "RotaryPositions.fraction = 0.5",
                          "GPT.qkv_bias = True", "GPT.parallel_residual = True",
                          "GPT.tie_embeddings = False"],
    "moe": ["GPT.moe = @MoE()", "MoE.layers = [1]", "MoE.num_experts = 4",
            "MoE.capacity_factor = 4.0"],  # no token overflows, as in one-token steps
}


def random_model(bindings, batch_size=3, mesh_shape="", layout="", precision="float32",
                 chunk=64):
  """A RestoredModel with decode ops over freshly initialized (seeded) weights."""
  gin_utils.parse(["models/tiny.gin"], SMALL + bindings)
  spec = mesh_lib.mesh(mesh_shape=mesh_shape, layout=layout)
  restored = inference.RestoredModel(gpt_lib.GPT(), runtime.Runtime(spec), model_dir=None,
                                     batch_size=batch_size, precision=precision, decode=True,
                                     chunk=chunk)
  with restored.graph.as_default():
    tf.set_random_seed(3)
    restored.checkpoints.restore_or_initialize(restored.session,
                                               [tf.local_variables_initializer()])
  return restored


def cached_and_uncached(restored, steps=10, seed=0, lengths=(3, 6, 1)):
  """Logits of start/extend and of next_logits on the same growing windows, per step."""
  rng = np.random.default_rng(seed)
  windows = [list(rng.integers(0, VOCAB, n)) for n in lengths]
  pairs = [(restored.start(windows), restored.next_logits(windows))]
  for _ in range(steps):
    for window in windows:
      window.append(int(rng.integers(0, VOCAB)))
    pairs.append((restored.extend(windows), restored.next_logits(windows)))
  return pairs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_logits_equal_the_full_window_ones(variant):
  pairs = cached_and_uncached(random_model(VARIANTS[variant]))
  for cached, uncached in pairs:
    assert np.abs(uncached).max() > 1.0
    np.testing.assert_allclose(cached, uncached, atol=2e-5, rtol=0)


@pytest.mark.parametrize("variant", ["global+local", "linear+local", "rotary"])
def test_prompts_run_in_chunks_of_any_length(variant):
  """Prompts of 3, 11 and 6 ids in chunks of 4: rows end in different chunks, padded."""
  pairs = cached_and_uncached(random_model(VARIANTS[variant], chunk=4), steps=3,
                              lengths=(3, 11, 6))
  for cached, uncached in pairs:
    np.testing.assert_allclose(cached, uncached, atol=2e-5, rtol=0)


def test_local_layers_attend_only_to_their_window_far_into_the_context():
  """Past 2 * 64 positions a local layer reads the cache from near its window's start."""
  restored = random_model(VARIANTS["global+local"] + ["GPT.n_ctx = 256"])
  pairs = cached_and_uncached(restored, steps=12, lengths=(150, 139, 141))
  for cached, uncached in pairs:
    np.testing.assert_allclose(cached, uncached, atol=2e-5, rtol=0)


def test_a_layout_splitting_kv_is_refused_with_the_fix():
  with pytest.raises(ValueError, match="splits only batch and heads.*kv.*sample.cache"):
    random_model([], mesh_shape="x:2", layout="kv:x")


@pytest.mark.parametrize("mesh_shape,layout", [("x:2", "batch:x"), ("x:2", "heads:x,vocab:x")])
def test_cache_split_over_devices_equals_one_device(neo_model_dir, mesh_shape, layout):
  parse_model_config(neo_model_dir, "runs/sample.gin")

  def restored(spec):
    model = inference.RestoredModel(gpt_lib.GPT(), runtime.Runtime(spec), neo_model_dir, 4,
                                    decode=True)
    model.restore()
    return model

  one_device = cached_and_uncached(restored(mesh_lib.mesh()))
  split = cached_and_uncached(restored(mesh_lib.mesh(mesh_shape=mesh_shape, layout=layout)))
  for (_, uncached), (split_cached, _) in zip(one_device, split, strict=True):
    np.testing.assert_allclose(split_cached, uncached, atol=2e-5, rtol=0)


def test_bfloat16_cache_stays_close_to_float32():
  pairs = cached_and_uncached(random_model(VARIANTS["global+local"], precision="bfloat16"))
  for cached, uncached in pairs:
    assert np.abs(cached - uncached).max() < 0.1 * np.abs(uncached).max()


def test_prefill_once_then_one_step_per_token_until_the_window_slides():
  calls = []

  def counted(kind):
    def logits(windows):
      calls.append((kind, max(len(w) for w in windows)))
      return np.eye(10)[[(w[-1] + 1) % 10 for w in windows]]
    return logits

  new_ids = sample_lib.generate(counted("start"), counted("extend"), [[1], [4, 5]], n_ctx=4,
                                max_new_tokens=4, eos_id=-1,
                                choose=lambda i, logits: int(np.argmax(logits)))
  assert new_ids == [[2, 3, 4, 5], [6, 7, 8, 9]]
  # [4, 5] + 2 new ids fills n_ctx = 4; its next window slides, so the cache is rebuilt.
  assert calls == [("start", 2), ("extend", 3), ("extend", 4), ("start", 4)]


@pytest.mark.parametrize("bindings", [
    ["sample.temperature = 0"],
    ["sample.temperature = 1.0", "sample.top_k = 20", "sample.top_p = 0.9", "sample.seed = 5"],
])
def test_sampling_with_the_cache_gives_the_reference_tokens(neo_model_dir, bindings):
  prompts = ["def ", "import os\n", "", "class Foo(object):\n    def __init__(self):"]

  def sampled(cache):
    parse_model_config(neo_model_dir, "runs/sample.gin", "sample.max_new_tokens = 80",
                       "sample.batch_size = 3", f"sample.cache = {cache}", *bindings)
    return sample_lib.sample(neo_model_dir, prompts)

  assert sampled(True) == sampled(False)


def test_greedy_decode_past_n_ctx_matches_the_reference(neo_model_dir):
  """80 new ids after a 20-id prompt: the window slides past the 64-id n_ctx, no EOS stop."""
  parse_model_config(neo_model_dir, "runs/sample.gin")
  model = gpt_lib.GPT()
  restored = inference.RestoredModel(model, runtime.Runtime(mesh_lib.mesh()), neo_model_dir, 2,
                                     decode=True)
  restored.restore()
  prompts = [list(range(3, 23)), [7]]

  def decode(start, extend):
    return sample_lib.generate(start, extend, prompts, model.n_ctx, 80, eos_id=-1,
                               choose=lambda i, logits: int(np.argmax(logits)))

  cached = decode(restored.start, restored.extend)
  assert cached == decode(restored.next_logits, restored.next_logits)
  assert [len(ids) for ids in cached] == [80, 80]


def test_greedy_with_a_stop_string_is_greedy_cut_at_its_first_occurrence(neo_model_dir):
  tokenizer = inference.load_tokenizer(neo_model_dir)  # ids < VOCAB: bytes
  restored = random_model([])
  prompts = [[5], [9, 20, 31], [17, 4], [40], [2, 33], [25, 11, 7]]
  full = sample_lib.complete(restored, tokenizer, prompts, 30)
  # The stop string: a character that first appears after the start of some row's text.
  row, stop = next((row, c.text[k]) for row, c in enumerate(full)
                   for k in range(1, len(c.text) - 1) if c.text.find(c.text[k]) == k)
  stopped = sample_lib.complete(restored, tokenizer, prompts, 30, stop=[stop, "\x00never"])
  for before, after in zip(full, stopped, strict=True):
    assert after.text == sample_lib.cut_at_stop(before.text, [stop])
    assert after.ids == before.ids[:len(after.ids)]
  assert stopped[row].text == full[row].text[:full[row].text.find(stop)]
  assert len(stopped[row].ids) < len(full[row].ids)
  assert stop in tokenizer.decode(stopped[row].ids)
