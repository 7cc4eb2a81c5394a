"""Logical axis names -> mesh axes, and the mesh from the config.

Parameters carry logical axis names (`embed`, `heads`, `mlp`, ...) in their
`logical_axes` metadata; activations are constrained by logical names too. The
config's `sharding_rules` map each name to a mesh axis (or a tuple of them, or
None), so FSDP, tensor parallelism and pure data parallelism are config
changes. A mesh axis is used at most once per array, and a dimension that a
mesh axis does not divide is replicated instead (tiny test configs).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from monoformer_jax.config import schema
from monoformer_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
Rules = Sequence[tuple[str, Any]]

_state = threading.local()


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """Mesh ('data', 'fsdp', 'tensor') from e.g. {data: -1, fsdp: 1, tensor: 1}.

  The sizes split one slice's devices (-1: the rest of them); with
  `dcn_data: S` > 1 (default 1) the devices are S slices and the data axis is
  S times `data` long: its outer factor spans the slices over the data-centre
  network (DCN), the rest stays on each slice's ICI (or NVLink), as MaxText's
  dcn_data_parallelism. Slices are the devices' `slice_index`: TPU slices of a
  multi-slice run, and GPU hosts (JAX gives the GPUs of one machine one
  slice_index), so on a GPU cluster FSDP stays inside a node. `dcn_data: -1`
  takes as many slices as the devices form.
  """
  devices = jax.devices() if devices is None else list(devices)
  mesh_config = schema.section("mesh", mesh_config)  # its sizes checked there
  slices = len({getattr(d, "slice_index", None) or 0 for d in devices})
  dcn = slices if mesh_config.dcn_data == -1 else mesh_config.dcn_data
  if dcn != slices:
    raise ConfigError(
      f"config.mesh.dcn_data={dcn} but the {len(devices)} devices form {slices} "
      f"slice(s): set --config.mesh.dcn_data={slices} (or -1: one per slice)"
    )
  per_slice = len(devices) // slices
  sizes = [mesh_config[a] for a in MESH_AXES]
  unknown = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  where = f"{per_slice} devices" + (f" per slice ({slices} slices)" if slices > 1 else "")
  known = math.prod(s for s in sizes if s != -1)
  if unknown:
    if per_slice % known:
      raise ConfigError(
        f"config.mesh {dict(zip(MESH_AXES, sizes))}: {where} are not divisible by {known}"
      )
    sizes[sizes.index(-1)] = per_slice // known
  if math.prod(sizes) != per_slice:
    raise ConfigError(
      f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
      f"devices but {where} are available; set one axis to -1"
    )
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if slices == 1:
    return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices, axis_types=axis_types)
  grid = mesh_utils.create_hybrid_device_mesh(sizes, (slices, 1, 1), devices)
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)


def logical_to_spec(
  axes: Sequence[str | None],
  rules: Rules,
  shape: Sequence[int] | None = None,
  mesh: jax.sharding.Mesh | None = None,
) -> P:
  """PartitionSpec for logical `axes` under `rules`.

  With `shape` and `mesh`, a mesh axis that does not divide its dimension is
  dropped (that dimension is replicated over it) rather than failing.
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for i, name in enumerate(axes):
    if name is not None and name not in table:
      raise ConfigError(
        f"logical axis {name!r} has no entry in sharding_rules "
        f"{list(table)}; add ({name!r}, None) to replicate it"
      )
    target = table.get(name) if name is not None else None
    mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
    mesh_axes = tuple(a for a in mesh_axes if a not in used)
    if shape is not None and mesh is not None:
      kept = []
      for a in mesh_axes:
        if shape[i] % (math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]) == 0:
          kept.append(a)
      mesh_axes = tuple(kept)
    used.update(mesh_axes)
    spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return P(*spec)


@contextlib.contextmanager
def logical_rules(rules: Rules):
  """Makes `rules` the ones `constrain` uses while tracing inside the block."""
  previous = getattr(_state, "rules", None)
  _state.rules = tuple(rules)
  try:
    yield
  finally:
    _state.rules = previous


# The project's logical axis rules, the default of `config.sharding_rules`
# (config/schema.py). Parameters: FSDP over `embed`, tensor parallelism over
# heads, MLP and vocabulary. Activations: the batch over data and fsdp, heads
# over tensor. The mesh's sizes (config.mesh) decide which of these are real
# splits: an axis of size 1 splits nothing.
RULES: Rules = schema.SHARDING_RULES


def current_rules() -> Rules:
  """The rules of the enclosing `logical_rules` block, else `RULES`."""
  rules = getattr(_state, "rules", None)
  return RULES if rules is None else rules


def _tracing_rules():
  """(rules, abstract mesh) while tracing inside `logical_rules` under a
  mesh; None otherwise."""
  rules = getattr(_state, "rules", None)
  mesh = jax.sharding.get_abstract_mesh()
  if rules is None or mesh is None or mesh.empty:
    return None
  return rules, mesh


def constrain(x, axes: Sequence[str | None]):
  """with_sharding_constraint by logical names; a no-op without mesh or rules."""
  active = _tracing_rules()
  if active is None:
    return x
  rules, mesh = active
  spec = logical_to_spec(axes, rules, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, spec)


def batch_shards(rows: int) -> int:
  """How many pieces `constrain` cuts a [rows, ...] batch into while tracing
  (the 'batch' rule's mesh axes that divide it); 1 without a mesh or rules."""
  active = _tracing_rules()
  if active is None:
    return 1
  rules, mesh = active
  spec = logical_to_spec(("batch",), rules, (rows,), mesh)[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
  return math.prod(mesh.shape[a] for a in axes)


def batch_sharding(mesh, rules, ndim: int) -> NamedSharding:
  """Sharding of a [B, ...] input array: batch over the 'batch' rule's axes."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def global_batch(local_batch: dict[str, np.ndarray], mesh, rules) -> dict[str, jax.Array]:
  """Per-host numpy rows -> global jax arrays sharded over the batch axes."""
  return {
    k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, v.ndim), v)
    for k, v in local_batch.items()
  }
