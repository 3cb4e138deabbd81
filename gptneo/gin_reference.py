"""The README's gin reference, made from the configurables' own signatures and docstrings.

  python -m gptneo.gin_reference            # print the reference
  python -m gptneo.gin_reference README.md  # rewrite the README's reference section
"""
import inspect
import re
import sys

import gin

from gptneo import evaluate
from gptneo import hf
from gptneo import mesh
from gptneo import sample
from gptneo import train
from gptneo.model import gpt
from gptneo.model import moe
from gptneo.model import positions
from gptneo.optim import optimizers

CONFIGURABLES = [train.train, gpt.GPT, positions.RotaryPositions, positions.AxialPositions,
                 moe.MoE, optimizers.Adam, optimizers.Adafactor,
                 optimizers.learning_rate_schedule, mesh.mesh, sample.sample,
                 evaluate.evaluate, hf.export_hf]
ACTIVATIONS = ["gelu", "gelu_tanh", "relu", "selu", "silu", "swish"]
FEED_FORWARDS = ["mlp", "glu"]
POSITIONS = ["LearnedPositions", "RotaryPositions", "AxialPositions", "NoPositions"]
START, END = "<!-- gin-reference:start -->", "<!-- gin-reference:end -->"


def _arg_docs(obj):
  """name -> description, from the `Args:` section of the docstring."""
  doc = inspect.getdoc(obj) or ""
  args = doc.split("Args:", 1)[1] if "Args:" in doc else ""
  args = re.split(r"\n\S", args, maxsplit=1)[0]  # stop at the next section
  docs, name = {}, None
  for line in args.splitlines():
    match = re.match(r"\s{2}(\w+): (.*)", line)
    if match:
      name, docs[match.group(1)] = match.group(1), match.group(2).strip()
    elif name and line.strip():
      docs[name] += " " + line.strip()
  return docs


def _rows(obj):
  signature = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)
  docs = _arg_docs(obj)
  for param in signature.parameters.values():
    if param.name in ("self", "step", "total_steps", "name", "model_dir", "prompt", "prompts",
                      "task", "task_file", "output_dir"):  # flags or call arguments
      continue
    default = param.default
    if default is gin.REQUIRED or default is param.empty:
      shown = "required"
    elif callable(default):
      shown = "@" + default.__name__
    else:
      shown = repr(default)
    yield f"| `{obj.__name__}.{param.name}` | `{shown}` | {docs.get(param.name, '')} |"


def reference():
  lines = []
  for obj in CONFIGURABLES:
    summary = (inspect.getdoc(obj) or "").splitlines()[0]
    lines += [f"### `{obj.__name__}`", "", summary, "", "| binding | default | meaning |",
              "|---|---|---|", *_rows(obj), ""]
  lines.append("Activations, for `GPT.activation`: " +
               ", ".join(f"`@{a}`" for a in ACTIVATIONS) + ".")
  lines += ["", "Feed-forwards, for `GPT.feed_forward`: " +
            ", ".join(f"`@{f}`" for f in FEED_FORWARDS) + ". Position encodings, for "
            "`GPT.positions`: " + ", ".join(f"`@{p}()`" for p in POSITIONS) + "."]
  return "\n".join(lines)


def with_reference(readme_text):
  """`readme_text` with the section between the markers replaced by the current reference."""
  head, rest = readme_text.split(START, 1)
  _, tail = rest.split(END, 1)
  return f"{head}{START}\n{reference()}\n{END}{tail}"


if __name__ == "__main__":
  if len(sys.argv) > 1:
    with open(sys.argv[1]) as f:
      text = with_reference(f.read())
    with open(sys.argv[1], "w") as f:
      f.write(text)
  else:
    print(reference())
