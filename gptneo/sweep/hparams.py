"""The sweep as TensorBoard's HParams dashboard sees it: `tensorboard --logdir=ROOT`.

The root's events file declares the experiment (the axes and the metrics); each point's model
dir gets a session start naming its axis values. The metrics are the point's own summaries,
which bin/train writes into the same folder (loss, eval/loss, eval/bits_per_byte). A gs://
root works the same: the experiment in ROOT/_sweep, the sessions in the bucket's model dirs.

TensorBoard has no integer type (a number is a float64, which its table prints as 64.000), so
an integer (an axis value, the parameter count) goes in as its decimal text, and the
experiment declares an all-integer column as those texts: 64 stays 64. The events files are written with
TensorBoard's own record writer: the report needs no TensorFlow.
"""
import os
import tempfile
import time

from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.hparams import summary_v2 as hp
from tensorboard.summary.writer import record_writer

from gptneo import storage
from gptneo.sweep import root as root_lib
from gptneo.sweep import spec as spec_lib

EVENTS_FILE = "events.out.tfevents.0.sweep-hparams"  # one fixed name: a new report replaces it
METRICS = (("loss", "training loss"), ("eval/loss", "validation loss"),
           ("eval/bits_per_byte", "bits per byte"))


PARAMETERS = "parameters"


def _value(text):
  """An axis value as TensorBoard takes it: a number, bool or string; an integer as its text."""
  value = spec_lib.parse_value(text, "hparam")
  if not isinstance(value, (bool, int, float, str)):
    return text
  return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _point_hparams(point, parameters):
  """{hparam: value} of the point: its axis values, then its parameter count."""
  return {**{key: _value(text) for key, (_, text) in zip(point.labels, point.values,
                                                          strict=True)},
          PARAMETERS: str(parameters)}


def _hparam(name, values):
  """The experiment's declaration of a column: an integer one as its texts (a string type)."""
  if all(isinstance(v, str) and v.lstrip("-").isdigit() for v in values):
    return hp.HParam(name, hp.Discrete(sorted(set(values))))
  return hp.HParam(name)


def _write_events(folder, summary):
  """One events file of one summary, written whole under its fixed name."""
  def write(temporary):
    with open(temporary, "wb") as f:
      writer = record_writer.RecordWriter(f)
      writer.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
                   .SerializeToString())
      writer.write(event_pb2.Event(wall_time=time.time(), step=0, summary=summary)
                   .SerializeToString())
  storage.atomic_write(os.path.join(folder, EVENTS_FILE), write)


def write_session(folder, point, parameters):
  """The point's session start in the folder its run writes summaries to, unless it is there
  already (it never changes). Called before the point's bin/train starts: for a gs:// root
  that folder is this machine's mirror of the point, so bin/train's own sync takes it up."""
  if not os.path.isfile(os.path.join(folder, EVENTS_FILE)):
    os.makedirs(folder, exist_ok=True)
    summary = hp.hparams_pb(_point_hparams(point, parameters), trial_id=point.name)
    _write_events(folder, summary)


def _upload_session(root, point, parameters):
  """A gs:// point bin/train ran elsewhere (--print_commands, Slurm) gets its session in the
  bucket. Only once it is final: an object written beside a run that may resume would tell
  that run's mirror the bucket changed, and its unsynced work would yield to the bucket."""
  model_dir = root.model_dir(point)
  if EVENTS_FILE in storage.object_names(model_dir):
    return
  with tempfile.TemporaryDirectory() as folder:
    write_session(folder, point, parameters)
    storage.upload_file(os.path.join(folder, EVENTS_FILE), f"{model_dir}/{EVENTS_FILE}")


def write(root, points, table):
  """The experiment at the root (for gs://, in ROOT/_sweep), and each point's session in its
  run: TensorBoard pairs a session with the metrics of the run that holds it."""
  rows = {r["point"]: r for r in table}
  values = [_point_hparams(p, rows[p.name]["parameters"]) for p in points]
  names = list(values[0]) if values else []
  config = hp.hparams_config_pb([_hparam(n, [v[n] for v in values]) for n in names],
                                [hp.Metric(tag, display_name=title) for tag, title in METRICS])
  _write_events(str(root.path), config)
  for point in points:
    row = rows[point.name]
    if not root.uri:
      write_session(str(root.run_dir(point)), point, row["parameters"])
    elif row["status"] in root_lib.FINAL:
      _upload_session(root, point, row["parameters"])
