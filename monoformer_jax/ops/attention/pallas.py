"""Mixed-mask flash attention in Pallas: the public entry, kernel choice and autodiff.

Two backends: 'tpu' (Mosaic, pallas_tpu.py) and 'gpu' (Triton, pallas_gpu.py),
each compiled or in interpret mode (plain XLA ops, which any platform runs:
the CPU tests). Which kernel runs is decided for the platform the call is
LOWERED for, not for the host that traces it (`kernel_plan`): a CPU host that
exports or compiles ahead of time for TPU gets the Mosaic kernel.

Every branch of that choice takes and returns the model's layout: it pads the
row to whole blocks (keys and queries appended as padding, segment id 0, cut
off again after), transposes into its kernel's layout, builds the block map
from the ids (block_map.py) and calls its kernel. One `jax.custom_vjp` spans
the choice; its only saved activation besides the inputs and the output is
the float32 log-sum-exp [B, H, Lq].
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from monoformer_jax.ops.attention import pallas_gpu, pallas_tpu
from monoformer_jax.ops.attention.block_map import block_map
from monoformer_jax.ops.attention.mask import query_ids, query_offset

BACKENDS = {"tpu": pallas_tpu, "gpu": pallas_gpu}
# Where each backend compiles: lowering platforms, and the "gpu" a mesh's devices report.
COMPILED_ON = {"tpu": ("tpu",), "gpu": ("gpu", "cuda", "rocm")}
HEADS_MAJOR = {"tpu": True, "gpu": False}  # kernel layout [B, H, L, D] or [B, L, H, D]
DEFAULT_BLOCKS = {"tpu": (128, 128), "gpu": (64, 64)}
# The platforms `platform_dependent` tells apart; "default" is every other
# one, in practice cpu.
PLATFORMS = ("tpu", "cuda", "rocm", "default")


class KernelConfig(NamedTuple):
  backend: str
  block_q: int
  block_k: int
  interpret: Any  # bool, or pltpu.InterpretParams for the TPU interpreter


def backend_for(platform: str) -> str:
  """The backend native to a platform: 'gpu' for gpu, cuda and rocm, else 'tpu'.

  Off TPU and GPU (cpu) that is the TPU kernel, which runs there interpreted.
  """
  return "gpu" if platform in ("gpu", "cuda", "rocm") else "tpu"


def kernel_config(backend: str, block_q=None, block_k=None, interpret=False) -> KernelConfig:
  """One backend's kernels, compiled or interpreted, with checked block sizes."""
  if backend not in BACKENDS:
    raise ValueError(f"pallas backend {backend!r}: choose one of {sorted(BACKENDS)}")
  default_q, default_k = DEFAULT_BLOCKS[backend]
  block_q, block_k = block_q or default_q, block_k or default_k
  if backend == "tpu" and not interpret and (block_q % 128 or block_k % 128):
    raise ValueError(
      f"TPU blocks (block_q={block_q}, block_k={block_k}) must be multiples of "
      "128 for the compiled Mosaic kernel; smaller blocks run only in "
      "interpret mode: pass interpret=True. (interpret=None also builds the "
      "compiled kernel, in case the call is lowered for TPU, even on CPU.)"
    )
  if backend == "tpu" and interpret and block_k > 128 and block_k % 128:
    raise ValueError(
      f"block_k={block_k}: the TPU kernel tiles key ids from 128 "
      "lanes; use a block_k below 128 or a multiple of it"
    )
  if backend == "gpu" and any(x & (x - 1) or x < 16 for x in (block_q, block_k)):
    raise ValueError(
      f"GPU blocks (block_q={block_q}, block_k={block_k}) must be "
      "powers of two >= 16 (Triton tiles), e.g. 64"
    )
  return KernelConfig(backend, block_q, block_k, interpret)


def lowering_platform() -> str | None:
  """The platform of the mesh in context ('cpu', 'gpu', 'tpu': what a program
  traced under it is lowered for, ahead-of-time compiles for a TPU topology
  included), or None without one; then the choice is left to lowering."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh is None or mesh.empty else getattr(mesh, "abstract_device", None)
  return None if device is None else device.platform


def kernel_plan(backend=None, block_q=None, block_k=None, interpret=None, platform=None):
  """The kernel per lowering platform: ((platforms, KernelConfig), ...).

  backend=None: each platform's own (`backend_for`; cpu: 'tpu'). interpret=None:
  compiled where the backend compiles (TPU for 'tpu', GPUs for 'gpu'),
  interpreted elsewhere. Both given: that one kernel on every platform. A
  known `platform` (e.g. the mesh's) plans for it alone. Otherwise every config
  is built and checked here, also those of platforms the call will not be
  lowered for, because `platform_dependent` traces every branch.
  """
  platforms_of: dict[KernelConfig, list[str]] = {}
  for name in PLATFORMS if platform is None else (platform,):
    chosen = backend or backend_for(name)
    interpreted = name not in COMPILED_ON.get(chosen, ()) if interpret is None else interpret
    cfg = kernel_config(chosen, block_q, block_k, interpreted)
    platforms_of.setdefault(cfg, []).append(name)
  return tuple((tuple(platforms), cfg) for cfg, platforms in platforms_of.items())


def _dispatch(plan, fn, *args):
  """fn(cfg, *args) with the plan's config for the platform being lowered for.

  Not `jax.default_backend()`: that is the host's platform, wrong for
  `jax.export(..., platforms=[...])` and ahead-of-time compiles for another
  platform. `platform_dependent` traces every branch but lowers only the
  branch of the platform it lowers for (its cond drops the others in
  lowering; the export test in test_pallas_attention.py holds that), so a
  TPU export contains no Triton call and a cuda export no Mosaic one.
  """
  if len(plan) == 1:
    return fn(plan[0][1], *args)
  branches = {}
  for platforms, cfg in plan:
    branch = functools.partial(fn, cfg)  # one object per config: cuda and rocm share it
    branches.update((platform, branch) for platform in platforms)
  default = branches.pop("default")
  return jax.lax.platform_dependent(*args, default=default, **branches)


def _to_kernel(cfg, x_BxLxHxD):
  """[B, L, H, D] (H: query or kv heads) in the kernel's layout."""
  return x_BxLxHxD.transpose(0, 2, 1, 3) if HEADS_MAJOR[cfg.backend] else x_BxLxHxD


_from_kernel = _to_kernel  # the transpose is its own inverse


def _pad_row(x, n):
  """x [B, L, ...] padded with zeros to n tokens."""
  return jnp.pad(x, ((0, 0), (0, n - x.shape[1])) + ((0, 0),) * (x.ndim - 2))


def _padded_inputs(cfg, q, k, v, segment_ids, image_ids, q_offset):
  """Inputs on whole blocks in the kernel's layout, query ids and the block map."""
  lq, lk = q.shape[1], k.shape[1]
  lq_pad = -(-lq // cfg.block_q) * cfg.block_q
  # Keys padded to whole blocks, and far enough that the padded queries (which
  # follow the last query) are still tokens of the row.
  lk_pad = -(-(lk + lq_pad - lq) // cfg.block_k) * cfg.block_k
  seg, img = _pad_row(segment_ids, lk_pad), _pad_row(image_ids, lk_pad)
  q_ids = tuple(query_ids(x, lq_pad, q_offset) for x in (seg, img))
  bmap = block_map(
    seg, img, q_len=lq_pad, q_offset=q_offset, block_q=cfg.block_q, block_k=cfg.block_k
  )
  qkv = tuple(_to_kernel(cfg, _pad_row(x, n)) for x, n in ((q, lq_pad), (k, lk_pad), (v, lk_pad)))
  return qkv, (seg, img, q_ids, q_offset, bmap), lq_pad


def _forward(cfg, q, k, v, segment_ids, image_ids, q_offset):
  """(out [B, Lq, H, D], lse [B, H, Lq] float32) from cfg's forward kernel."""
  lq = q.shape[1]
  qkv, ids, _ = _padded_inputs(cfg, q, k, v, segment_ids, image_ids, q_offset)
  out, lse = BACKENDS[cfg.backend].forward(
    *qkv, *ids, block_q=cfg.block_q, block_k=cfg.block_k, interpret=cfg.interpret
  )
  return _from_kernel(cfg, out)[:, :lq], lse[..., :lq]


def _backward(cfg, q, k, v, segment_ids, image_ids, q_offset, out, lse, dout):
  """(dq, dk, dv) in the model's layout from cfg's backward kernels."""
  lq, lk = q.shape[1], k.shape[1]
  qkv, ids, lq_pad = _padded_inputs(cfg, q, k, v, segment_ids, image_ids, q_offset)
  # Padding queries are padding tokens: the forward kernel gave them out = 0
  # and lse = 0, and their cotangent is 0; zeros restore exactly that.
  out_p, dout_p = (_to_kernel(cfg, _pad_row(x, lq_pad)) for x in (out, dout))
  lse_p = jnp.pad(lse, ((0, 0), (0, 0), (0, lq_pad - lq)))
  dq, dk, dv = BACKENDS[cfg.backend].backward(
    *qkv,
    *ids,
    out_p,
    lse_p,
    dout_p,
    block_q=cfg.block_q,
    block_k=cfg.block_k,
    interpret=cfg.interpret,
  )
  return (
    _from_kernel(cfg, dq)[:, :lq],
    _from_kernel(cfg, dk)[:, :lk],
    _from_kernel(cfg, dv)[:, :lk],
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(plan, q, k, v, segment_ids, image_ids, q_offset):
  return _dispatch(plan, _forward, q, k, v, segment_ids, image_ids, q_offset)[0]


def _flash_fwd(plan, q, k, v, segment_ids, image_ids, q_offset):
  out, lse = _dispatch(plan, _forward, q, k, v, segment_ids, image_ids, q_offset)
  return out, (q, k, v, segment_ids, image_ids, q_offset, out, lse)


def _flash_bwd(plan, residuals, dout):
  dq, dk, dv = _dispatch(plan, _backward, *residuals, dout)
  return dq, dk, dv, None, None, None


# The choice sits inside the forward and the backward rule rather than around
# a custom_vjp per backend: AD never differentiates a platform cond, and the
# residuals are the same arrays whichever branch is lowered.
_flash.defvjp(_flash_fwd, _flash_bwd)


def pallas_attention(
  q_BxLqxHxD,
  k_BxLxKxD,
  v_BxLxKxD,
  segment_ids,
  image_ids,
  *,
  q_offset=None,
  backend=None,
  block_q=None,
  block_k=None,
  interpret=None,
):
  """Flash attention under the mixed mask, equal to `xla_attention`.

  q [B, Lq, H, D]; k, v [B, L, K, D] with H a multiple of K (grouped-query
  heads, never repeated in memory); ids [B, L] for the whole row. With Lq < L
  the queries are the row's tokens from `q_offset` (default the last Lq), for
  decoding against a cache. Any lengths: the row is padded with segment id 0 to
  whole blocks (block_k for keys, block_q for queries) and the padding cut off,
  so lengths that are multiples of the blocks avoid a copy. float32 or
  bfloat16 inputs; softmax and accumulation in float32.

  `backend` ('tpu', 'gpu') and `interpret` default to the platform the call
  is lowered for: Mosaic compiled on TPU, Triton compiled on cuda and rocm,
  the TPU kernel interpreted on CPU (see `kernel_plan`). Under a mesh that is
  the mesh's platform; without one, `platform_dependent` decides in lowering. Blocks default to
  the backend's; blocks the compiled TPU kernel cannot take (below 128) need
  interpret=True.
  """
  b, lq, h, _d = q_BxLqxHxD.shape
  lk, kvh = k_BxLxKxD.shape[1], k_BxLxKxD.shape[2]
  if h % kvh:
    raise ValueError(f"{h} query heads are not a multiple of {kvh} kv heads")
  if segment_ids.shape != (b, lk) or image_ids.shape != (b, lk):
    raise ValueError(
      f"segment_ids {segment_ids.shape} and image_ids "
      f"{image_ids.shape} must be [B, L] = {(b, lk)}, the whole "
      "row of keys"
    )
  plan = kernel_plan(backend, block_q, block_k, interpret, platform=lowering_platform())
  q_offset = jnp.asarray(query_offset(lq, lk, q_offset), jnp.int32)
  return _flash(plan, q_BxLqxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids, image_ids, q_offset)
