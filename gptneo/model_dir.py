"""What a model dir holds, and who may write it.

`contents`, `check_empty` and `clear` say what a model dir (a folder or a gs:// prefix) holds
and delete the model in one (bin/import_hf --overwrite).
"""
import fnmatch
import os

from gptneo import storage
from gptneo.errors import UserError

# What bin/train and bin/import_hf write into a model dir: what --overwrite deletes.
MODEL_FILES = ("model.ckpt-*", "checkpoint", "checkpoint.tmp*", "events.out.tfevents.*",
               "train_metrics.jsonl", "eval.jsonl", "operative_config.gin", "model.gin",
               "command.txt", "tokenizer.json")


def contents(model_dir):
  """The names a model dir holds, hidden ones (a lock, a mirror's records) aside; for gs://,
  its objects'."""
  if storage.is_remote(model_dir):
    return storage.object_names(model_dir)
  try:
    return sorted(name for name in os.listdir(model_dir) if not name.startswith("."))
  except FileNotFoundError:
    return []
  except NotADirectoryError:
    raise UserError(f"model dir {model_dir!r} is a file; pass a folder as --model_dir") from None


def check_empty(model_dir, overwrite=False):
  """Refuses (one line) a model dir that holds anything, unless overwrite."""
  names = contents(model_dir)
  if names and not overwrite:
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise UserError(f"model dir {model_dir} is not empty (it holds {shown}); pass "
                    f"--overwrite to replace the model in it, or choose another --model_dir")


def clear(model_dir):
  """Deletes the model a local model dir holds (MODEL_FILES); any other file stays."""
  for name in contents(model_dir):
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in MODEL_FILES):
      os.remove(os.path.join(model_dir, name))
