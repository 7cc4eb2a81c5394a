"""Mixed-mask attention: the mask rule, its block map, and one dispatch over implementations."""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from monoformer_jax.ops.attention.block_map import block_map, live_fraction
from monoformer_jax.ops.attention.mask import mixed_mask, query_offset
from monoformer_jax.ops.attention.pallas import pallas_attention
from monoformer_jax.ops.attention.xla import xla_attention
from monoformer_jax.parallel import sharding

IMPLS = ("xla", "pallas", "auto")


def resolve_impl(impl: str) -> str:
  """'auto' is 'pallas' on TPU and GPU and 'xla' on CPU."""
  if impl not in IMPLS:
    raise ValueError(f"unknown attention impl {impl!r}; set "
                     f"config.model.attention_impl to one of {IMPLS}")
  if impl == "auto":
    return "xla" if jax.default_backend() == "cpu" else "pallas"
  return impl


def attention(q, k, v, segment_ids, image_ids, *, impl="xla", q_offset=None,
              **kernel_options):
  """Attention of q [B, Lq, H, D] over k, v [B, Lk, K, D] under the mixed mask.

  H must be a multiple of K (grouped-query attention); ids [B, Lk] describe the
  whole row, and fewer queries than keys are the row's tokens from `q_offset`
  (default the last Lq). `impl`: 'xla' (dense reference), 'pallas' (the
  block-sparse flash kernels; interpreted on CPU) or 'auto'. Under a mesh
  (`jax.set_mesh`) the Pallas call runs per shard in `jax.shard_map`, batch
  over the 'batch' rule's axes and heads over the 'heads' rule's axis.
  """
  impl = resolve_impl(impl)
  if impl == "xla":
    if kernel_options:
      raise ValueError(f"options {sorted(kernel_options)} are for impl='pallas'")
    return xla_attention(q, k, v, segment_ids, image_ids, q_offset=q_offset)
  return _sharded(pallas_attention, q, k, v, segment_ids, image_ids,
                  q_offset=q_offset, **kernel_options)


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
  q_spec, kv_spec, ids_spec = P(batch, None, heads, None), P(batch, None, heads, None), P(batch, None)
  offset = jnp.asarray(query_offset(q.shape[1], k.shape[1], options.pop("q_offset")),
                       jnp.int32)
  per_shard = lambda q, k, v, s, i, o: fn(q, k, v, s, i, q_offset=o, **options)
  return jax.shard_map(
      per_shard, mesh=mesh,
      in_specs=(q_spec, kv_spec, kv_spec, ids_spec, ids_spec, P()),
      out_specs=q_spec, check_vma=False,
  )(q, k, v, segment_ids, image_ids, offset)


__all__ = ["attention", "block_map", "live_fraction", "mixed_mask",
           "pallas_attention", "xla_attention", "resolve_impl", "IMPLS"]
