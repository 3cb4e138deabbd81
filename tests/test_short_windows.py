"""Windows shorter than n_ctx (inference only): the position tables keep their n_ctx rows and
the first `sequence` of them are used, so the logits of a window of L tokens are those of the
first L positions of the n_ctx window, for every position type and attention mix, and a
RestoredModel of that length loads the same checkpoint."""
import os

import numpy as np
import pytest

from gptneo import gin_utils
from gptneo import inference
from gptneo import mesh as mesh_lib
from gptneo import runtime
from gptneo.compat import mtf, tf
from gptneo.model import gpt as gpt_lib
from gptneo.model import ops
from gptneo.model import positions
from tests.conftest import NEO_N_CTX

N_CTX, VOCAB, WINDOW = 32, 64, 8
VARIANTS = {
  "learned_global_local": dict(attention_layers=[[["global", "local"], 1]]),
  "learned_local": dict(attention_layers=[["local", 2]]),
  "rotary_global_local": dict(positions=positions.RotaryPositions(fraction=0.5),
                attention_layers=[[["global", "local"], 1]]),
  "axial": dict(positions=positions.AxialPositions()),
  "none_local": dict(positions=positions.NoPositions(), attention_layers=[["local", 2]]),
}


def logits_at(model, lengths, tokens):
  """Logits of tokens[:, :L] for each L, from one graph (so one set of weights)."""
  graph = tf.Graph()
  with graph.as_default():
    tf.set_random_seed(3)
    mtf_graph, mtf_mesh = runtime.new_mesh()
    placeholders, outputs = [], []
    for length in lengths:
      dims = model.dims(tokens.shape[0], length)
      placeholders.append(tf.placeholder(tf.int32, [tokens.shape[0], length]))
      ids = mtf.import_tf_tensor(mtf_mesh, placeholders[-1], [dims.batch, dims.sequence])
      logits, _ = model(ids, runtime.variable_dtype("float32"),
                        ops.Dropout(is_training=False, seed=0, step=0))
      outputs.append(logits)
    spec = mesh_lib.mesh()
    lowering = runtime.lower(mtf_graph, mtf_mesh, spec)
    exported = [lowering.export_to_tf_tensor(x) for x in outputs]
    shapes = {v.name: v.shape.to_integer_list for v in mtf_graph.trainable_variables}
    with tf.Session(graph=graph, config=spec.session_config()) as session:
      session.run(tf.global_variables_initializer())
      session.run(lowering.copy_masters_to_slices())
      feed = {p: tokens[:, :length] for p, length in zip(placeholders, lengths, strict=True)}
      return session.run(exported, feed), shapes


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_short_window_gives_the_first_positions_of_the_full_window(variant):
  model = gpt_lib.GPT(n_layer=2, n_embd=32, n_head=4, n_ctx=N_CTX, n_vocab=VOCAB,
            window_size=WINDOW, **VARIANTS[variant])
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, N_CTX))
  lengths = (N_CTX, 16, WINDOW, 5) if "local" not in variant else (N_CTX, 16, WINDOW, 3)
  (full, *short), shapes = logits_at(model, lengths, tokens)
  for length, logits in zip(lengths[1:], short, strict=True):
    assert logits.shape == (2, length, VOCAB)
    np.testing.assert_allclose(logits, full[:, :length], atol=1e-5, err_msg=str(length))
  assert [shape for name, shape in shapes.items() if name.endswith("/wpe")] == (
      [[N_CTX, 32]] if variant.startswith("learned") else [])  # the checkpoint's shape


def test_a_window_local_attention_cannot_cut_into_blocks_is_refused():
  model = gpt_lib.GPT(n_layer=2, n_embd=32, n_head=4, n_ctx=N_CTX, n_vocab=VOCAB,
            window_size=WINDOW, attention_layers=[[["global", "local"], 1]])
  assert [n for n in range(1, 2 * N_CTX) if model.window_fits(n)] == [*range(1, 9), 16, 24, 32]
  with pytest.raises(ValueError, match="a window of 12 tokens does not fit this model"):
    logits_at(model, (12,), np.zeros((1, 12), np.int64))


def test_a_restored_model_of_a_shorter_length_scores_the_checkpoint_alike(neo_model_dir):
  gin_utils.parse([os.path.join(neo_model_dir, "operative_config.gin")],
          ['mesh.mesh_shape = ""', 'mesh.layout = ""'])
  rt = runtime.Runtime(mesh_lib.mesh())
  full, short = (inference.RestoredModel(gpt_lib.GPT(), rt, neo_model_dir, 2,
                       sequence_length=length)
           for length in (None, NEO_N_CTX // 2))
  full.restore(), short.restore()
  windows = [list(range(3, 3 + NEO_N_CTX // 2)), [5, 6, 7]]
  tokens = full.pad(windows)
  got = short.score(short.pad(windows), short.pad([w[1:] + [1] for w in windows]))
  want = full.score(tokens, full.pad([w[1:] + [1] for w in windows]))
  assert short.pad(windows).shape == (2, NEO_N_CTX // 2)
  np.testing.assert_allclose(got.token_nll, want.token_nll[:, :NEO_N_CTX // 2], atol=1e-5)
  np.testing.assert_array_equal(got.argmax, want.argmax[:, :NEO_N_CTX // 2])
  np.testing.assert_allclose(short.next_logits(windows), full.next_logits(windows), atol=1e-5)
