"""The device mesh: `mesh_shape` and `layout` bindings, devices, validation, mtf mesh impl."""
import dataclasses
import math

import gin

from gptneo.compat import mtf, tf

MESH_NAME = "mesh"


def _parse_pairs(text, knob, value_type):
  """Parses GPT-Neo's "a:b,c:d" syntax into [(a, b), (c, d)]."""
  pairs = []
  for item in filter(None, (s.strip() for s in text.replace(";", ",").split(","))):
    name, sep, value = item.partition(":")
    try:
      if not sep or not name.strip():
        raise ValueError
      pairs.append((name.strip(), value_type(value.strip())))
    except ValueError:
      raise ValueError(f"{knob} item {item!r} is not 'name:{value_type.__name__}', "
                       f"e.g. {knob} = '{'x:2' if value_type is int else 'batch:x'}'") from None
  return pairs


@dataclasses.dataclass
class MeshSpec:
  """A mesh shape, layout rules over named tensor dimensions, and the devices to use."""
  shape: list  # [(mesh dim name, size)]
  layout: list  # [(tensor dim name, mesh dim name)]
  devices: list  # device strings, one per mesh position

  @property
  def size(self):
    return math.prod(size for _, size in self.shape)

  def validate(self, dim_sizes):
    """Raises ValueError if the layout can't apply to tensor dimensions `dim_sizes`."""
    mesh_sizes = dict(self.shape)
    for tensor_dim, mesh_dim in self.layout:
      if tensor_dim not in dim_sizes:
        raise ValueError(f"layout names tensor dimension {tensor_dim!r}, which the model "
                         f"doesn't have; use one of {sorted(dim_sizes)}")
      if mesh_dim not in mesh_sizes:
        raise ValueError(f"layout maps {tensor_dim!r} to mesh dimension {mesh_dim!r}, "
                         f"which mesh_shape doesn't define; use one of {sorted(mesh_sizes)}")
      if dim_sizes[tensor_dim] % mesh_sizes[mesh_dim]:
        raise ValueError(f"layout splits {tensor_dim!r} (size {dim_sizes[tensor_dim]}) over "
                         f"{mesh_dim!r} (size {mesh_sizes[mesh_dim]}), which doesn't divide it; "
                         f"change the layout or the size")

  def mtf_shape(self):
    return mtf.Shape([mtf.Dimension(name, size) for name, size in self.shape])

  def mtf_layout(self):
    return mtf.LayoutRules(self.layout)

  def mesh_impl(self):
    """mtf's placement implementation: each mesh position a device of this process."""
    return mtf.placement_mesh_impl.PlacementMeshImpl(
        self.mtf_shape(), self.mtf_layout(), self.devices)

  def session_config(self):
    cpu_count = sum(1 for d in self.devices if "cpu" in d.lower())
    return tf.ConfigProto(device_count={"CPU": max(cpu_count, 1)},
                          allow_soft_placement=False)


@gin.configurable
def mesh(mesh_shape="", layout="", device_type="cpu", cpu_devices=None, gpu_ids=None):
  """The mesh to train on.

  Args:
    mesh_shape: named mesh dimensions and sizes, e.g. "x:2,y:4"; "" is one device.
    layout: tensor dimension to mesh dimension rules, e.g. "batch:x,heads:y".
    device_type: "cpu" (one CPU device per mesh position) or "gpu".
    cpu_devices: how many CPU devices this process may use (default: the mesh size).
    gpu_ids: GPU ids to place the mesh on, in mesh order (default: 0 .. size-1).

  Returns:
    A MeshSpec.
  """
  spec = MeshSpec(_parse_pairs(mesh_shape, "mesh_shape", int),
                  _parse_pairs(layout, "layout", str), devices=[])
  if any(size < 1 for _, size in spec.shape):
    raise ValueError(f"mesh_shape {mesh_shape!r} has a dimension smaller than 1")
  spec.devices = _devices(spec.size, device_type, cpu_devices, gpu_ids)
  return spec


def _devices(size, device_type, cpu_devices, gpu_ids):
  if device_type == "cpu":
    available = size if cpu_devices is None else cpu_devices
    ids = range(size)
  elif device_type == "gpu":
    available = len(tf.config.list_physical_devices("GPU"))
    ids = list(gpu_ids) if gpu_ids is not None else list(range(size))
    if len(ids) != size:
      raise ValueError(f"mesh.gpu_ids has {len(ids)} ids for a mesh of {size} devices")
    available = available if max(ids) < available else 0
  else:
    raise ValueError(f"mesh.device_type = {device_type!r}; use 'cpu' or 'gpu'")
  if size > available:
    raise ValueError(f"the mesh needs {size} {device_type} devices but {available} are "
                     f"available; shrink mesh_shape or add devices")
  return [f"/{device_type}:{i}" for i in ids]
