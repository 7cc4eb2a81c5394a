"""Mixed-mask attention: the mask rule, its block map, and one dispatch over implementations."""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from monoformer_jax.errors import ConfigError
from monoformer_jax.ops.attention.block_map import block_map, live_fraction
from monoformer_jax.ops.attention.mask import allowed, mixed_mask, query_offset
from monoformer_jax.ops.attention.pallas import (
  backend_for,
  kernel_plan,
  lowering_platform,
  pallas_attention,
)
from monoformer_jax.ops.attention.xla import xla_attention
from monoformer_jax.parallel import sharding

IMPLS = ("xla", "pallas", "auto")
_KERNEL_PLATFORMS = ("tpu", "gpu", "cuda", "rocm")


def resolve_impl(impl: str, platform: str | None = None) -> str:
  """'xla' or 'pallas' for `impl` on `platform` (default: jax.default_backend()).

  'auto' is 'pallas' on TPU and GPU and 'xla' on CPU.
  """
  if impl not in IMPLS:
    raise ConfigError(
      f"unknown attention impl {impl!r}; set config.model.attention_impl to one of {IMPLS}"
    )
  if impl != "auto":
    return impl
  platform = jax.default_backend() if platform is None else platform
  return "pallas" if platform in _KERNEL_PLATFORMS else "xla"


def attention(q, k, v, segment_ids, image_ids, *, impl="xla", q_offset=None, **kernel_options):
  """Attention of q [B, Lq, H, D] over k, v [B, L, K, D] under the mixed mask.

  H must be a multiple of K (grouped-query attention); ids [B, L] describe the
  whole row, and fewer queries than keys are the row's tokens from `q_offset`
  (default the last Lq). `impl`: 'xla' (dense reference), 'pallas' (the
  block-sparse flash kernels; interpreted on CPU) or 'auto' (Pallas when
  lowered for TPU or GPU, XLA for CPU; `kernel_options` go to the Pallas
  branches). Under a mesh (`jax.set_mesh`) the Pallas call runs per shard in
  `jax.shard_map`, batch over the 'batch' rule's axes and heads over the
  'heads' rule's axis. The platform is the mesh's when one is set, else the
  one the program is lowered for (`jax.lax.platform_dependent`).
  """
  if impl == "xla" and kernel_options:
    raise ValueError(f"options {sorted(kernel_options)} are for impl='pallas'")
  platform = lowering_platform()
  if impl == "auto" and platform is not None:  # the mesh says what this will run on
    impl = resolve_impl(impl, platform)
  if impl != "auto":
    return _on_platform(impl, None, q_offset, kernel_options)(q, k, v, segment_ids, image_ids)
  # Decided for the platform being lowered for, like the kernel inside
  # pallas_attention: an export for TPU from a CPU host must carry the kernel.
  # Under jax.grad the branches' residuals are merged, so the kernel branches
  # return zeros for the XLA branch's [B, K, G, Lq, L] probabilities; with the
  # other branches pruned in lowering XLA deletes those (checked on CPU
  # compiles, also under scan + checkpoint: equal temp memory).
  on = {p: _on_platform(impl, p, q_offset, kernel_options) for p in ("tpu", "cuda", "cpu")}
  return jax.lax.platform_dependent(
    q,
    k,
    v,
    segment_ids,
    image_ids,
    tpu=on["tpu"],
    cuda=on["cuda"],
    rocm=on["cuda"],
    default=on["cpu"],
  )


def _on_platform(impl, platform, q_offset, kernel_options):
  """attention(q, k, v, segment_ids, image_ids) of `impl` resolved for `platform`."""
  if resolve_impl(impl, platform) == "xla":
    return lambda q, k, v, s, i: xla_attention(q, k, v, s, i, q_offset=q_offset)
  if platform is not None:  # 'auto': that platform's kernel, compiled
    kernel_options = dict(backend=backend_for(platform), interpret=False) | kernel_options
  # Checked now: outside jit, platform_dependent calls only the host's branch.
  kernel_plan(**kernel_options, platform=platform or lowering_platform())
  return lambda q, k, v, s, i: _sharded(
    pallas_attention, q, k, v, s, i, q_offset=q_offset, **kernel_options
  )


def _sharded(fn, q, k, v, segment_ids, image_ids, **options):
  """`fn` per shard when a mesh is set: a custom kernel is opaque to GSPMD."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return fn(q, k, v, segment_ids, image_ids, **options)
  rules = sharding.current_rules()
  batch = sharding.logical_to_spec(("batch",), rules, q.shape[:1], mesh)[0]
  heads = sharding.logical_to_spec(("heads",), rules, q.shape[2:3], mesh)[0]
  kv_heads = sharding.logical_to_spec(("kv_heads",), rules, k.shape[2:3], mesh)[0]
  if heads != kv_heads:  # each shard must hold whole query groups with their kv head
    heads = None
  q_spec, kv_spec, ids_spec = (
    P(batch, None, heads, None),
    P(batch, None, heads, None),
    P(batch, None),
  )
  offset = jnp.asarray(query_offset(q.shape[1], k.shape[1], options.pop("q_offset")), jnp.int32)
  per_shard = lambda q, k, v, s, i, o: fn(q, k, v, s, i, q_offset=o, **options)
  return jax.shard_map(
    per_shard,
    mesh=mesh,
    in_specs=(q_spec, kv_spec, kv_spec, ids_spec, ids_spec, P()),
    out_specs=q_spec,
    check_vma=False,
  )(q, k, v, segment_ids, image_ids, offset)


__all__ = [
  "allowed",
  "attention",
  "block_map",
  "live_fraction",
  "mixed_mask",
  "pallas_attention",
  "xla_attention",
  "resolve_impl",
  "IMPLS",
]
