"""Harness task names to task configs, looked for in order: our offline tasks (this package's
tasks/ folder), the user's folders (--task_dir, train.harness_task_dirs), then lm-eval's own
task names (which read their data from the HF hub, or its cache when offline).

A task of ours is a YAML file lm-eval reads (`task: NAME`, `dataset_path: json`,
`dataset_kwargs: {data_files: ...}`); a relative data file is found next to its YAML, so a
folder of tasks works from anywhere. Every JSONL data file is checked line by line first.
"""
import json
import os
import pathlib

from gptneo import harness
from gptneo.errors import UserError

TASK_DIR = pathlib.Path(__file__).resolve().parent / "tasks"


def find(names, task_dirs=()):
  """One lm-eval task spec per name: a config dict (ours, data files resolved and checked)
  or the name itself (lm-eval's). Raises UserError for a name found nowhere, naming a YAML of
  the user's folders that could not be read as a task (it may be the one meant)."""
  folders = [TASK_DIR, *map(pathlib.Path, task_dirs)]
  for folder in folders[1:]:
    if not folder.is_dir():
      raise UserError(f"task folder {folder} is not a folder; --task_dir names a folder of "
                      f"task YAML files")
  ours, unread = _index(folders)
  missing = [name for name in names if name not in ours]
  if missing and not _builtin(missing):
    where = ", ".join(map(str, folders))
    hint = (f"; {unread[0][0]} could not be read as a task ({unread[0][1]})" if unread else "")
    raise UserError(f"harness task {missing[0]!r} not found in {where} nor among lm-eval's "
                    f"tasks{hint}; name a task: field of a YAML file there (e.g. "
                    f"gptneo_lambada)")
  return [load(ours[name]) if name in ours else name for name in names]


def _index(folders):
  """({task name: YAML path}, [(YAML path, why it is no task)]), earlier folders first (a
  user's task may not shadow ours)."""
  index, unread = {}, []
  for folder in folders:
    for path in sorted(folder.glob("*.y*ml")):
      name, why = _task_name(path)
      if name:
        index.setdefault(name, path)
      elif why:
        unread.append((path, why))
  return index, unread


def _task_name(path):
  """(the task: field of YAML `path`, or None; why a file that names none is no task, or None
  for one that is something else of lm-eval's: a group or tag).

  Read as YAML (a comment after the name is no part of it), lm-eval's tags such as
  `!function` taken as plain values: only the top-level task: field matters here.
  """
  import yaml  # pylint: disable=g-import-not-at-top  (lm-eval's dependency, as harness is)
  data = path.read_bytes()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError:
    text = "\0"
  if "\0" in text:
    return None, "not text"
  try:
    config = yaml.load(text, Loader=_task_loader())  # a SafeLoader: builds no Python objects
  except yaml.YAMLError as error:
    return None, f"not YAML: {str(error).splitlines()[0]}"
  if not isinstance(config, dict):
    return None, "no top-level task: field"
  if isinstance(config.get("task"), str) and config["task"].strip():
    return config["task"].strip(), None
  if "group" in config or "tag" in config:
    return None, None
  return None, "no top-level task: field"


def _any_tag(loader, suffix, node):
  """A value under a tag only lm-eval resolves (`!function utils.process`): its plain text."""
  del loader, suffix
  return str(getattr(node, "value", ""))


def _task_loader():
  """yaml's SafeLoader that also reads lm-eval's tags (as _any_tag)."""
  import yaml  # pylint: disable=g-import-not-at-top
  loader = type("TaskLoader", (yaml.SafeLoader,), {})
  loader.add_multi_constructor("!", _any_tag)
  return loader


def _builtin(names):
  """True if every one of names is a task, group or tag of lm-eval's own."""
  manager = harness.import_lm_eval("lm_eval.tasks").TaskManager()
  return all(name in manager.all_tasks for name in names)


def load(path):
  """The task config of YAML `path`, its relative data files made absolute and checked."""
  yaml_loader = harness.import_lm_eval("lm_eval.tasks._yaml_loader")
  try:
    config = yaml_loader.load_yaml(path)
  except Exception as error:  # yaml's errors, a missing include or !function
    raise UserError(f"task file {path} does not load ({str(error).splitlines()[0]}); "
                    f"fix the YAML") from None
  kwargs = config.get("dataset_kwargs") or {}
  if "data_files" in kwargs:
    config["dataset_kwargs"] = {**kwargs, "data_files": _resolve(kwargs["data_files"], path)}
  return config


def _resolve(data_files, yaml_path):
  """data_files (a path, list or {split: path or list}) relative to the YAML's folder."""
  if isinstance(data_files, dict):
    return {split: _resolve(files, yaml_path) for split, files in data_files.items()}
  if isinstance(data_files, list):
    return [_resolve(files, yaml_path) for files in data_files]
  path = pathlib.Path(os.path.expanduser(data_files))
  path = path if path.is_absolute() else yaml_path.parent / path
  if not path.is_file():
    raise UserError(f"task file {yaml_path}: data file {path} not found; data_files are "
                    f"relative to the YAML's folder, or absolute")
  if path.suffix == ".jsonl":
    check_jsonl(path)
  return str(path)


def check_jsonl(path):
  """Every non-blank line of JSON Lines file `path` must be a JSON object."""
  lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
  for number, line in enumerate(lines, start=1):
    try:
      record = json.loads(line) if line.strip() else {}
    except json.JSONDecodeError as error:
      raise UserError(f"{path} line {number} is not JSON ({error.msg}); write one JSON "
                      f"object per line") from None
    if not isinstance(record, dict):
      raise UserError(f"{path} line {number} is not a JSON object; write one per line")
