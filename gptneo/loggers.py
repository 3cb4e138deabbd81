"""Loggers a run may add (train.loggers) beside TensorBoard and train_metrics.jsonl, which
every run writes: "wandb", Weights & Biases.

W&B runs offline unless told otherwise (`wandb.mode = "online"`): nothing leaves the machine;
its files go where W&B puts them (wandb.dir, else $WANDB_DIR, else ./wandb: not in the model
dir, where W&B's links would be refused), and `wandb sync <dir>/wandb/offline-run-*` uploads
them later. A resumed run continues the same W&B run (its id kept in the model dir).
"""
import os
import uuid

import gin

from gptneo import model_dir as model_dir_lib
from gptneo.errors import UserError

LOGGERS = ("wandb",)
WANDB_MODES = ("offline", "online", "disabled")
WANDB_ID = "wandb_run_id.txt"  # in the model dir: a resumed run logs into the same W&B run


def check(names):
  """train.loggers: a list of LOGGERS' names, each importable.

  Args:
    names: the train.loggers binding.
  """
  if isinstance(names, str) or not all(isinstance(name, str) for name in names):
    raise UserError(f"train.loggers = {names!r}; use a list of names, e.g. [\"wandb\"]")
  for name in names:
    if name not in LOGGERS:
      raise UserError(f"train.loggers: {name!r} is no logger we know; use one of {list(LOGGERS)} "
                      f"(TensorBoard and train_metrics.jsonl are always written)")
  if "wandb" in names:
    _import_wandb()
    settings = wandb_settings()
    if settings["mode"] not in WANDB_MODES:
      raise UserError(f"wandb.mode = {settings['mode']!r}; use one of {list(WANDB_MODES)}")


def _import_wandb():
  try:
    import wandb  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError("train.loggers has \"wandb\" but wandb is not installed: .venv/bin/pip "
                    "install -r requirements.txt (make install does)") from None
  return wandb


@gin.configurable("wandb")
def wandb_settings(project="gptneo", mode="offline", name=None, entity=None, dir=None):  # pylint: disable=redefined-builtin
  """Weights & Biases, for train.loggers = ["wandb"].

  Args:
    project: the W&B project.
    mode: "offline" (the default: files in <model_dir>/wandb only, `wandb sync` uploads
      them), "online" (sends to W&B as the run goes: needs `wandb login`), or "disabled".
    name: the run's display name (None: the model dir's folder name).
    entity: the W&B user or team (None: the logged-in user's default).
    dir: the folder W&B writes its wandb/ folder into (None: $WANDB_DIR, else the working
      directory); never inside the model dir.

  Returns:
    these settings, as a dict.
  """
  return {"project": project, "mode": mode, "name": name, "entity": entity, "dir": dir}


class WandbLogger:
  """Sends a run's scalars to a W&B run (offline by default)."""

  def __init__(self, model_dir, config):
    wandb = _import_wandb()
    settings = wandb_settings()
    self.run = wandb.init(
        project=settings["project"], entity=settings["entity"], mode=settings["mode"],
        name=settings["name"] or os.path.basename(os.path.normpath(model_dir)),
        dir=settings["dir"], id=_run_id(model_dir), resume="allow", config=config)

  def scalars(self, step, values):
    self.run.log(dict(values), step=int(step))

  def close(self):
    self.run.finish()


def _run_id(model_dir):
  """The W&B run id of this model dir: kept in it, so a resumed run continues its W&B run."""
  path = os.path.join(model_dir, WANDB_ID)
  try:
    with model_dir_lib.open_file(path) as f:
      return f.read().strip()
  except FileNotFoundError:
    run_id = uuid.uuid4().hex[:12]
    with model_dir_lib.open_file(path, "w") as f:
      f.write(run_id + "\n")
    return run_id


def make(names, model_dir, config):
  """The loggers train.loggers names, started.

  Args:
    names: train.loggers (checked).
    model_dir: the run's local model dir.
    config: {knob: value} the logger records with the run.
  """
  return [WandbLogger(model_dir, config) for name in names if name == "wandb"]
