"""The sweep as TensorBoard's HParams dashboard sees it: `tensorboard --logdir=ROOT`.

The root's events file declares the experiment (the axes and the metrics); each run dir gets
a session start naming its axis values. The metrics are the point's own summaries, which
bin/train writes into the same run dir (loss, eval/loss, eval/bits_per_byte).
"""
import os
import time

from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.hparams import summary_v2 as hp

from gptneo.compat import tf
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
  tmp = os.path.join(folder, ".sweep-hparams.tmp")
  with tf.io.TFRecordWriter(tmp) as writer:
    writer.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
                 .SerializeToString())
    writer.write(event_pb2.Event(wall_time=time.time(), step=0, summary=summary)
                 .SerializeToString())
  os.replace(tmp, os.path.join(folder, EVENTS_FILE))


def write(root, points, table):
  """The experiment at the root, a session per point in its run dir."""
  values = [_point_hparams(p) for p in points]
  names = list(values[0]) if values else []
  config = hp.hparams_config_pb(
      [hp.HParam(name) for name in names] + [hp.HParam("parameters")],
      [hp.Metric(tag, display_name=title)
       for tag, title in METRICS])
  _write_events(str(root.path), config)
  params = {r["point"]: r["parameters"] for r in table}
  for point, hparams in zip(points, values, strict=True):
    summary = hp.hparams_pb({**hparams, "parameters": params[point.name]}, trial_id=point.name)
    _write_events(str(root.run_dir(point)), summary)
