"""Writes the offline tasks' JSONL files from CPython's own docstrings (text we may ship).

  .venv/bin/python -m gptneo.harness.tasks.build   # rewrites gptneo/harness/tasks/*.jsonl

The first sentence of public functions' docstrings of a few stdlib modules, whitespace
collapsed, deterministic for one Python version (3.11):
- gptneo_lambada.jsonl: {"text": ...}, scored on its last word (bin/eval --task=lambada reads
  the same file);
- gptneo_hellaswag.jsonl: {"query", "choices", "label"}: a sentence's second half among three
  halves of other sentences;
- gptneo_wikitext.jsonl: {"page": ...}: whole docstrings, for rolling perplexity.
"""
import inspect
import json
import pathlib
import random
import re

MODULES = ("argparse", "ast", "calendar", "csv", "difflib", "fractions", "heapq", "json",
           "string", "textwrap", "shlex", "queue", "os", "pathlib", "random", "statistics")
EXAMPLES = 40


def docstrings():
  for name in MODULES:
    module = __import__(name)
    for attr, value in sorted(vars(module).items()):
      doc = inspect.getdoc(value) if callable(value) and not attr.startswith("_") else None
      if doc and inspect.getmodule(value) is module:
        yield " ".join(doc.split())


def sentences(docs):
  """First sentences of 8 to 30 plain words (ASCII, no doctest)."""
  seen = []
  for doc in docs:
    first = re.split(r"(?<=\.) ", doc)[0].rstrip(".")
    words = first.split(" ")
    if 8 <= len(words) <= 30 and first.isascii() and ">>>" not in first and first not in seen:
      seen.append(first)
  return seen


def write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))


def main():
  folder = pathlib.Path(__file__).parent
  docs = list(docstrings())
  lines = sentences(docs)[:EXAMPLES]
  write(folder / "gptneo_lambada.jsonl", [{"text": line} for line in lines])
  rng = random.Random(0)
  halves = [line.split(" ") for line in lines]
  records = []
  for index, words in enumerate(halves):
    cut = len(words) // 2
    others = rng.sample([h for i, h in enumerate(halves) if i != index], 3)
    endings = [" ".join(words[cut:])] + [" ".join(o[len(o) // 2:]) for o in others]
    order = rng.sample(range(4), 4)
    records.append({"query": " ".join(words[:cut]), "choices": [endings[i] for i in order],
                    "label": order.index(0)})
  write(folder / "gptneo_hellaswag.jsonl", records)
  pages = [d for d in docs if 200 <= len(d) <= 1500 and d.isascii()][:EXAMPLES]
  write(folder / "gptneo_wikitext.jsonl", [{"page": page} for page in pages])


if __name__ == "__main__":
  main()
