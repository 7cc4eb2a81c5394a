"""The model-driven samplers: guided DDPM images and text completion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from monoformer_jax.data.packing import Example, RowSpec, pack_examples
from monoformer_jax.diffusion.gaussian import GaussianDiffusion
from monoformer_jax.diffusion.sample_images import sample_images
from monoformer_jax.text.generate import generate
from official_tiny import load_official_tiny

BOS, EOS, NL, PAD, IMAGE, IM_START, IM_END = 1, 2, 13, 256, 257, 258, 259


@pytest.fixture(scope="module")
def model(fixture_dir):
  return load_official_tiny(fixture_dir)[0]


def _rows(prompts):
  spec = RowSpec(seq_len=32, max_images=1, image_shape=(8, 8, 4), tokens_per_image=16,
                 image_id=IMAGE, pad_id=PAD)
  examples = [Example([BOS, *p, IM_START, IMAGE, IM_END, NL, EOS],
                      [np.zeros((8, 8, 4), np.float32)], train_text=False) for p in prompts]
  return pack_examples(examples, spec, one_per_row=True)


def test_guidance_scale_one_is_the_conditional_model(model):
  cond, null = _rows([[40, 41, 42], [50, 51, 52]]), _rows([[], []])
  diffusion = GaussianDiffusion.create(respacing="5")
  key = jax.random.PRNGKey(0)
  plain = sample_images(model, cond, diffusion, key)
  guided_1 = sample_images(model, cond, diffusion, key, null_rows=null, cfg_scale=1.0)
  guided_3 = sample_images(model, cond, diffusion, key, null_rows=null, cfg_scale=3.0)
  assert plain.shape == (2, 8, 8, 4) and np.isfinite(np.asarray(plain)).all()
  np.testing.assert_allclose(guided_1, plain, rtol=1e-4, atol=1e-4)
  assert np.abs(np.asarray(guided_3) - np.asarray(plain)).max() > 1e-2
  again = sample_images(model, cond, diffusion, key)
  np.testing.assert_array_equal(again, plain)   # seeded: reproducible


def test_greedy_generation_matches_step_by_step_argmax(model):
  prompts = [[BOS, 10, 20, 30, 40, 50], [BOS, 7]]
  new = generate(model, prompts, max_new_tokens=5, eos_id=EOS, pad_id=PAD,
                 key=jax.random.PRNGKey(0))
  for prompt, got in zip(prompts, new):
    seq = list(prompt)
    for _ in range(5):   # the reference: full forward of the sequence, argmax
      n = len(seq)
      tok = jnp.asarray([seq], jnp.int32)
      ones, zeros = jnp.ones((1, n), jnp.int32), jnp.zeros((1, n), jnp.int32)
      logits, _ = model(tok, ones, zeros, jnp.arange(n)[None], jnp.zeros((1, 1, 8, 8, 4)),
                        jnp.zeros((1, 1), jnp.int32))
      seq.append(int(jnp.argmax(logits[0, -1])))
      if seq[-1] == EOS:
        break
    assert got == seq[len(prompt):]
