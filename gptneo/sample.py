"""Basic sampling: temperature sampling from a trained model, rerunning the window per token."""
import os

import gin
import numpy as np

from gptneo import runtime
from gptneo.compat import mtf, tf
from gptneo.data import tokenizer as tokenizer_lib
from gptneo.model import ops

TOKENIZER_FILE = "tokenizer.json"


class Sampler:
  """The model's next-token logits for one window of up to n_ctx tokens, from a checkpoint."""

  def __init__(self, model, spec, model_dir, precision="float32"):
    self.model = model
    self.graph = tf.Graph()
    with self.graph.as_default():
      self.window = tf.placeholder(tf.int32, [1, model.n_ctx], name="window")
      mtf_graph, mtf_mesh = runtime.new_mesh()
      dims = model.dims(1)
      tokens = mtf.import_tf_tensor(mtf_mesh, self.window, [dims.batch, dims.sequence])
      logits = model(tokens, runtime.variable_dtype(precision),
                     ops.Dropout(is_training=False, seed=0, step=0))
      lowering = runtime.lower(mtf_graph, mtf_mesh, spec)
      self.logits = lowering.export_to_tf_tensor(logits)
      checkpoints = runtime.Checkpoints(lowering, model_dir)
      self.session = tf.Session(graph=self.graph, config=spec.session_config())
      self.checkpoint = checkpoints.restore(self.session)

  def next_logits(self, context):
    """Logits after the last of `context` (a list of ids; only its last n_ctx count)."""
    context = context[-self.model.n_ctx:]
    window = np.zeros([1, self.model.n_ctx], np.int32)
    window[0, :len(context)] = context
    return self.session.run(self.logits, {self.window: window})[0, len(context) - 1]


def sample_tokens(next_logits, prompt_ids, max_new_tokens, temperature, eos_id, rng):
  """Draws up to `max_new_tokens` ids after `prompt_ids`, stopping after EOS.

  temperature 0 is greedy decoding.
  """
  ids = list(prompt_ids)
  for _ in range(max_new_tokens):
    logits = next_logits(ids).astype(np.float64)
    if temperature == 0:
      token = int(np.argmax(logits))
    else:
      probs = np.exp((logits - logits.max()) / temperature)
      token = int(rng.choice(len(probs), p=probs / probs.sum()))
    if token == eos_id:
      break
    ids.append(token)
  return ids[len(prompt_ids):]


@gin.configurable(denylist=["model_dir", "prompt"])
def sample(model_dir, prompt, model=gin.REQUIRED, mesh=gin.REQUIRED, max_new_tokens=100,
           temperature=0.8, seed=0, precision="float32"):
  """Continues `prompt` with the latest checkpoint in `model_dir`.

  Args:
    model_dir: a trained model's folder (checkpoints, operative_config.gin, tokenizer.json).
    prompt: the text to continue; "" starts from the end-of-text token.
    model: the model, as trained (read from the operative config).
    mesh: the mesh to sample on.
    max_new_tokens: stop after this many new tokens (or at end-of-text).
    temperature: softmax temperature; 0 is greedy.
    seed: seeds the sampling.
    precision: "float32" or "bfloat16" activations.

  Returns:
    the decoded continuation (without the prompt).
  """
  if temperature < 0:
    raise ValueError(f"sample.temperature = {temperature}; it must be >= 0")
  tokenizer = tokenizer_lib.load_tokenizer(os.path.join(model_dir, TOKENIZER_FILE))
  eos = tokenizer_lib.eos_id(tokenizer)
  prompt_ids = tokenizer.encode(prompt).ids if prompt else [eos]
  sampler = Sampler(model, mesh, model_dir, precision)
  new_ids = sample_tokens(sampler.next_logits, prompt_ids, max_new_tokens, temperature, eos,
                          np.random.default_rng(seed))
  return tokenizer.decode(new_ids)
