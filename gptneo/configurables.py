"""The one registration point: importing it registers every gin configurable of gptneo.

Every binary imports it at the top, so any gin file parses in any of them; gin_utils, a leaf,
never imports it. gin_reference derives docs/config_reference.md from what is listed here.
"""
# TensorFlow first, with its C++ start-up banner silenced: every program imports this first.
from gptneo import quiet_tensorflow  # noqa: F401  pylint: disable=unused-import,g-bad-import-order
from gptneo import evaluate  # pylint: disable=g-bad-import-order
from gptneo.hf import export as hf_export
from gptneo import loggers
from gptneo import memory
from gptneo import mesh
from gptneo import sample
from gptneo import train
from gptneo.harness import run as harness_run
from gptneo.model import feedforward
from gptneo.model import gpt
from gptneo.model import moe
from gptneo.model import ops
from gptneo.model import positions
from gptneo.optim import optimizers

# Modules whose configurables have knobs, in the order docs/config_reference.md lists them.
KNOBS = (train, gpt, positions, moe, optimizers, mesh, memory, sample, evaluate, harness_run,
         hf_export, loggers)

# What a reference-valued knob accepts: everything one module registers, e.g. the
# activations of ops for `GPT.activation = @gelu`; (title, knob, module).
CHOICES = (
    ("Activations", "GPT.activation", ops),
    ("Feed-forwards", "GPT.feed_forward", feedforward),
    ("Position encodings", "GPT.positions", positions),
)
