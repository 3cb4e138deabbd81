"""Every point through bin/train's own checks, before anything is created or run.

A point is parsed as bin/train parses it (gin_utils.parse), its `train.*` settings frozen and
checked (train.Settings.check: dataset, microbatches, mesh and layout, precision, loop); no
graph is built. gin's state is global, so the points go one after another.
"""
import gin

from gptneo import gin_utils
from gptneo import train
from gptneo.errors import UserError
from gptneo.layout_search import configured
from gptneo.sweep.root import Facts


def check(point):
  """The point's Facts; UserError naming the point if bin/train would refuse it."""
  try:
    gin_utils.parse(list(point.gin_files), list(point.gin_params))
    settings = train.settings()
    settings.check()
    work = configured.workload_from_gin()
  except UserError as error:
    raise UserError(f"point {point.index} ({point.name}): {error}") from None
  finally:
    gin.clear_config()
  model, mesh = settings.model, settings.mesh
  return Facts(settings.train_steps, settings.tokens_per_step, work.num_parameters(),
               (model.n_vocab + model.n_ctx) * model.n_embd, settings.eval_every_n_steps,
               mesh.device_type, len(mesh.devices))


def check_all(points):
  """[Facts of each point], in order; the first bad point raises."""
  return [check(point) for point in points]
