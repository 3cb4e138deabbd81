"""Imports every module that registers gin configurables, so any gin file parses in any binary."""
from gptneo import evaluate  # noqa: F401
from gptneo import hf  # noqa: F401
from gptneo import mesh  # noqa: F401
from gptneo import sample  # noqa: F401
from gptneo import train  # noqa: F401
from gptneo.model import feedforward  # noqa: F401
from gptneo.model import gpt  # noqa: F401
from gptneo.model import moe  # noqa: F401
from gptneo.model import ops  # noqa: F401
from gptneo.model import positions  # noqa: F401
from gptneo.optim import optimizers  # noqa: F401
