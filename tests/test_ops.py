"""ops.embedding_lookup, ops.softmax_cross_entropy and ops.softmax equal the mtf ops they replace.

Each case builds the new op and its mtf reference side by side in one graph, lowers it onto a
CPU mesh (one device, or the batch or vocabulary split over 2 or 4) and compares forward values
and gradients (of a random-weighted sum of the outputs) to float32 rounding.
"""
import numpy as np
import pytest

from gptneo import runtime
from gptneo.compat import mtf, tf
from gptneo.model import ops
from tests.test_layouts import BATCH, VOCAB, spec_of

SEQ, EMBD, HEADS = 4, 16, 8
LAYOUTS = {  # case -> (mesh_shape, layout), all with the shapes above
    "1": ("", ""),
    "2 batch": ("x:2", "batch:x"),
    "2 vocab": ("x:2", "vocab:x"),
    "4 batch": ("x:4", "batch:x"),
    "4 vocab": ("x:4", "vocab:x"),
    "4 batch x vocab": ("x:2,y:2", "batch:x,vocab:y"),
}
SOFTMAX_LAYOUTS = {"1": ("", ""), "2 batch": ("x:2", "batch:x"), "2 heads": ("x:2", "heads:x"),
                   "4 batch x heads": ("x:2,y:2", "batch:x,heads:y")}
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def dim(name, size):
  return mtf.Dimension(name, size)


BATCH_DIM, SEQ_DIM, VOCAB_DIM = dim("batch", BATCH), dim("sequence", SEQ), dim("vocab", VOCAB)
EMBD_DIM, HEADS_DIM, MEMORY_DIM = dim("embd", EMBD), dim("heads", HEADS), dim("memory", SEQ)


def run_both(layout, inputs, build, dtype=tf.float32):
  """Outputs and input gradients of build(new=True) and build(new=False), as numpy.

  inputs: name -> (numpy array, mtf dims); float inputs are cast to `dtype` and
  differentiated. build(tensors, new) returns one mtf tensor.
  """
  spec = spec_of(*layout)
  graph = tf.Graph()
  with graph.as_default():
    mtf_graph, mesh = runtime.new_mesh()
    tensors = {}
    for name, (value, dims) in inputs.items():
      tensors[name] = mtf.import_tf_tensor(mesh, tf.constant(value), dims, name=name)
      if value.dtype.kind == "f":
        tensors[name] = mtf.cast(tensors[name], dtype)
    floats = [name for name, (value, _) in inputs.items() if value.dtype.kind == "f"]
    results = {}
    for new in (True, False):
      y = build(tensors, new)
      weight = np.random.RandomState(1).normal(size=y.shape.to_integer_list).astype(np.float32)
      cotangent = mtf.cast(mtf.import_tf_tensor(mesh, tf.constant(weight), y.shape), y.dtype)
      grads = mtf.gradients([mtf.reduce_sum(y * cotangent)], [tensors[n] for n in floats])
      results[new] = [mtf.cast(t, tf.float32) for t in [y] + grads]
    lowering = runtime.lower(mtf_graph, mesh, spec)
    exported = {new: [lowering.export_to_tf_tensor(t) for t in ts] for new, ts in results.items()}
    with tf.Session(config=spec.session_config()) as session:
      got = session.run(exported)
  return got[True], got[False]


def assert_same(got, want, **tolerance):
  names = ["output"] + [f"gradient {i}" for i in range(1, len(want))]
  for name, g, w in zip(names, got, want, strict=True):
    np.testing.assert_allclose(g, w, err_msg=name, **(tolerance or TOLERANCE))


def token_ids(seed=0, low=0, high=VOCAB):
  return np.random.RandomState(seed).randint(low, high, size=(BATCH, SEQ)).astype(np.int32)


def embedding_inputs(ids):
  weights = np.random.RandomState(2).normal(size=(VOCAB, EMBD)).astype(np.float32)
  return {"wte": (weights, [VOCAB_DIM, EMBD_DIM]), "ids": (ids, [BATCH_DIM, SEQ_DIM])}


def build_embedding(t, new):
  lookup = ops.embedding_lookup if new else mtf.gather
  return lookup(t["wte"], t["ids"], VOCAB_DIM)


def xent_inputs(targets):
  logits = np.random.RandomState(3).normal(scale=3.0, size=(BATCH, SEQ, VOCAB)).astype(
      np.float32)
  return {"logits": (logits, [BATCH_DIM, SEQ_DIM, VOCAB_DIM]),
          "targets": (targets, [BATCH_DIM, SEQ_DIM])}


def build_xent(t, new):
  if new:
    return ops.softmax_cross_entropy(t["logits"], t["targets"], VOCAB_DIM)
  return mtf.layers.softmax_cross_entropy_with_logits(t["logits"], t["targets"], VOCAB_DIM)


def softmax_inputs():
  scores = np.random.RandomState(4).normal(scale=4.0, size=(BATCH, HEADS, SEQ, SEQ))
  return {"scores": (scores.astype(np.float32), [BATCH_DIM, HEADS_DIM, SEQ_DIM, MEMORY_DIM])}


def build_softmax(t, new):
  return (ops.softmax if new else mtf.softmax)(t["scores"], MEMORY_DIM)


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_embedding_lookup_equals_mtf_gather(case):
  got, want = run_both(LAYOUTS[case], embedding_inputs(token_ids()), build_embedding)
  assert_same(got, want)
  assert np.abs(got[1]).sum() > 0  # the gradient reached the weights


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_softmax_cross_entropy_equals_mtf(case):
  got, want = run_both(LAYOUTS[case], xent_inputs(token_ids()), build_xent)
  assert_same(got, want)


@pytest.mark.parametrize("case", list(SOFTMAX_LAYOUTS))
def test_softmax_equals_mtf(case):
  got, want = run_both(SOFTMAX_LAYOUTS[case], softmax_inputs(), build_softmax)
  assert_same(got, want)


def test_softmax_over_a_middle_dimension():
  build = lambda t, new: (ops.softmax if new else mtf.softmax)(t["scores"], HEADS_DIM)  # noqa: E731
  assert_same(*run_both(LAYOUTS["2 batch"], softmax_inputs(), build))


@pytest.mark.parametrize("case", ["1", "2 vocab", "4 batch x vocab"])
def test_out_of_range_ids_give_zero_rows_and_no_gradient(case):
  """As mtf.gather's one-hot: an id < 0 or >= vocab embeds to zeros, on every layout."""
  ids = token_ids(seed=5, low=-3, high=VOCAB + 3)
  assert (ids < 0).any() and (ids >= VOCAB).any()
  got, want = run_both(LAYOUTS[case], embedding_inputs(ids), build_embedding)
  assert_same(got, want)
  outside = (ids < 0) | (ids >= VOCAB)
  assert not got[0][outside].any() and got[0][~outside].all()


@pytest.mark.parametrize("case", ["1", "2 vocab", "4 batch x vocab"])
def test_out_of_range_targets_give_zero_loss_and_no_gradient(case):
  """As mtf's one-hot loss: a target < 0 or >= vocab costs 0 and trains nothing."""
  targets = token_ids(seed=6, low=-3, high=VOCAB + 3)
  got, want = run_both(LAYOUTS[case], xent_inputs(targets), build_xent)
  assert_same(got, want)
  outside = (targets < 0) | (targets >= VOCAB)
  assert outside.any() and not got[0][outside].any() and not got[1][outside].any()
  assert got[0][~outside].all()


def bfloat16_errors(layout, inputs, build):
  """Max |error| of each output/gradient in bfloat16 against float32: (ours, mtf's)."""
  exact, _ = run_both(layout, inputs, build)
  ours, theirs = run_both(layout, inputs, build, dtype=tf.bfloat16)
  error = lambda got: [np.abs(g - e).max() for g, e in zip(got, exact, strict=True)]  # noqa: E731
  return error(ours), error(theirs)


@pytest.mark.parametrize("case", ["1", "4 batch x vocab"])
def test_bfloat16_embedding_lookup(case):
  """The model's bfloat16 activations: rows copied exactly, gradients as close as mtf's."""
  ours, theirs = bfloat16_errors(LAYOUTS[case], embedding_inputs(token_ids()), build_embedding)
  assert ours[0] == theirs[0] and ours[0] < 2e-2, (ours, theirs)  # bfloat16 rounding of wte
  assert ours[1] <= 1.5 * theirs[1] + 1e-3 and ours[1] < 5e-2, (ours, theirs)


@pytest.mark.parametrize("case", ["1", "4 batch x heads"])
def test_bfloat16_softmax(case):
  """As accurate as mtf.softmax in bfloat16 (one kernel instead of exp(log_softmax))."""
  ours, theirs = bfloat16_errors(SOFTMAX_LAYOUTS[case], softmax_inputs(), build_softmax)
  for mine, mtfs in zip(ours, theirs, strict=True):
    assert mine <= 1.5 * mtfs + 1e-3 and mine < 5e-2, (ours, theirs)


def test_underflowing_target_probability_caps_the_loss():
  """A target 1000 below the best logit: mtf says 1000, ours -log(1e-37) ~ 85, not inf."""
  inputs = xent_inputs(np.zeros((BATCH, SEQ), np.int32))
  inputs["logits"][0][..., 0] = -1000.0
  got, want = run_both(LAYOUTS["1"], inputs, build_xent)
  np.testing.assert_allclose(got[0], -np.log(np.float32(1e-37)), rtol=1e-5)
  np.testing.assert_allclose(got[1], want[1], **TOLERANCE)  # the gradient stays exact


def test_softmax_refuses_a_split_reduced_dimension():
  with pytest.raises(ValueError, match="softmax over heads, which the layout splits"):
    run_both(("x:2", "heads:x"), softmax_inputs(),
             lambda t, new: ops.softmax(t["scores"], HEADS_DIM))


def test_embedding_lookup_refuses_vocab_and_ids_on_one_mesh_axis():
  """No tensor here has both dims (mtf.gather's one-hot would): the op itself must refuse."""
  with pytest.raises(ValueError, match="same mesh axis"):
    run_both(("x:2", "batch:x,vocab:x"), embedding_inputs(token_ids()),
             lambda t, new: ops.embedding_lookup(t["wte"], t["ids"], VOCAB_DIM))
