"""The Pallas kernels against the XLA reference, the block map against the dense mask.

Both kernels (TPU Mosaic, GPU Triton) run in interpret mode on CPU; their real
lowerings are checked with `jax.export` for 'tpu' and 'cuda', as is the choice
of kernel by the platform lowered for.
"""

import contextlib
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from monoformer_jax.ops.attention import attention, block_map, mixed_mask, resolve_impl
from monoformer_jax.ops.attention.block_map import EMPTY, FULL, PARTIAL, key_intervals
from monoformer_jax.ops.attention.pallas import pallas_attention
from monoformer_jax.ops.attention.xla import xla_attention

BACKENDS = ("tpu", "gpu")


def row(length, examples, pad_gaps=()):
  """(segment_ids, image_ids) [L] from examples [(n_tokens, [(start, size), ...])].

  Examples follow each other from token 0 (with `pad_gaps[i]` padding tokens
  before example i when given); images are numbered along the row from 1.
  """
  seg, img = np.zeros(length, np.int32), np.zeros(length, np.int32)
  at, image = 0, 0
  for i, (n, images) in enumerate(examples):
    at += pad_gaps[i] if i < len(pad_gaps) else 0
    seg[at : at + n] = i + 1
    for start, size in images:
      image += 1
      img[at + start : at + start + size] = image
    at += n
  assert at <= length
  return seg, img


def random_row(rng, length):
  """Examples of 1..48 tokens with up to two images each, until the row is ~full."""
  examples, used = [], 0
  while used < length - 8:
    n = int(rng.integers(1, min(48, length - used) + 1))
    images, at = [], int(rng.integers(0, 4))
    for _ in range(int(rng.integers(0, 3))):
      size = int(rng.integers(1, 20))
      if at + size > n:
        break
      images.append((at, size))
      at += size + int(rng.integers(0, 5))
    examples.append((n, images))
    used += n
  return row(length, examples)


LAYOUTS = {
  # Three packed examples (a one-token one between), three images, padding;
  # a second row of two text-only examples. Images straddle 16/32 blocks.
  "packed": [
    row(128, [(40, [(8, 24)]), (1, []), (50, [(5, 17), (25, 9)])]),
    row(128, [(70, []), (58, [])]),
  ],
  # Block-aligned image filling two key blocks; a row mostly padding.
  "aligned": [row(128, [(128, [(32, 64)])]), row(128, [(10, [])])],
  "random": [random_row(np.random.default_rng(s), 128) for s in (1, 2)],
}


def _stack(rows):
  seg, img = zip(*rows)
  return jnp.asarray(np.stack(seg)), jnp.asarray(np.stack(img))


def _qkv(b, lq, lk, h, kv, d, dtype, seed=0):
  rng = np.random.default_rng(seed)
  make = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32).astype(dtype)
  return make(b, lq, h, d), make(b, lk, kv, d), make(b, lk, kv, d)


def _loss(fn):
  """A scalar whose gradient weights every output element differently."""

  def loss(q, k, v):
    out = fn(q, k, v).astype(jnp.float32)
    w = jnp.sin(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
    return (out * w).sum()

  return loss


def _close(got, want, dtype):
  # float32: the kernels differ from the reference only in summation order
  # (~1e-6); one key block wrongly dropped or included moves outputs and
  # gradients by O(1e-2) or more. bfloat16: inputs and the probabilities fed
  # to the P.V product are rounded at eps 2^-8 by both sides, in a different
  # order: 2% of the largest value, still well under a wrong block's effect.
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  if dtype == jnp.float32:
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  else:
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max(), np.abs(got - want).max()


def _check(backend, seg, img, q, k, v, dtype, block_q, block_k, q_offset=None, interpret=True):
  kernel = functools.partial(
    pallas_attention,
    segment_ids=seg,
    image_ids=img,
    q_offset=q_offset,
    backend=backend,
    block_q=block_q,
    block_k=block_k,
    interpret=interpret,
  )
  reference = functools.partial(xla_attention, segment_ids=seg, image_ids=img, q_offset=q_offset)
  _close(jax.jit(kernel)(q, k, v), reference(q, k, v), dtype)
  got = jax.jit(jax.grad(_loss(kernel), (0, 1, 2)))(q, k, v)
  want = jax.grad(_loss(reference), (0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    _close(g, w, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
  "layout,blocks",
  [("packed", (32, 32)), ("packed", (16, 32)), ("aligned", (32, 16)), ("random", (32, 32))],
)
def test_outputs_and_gradients_match_xla(backend, layout, blocks):
  seg, img = _stack(LAYOUTS[layout])
  q, k, v = _qkv(2, 128, 128, 4, 2, 64, jnp.float32)
  _check(backend, seg, img, q, k, v, jnp.float32, *blocks)


def test_tpu_kernels_under_the_strict_tpu_interpreter():
  # Simulates TPU memory: reading scratch before it is written gives NaN,
  # out-of-bounds block reads raise.
  seg, img = _stack(LAYOUTS["packed"][:1])
  q, k, v = _qkv(1, 128, 128, 2, 1, 64, jnp.float32)
  _check(
    "tpu",
    seg,
    img,
    q,
    k,
    v,
    jnp.float32,
    32,
    32,
    interpret=pltpu.InterpretParams(uninitialized_memory="nan"),
  )


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_head_dim_128_and_a_length_that_needs_padding(backend):
  seg, img = _stack(LAYOUTS["packed"])
  seg, img = seg[:, :100], img[:, :100]  # not a multiple of the blocks
  q, k, v = _qkv(2, 100, 100, 4, 1, 128, jnp.bfloat16, seed=1)
  _check(backend, seg, img, q, k, v, jnp.bfloat16, 32, 32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q_len,q_offset", [(1, None), (24, 40)])
def test_queries_at_the_end_of_a_cached_row(backend, q_len, q_offset):
  seg, img = _stack(LAYOUTS["packed"])
  q_all, k, v = _qkv(2, 128, 128, 4, 2, 64, jnp.float32, seed=2)
  start = 128 - q_len if q_offset is None else q_offset
  q = q_all[:, start : start + q_len]
  full = xla_attention(q_all, k, v, seg, img)[:, start : start + q_len]
  _close(xla_attention(q, k, v, seg, img, q_offset=q_offset), full, jnp.float32)
  _check(backend, seg, img, q, k, v, jnp.float32, 16, 32, q_offset=q_offset)


GAP_ROWS = [
  row(96, [(8, [(2, 4)]), (20, [])], pad_gaps=(0, 16)),
  # An image ending its example, then a gap; an image opening the next.
  row(96, [(10, [(4, 6)]), (30, [(0, 12)]), (5, [])], pad_gaps=(3, 7, 9)),
]


@pytest.mark.parametrize("rows", ["random", "gaps"])
def test_key_intervals_are_the_keys_the_rule_allows(rows):
  # block_map reasons only about each query's [lo, hi]; this ties it to the
  # rule. An allowed key outside [lo, hi] could sit in a block skipped as
  # empty; a key inside it that is not allowed (padding in a gap included)
  # could sit in a block computed as full, without its mask.
  seg, img = _stack(
    [random_row(np.random.default_rng(s), 128) for s in range(4)] if rows == "random" else GAP_ROWS
  )
  lo, hi = (np.asarray(x) for x in key_intervals(seg, img))
  keys = np.arange(seg.shape[1])
  in_interval = (keys >= lo[..., None]) & (keys <= hi[..., None])
  allowed = np.asarray(mixed_mask(seg, img))
  real = np.asarray(seg) != 0
  assert not (allowed & ~in_interval)[real].any()  # empty blocks stay safe
  assert not (in_interval & ~allowed)[real].any()  # full blocks stay exact
  assert not in_interval[~real].any() and not allowed[~real].any()


def _dense_blocks(mask_BxLqxL, block_q, block_k):
  b, lq, lk = mask_BxLqxL.shape
  blocks = mask_BxLqxL.reshape(b, lq // block_q, block_q, lk // block_k, block_k)
  return blocks.any((2, 4)), blocks.all((2, 4))


@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (16, 64), (8, 8)])
@pytest.mark.parametrize("seed", range(4))
def test_block_map_agrees_with_the_dense_mask(seed, blocks):
  rng = np.random.default_rng(seed)
  seg, img = _stack([random_row(rng, 128) for _ in range(3)])
  block_q, block_k = blocks
  bmap = block_map(seg, img, q_len=128, q_offset=0, block_q=block_q, block_k=block_k)
  any_allowed, all_allowed = _dense_blocks(np.asarray(mixed_mask(seg, img)), *blocks)
  kinds = np.asarray(bmap.kinds)
  assert not any_allowed[kinds == EMPTY].any()  # nothing allowed is skipped
  assert all_allowed[kinds == FULL].all()  # nothing masked goes unmasked
  # Padding only at the row's end: the map is exact, not just safe.
  np.testing.assert_array_equal(kinds == EMPTY, ~any_allowed)
  np.testing.assert_array_equal(kinds == FULL, all_allowed)
  # The runs the kernels walk cover every live block, and the full runs hold
  # only full blocks, in both directions.
  for runs, table in ((bmap.kv, kinds), (bmap.q, np.swapaxes(kinds, 1, 2))):
    start, fstart, fstop, stop = (np.asarray(r) for r in runs)
    index = np.arange(table.shape[-1])
    inside = (index >= start[..., None]) & (index < stop[..., None])
    in_full = (index >= fstart[..., None]) & (index < fstop[..., None])
    assert not (table[~inside] != EMPTY).any()
    assert (table[in_full] == FULL).all()
    assert ((start <= fstart) & (fstart <= fstop) & (fstop <= stop)).all()


def test_block_map_is_conservative_across_a_padding_gap():
  # Padding between two examples: a key block wholly in the gap inside the
  # live hull is called partial (computed, all masked), never full or skipped.
  seg, img = _stack([row(64, [(8, [(2, 4)]), (20, [])], pad_gaps=(0, 16))])
  bmap = block_map(seg, img, q_len=64, q_offset=0, block_q=32, block_k=8)
  any_allowed, all_allowed = _dense_blocks(np.asarray(mixed_mask(seg, img)), 32, 8)
  kinds = np.asarray(bmap.kinds)
  assert not any_allowed[kinds == EMPTY].any() and all_allowed[kinds == FULL].all()
  assert ((kinds == PARTIAL) & ~any_allowed).any()


def test_the_papers_layout_by_hand():
  # 256 image tokens (20..275) in a 300-token example, a 512-token row,
  # blocks of 128. Queries 0..19 see [0, i], the image [0, 275], 276..299
  # [0, i], padding nothing. So q block 0 reaches k block 2 through its image
  # tokens but its first token sees one key (partial); q block 1 (all image)
  # sees k blocks 0-1 whole and k block 2 up to 275; q block 2 holds padding
  # (never full); q block 3 and k block 3 are padding only.
  seg, img = _stack([row(512, [(300, [(20, 256)])])])
  bmap = block_map(seg, img, q_len=512, q_offset=0, block_q=128, block_k=128)
  P, F, E = PARTIAL, FULL, EMPTY
  np.testing.assert_array_equal(
    np.asarray(bmap.kinds)[0], [[P, P, P, E], [F, F, P, E], [P, P, P, E], [E, E, E, E]]
  )
  # Per q block: start, full_start, full_stop, stop (no full run: at stop).
  np.testing.assert_array_equal(
    np.stack([np.asarray(r)[0] for r in bmap.kv], 1),
    [[0, 3, 3, 3], [0, 0, 2, 3], [0, 3, 3, 3], [0, 0, 0, 0]],
  )


@pytest.mark.parametrize("backend,platform", [("tpu", "tpu"), ("gpu", "cuda")])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernels_lower_for_the_real_hardware(backend, platform, head_dim):
  q = jax.ShapeDtypeStruct((2, 512, 8, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 512, 2, head_dim), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((2, 512), jnp.int32)
  fwd = functools.partial(pallas_attention, backend=backend, interpret=False)
  bwd = jax.grad(lambda q, k, v, s, i: fwd(q, k, v, s, i).astype(jnp.float32).sum(), (0, 1, 2))
  # Triton kernels are custom calls without a serialization guarantee.
  checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  for fn in (fwd, bwd):
    exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(
      q, kv, kv, ids, ids
    )
    text = exported.mlir_module()
    assert ("tpu_custom_call" if backend == "tpu" else "xla.gpu.triton") in text


def _kernel_calls(module_text):
  """Sorted (kind, kernel name) of the Mosaic and Triton calls in a StableHLO module."""
  calls = []
  for line in module_text.splitlines():
    kind = (
      "mosaic" if "@tpu_custom_call(" in line else "triton" if "xla.gpu.triton(" in line else None
    )
    if kind:
      name = re.search(r"mixed_flash_\w+", line)
      calls.append((kind, name and name.group()))
  return sorted(calls)


def test_the_kernel_is_chosen_for_the_lowering_platform_not_the_host():
  # From this CPU host, with no backend or interpret given: an export for TPU
  # carries Mosaic and no Triton, one for cuda the reverse, forward and
  # backward alike; for CPU the kernels are interpreted (plain XLA ops).
  # impl='auto' is the kernel for TPU and cuda and dense XLA for CPU.
  q = jax.ShapeDtypeStruct((1, 256, 4, 64), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((1, 256), jnp.int32)
  checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]

  def calls(impl, platform, grad):
    fwd = lambda q, k, v, s, i: attention(q, k, v, s, i, impl=impl)
    fn = jax.grad(lambda *a: fwd(*a).astype(jnp.float32).sum(), (0, 1, 2)) if grad else fwd
    text = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(
      q, kv, kv, ids, ids
    ).mlir_module()
    other = {"tpu": "xla.gpu.triton", "cuda": "tpu_custom_call"}.get(platform)
    assert other is None or other not in text, (impl, platform, grad)
    return _kernel_calls(text)

  fwd_only = ["mixed_flash_fwd"]
  with_bwd = sorted(fwd_only + ["mixed_flash_dq", "mixed_flash_dkv"])
  for impl in ("pallas", "auto"):
    for platform, kind in (("tpu", "mosaic"), ("cuda", "triton")):
      assert calls(impl, platform, False) == [(kind, n) for n in fwd_only]
      assert calls(impl, platform, True) == [(kind, n) for n in with_bwd]
    assert calls(impl, "cpu", True) == []
  assert resolve_impl("auto", "tpu") == resolve_impl("auto", "gpu") == "pallas"
  assert resolve_impl("auto", "cpu") == "xla"


def test_blocks_only_interpret_mode_takes_need_interpret_true():
  # Every platform's branch is traced, the compiled TPU one too, so blocks
  # below 128 fail on this CPU host unless interpret=True says so.
  seg, img = _stack(LAYOUTS["packed"])
  q, k, v = _qkv(2, 128, 128, 4, 2, 64, jnp.float32)
  for backend in (None, "tpu"):
    with pytest.raises(ValueError, match=r"block_q=32.*pass interpret=True"):
      pallas_attention(q, k, v, seg, img, backend=backend, block_q=32, block_k=32)
  with pytest.raises(ValueError, match=r"block_q=32.*pass interpret=True"):
    attention(q, k, v, seg, img, impl="auto", block_q=32)
  got = pallas_attention(q, k, v, seg, img, backend="tpu", block_q=32, block_k=32, interpret=True)
  _close(got, xla_attention(q, k, v, seg, img), jnp.float32)


def test_sharded_call_matches_one_device():
  seg, img = _stack(LAYOUTS["packed"] + LAYOUTS["random"])
  q, k, v = _qkv(4, 128, 128, 4, 2, 64, jnp.float32, seed=3)
  want = xla_attention(q, k, v, seg, img)
  want_grads = jax.grad(_loss(lambda q, k, v: xla_attention(q, k, v, seg, img)), (0, 1, 2))(q, k, v)
  mesh = jax.make_mesh(
    (2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
  )
  fn = lambda q, k, v: attention(
    q, k, v, seg, img, impl="pallas", block_q=32, block_k=32, backend="tpu", interpret=True
  )
  with jax.set_mesh(mesh):
    got = jax.jit(fn)(q, k, v)
    got_grads = jax.jit(jax.grad(_loss(fn), (0, 1, 2)))(q, k, v)
  _close(got, want, jnp.float32)
  for g, w in zip(got_grads, want_grads):
    _close(g, w, jnp.float32)


def test_the_platform_choice_under_jit_grad_and_shard_map_matches_xla():
  # No backend or interpret: without a mesh the kernel is chosen by
  # platform_dependent inside the custom_vjp's forward and backward (on CPU:
  # the TPU kernel interpreted, default blocks); under a mesh its devices'
  # platform decides when tracing (per shard); 'auto' is XLA here.
  seg, img = _stack(LAYOUTS["packed"] + LAYOUTS["random"])
  q, k, v = _qkv(4, 128, 128, 4, 2, 64, jnp.float32, seed=4)
  reference = lambda q, k, v: xla_attention(q, k, v, seg, img)
  want, want_grads = reference(q, k, v), jax.grad(_loss(reference), (0, 1, 2))(q, k, v)
  mesh = jax.make_mesh(
    (2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
  )
  for impl in ("pallas", "auto"):
    fn = functools.partial(attention, segment_ids=seg, image_ids=img, impl=impl)
    assert "platform_index" in str(jax.make_jaxpr(jax.grad(_loss(fn)))(q, k, v))
    for on_mesh in (False, True):
      with jax.set_mesh(mesh) if on_mesh else contextlib.nullcontext():
        # one compile for the output and the gradients
        both = lambda *x, fn=fn: (fn(*x), jax.grad(_loss(fn), (0, 1, 2))(*x))
        got, got_grads = jax.jit(both)(q, k, v)
        if on_mesh:
          assert "platform_index" not in str(jax.make_jaxpr(jax.grad(_loss(fn)))(q, k, v))
      _close(got, want, jnp.float32)
      for g, w in zip(got_grads, want_grads):
        _close(g, w, jnp.float32)


def test_dispatch_and_errors():
  assert resolve_impl("auto") == "xla"  # CPU
  with pytest.raises(ValueError, match="attention_impl"):
    resolve_impl("flash")
  seg, img = _stack(LAYOUTS["packed"])
  q, k, v = _qkv(2, 128, 128, 4, 2, 64, jnp.float32)
  with pytest.raises(ValueError, match="multiples of 128"):
    pallas_attention(q, k, v, seg, img, backend="tpu", block_q=64, interpret=False)
  with pytest.raises(ValueError, match="powers of two"):
    pallas_attention(q, k, v, seg, img, backend="gpu", block_q=48)
  with pytest.raises(ValueError, match="multiple of 3 kv heads"):
    pallas_attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2), seg, img)
  with pytest.raises(ValueError, match=r"must be \[B, L\]"):
    pallas_attention(q, k, v, seg[:, :64], img)
