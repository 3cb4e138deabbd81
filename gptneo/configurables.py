"""Imports every module that registers gin configurables, so any gin file parses in any binary."""
from gptneo import mesh  # noqa: F401
from gptneo import sample  # noqa: F401
from gptneo import train  # noqa: F401
from gptneo.model import gpt  # noqa: F401
from gptneo.model import ops  # noqa: F401
from gptneo.optim import optimizers  # noqa: F401
