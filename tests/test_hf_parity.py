"""A global + local GPT-Neo gives HuggingFace's GPTNeoForCausalLM logits.

Needs `torch` and `transformers`; skipped without them. The weights are mapped here by hand,
independently of gptneo/hf/: HF's Linear weights are [out, in], ours [in, ...named out
dims], with q, k and v stacked in one [embd, 3, heads, kv] weight.
"""
import numpy as np
import pytest

from gptneo.model import gpt as gpt_lib
from tests.model_harness import Harness

torch = pytest.importorskip("torch", reason="HF parity needs torch")
transformers = pytest.importorskip("transformers", reason="HF parity needs transformers "
                                   "(pip install transformers); issue 3 will add it")

N_LAYER, N_EMBD, N_HEAD, N_CTX, VOCAB, WINDOW = 4, 32, 4, 16, 64, 4


def hf_model():
  torch.manual_seed(0)
  config = transformers.GPTNeoConfig(
      vocab_size=VOCAB, max_position_embeddings=N_CTX, hidden_size=N_EMBD, num_layers=N_LAYER,
      num_heads=N_HEAD, attention_types=[[["global", "local"], N_LAYER // 2]],
      window_size=WINDOW, activation_function="gelu_new", resid_dropout=0.0,
      embed_dropout=0.0, attention_dropout=0.0)
  model = transformers.GPTNeoForCausalLM(config).eval()
  with torch.no_grad():  # HF inits biases and LayerNorms to constants: make them matter
    for name, parameter in model.named_parameters():
      if name.endswith("bias") or "ln" in name:
        parameter.add_(0.1 * torch.randn_like(parameter))
  return model


def our_weights(hf):
  """HF's state dict under our variable names and shapes."""
  state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  heads = (N_HEAD, N_EMBD // N_HEAD)
  weights = {"gpt/wte": state["transformer.wte.weight"],
             "gpt/wpe": state["transformer.wpe.weight"],
             "gpt/ln_f/g": state["transformer.ln_f.weight"],
             "gpt/ln_f/b": state["transformer.ln_f.bias"]}
  for i in range(N_LAYER):
    hf_block, block = f"transformer.h.{i}.", f"gpt/h{i}/"
    for norm in ("ln_1", "ln_2"):
      weights[f"{block}{norm}/g"] = state[f"{hf_block}{norm}.weight"]
      weights[f"{block}{norm}/b"] = state[f"{hf_block}{norm}.bias"]
    weights[f"{block}attn/qkv/w"] = np.stack(
        [state[f"{hf_block}attn.attention.{p}_proj.weight"].T.reshape(N_EMBD, *heads)
         for p in ("q", "k", "v")], axis=1)
    weights[f"{block}attn/out/w"] = state[f"{hf_block}attn.attention.out_proj.weight"].T.reshape(
        *heads, N_EMBD)
    weights[f"{block}attn/out/b"] = state[f"{hf_block}attn.attention.out_proj.bias"]
    for ours, theirs in (("fc", "c_fc"), ("proj", "c_proj")):
      weights[f"{block}mlp/{ours}/w"] = state[f"{hf_block}mlp.{theirs}.weight"].T
      weights[f"{block}mlp/{ours}/b"] = state[f"{hf_block}mlp.{theirs}.bias"]
  return weights


def test_global_local_gpt_neo_matches_huggingface():
  hf = hf_model()
  ours = gpt_lib.GPT(n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD, n_ctx=N_CTX, n_vocab=VOCAB,
                     attention_layers=[[["global", "local"], N_LAYER // 2]],
                     window_size=WINDOW, scale_attention=False)
  harness = Harness(ours, batch_size=2)
  harness.load(our_weights(hf))
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, N_CTX))
  with torch.no_grad():
    expected = hf(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(harness.logits_of(tokens), expected, atol=1e-4)
