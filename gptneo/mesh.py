"""The device mesh: `mesh_shape` and `layout` bindings, devices, validation, mtf mesh impl."""
import dataclasses
import math

import gin

from gptneo.compat import mtf, tf
from gptneo.errors import UserError

MESH_NAME = "mesh"
IMPLEMENTATIONS = ("placement", "simd")
# Layout rules that split no tensor dimension of the model but its weights' storage:
# "fsdp:x" (ZeRO-3) stores every weight, its gradient and its optimizer slots split over x;
# "zero:x" (ZeRO-1/2) only the optimizer's slots and update (docs/large_models.md).
SHARDING_RULES = ("fsdp", "zero")
# The order in which a weight's dimensions are tried as its shard dimension (shard_dim).
PREFERENCE = ("embd", "mlp", "vocab", "heads", "kv", "sequence", "experts")


def shard_dim(weight_dims: tuple, split: dict, ways: int) -> str | None:
  """The dimension a weight is stored split along under `fsdp`/`zero` over `ways` devices.

  The one choice of it, for the model, the optimizer and the cost model alike.

  Args:
    weight_dims: the weight's ((dimension name, size), ...).
    split: {tensor dimension name: mesh size} of the dimensions the layout already splits.
    ways: the size of the mesh dimension the rule names.

  Returns:
    The first of the weight's dimensions in PREFERENCE order that the layout does not split
    and whose size `ways` divides, or None: the weight stays whole.
  """
  sizes = dict(weight_dims)
  return next((name for name in PREFERENCE
               if name in sizes and name not in split and sizes[name] % ways == 0), None)


def renamed(x, dims):
  """mtf tensor `x` with its dimensions renamed, position by position, to `dims`' names.

  Between a weight's stored dimensions and the model's (Sharding.stored_dims), mtf lowers
  the rename as an all-gather (to the model's) or a slice of the all-reduced sum (to the
  stored ones) over the rule's mesh dimension.
  """
  for old, new in zip(x.shape.dims, dims, strict=True):
    if old.name != new.name:
      x = mtf.rename_dimension(x, old.name, new.name)
  return x


@dataclasses.dataclass(frozen=True)
class Sharding:
  """Which mesh dimension weights (`fsdp`) or optimizer slots (`zero`) are stored split over.

  Built by MeshSpec.sharding(); carried by the mtf mesh (runtime.new_mesh) to the model's
  weights (ops.weight) and the optimizer.
  """
  fsdp: str = None  # mesh dimension name, or None
  zero: str = None
  mesh_sizes: dict = dataclasses.field(default_factory=dict)  # mesh dim -> size
  split: dict = dataclasses.field(default_factory=dict)  # tensor dim -> mesh size
  placed: dict = dataclasses.field(default_factory=dict)  # tensor dim -> mesh dim

  def mesh_dim(self, kind):
    """The mesh dimension of `kind` ("fsdp" or "zero"), or None."""
    return getattr(self, kind)

  def stored_dims(self, dims, kind):
    """`dims` (mtf.Dimensions of a weight) with its shard dimension renamed "<d>_<kind>".

    Unchanged without a `kind` rule, when no dimension qualifies (shard_dim), or when one of
    the weight's dimensions already lies on that mesh dimension (it is split over it then).
    """
    mesh_dim = self.mesh_dim(kind)
    if mesh_dim is None or any(self.placed.get(d.name) == mesh_dim for d in dims):
      return list(dims)
    name = shard_dim(tuple((d.name, d.size) for d in dims), self.split,
                     self.mesh_sizes[mesh_dim])
    return [mtf.Dimension(f"{d.name}_{kind}", d.size) if d.name == name else d for d in dims]


def parse_mesh_shape(text):
  """"x:2,y:4" -> [("x", 2), ("y", 4)]: mesh dimension names and sizes."""
  return _parse_pairs(text, "mesh_shape", int)


def parse_layout(text):
  """"batch:x,heads:y" -> [("batch", "x"), ("heads", "y")]: tensor to mesh dimension."""
  return _parse_pairs(text, "layout", str)


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
      raise UserError(f"{knob} item {item!r} is not 'name:{value_type.__name__}', "
                      f"e.g. {knob} = '{'x:2' if value_type is int else 'batch:x'}'") from None
  return pairs


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  """A mesh shape, layout rules over named tensor dimensions, and the devices to use.

  Configuration only: what a process holds while it runs a mesh (its server's session target,
  a TPU system and device assignment) lives in runtime.Runtime.
  """
  shape: list  # [(mesh dim name, size)]
  layout: list  # [(tensor dim name, mesh dim name)]
  devices: list  # device strings, one per mesh position
  implementation: str = "placement"  # or "simd": mtf's SPMD mesh for TPUs
  tpu: str = None  # the TPU to resolve (name, grpc:// address or "local"), with "simd"
  cluster: dict = None  # {"worker": ["host:port", ...]}: one mesh over several processes
  task_index: int = 0  # this process's place in cluster["worker"]
  operation_timeout: float = 300.0  # seconds a step may wait on a peer before failing

  @property
  def size(self):
    return math.prod(size for _, size in self.shape)

  @property
  def device_type(self):
    """"tpu" (simd), "gpu" or "cpu": what the mesh positions are."""
    if self.implementation == "simd":
      return "tpu"
    return "gpu" if any("/gpu:" in d for d in self.devices) else "cpu"

  @property
  def model_layout(self):
    """The layout's rules over the model's tensor dimensions (no fsdp/zero rule)."""
    return [(t, m) for t, m in self.layout if t not in SHARDING_RULES]

  def sharding(self):
    """The Sharding of the layout's `fsdp` / `zero` rules (a Sharding of neither if none)."""
    rules, sizes = dict(self.layout), dict(self.shape)
    return Sharding(rules.get("fsdp"), rules.get("zero"), sizes,
                    {t: sizes[m] for t, m in self.model_layout}, dict(self.model_layout))

  def mtf_rules(self):
    """The rules mtf lays tensors out by: `fsdp:x` becomes `<d>_fsdp:x` for every d of
    PREFERENCE (weights' stored dimensions, Sharding.stored_dims), `zero:x` alike."""
    expanded = [(f"{d}_{kind}", m) for kind, m in self.layout if kind in SHARDING_RULES
                for d in PREFERENCE]
    return self.model_layout + expanded

  def validate(self, dim_sizes=None, tensor_shapes=()):
    """Raises ValueError if the layout can't apply to tensor dimensions `dim_sizes`.

    `tensor_shapes` ((tensor name, (dimension names)) pairs, e.g. of the mtf graph about to
    be lowered: runtime.lower) are checked too: mtf can't lay out a tensor two of whose
    dimensions the layout puts on one mesh dimension.
    """
    if dim_sizes is not None:
      self._validate_rules(dim_sizes, dict(self.shape))
    for name, dims in tensor_shapes:
      self._validate_tensor(name, dims)

  def _validate_tensor(self, name, dims):
    """Two dimensions of one tensor on one mesh dimension: mtf's LayoutRules reject it."""
    on = {}
    for dim in dims:
      for tensor_dim, mesh_dim in self.mtf_rules():
        if tensor_dim == dim and mesh_dim in on:
          raise UserError(f"layout puts {on[mesh_dim]!r} and {dim!r} both on mesh dimension "
                          f"{mesh_dim!r}, but tensor {name} has both ({', '.join(dims)}); "
                          f"map one of them to another mesh dimension or leave it whole")
        if tensor_dim == dim:
          on[mesh_dim] = dim

  def _validate_rules(self, dim_sizes, mesh_sizes):
    self._validate_sharding(dim_sizes, mesh_sizes)
    for tensor_dim, mesh_dim in self.model_layout:
      if tensor_dim == "memory_length":  # GPT-Neo's name of the keys' length
        raise UserError(f"layout rule 'memory_length:{mesh_dim}' (GPT-Neo's) splits the "
                        f"keys' length, which attention reduces over in every layer; this "
                        f"model has no such split: drop it (e.g. GPT-Neo XL's "
                        f"'batch:x,memory_length:y,embd:y' is 'batch:x,embd:y' here)")
      if tensor_dim not in dim_sizes:
        raise UserError(f"layout names tensor dimension {tensor_dim!r}, which the model "
                        f"doesn't have; use one of {sorted(dim_sizes)}")
      if mesh_dim not in mesh_sizes:
        raise UserError(f"layout maps {tensor_dim!r} to mesh dimension {mesh_dim!r}, "
                        f"which mesh_shape doesn't define; use one of {sorted(mesh_sizes)}")
      if dim_sizes[tensor_dim] % mesh_sizes[mesh_dim]:
        raise UserError(f"layout splits {tensor_dim!r} (size {dim_sizes[tensor_dim]}) over "
                        f"{mesh_dim!r} (size {mesh_sizes[mesh_dim]}), which doesn't divide it; "
                        f"change the layout or the size")

  def _validate_sharding(self, dim_sizes, mesh_sizes):
    """fsdp / zero: at most one of them, once, on a mesh dimension some weight can split over."""
    rules = [(kind, m) for kind, m in self.layout if kind in SHARDING_RULES]
    if len(rules) > 1:
      written = ",".join(f"{kind}:{m}" for kind, m in rules)
      raise UserError(f"layout has {written!r}: use one of fsdp (weights, gradients and "
                      f"optimizer state sharded) or zero (optimizer state only), once; "
                      f"fsdp already shards the optimizer state")
    for kind, mesh_dim in rules:
      if mesh_dim not in mesh_sizes:
        raise UserError(f"layout rule '{kind}:{mesh_dim}' names mesh dimension {mesh_dim!r}, "
                        f"which mesh_shape doesn't define; use one of {sorted(mesh_sizes)}")
      ways, split = mesh_sizes[mesh_dim], {t: mesh_sizes[m] for t, m in self.model_layout}
      candidates = {d: dim_sizes[d] for d in PREFERENCE if d in dim_sizes and d not in split}
      if not any(size % ways == 0 for size in candidates.values()):
        raise UserError(f"layout rule '{kind}:{mesh_dim}' can't split any weight: none of "
                        f"{candidates or 'its unsplit dimensions'} divides by {mesh_dim!r}'s "
                        f"size {ways}; name a mesh dimension whose size divides one of them, "
                        f"or drop the rule")

  def mtf_shape(self):
    return mtf.Shape([mtf.Dimension(name, size) for name, size in self.shape])

  def mtf_layout(self):
    return mtf.LayoutRules(self.mtf_rules())

  def mesh_impl(self, device_assignment=None):
    """mtf's placement (one device of this process per position) or SIMD (TPU) mesh.

    The SIMD mesh needs the TPU's `device_assignment` (runtime.started connects to it).
    """
    if self.implementation == "simd":
      if device_assignment is None:
        raise UserError("mesh.implementation = 'simd' needs a TPU device assignment: "
                        "runtime.started(spec) gets one with tpu.connect (docs/tpu.md)")
      return mtf.simd_mesh_impl.SimdMeshImpl(self.mtf_shape(), self.mtf_layout(),
                                             device_assignment=device_assignment)
    # TF's canonical names ("/device:CPU:0", not "/cpu:0"): mtf compares a one-device mesh's
    # device with its variables' (canonical) device as strings, and only when they match does
    # it use the variable itself as its slice. Otherwise each variable gets a slice variable
    # that shares the master's buffer until the first update copies it, so every step after
    # the first holds weights and optimizer state twice (bench/RESULTS.md, memory section).
    return mtf.placement_mesh_impl.PlacementMeshImpl(
        self.mtf_shape(), self.mtf_layout(),
        [tf.DeviceSpec.from_string(device).to_string() for device in self.devices])

  @property
  def is_peer(self):
    """A task other than 0 of a cluster: it serves its devices, task 0 drives the mesh."""
    return bool(self.cluster) and self.task_index != 0

  @property
  def num_tasks(self):
    return len(self.cluster["worker"]) if self.cluster else 1

  def session_config(self):
    """Devices this process may use; a lost peer or TPU host fails a step instead of hanging."""
    if self.implementation == "simd":  # no timeout: XLA compiles for minutes
      return tf.ConfigProto(allow_soft_placement=True)
    cpu_count = sum(1 for d in self.devices if "cpu" in d.lower()) // self.num_tasks
    config = tf.ConfigProto(device_count={"CPU": max(cpu_count, 1)},
                            allow_soft_placement=False)
    if self.cluster:  # a lost peer fails the step instead of hanging it
      config.operation_timeout_in_ms = int(self.operation_timeout * 1000)
    return config


@gin.configurable
def mesh(mesh_shape="", layout="", device_type="cpu", cpu_devices=None, gpu_ids=None,
         implementation="placement", tpu=None, cluster=None, task_index=0,
         operation_timeout=300.0):
  """The mesh to train on.

  Args:
    mesh_shape: named mesh dimensions and sizes, e.g. "x:2,y:4"; "" is one device.
    layout: tensor dimension to mesh dimension rules, e.g. "batch:x,heads:y"; "fsdp:x"
      stores weights, gradients and optimizer state split over x, "zero:x" the optimizer
      state only (docs/large_models.md).
    device_type: "cpu" (one CPU device per mesh position) or "gpu" (placement only).
    cpu_devices: how many CPU devices this process may use (default: the mesh size).
    gpu_ids: GPU ids to place the mesh on, in mesh order (default: 0 .. size-1).
    implementation: "placement" (CPU/GPU devices of this process) or "simd" (TPU cores, one
      SPMD program; see docs/tpu.md).
    tpu: with "simd": the TPU's name, grpc:// address, or "local" on a TPU VM.
    cluster: run one mesh over several processes, e.g. {"worker": ["host0:2222",
      "host1:2222"]}; mesh positions are spread evenly over the tasks (docs/multihost.md).
    task_index: this process's index in cluster["worker"] (bin/train --task_index).
    operation_timeout: seconds a step may wait on another task before failing.

  Returns:
    A MeshSpec.
  """
  shape, rules = parse_mesh_shape(mesh_shape), parse_layout(layout)
  if any(size < 1 for _, size in shape):
    raise UserError(f"mesh_shape {mesh_shape!r} has a dimension smaller than 1")
  if implementation not in IMPLEMENTATIONS:
    raise UserError(f"mesh.implementation = {implementation!r}; use one of {IMPLEMENTATIONS}")
  size = math.prod(size for _, size in shape)
  if implementation == "simd":
    if not tpu:
      raise UserError("mesh.implementation = 'simd' runs on a TPU: set mesh.tpu to its name, "
                      "grpc:// address or 'local' (docs/tpu.md)")
    # The SIMD mesh places by device assignment, not by device name.
    return MeshSpec(shape, rules, [""] * size, implementation, tpu)
  if cluster:
    devices = _cluster_devices(size, device_type, cluster, task_index)
    return MeshSpec(shape, rules, devices, implementation, tpu, cluster, task_index,
                    operation_timeout)
  return MeshSpec(shape, rules, _devices(size, device_type, cpu_devices, gpu_ids),
                  implementation, tpu)


def host_cpu() -> MeshSpec:
  """One CPU device of this process: where a TPU run scores train.harness_tasks (the restored
  model of the harness runs on a placement mesh only)."""
  return MeshSpec([], [], ["/cpu:0"])


def _cluster_devices(size, device_type, cluster, task_index):
  """Mesh position p lives on task p // per_task, device p % per_task of that task."""
  tasks = cluster.get("worker") if isinstance(cluster, dict) else None
  if not tasks or set(cluster) != {"worker"}:
    raise UserError(f"mesh.cluster = {cluster!r}; write {{'worker': ['host:port', ...]}}")
  if size % len(tasks):
    raise UserError(f"mesh_shape has {size} positions, which {len(tasks)} tasks in "
                    f"mesh.cluster can't share evenly; make the mesh a multiple of the tasks")
  if not 0 <= task_index < len(tasks):
    raise UserError(f"--task_index={task_index} but mesh.cluster has {len(tasks)} tasks; "
                    f"use 0 .. {len(tasks) - 1}")
  per_task = size // len(tasks)
  return [f"/job:worker/task:{p // per_task}/{device_type}:{p % per_task}" for p in range(size)]


def _devices(size, device_type, cpu_devices, gpu_ids):
  if device_type == "cpu":
    available = size if cpu_devices is None else cpu_devices
    ids = range(size)
  elif device_type == "gpu":
    available = len(tf.config.list_physical_devices("GPU"))
    ids = list(gpu_ids) if gpu_ids is not None else list(range(size))
    if len(ids) != size:
      raise UserError(f"mesh.gpu_ids has {len(ids)} ids for a mesh of {size} devices")
    available = available if max(ids) < available else 0
  else:
    raise UserError(f"mesh.device_type = {device_type!r}; use 'cpu' or 'gpu'")
  if size > available:
    raise UserError(f"the mesh needs {size} {device_type} devices but {available} are "
                    f"available; shrink mesh_shape or add devices")
  return [f"/{device_type}:{i}" for i in ids]
