"""Imports every module that registers gin configurables, so any gin file parses in any binary."""
# pylint: disable=unused-import
from gptneo import mesh
from gptneo import sample
from gptneo import train
from gptneo.model import gpt
from gptneo.model import ops
from gptneo.optim import optimizers
