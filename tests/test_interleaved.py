"""Interleaved generation against a step-by-step reference that recomputes the
whole row, laid out by the packer alone (no cache, no padding, no lockstep), at
every token and every denoising step; its seeds follow the contract in
text/interleaved.py's docstring.

The model is the digits architecture (2 layers) with every parameter drawn at
random, and a head that raises `<|im_start|>` where the hidden state says so
(`_Drawing`), so the rows switch to images at different steps, more than once.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import benchmark_module, digits_config

from monoformer_jax.data.packing import pack_examples
from monoformer_jax.diffusion.gaussian import GaussianDiffusion, apply_cfg, sample_step
from monoformer_jax.errors import ConfigError
from monoformer_jax.layout import Example, Row, RowSpec
from monoformer_jax.model.build import abstract_model, compiled
from monoformer_jax.model.monoformer import MonoFormer
from monoformer_jax.text.generate import sample_token
from monoformer_jax.text.interleaved import TokenIds, generate_interleaved
from monoformer_jax.text.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
IDS = TokenIds.of(TOK)
PROMPTS = [[TOK.bos_id] + TOK.encode("here is a"), [TOK.bos_id] + TOK.encode("two")]


def assert_image_close(got, want):
  """Equal up to float32 sums in another order: the random model's images
  reach several hundred, and the lockstep layout's padding columns change the
  attention's summation order (errors up to ~6e-7 of the image's scale; a
  wrong mask or a wrong fed image moves it by 1e-5 of it or more)."""
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-6 * np.abs(want).max())


class _Drawing(MonoFormer):
  """A model that asks for an image (its `<|im_start|>` logit raised by 30)
  wherever its final hidden state's first feature exceeds 1, about one token
  in six: at different steps in different rows, and more than once per row."""

  def logits(self, h_BxLxE):
    logits = super().logits(h_BxLxE)
    fire = (h_BxLxE[..., 0] > 1.0).astype(logits.dtype)
    return logits.at[..., TOK.im_start_id].add(30.0 * fire)


def _random_model(conditioning, seed=1, cls=MonoFormer):
  config = digits_config()
  config.model.conditioning = conditioning
  _, abstract, _ = abstract_model(config.model)
  rng = np.random.default_rng(seed)

  def draw(path, x):
    noise = rng.standard_normal(x.shape).astype(np.float32)
    return 1 + 0.1 * noise if path[-1].key == "scale" else 0.08 * noise

  model = cls(config.model, rngs=nnx.Rngs(0))
  nnx.update(model, jax.tree_util.tree_map_with_path(draw, abstract))
  return model


def _drawing_model(conditioning):
  # Seeds at which both prompts draw within 100 columns.
  seed = {"adaln_before_decoder": 4, "add_before_image_tokens": 1}[conditioning]
  return _random_model(conditioning, seed=seed, cls=_Drawing)


@compiled
def _forward(model, _, row, latents, t):
  return model(row, latents, t)


def _run_row(model, ids, images, t_slots, seq_len=96):
  """(logits [L, V], diffusion outputs [M, h, w, 2C]) of one example laid out
  by the packer: the whole row recomputed."""
  spec = RowSpec(
    seq_len=seq_len,
    max_images=max(1, len(images)),
    image_shape=(8, 8, 1),
    tokens_per_image=model.tokens_per_image,
    image_id=TOK.image_id,
    pad_id=TOK.pad_id,
    cond_token=model.cond_token,
  )
  batch = pack_examples([Example(ids, list(images))], spec, one_per_row=True)
  latents = np.zeros((1, spec.max_images, 8, 8, 1), np.float32)
  t = np.zeros((1, spec.max_images), np.int32)
  for k, (x, tk) in enumerate(zip(images, t_slots)):
    latents[0, k], t[0, k] = x, tk
  logits, out = _forward(model, None, Row.of(batch), jnp.asarray(latents), jnp.asarray(t))
  last = int((batch["segment_ids"][0] > 0).sum()) - 1
  return np.asarray(logits[0, last]), out[0]


def reference(
  model,
  prompt,
  n_new,
  key,
  index,
  diffusion,
  *,
  cfg_scale=None,
  sampler="ddpm",
  fed_t=0,
  temperature=0.0,
  top_k=0,
):
  """Row `index`'s first `n_new` new ids and its images, each token and step
  from the whole row recomputed; earlier images sit in the row at `fed_t`."""
  text_key, image_key = jax.random.split(key)
  text_key, image_key = jax.random.fold_in(text_key, index), jax.random.fold_in(image_key, index)
  ids, images, new, j = list(prompt), [], [], 0
  while len(new) < n_new:
    if ids[-1] == TOK.im_start_id:
      k = len(images)
      init, loop = jax.random.split(jax.random.fold_in(image_key, k))
      x_t = jax.random.normal(init, (1, 8, 8, 1))
      row_ids = ids + [TOK.image_id]

      def denoise(x, t_model, row_ids=row_ids, k=k):
        out = _run_row(model, row_ids, images + [np.asarray(x[0])], [fed_t] * k + [t_model[0]])[1]
        cond = out[None, k]
        if cfg_scale is None:
          return cond
        null = _run_row(
          model, [TOK.bos_id, TOK.im_start_id, TOK.image_id], [np.asarray(x[0])], [t_model[0]]
        )[1][None, 0]
        return apply_cfg(cond, null, cfg_scale)

      for i in range(diffusion.num_timesteps):
        x_t = sample_step(denoise, x_t, i, loop[None], diffusion, sampler=sampler, row_keys=True)
      images.append(np.asarray(x_t[0]))
      ids += [TOK.image_id, TOK.im_end_id]
      new += [TOK.image_id, TOK.im_end_id]
      continue
    logits = _run_row(model, ids, images, [fed_t] * len(images))[0]
    tok = int(
      sample_token(
        jnp.asarray(logits)[None],
        jax.random.fold_in(text_key, j),
        temperature=temperature,
        top_k=top_k,
      )[0]
    )
    j += 1
    ids.append(tok)
    new.append(tok)
  return new[:n_new], images


D5 = GaussianDiffusion.create(1000, respacing="5")


@pytest.mark.slow
@pytest.mark.parametrize("conditioning", ["adaln_before_decoder", "add_before_image_tokens"])
def test_interleaved_equals_recomputing_the_row(conditioning):
  """Greedy text and guided DDPM images, two prompts that switch at different
  steps, two images or more in an answer: equal to the recomputed rows. The
  row that asks first waits for the other, and both draw in one pass."""
  model = _drawing_model(conditioning)
  key = jax.random.PRNGKey(3)
  events = []
  outs = generate_interleaved(
    model,
    PROMPTS,
    ids=IDS,
    max_new_tokens=100,
    diffusion=D5,
    key=key,
    cfg_scale=2.0,
    progress=events.append,
  )
  starts = [[i for i, t in enumerate(o.ids) if t == TOK.im_start_id] for o in outs]
  counts = [len(o.images) for o in outs]
  assert min(counts) >= 1 and max(counts) >= 2, counts
  assert starts[0][0] != starts[1][0], starts  # the rows switch at different steps
  assert any(e.startswith("drawing 2 image(s)") for e in events), events
  for r, out in enumerate(outs):
    # The format: every image is <|im_start|> <image> <|im_end|>.
    for s in starts[r][: len(out.images)]:
      assert out.ids[s + 1 : s + 3] == [TOK.image_id, TOK.im_end_id]
    want_ids, want_images = reference(model, PROMPTS[r], len(out.ids), key, r, D5, cfg_scale=2.0)
    assert out.ids == want_ids
    assert len(want_images) == len(out.images)
    for got, want in zip(out.images, want_images):
      assert_image_close(got, want)
  # The fed-back image is clean: recomputing with it at t = 999 moves the
  # second image (which attends to the first) by far more than the tolerance.
  r = int(np.argmax(counts))
  _, noisy_fed = reference(
    model, PROMPTS[r], len(outs[r].ids), key, r, D5, cfg_scale=2.0, fed_t=999
  )
  assert np.abs(noisy_fed[1] - outs[r].images[1]).max() > 1e-2


def test_interleaved_without_waiting_draws_each_row_alone():
  """max_wait=0: a row draws as soon as it asks, one pass per image here, and
  the rows still equal the recomputed ones."""
  model = _drawing_model("adaln_before_decoder")
  key = jax.random.PRNGKey(3)
  events = []
  outs = generate_interleaved(
    model,
    PROMPTS,
    ids=IDS,
    max_new_tokens=100,
    diffusion=D5,
    key=key,
    cfg_scale=2.0,
    max_wait=0,
    progress=events.append,
  )
  passes = [e for e in events if e.startswith("drawing")]
  assert len(passes) == sum(len(o.images) for o in outs) >= 3, passes
  assert all(e.startswith("drawing 1 image(s)") for e in passes), passes
  for r, out in enumerate(outs):
    want_ids, want_images = reference(model, PROMPTS[r], len(out.ids), key, r, D5, cfg_scale=2.0)
    assert out.ids == want_ids
    for got, want in zip(out.images, want_images, strict=True):
      assert_image_close(got, want)


@pytest.mark.slow
def test_interleaved_sampled_text_and_ddim_are_per_row():
  """Temperature sampling and DDIM: each row equals the reference, and a row's
  output does not depend on the other rows of its batch."""
  model = _drawing_model("add_before_image_tokens")
  key = jax.random.PRNGKey(5)
  kw = dict(
    ids=IDS, max_new_tokens=48, diffusion=D5, key=key, sampler="ddim", temperature=1.0, top_k=8
  )
  both = generate_interleaved(model, PROMPTS, **kw)
  assert both[1].images  # the compared row draws
  alone = generate_interleaved(model, PROMPTS[:1], **kw)[0]
  n = min(len(alone.ids), len(both[0].ids))
  assert alone.ids[:n] == both[0].ids[:n]
  want_ids, want_images = reference(
    model, PROMPTS[1], len(both[1].ids), key, 1, D5, sampler="ddim", temperature=1.0, top_k=8
  )
  assert both[1].ids == want_ids
  for got, want in zip(both[1].images, want_images):
    assert_image_close(got, want)


def test_interleaved_stops_at_eos_and_budget():
  model = _drawing_model("adaln_before_decoder")
  # eos as the token that opens images: every row stops where it would draw.
  ids = TokenIds.of(TOK, stop_ids=[TOK.im_start_id])
  outs = generate_interleaved(model, PROMPTS, ids=ids, max_new_tokens=40, diffusion=D5)
  for out in outs:
    assert out.stop == "stop" and out.ids[-1] == TOK.im_start_id and not out.images
  # A budget with room for the text but not for an image after it.
  outs = generate_interleaved(model, PROMPTS, ids=IDS, max_new_tokens=18, diffusion=D5)
  assert all(o.stop == "budget" for o in outs)
  assert all(TOK.im_start_id not in o.ids or o.images for o in outs)


def test_interleaved_bad_inputs_name_the_fix():
  model = _random_model("add_before_image_tokens")
  with pytest.raises(ConfigError, match="at least 19"):  # <|im_start|> + 1 + 16 + 1
    generate_interleaved(model, PROMPTS, ids=IDS, max_new_tokens=10, diffusion=D5)
  # 110 positions + 19 for the image: 1 past the 128.
  with pytest.raises(
    ConfigError, match=r"takes 110 positions and an image takes 19: 129 .* by 1 token$"
  ):
    generate_interleaved(
      model, [[TOK.bos_id] * 110], ids=IDS, max_new_tokens=40, diffusion=D5, max_positions=128
    )
  with pytest.raises(ConfigError, match="max_wait=-1"):
    generate_interleaved(model, PROMPTS, ids=IDS, max_new_tokens=40, diffusion=D5, max_wait=-1)
  with pytest.raises(ConfigError, match="one scale"):
    generate_interleaved(
      model, PROMPTS, ids=IDS, max_new_tokens=40, diffusion=D5, cfg_scale=(1.5, 2.0)
    )


@pytest.mark.slow
def test_the_interleaved_benchmark_counts_passes_and_compares_texts():
  """benchmarks/interleaved.py's run() on the drawing model: without waiting
  a pass for each column some row draws at; waiting, fewer passes, the same
  images counted and the same text."""
  bench = benchmark_module("interleaved")
  config = digits_config()
  model = _drawing_model(config.model.conditioning)
  eager = bench.run(model, TOK, config, 0, prompts=3, num_steps=2)
  waiting = bench.run(model, TOK, config, None, prompts=3, num_steps=2)
  assert eager[2] == waiting[2] >= 2 and eager[1] <= eager[2], (eager[:3], waiting[:3])
  assert waiting[1] < eager[1], (eager[:3], waiting[:3])
  assert eager[3] == waiting[3]
