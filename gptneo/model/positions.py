"""Position encodings, picked in gin: `GPT.positions = @RotaryPositions()`.

Each encoding may add an embedding to the token embeddings (`embed`) and may rotate the
queries and keys of every attention layer (`rotate`); the GPT calls both. Both take the
positions of the tokens: None for a window from position 0 (0 .. sequence - 1: training, and
inference on windows shorter than n_ctx), or an int32 tensor [batch, sequence] when decoding
continues each row at its own position. The tables always hold n_ctx rows (the checkpoint's
shape); a shorter window uses their first `sequence` rows.
"""
import math

import gin

from gptneo.compat import mtf, tf
from gptneo.errors import UserError
from gptneo.model import ops


class _Positions:
  """No-op defaults: nothing added, nothing rotated, nothing to check, no weights."""

  def validate(self, n_ctx, head_size):
    del n_ctx, head_size

  def num_parameters(self, n_ctx, n_embd):
    del n_ctx, n_embd
    return 0

  def embed(self, mesh, dims, n_ctx, dtype, std, positions=None):
    """An embedding [sequence, embd] ([batch, sequence, embd] at `positions`) or None."""
    del mesh, dims, n_ctx, dtype, std, positions
    return None

  def rotate(self, x, dims, positions=None):
    """Queries or keys [batch, sequence, heads, kv] with positions mixed in."""
    del dims, positions
    return x


def _table_rows(dims, n_ctx):
  """The position tables' first dimension: n_ctx rows, named `sequence`."""
  return mtf.Dimension(dims.sequence.name, n_ctx)


def _rows_at(table, dims, positions):
  """The rows of an [n_ctx, embd] table at `positions`, or its first `sequence` rows if None."""
  if positions is None:
    short = table.shape.get_dim_by_name(dims.sequence.name).size > dims.sequence.size
    return mtf.slice(table, 0, dims.sequence.size, dims.sequence.name) if short else table
  table = mtf.rename_dimension(table, dims.sequence.name, dims.memory.name)
  return ops.embedding_lookup(table, positions, dims.memory)


@gin.configurable
class LearnedPositions(_Positions):
  """GPT-2's learned absolute positions: a [n_ctx, n_embd] table `wpe` (the default)."""

  def num_parameters(self, n_ctx, n_embd):
    return n_ctx * n_embd

  def embed(self, mesh, dims, n_ctx, dtype, std, positions=None):
    table = ops.weight(mesh, "wpe", [_table_rows(dims, n_ctx), dims.embd], dtype,
                       tf.random_normal_initializer(stddev=std / 2))
    return _rows_at(table, dims, positions)


@gin.configurable
class NoPositions(_Positions):
  """No position encoding: causal attention alone tells positions apart."""


@gin.configurable
class RotaryPositions(_Positions):
  """Rotary position embedding (RoPE, Su et al. 2021) on part of each head.

  The first `fraction` of every query and key head is rotated pairwise by angles
  proportional to the position; the rest passes unchanged.

  Args:
    fraction: share of the head dimension (n_embd / n_head) that is rotated; the product
      must be an even integer. GPT-J and GPT-NeoX use 0.25.
    base: wavelength base of the rotation frequencies.
    interleaved: which dims form a rotated pair: False pairs dim j with dim j + size / 2
      (GPT-NeoX's and Pythia's rotate-half), True pairs dims 2j and 2j + 1 (GPT-J's
      rotate-every-two). The same model either way, up to a fixed permutation of the
      query and key weights; pick the one of the checkpoint you import.
  """

  def __init__(self, fraction=1.0, base=10000.0, interleaved=False):
    if not 0.0 < fraction <= 1.0:
      raise UserError(f"RotaryPositions.fraction = {fraction}; it must be in (0, 1]")
    if type(interleaved) is not bool:
      raise UserError(f"RotaryPositions.interleaved = {interleaved!r}; it must be True or "
                      f"False")
    self.fraction, self.base, self.interleaved = fraction, base, interleaved

  def rotary_size(self, head_size):
    """Dims rotated per head; a fraction read from a checkpoint's config (rotary_dim /
    head size) may miss an integer by a rounding, which does not count."""
    size = self.fraction * head_size
    return round(size) if math.isclose(size, round(size), rel_tol=1e-9) else size

  def validate(self, n_ctx, head_size):
    size = self.rotary_size(head_size)
    if size != int(size) or int(size) % 2:
      raise UserError(f"RotaryPositions.fraction = {self.fraction} rotates {size:g} of the "
                      f"{head_size} dims per head; pick a fraction that gives an even "
                      f"integer, e.g. {2 / head_size:g} times an integer")

  def rotate(self, x, dims, positions=None):
    size = int(self.rotary_size(dims.kv.size))
    # mtf slices no split dimension: the whole head is taken as is (a layout may split kv).
    rotated = x if size == dims.kv.size else mtf.slice(x, 0, size, dims.kv.name)
    if positions is None:
      positions = mtf.mtf_range(x.mesh, dims.sequence, tf.int32)
    rotate_pairs = self._rotate_every_two if self.interleaved else self._rotate_half
    rotated = rotate_pairs(rotated, dims.kv, positions)
    if size == dims.kv.size:
      return rotated
    rest = mtf.slice(x, size, dims.kv.size - size, dims.kv.name)
    return mtf.concat([rotated, rest], dims.kv.name)

  def _rotate_half(self, x, kv, positions):
    """x [..., kv: size] with dim j paired with dim j + size / 2 (GPT-NeoX)."""
    half = mtf.Dimension(kv.name, x.shape.get_dim_by_name(kv.name).size // 2)
    first = mtf.slice(x, 0, half.size, kv.name)
    second = mtf.slice(x, half.size, half.size, kv.name)
    cos, sin = self._cos_sin(positions, half, x.dtype)
    return (x * mtf.concat([cos, cos], kv.name)
            + mtf.concat([-second, first], kv.name) * mtf.concat([sin, sin], kv.name))

  def _rotate_every_two(self, x, kv, positions):
    """x [..., kv: size] with dims 2j and 2j + 1 paired (GPT-J): kv reshaped to [pairs, 2]
    (its own dimension names: a layout splitting kv gathers it for the rotation)."""
    size = x.shape.get_dim_by_name(kv.name).size
    pairs, two = mtf.Dimension("rotary_pairs", size // 2), mtf.Dimension("rotary_two", 2)
    at = x.shape.dims.index(x.shape.get_dim_by_name(kv.name))
    split_shape = x.shape.dims[:at] + [pairs, two] + x.shape.dims[at + 1:]
    even, odd = mtf.unstack(mtf.reshape(x, split_shape), two)
    cos, sin = self._cos_sin(positions, pairs, x.dtype)
    rotated = mtf.stack([even * cos - odd * sin, odd * cos + even * sin], two.name, at + 1)
    return mtf.reshape(rotated, x.shape)

  def _cos_sin(self, positions, half, dtype):
    """cos and sin of position * base^(-2j / size), each positions.shape + [half]."""
    exponent = mtf.mtf_range(positions.mesh, half, tf.float32) * (-2.0 / (2 * half.size))
    frequency = mtf.exp(exponent * math.log(self.base))
    angle = mtf.cast(positions, tf.float32) * frequency
    return (mtf.cast(mtf.cwise(tf.cos, [angle]), dtype),
            mtf.cast(mtf.cwise(tf.sin, [angle]), dtype))


@gin.configurable
class AxialPositions(_Positions):
  """Axial learned positions (GPT-Neo's `axial_pos_emb`): two small tables, averaged.

  Position p = i * shape[1] + j gets (row_i + column_j) / 2, so the tables hold
  (shape[0] + shape[1]) * n_embd weights instead of n_ctx * n_embd.

  Args:
    shape: (rows, columns) with rows * columns = n_ctx; None picks the most square
      factorization of n_ctx.
  """

  def __init__(self, shape=None):
    self.shape = tuple(shape) if shape is not None else None

  def factors(self, n_ctx):
    if self.shape is not None:
      return self.shape
    rows = max(d for d in range(1, math.isqrt(n_ctx) + 1) if n_ctx % d == 0)
    return rows, n_ctx // rows

  def validate(self, n_ctx, head_size):
    del head_size
    rows, columns = self.factors(n_ctx)
    if rows * columns != n_ctx:
      raise UserError(f"AxialPositions.shape = {self.shape} multiplies to {rows * columns}, "
                      f"not GPT.n_ctx = {n_ctx}; pick two factors of n_ctx (or None)")

  def num_parameters(self, n_ctx, n_embd):
    return sum(self.factors(n_ctx)) * n_embd

  def embed(self, mesh, dims, n_ctx, dtype, std, positions=None):
    rows, columns = (mtf.Dimension(f"axial_{i}", size)
                     for i, size in enumerate(self.factors(n_ctx)))
    tables = [ops.weight(mesh, f"wpe_axial_{i}", [axis, dims.embd], dtype,
                         tf.random_normal_initializer(stddev=std / 2))
              for i, axis in enumerate((rows, columns))]
    grid = mtf.add(tables[0], tables[1], output_shape=[rows, columns, dims.embd]) * 0.5
    return _rows_at(mtf.reshape(grid, [_table_rows(dims, n_ctx), dims.embd]), dims, positions)
