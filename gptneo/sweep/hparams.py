"""The sweep as TensorBoard's HParams dashboard sees it: `tensorboard --logdir=ROOT`.

The root's events file declares the experiment (the axes and the metrics); each point's model
dir gets a session start naming its axis values. The metrics are the point's own summaries,
which bin/train writes into the same folder (loss, eval/loss, eval/bits_per_byte). A gs://
root works the same: the experiment in ROOT/_sweep, the sessions in the bucket's model dirs.
"""
import os
import tempfile
import time

from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.hparams import summary_v2 as hp

from gptneo import storage
from gptneo.compat import tf
from gptneo.sweep import root as root_lib
from gptneo.sweep import spec as spec_lib

EVENTS_FILE = "events.out.tfevents.0.sweep-hparams"  # one fixed name: a new report replaces it
METRICS = (("loss", "training loss"), ("eval/loss", "validation loss"),
           ("eval/bits_per_byte", "bits per byte"))


def _value(text):
  value = spec_lib.parse_value(text, "hparam")
  return value if isinstance(value, (bool, int, float, str)) else text


def _point_hparams(point):
  return {key: _value(text) for key, (_, text) in zip(point.labels, point.values, strict=True)}


def _write_events(folder, summary):
  """One events file of one summary, written whole under its fixed name."""
  def write(temporary):
    with tf.io.TFRecordWriter(temporary) as writer:
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
    summary = hp.hparams_pb({**_point_hparams(point), "parameters": parameters},
                            trial_id=point.name)
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
  values = [_point_hparams(p) for p in points]
  names = list(values[0]) if values else []
  config = hp.hparams_config_pb(
      [hp.HParam(name) for name in names] + [hp.HParam("parameters")],
      [hp.Metric(tag, display_name=title)
       for tag, title in METRICS])
  _write_events(str(root.path), config)
  rows = {r["point"]: r for r in table}
  for point in points:
    row = rows[point.name]
    if not root.uri:
      write_session(str(root.run_dir(point)), point, row["parameters"])
    elif row["status"] in root_lib.FINAL:
      _upload_session(root, point, row["parameters"])
