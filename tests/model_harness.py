"""Runs a GPT's forward (and backward) pass on numpy tokens, on one CPU device."""
import numpy as np

from gptneo import mesh as mesh_lib
from gptneo import runtime
from gptneo.compat import mtf, tf
from gptneo.model import gpt as gpt_lib
from gptneo.model import ops


class Harness:
  """A built graph for one model and batch: logits(tokens), gradients(tokens), weights."""

  def __init__(self, model, batch_size, seed=1):
    self.model, self.graph = model, tf.Graph()
    with self.graph.as_default():
      tf.set_random_seed(seed)
      mtf_graph, mtf_mesh = runtime.new_mesh()
      dims = model.dims(batch_size)
      self.tokens = tf.placeholder(tf.int32, [batch_size, model.n_ctx + 1])
      inputs = mtf.import_tf_tensor(mtf_mesh, self.tokens[:, :-1], [dims.batch, dims.sequence])
      targets = mtf.import_tf_tensor(mtf_mesh, self.tokens[:, 1:], [dims.batch, dims.sequence])
      logits, aux_losses = model(inputs, runtime.variable_dtype("float32"),
                                 ops.Dropout(is_training=False, seed=0, step=0))
      loss = gpt_lib.loss(logits, targets, dims.vocab)
      for aux in aux_losses.values():
        loss += aux
      variables = mtf_graph.trainable_variables
      grads = mtf.gradients([loss], [v.outputs[0] for v in variables])
      spec = mesh_lib.mesh()
      lowering = runtime.lower(mtf_graph, mtf_mesh, spec)
      self.logits = lowering.export_to_tf_tensor(logits)
      self.aux_losses = {name: lowering.export_to_tf_tensor(value)
                         for name, value in aux_losses.items()}
      self.grads = {v.name: lowering.export_to_tf_tensor(g)
                    for v, g in zip(variables, grads, strict=True)}
      self.masters = {v.name: v._master for v in variables}  # pylint: disable=protected-access
      self.session = tf.Session(config=spec.session_config())
      self.session.run(tf.global_variables_initializer())
      self._to_slices = lowering.copy_masters_to_slices()
      self.session.run(self._to_slices)

  def weights(self):
    return self.session.run(self.masters)

  def load(self, weights):
    """Overwrites this model's weights with another's of the same names."""
    with self.graph.as_default():
      for name, master in self.masters.items():
        master.load(weights[name], self.session)
      self.session.run(self._to_slices)

  def logits_of(self, tokens):
    """Logits [batch, n_ctx, vocab] for int tokens [batch, n_ctx]."""
    padded = np.concatenate([tokens, tokens[:, :1]], axis=1)
    return self.session.run(self.logits, {self.tokens: padded})

  def aux_losses_of(self, tokens):
    padded = np.concatenate([tokens, tokens[:, :1]], axis=1)
    return self.session.run(self.aux_losses, {self.tokens: padded})

  def gradients_of(self, windows):
    """Gradients of the training loss for windows [batch, n_ctx + 1]."""
    return self.session.run(self.grads, {self.tokens: windows})
