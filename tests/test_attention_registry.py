"""One registry of attention types: training, decoding and export all refuse what it lacks."""
import pytest

from gptneo import hf
from gptneo.errors import UserError
from gptneo.model import attention
from gptneo.model import cache as cache_lib
from gptneo.model import gpt as gpt_lib
from tests.test_decode import random_model

SHAPE = dict(n_layer=2, n_embd=32, n_head=4, n_ctx=16, n_vocab=64, scale_attention=False)


@pytest.fixture
def made_up(monkeypatch):
  """A type that trains as global attention but has neither a decoder nor an HF name."""
  kind = attention.AttentionType("made_up", attention.ATTENTION_TYPES["global"].train_kernel)
  monkeypatch.setitem(attention.ATTENTION_TYPES, "made_up", kind)
  return kind


def test_training_refuses_an_unknown_type_naming_the_known_ones():
  with pytest.raises(UserError) as error:
    attention.kernel("sparse", 4, 1.0)
  assert str(error.value) == ("GPT.attention_layers names unknown attention type 'sparse'; use "
                              "one of ['global', 'local', 'linear']")


def test_training_runs_the_kernel_the_registry_names(monkeypatch):
  def kernel(q, k, v, dims, drop_probs):
    del k, v, dims, drop_probs
    return q
  kind = attention.AttentionType("identity", lambda window_size, scale: kernel)
  monkeypatch.setitem(attention.ATTENTION_TYPES, "identity", kind)
  assert attention.kernel("identity", 4, 1.0) is kernel


def test_decoding_refuses_a_type_without_a_decoder(made_up):
  del made_up
  with pytest.raises(UserError, match=r"^GPT.attention_layers uses 'made_up' attention, which "
                     r"the key/value cache cannot decode; set sample.cache = False$"):
    random_model(['GPT.attention_layers = ["made_up", "global"]'])


def test_decoding_refuses_an_unknown_type():
  cache = cache_lib.DecodeCache(positions=None)
  with pytest.raises(UserError, match="unknown attention type 'sparse'"):
    cache.attend("sparse", None, None, None, None, 4, 1.0)


def test_export_refuses_a_type_without_an_hf_name(made_up):
  del made_up
  model = gpt_lib.GPT(attention_layers=["made_up", "linear"], **SHAPE)
  with pytest.raises(UserError) as error:
    hf.check_exportable(model)
  assert str(error.value) == ("HF GPT-Neo cannot express this model: GPT.attention_layers uses "
                              "['linear', 'made_up'] (HF GPT-Neo: ['global', 'local'])")


def test_export_writes_the_registry_hf_names(monkeypatch):
  kind = attention.AttentionType("wide", attention.ATTENTION_TYPES["global"].train_kernel,
                                 decode="softmax", hf_name="global")
  monkeypatch.setitem(attention.ATTENTION_TYPES, "wide", kind)
  model = gpt_lib.GPT(**{**SHAPE, "n_layer": 3}, attention_layers=["wide", "global", "local"],
                      window_size=4)
  hf.check_exportable(model)
  assert hf.hf_config(model, 0, "float32")["attention_types"] == [[["global"], 2],
                                                                  [["local"], 1]]


def test_a_decode_mode_the_cache_lacks_is_a_bug_at_registration():
  with pytest.raises(ValueError, match="decodes as 'sparse', which cache.DecodeCache does not"):
    attention.AttentionType("x", attention.linear_attention, decode="sparse")
