"""HuggingFace interop: export our checkpoints as HF GPT-Neo, GPT-2, GPT-NeoX or GPT-J folders
(`export.py`) and import such folders as our checkpoints (`import_.py`). Neither direction
needs torch or transformers. architectures.py holds the architectures' weight tables and
configs; fields.py checks config.json values and writes them as gin.

This module only re-exports the public names, as `hf.X`.
"""
from gptneo.hf.architectures import ARCHITECTURES
from gptneo.hf.architectures import GPT_NEO
from gptneo.hf.architectures import to_hf
from gptneo.hf.export import check_exportable
from gptneo.hf.export import EXPORT_DTYPES
from gptneo.hf.export import export_hf
from gptneo.hf.export import hf_config
from gptneo.hf.export import weight_pairs
from gptneo.hf.export import WEIGHTS_FILE
from gptneo.hf.export import write_tokenizer
from gptneo.hf.import_ import build_model
from gptneo.hf.import_ import check_weights
from gptneo.hf.import_ import FLOAT_DTYPES
from gptneo.hf.import_ import gin_bindings
from gptneo.hf.import_ import HF_BUFFERS
from gptneo.hf.import_ import hf_shapes
from gptneo.hf.import_ import import_hf
from gptneo.hf.import_ import MODEL_GIN
from gptneo.hf.import_ import our_weights
from gptneo.hf.import_ import read_hf_config
from gptneo.hf.import_ import read_source
from gptneo.hf.import_ import Source
from gptneo.hf.import_ import WEIGHTS_INDEX

__all__ = [
    "ARCHITECTURES", "GPT_NEO", "to_hf", "check_exportable", "EXPORT_DTYPES", "export_hf",
    "hf_config", "weight_pairs", "WEIGHTS_FILE", "write_tokenizer", "build_model",
    "check_weights", "FLOAT_DTYPES", "gin_bindings", "HF_BUFFERS", "hf_shapes", "import_hf",
    "MODEL_GIN", "our_weights", "read_hf_config", "read_source", "Source", "WEIGHTS_INDEX",
]
