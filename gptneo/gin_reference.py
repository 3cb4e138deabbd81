"""The gin reference (docs/config_reference.md): what gptneo.configurables registers, from the configurables'
own signatures and docstrings.

  python -m gptneo.gin_reference            # print the reference
  python -m gptneo.gin_reference docs/config_reference.md  # rewrite its reference section
"""
import inspect
import re
import sys

import gin

from gptneo import configurables
from gptneo import gin_utils

START, END = "<!-- gin-reference:start -->", "<!-- gin-reference:end -->"


def _tables():
  """The configurables with knobs, module by module in configurables.KNOBS order."""
  return [c for module in configurables.KNOBS for c in gin_utils.registered(module)]


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


def _rows(configurable):
  """One table row per knob: parameters the caller passes (no default, or denylisted) skipped."""
  obj = configurable.wrapped
  signature = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)
  docs = _arg_docs(obj)
  for param in signature.parameters.values():
    if param.default is param.empty or param.name in (configurable.denylist or ()):
      continue
    default = param.default
    if default is gin.REQUIRED:
      shown = "required"
    elif callable(default):
      shown = "@" + default.__name__
    else:
      shown = repr(default)
    yield f"| `{configurable.name}.{param.name}` | `{shown}` | {docs.get(param.name, '')} |"


def _choice(configurable):
  """How a gin file names a choice: @function, or @Class() for an instance."""
  return f"`@{configurable.name}()`" if inspect.isclass(configurable.wrapped) else (
      f"`@{configurable.name}`")


def reference():
  lines = []
  for configurable in _tables():
    rows = list(_rows(configurable))
    if not rows:  # e.g. NoPositions: nothing to bind; it is listed among the choices
      continue
    summary = (inspect.getdoc(configurable.wrapped) or "").splitlines()[0]
    lines += [f"### `{configurable.name}`", "", summary, "", "| binding | default | meaning |",
              "|---|---|---|", *rows, ""]
  for title, knob, module in configurables.CHOICES:
    choices = ", ".join(map(_choice, gin_utils.registered(module)))
    lines += [f"{title}, for `{knob}`: {choices}.", ""]
  return "\n".join(lines[:-1])


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
