"""muP (GPT.parametrization = "mup"): the coordinate check of Tensor Programs V.

A few Adam steps at widths 4x apart on the same tokens: under muP the scale of every layer's
output (mean |x| of each block's output and of the logits) stays put as the model widens,
under the standard parametrization it grows with width (the hidden matrices' and the output's
updates add up over more coordinates). Without muP's multipliers (the hidden matrices'
learning rates, the logits') the muP run grows like the standard one.
"""
import functools

import numpy as np
import pytest

from gptneo import gin_utils
from gptneo import mesh as mesh_lib
from gptneo import runtime
from gptneo import train_graph
from gptneo.compat import mtf, tf
from gptneo.model import gpt as gpt_lib
from gptneo.model import ops
from gptneo.optim import optimizers
from gptneo.sweep import sweep_file

BASE, WIDE = 64, 256  # the widths compared (4x); muP's base width is the narrow one
BATCH, N_CTX, VOCAB, STEPS = 8, 16, 64, 4
LEARNING_RATE = 0.01  # large enough that the updates, not the init, set the scale by STEPS


class RecordingGPT(gpt_lib.GPT):
  """The GPT, keeping each block's output (mtf tensors of this graph) in `blocks`."""

  def _layer(self, x, *args, **kwargs):
    x = super()._layer(x, *args, **kwargs)
    self.blocks.append(x)
    return x


def activation_scales(width, parametrization, precision="float32"):
  """Mean |x| of each block's output and of the logits after STEPS Adam steps, as a list."""
  with tf.Graph().as_default():
    tf.set_random_seed(3)
    adam_step = tf.Variable(1.0, trainable=False)
    mtf_graph, mesh = runtime.new_mesh()
    model = RecordingGPT(n_layer=2, n_embd=width, n_head=4, n_ctx=N_CTX, n_vocab=VOCAB,
                         parametrization=parametrization, mup_base_width=BASE)
    model.blocks = []
    dims = model.dims(BATCH)
    windows = np.random.RandomState(0).randint(0, VOCAB, size=(BATCH, N_CTX + 1))
    tokens, targets = (mtf.import_tf_tensor(mesh, tf.constant(t, tf.int32),
                                            [dims.batch, dims.sequence])
                       for t in (windows[:, :-1], windows[:, 1:]))
    logits, _ = model(tokens, runtime.variable_dtype(precision),
                      ops.Dropout(is_training=False, seed=0, step=0))
    loss = gpt_lib.loss(logits, targets, dims.vocab)
    variables = mtf_graph.trainable_variables
    grads = mtf.gradients([loss], [v.outputs[0] for v in variables])
    updates = optimizers.Adam(weight_decay=0.0).apply_grads(
        grads, variables, mtf.constant(mesh, LEARNING_RATE),
        mtf.import_fully_replicated(mesh, adam_step.read_value(), [], "step"))
    norm = optimizers.global_norm(grads)  # lower_step exports it: built before the lowering
    scales = [mtf.reduce_mean(mtf.abs(mtf.cast(x, tf.float32))) for x in model.blocks + [logits]]
    lowering = runtime.lower(mtf_graph, mesh, mesh_lib.mesh())
    step = train_graph.lower_step(lowering, train_graph.MtfStep(
        {"loss": loss}, norm, None, updates, grads))
    with tf.control_dependencies([step.updates]):
      train_op = adam_step.assign_add(1.0).op
    fetch = [lowering.export_to_tf_tensor(s) for s in scales]
    with tf.Session() as session:
      session.run(tf.global_variables_initializer())
      session.run(lowering.copy_masters_to_slices())
      for _ in range(STEPS):
        session.run(train_op)
      return session.run(fetch)


@functools.cache
def base_scales(precision):
  """activation_scales at BASE: the same model under either parametrization (every muP
  multiplier is 1 there), so run once."""
  return np.array(activation_scales(BASE, "standard", precision))


def growth(parametrization, precision="float32"):
  """Per layer (blocks, then logits): its scale at WIDE over its scale at BASE."""
  return np.array(activation_scales(WIDE, parametrization, precision)) / base_scales(precision)


MUP_BOUNDS = (0.4, 2.0)  # of every layer's growth over 4x the width; seen: 0.60-0.90


def test_standard_activations_grow_with_width():
  ratios = growth("standard")
  assert ratios.min() > MUP_BOUNDS[1], ratios  # seen: blocks 16 and 12, logits 3.2


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_mup_activations_keep_their_scale_as_width_grows(precision):
  ratios = growth("mup", precision)
  assert np.all((ratios > MUP_BOUNDS[0]) & (ratios < MUP_BOUNDS[1])), ratios


@pytest.mark.parametrize("multiplier", ["hidden_lr_multiplier", "output_multiplier"])
def test_without_a_mup_multiplier_the_check_fails(multiplier, monkeypatch):
  """The check above is passed by muP, not by any model: drop one multiplier and a layer
  grows (seen: without the hidden rates the blocks 12x, without the output's the logits
  2.8x; LayerNorm keeps the other from showing)."""
  monkeypatch.setattr(gpt_lib.GPT, multiplier, lambda self: 1.0)
  assert growth("mup").max() > MUP_BOUNDS[1] + 0.5


@pytest.mark.parametrize("optimizer", [
    optimizers.Adam(weight_decay=0.1), optimizers.Adam(weight_decay=0.1, fused=False),
    optimizers.Adafactor()], ids=["fused-adam", "adam", "adafactor"])
def test_a_weights_rate_multiplier_scales_its_step_not_its_decay(optimizer):
  """Two [4, 4] weights of ones, the same gradient: the one made with lr_multiplier 0.5
  moves half as far, apart from AdamW's decay per step, lr * weight_decay, which both take."""
  with tf.Graph().as_default():
    mtf_graph, mesh = runtime.new_mesh()
    dims = [mtf.Dimension("a", 4), mtf.Dimension("b", 4)]
    weights = [ops.weight(mesh, name, dims, runtime.variable_dtype("float32"),
                          tf.ones_initializer(), lr_multiplier=multiplier)
               for name, multiplier in (("full", 1.0), ("half", 0.5))]
    grad = mtf.constant(mesh, np.arange(16, dtype=np.float32).reshape(4, 4) - 7.5, dims)
    variables = [w.operation for w in weights]
    updates = optimizer.apply_grads([grad, grad], variables, mtf.constant(mesh, LEARNING_RATE),
                                    mtf.constant(mesh, 1.0))
    lowering = runtime.lower(mtf_graph, mesh, mesh_lib.mesh())
    values = [lowering.export_to_tf_tensor(w) for w in weights]
    with tf.Session() as session:
      session.run(tf.global_variables_initializer())
      session.run(lowering.copy_masters_to_slices())
      session.run([lowering.lowered_operation(op) for op in updates])
      full, half = session.run(values)
  decay = LEARNING_RATE * getattr(optimizer, "weight_decay", 0.0)  # of a weight of 1
  # Steps of ~5e-3 read off weights of ~1 in float32 (resolution 6e-8): an absolute tolerance.
  np.testing.assert_allclose(1.0 - half - decay, 0.5 * (1.0 - full - decay), rtol=0, atol=1e-6)
  assert np.abs(1.0 - full - decay).min() > 1e-4  # both moved


def test_the_shipped_transfer_sweep_builds_every_model():
  """gin/sweeps/mup_transfer.gin: both parametrizations x 4 widths x 7 powers of 2, each
  point's GPT valid (muP's base width divides every width)."""
  points = sweep_file.spec_from("mup_transfer.gin").expand()
  assert len(points) == 2 * 4 * 7
  for point in points:
    gin_utils.parse(point.gin_files, list(point.gin_params))
    model = gpt_lib.GPT()
    mup = "mup" in point.name
    assert model.hidden_lr_multiplier() == (64 / model.n_embd if mup else 1.0)
    assert model.output_multiplier() == (8.0 * 64 / model.n_embd if mup else 1.0)


def initial_logits(**gpt_kwargs):
  """The logits of a width-128 muP GPT (base 64) at init, on fixed tokens, seed 3."""
  with tf.Graph().as_default():
    tf.set_random_seed(3)
    mtf_graph, mesh = runtime.new_mesh()
    model = gpt_lib.GPT(n_layer=1, n_embd=128, n_head=4, n_ctx=N_CTX, n_vocab=VOCAB,
                        parametrization="mup", mup_base_width=BASE, **gpt_kwargs)
    dims = model.dims(BATCH)
    windows = np.random.RandomState(0).randint(0, VOCAB, size=(BATCH, N_CTX))
    tokens = mtf.import_tf_tensor(mesh, tf.constant(windows, tf.int32),
                                  [dims.batch, dims.sequence])
    logits, _ = model(tokens, runtime.variable_dtype("float32"),
                      ops.Dropout(is_training=False, seed=0, step=0))
    lowering = runtime.lower(mtf_graph, mesh, mesh_lib.mesh())
    fetch = lowering.export_to_tf_tensor(logits)
    with tf.Session() as session:
      session.run(tf.global_variables_initializer())
      session.run(lowering.copy_masters_to_slices())
      return session.run(fetch)


def test_the_output_multiplier_scales_the_logits_as_mups_output_mult():
  """GPT.mup_output_multiplier is MuReadout's output_mult: the logits are it times
  base / width times x·W_out, the same weights otherwise (it is the knob that made the
  transfer bench's widest muP model the best, bench/RESULTS.md)."""
  plain, tuned = initial_logits(), initial_logits(mup_output_multiplier=8.0)
  np.testing.assert_allclose(tuned, 8.0 * plain, rtol=1e-5, atol=1e-7)
  assert np.abs(plain).max() > 1e-3
