r"""Sample a trained MonoFormer from the command line: images and text.

    python -m monoformer_jax.sample --checkpoint=/tmp/digits --class_name=seven
    python -m monoformer_jax.sample --checkpoint=/tmp/digits \
        --prompt="an image of three." --num_samples=8 --sampler=ddim --cfg_scale=2
    python -m monoformer_jax.sample --checkpoint=/tmp/digits --text_prompt="two plus two is"
    python -m monoformer_jax.sample --checkpoint=/tmp/digits --image=seven.png \
        --text_prompt="which digit is this?" --temperature=0
    python -m monoformer_jax.sample --checkpoint=/tmp/digits --interleaved \
        --text_prompt="here is a" --temperature=1 --num_samples=8
    python -m monoformer_jax.sample --checkpoint=/tmp/digits --image=seven.png \
        --prompt="the next digit:" --edit_guidance=two_scale --cfg_scale=2 \
        --image_cfg_scale=1.5

With `--image` (repeatable) the model READS each image (its vision encoder,
then the KV cache over it) and answers `--text_prompt` about it (one prompt
for every image, or one per image); the answers are printed and written to
`text.txt`. Models trained without a vision encoder refuse `--image`.
`--image` with `--prompt` instead EDITS: each image read and a new one drawn
by the prompt (one for every image, or one each), `--num_samples` per image,
guided against rows that drop what `--edit_guidance` says (the instruction,
the image, both, or InstructPix2Pix's two scales); `edits.png` shows each
image beside its edits.

`--interleaved` writes text with images inline: each `--text_prompt` is
continued, and wherever the model writes <|im_start|> it draws an image and
goes on writing, `--num_samples` answers per prompt (with `--image`, one
image per prompt that it reads first). They go to `interleaved.html` (the
text with the images inline, PNGs in `interleaved/`) and `interleaved.json`
(the pieces in order). `--max_new_tokens` counts the images' columns too.

`--checkpoint` is a training workdir, one of its step folders, or the output
of `python -m monoformer_jax.convert`; the config saved with it describes the
model, and its mesh (`config.mesh`) shards the weights over the devices. Images
go to `--output_dir` as `images.png` (a row per prompt) and `images.npz`
(`images` float32 [B, h, w, C] in [0, 1], `prompts` [B]); text completions
are printed and written to `text.txt`. Without `--output_dir` they go to a new
folder beside the checkpoint (`WORKDIR/samples_step800`, or
`MODEL_samples_step0` for a converted model; `-2`, `-3`, ... when it exists);
an `--output_dir` that already holds these files needs `--overwrite`. Every
flag is checked before the model is loaded. Latent models are decoded with the
SD-VAE at `--vae` (or the config's `vae.path`); the digits model generates
pixels directly.
"""

import os

from absl import app, flags, logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import tqdm

from monoformer_jax import cli, inference
from monoformer_jax.checkpoints import beside, load_config, load_model
from monoformer_jax.model.build import param_shardings
from monoformer_jax.parallel import sharding
from monoformer_jax.vision.inputs import load_image
from monoformer_jax.config.fields import check_image_sampling, check_text_sampling
from monoformer_jax.paths import fresh_output_dir, new_folder_beside, writable_dir

OUTPUTS = ("images.png", "images.npz", "text.txt", "edits.png", "edits.npz", "interleaved.html",
           "interleaved.json")


def _output_dir(checkpoint: str, step: int) -> str:
  """--output_dir, checked; else a new folder beside the checkpoint."""
  if _OUTPUT_DIR.value:
    return fresh_output_dir(_OUTPUT_DIR.value, OUTPUTS, "--output_dir", _OVERWRITE.value)
  base = beside(checkpoint, step, "samples", "--output_dir")
  return writable_dir(new_folder_beside(base), "samples (or pass --output_dir)",
                      "the default --output_dir")

_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "Training workdir, step folder or converted model.")
_WEIGHTS = flags.DEFINE_enum("weights", "ema", ["ema", "raw"],
                             "EMA weights (the reference samples with them) or raw.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "Image prompt, free text (repeatable).")
_CLASS_NAME = flags.DEFINE_multi_string("class_name", [],
                                        "Class to draw, e.g. 'seven' (repeatable).")
_TEXT_PROMPT = flags.DEFINE_multi_string("text_prompt", [], "Text to complete (repeatable); "
                                         "with --image, the question about the image(s).")
_IMAGE = flags.DEFINE_multi_string("image", [], "An image for the model to read and answer "
                                   "--text_prompt about (repeatable; PNG or JPEG).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 4, "Images per prompt or class name (per "
                                    "image when editing; answers per prompt, interleaved).")
_INTERLEAVED = flags.DEFINE_bool("interleaved", False, "Continue --text_prompt with text and "
                                 "images inline (interleaved.html).")
_EDIT_GUIDANCE = flags.DEFINE_enum("edit_guidance", "both", ["both", "text", "image", "two_scale"],
                                   "Editing: what the guided rows drop (two_scale: "
                                   "InstructPix2Pix's, --cfg_scale on the text and "
                                   "--image_cfg_scale on the image).")
_IMAGE_CFG_SCALE = flags.DEFINE_float("image_cfg_scale", 1.5, "Editing with two_scale: the "
                                      "image's guidance scale.")
_SAMPLER = flags.DEFINE_enum("sampler", "ddpm", ["ddpm", "ddim"],
                             "DDPM (learned variance, the reference) or DDIM.")
_ETA = flags.DEFINE_float("eta", 0.0, "DDIM noise: 0 deterministic, 1 the posterior variance.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", None,
                                  "Denoising steps (default config.sample.num_steps, or 20).")
_CFG_SCALE = flags.DEFINE_float("cfg_scale", None, "Guidance scale, 0 for none (default "
                                "config.sample.cfg_scale, or 1.5).")
_GUIDE_EPS_0_TO_2 = flags.DEFINE_bool("guide_eps_0_to_2", False,
                                      "Guide only epsilon channels 0-2, as the reference.")
_CACHE = flags.DEFINE_bool("cache", True,
                           "Cache the prompt's keys/values (images) and the KV cache (text).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed: the same seed, the same samples.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 256, "Longest text completion.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.7, "Text temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 50, "Sample among the k likeliest tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "Sample within this probability mass (1: all).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.model / tokenizer.json / "
                                 "'bytes' (default config.data.tokenizer).")
_VAE = flags.DEFINE_string("vae", None, "diffusers AutoencoderKL folder (default "
                           "config.vae.path); latent models need one.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None,
                                  "Where images.png, images.npz and text.txt go (default: "
                                  "a new folder beside the checkpoint).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Replace images.* and text.txt already in --output_dir.")
flags.mark_flag_as_required("checkpoint")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not (_PROMPT.value or _CLASS_NAME.value or _TEXT_PROMPT.value):
    raise app.UsageError("nothing to sample: give --prompt, --class_name or --text_prompt")
  editing = bool(_IMAGE.value and _PROMPT.value)
  if editing and (_CLASS_NAME.value or _TEXT_PROMPT.value):
    raise app.UsageError("--image with --prompt edits the images; leave out --class_name and "
                         "--text_prompt (or sample them in another call)")
  if editing and len(_PROMPT.value) not in (1, len(_IMAGE.value)):
    raise app.UsageError(f"{len(_IMAGE.value)} --image but {len(_PROMPT.value)} --prompt: give "
                         "one instruction for all the images, or one each")
  if _INTERLEAVED.value and not _TEXT_PROMPT.value:
    raise app.UsageError("--interleaved continues --text_prompt: give at least one")
  if _INTERLEAVED.value and _IMAGE.value and len(_IMAGE.value) != len(_TEXT_PROMPT.value):
    raise app.UsageError(f"--interleaved with {len(_IMAGE.value)} --image and "
                         f"{len(_TEXT_PROMPT.value)} --text_prompt: give one image per prompt")
  if (_IMAGE.value and not editing and not _INTERLEAVED.value
      and len(_TEXT_PROMPT.value) not in (1, len(_IMAGE.value))):
    raise app.UsageError(f"{len(_IMAGE.value)} --image but {len(_TEXT_PROMPT.value)} "
                         "--text_prompt: give one question for all the images, or one each")
  images_read = [load_image(p) for p in _IMAGE.value]   # a bad file fails here, named
  if _TEXT_PROMPT.value:
    check_text_sampling(max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
                        top_k=_TOP_K.value, top_p=_TOP_P.value, prefix="--")
  config, step = load_config(_CHECKPOINT.value)
  if _IMAGE.value and not config.model.vision_encoder:
    raise app.UsageError(f"{_CHECKPOINT.value} was trained without a vision encoder "
                         "(model.vision_encoder is ''), so it cannot read --image; use a "
                         "model trained with model.vision_encoder=vae or clip (the digits "
                         "default reads digits)")
  sample_cfg = config.sample
  num_steps = sample_cfg.num_steps if _NUM_STEPS.value is None else _NUM_STEPS.value
  cfg_scale = sample_cfg.cfg_scale if _CFG_SCALE.value is None else _CFG_SCALE.value
  check_image_sampling(num_steps=num_steps, cfg_scale=cfg_scale, eta=_ETA.value,
                       num_samples=_NUM_SAMPLES.value,
                       num_timesteps=config.diffusion.num_timesteps, prefix="--")
  tokenizer = inference.tokenizer_of(config, _TOKENIZER.value)
  prompts = [] if editing else list(_PROMPT.value) + [inference.class_name_prompt(c, config)
                                                     for c in _CLASS_NAME.value]
  vae = inference.load_vae_of(config, _VAE.value) if (prompts or _IMAGE.value) else None
  # Every process of a multi-host run samples (sharded); process 0 writes.
  writer = jax.process_index() == 0
  out_dir = _output_dir(_CHECKPOINT.value, step) if writer else None

  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh), sharding.logical_rules(config.sharding_rules):
    model, config = load_model(_CHECKPOINT.value, weights=_WEIGHTS.value, config=config,
                               shardings=param_shardings(config, mesh), step=step)
    logging.info("%s weights of %s (step %d), mesh %s; writing to %s", _WEIGHTS.value,
                 _CHECKPOINT.value, step, dict(mesh.shape), out_dir)

    if prompts:
      per_sample = [p for p in prompts for _ in range(_NUM_SAMPLES.value)]
      logging.info("%d images: %s, %d steps, guidance %s, prompt cache %s",
                   len(per_sample), _SAMPLER.value, num_steps, cfg_scale or "off",
                   "on" if _CACHE.value else "off")
      with tqdm.tqdm(total=num_steps, desc=f"{_SAMPLER.value} steps") as bar:
        x0 = inference.generate_images(
            model, tokenizer, per_sample, num_steps=num_steps, sampler=_SAMPLER.value,
            eta=_ETA.value, cfg_scale=cfg_scale or None,
            guided_channels=3 if _GUIDE_EPS_0_TO_2.value else None, seed=_SEED.value,
            use_cache=_CACHE.value, diffusion=config.diffusion,
            progress=lambda _: bar.update(1))
        x0 = (jax.device_get(x0) if jax.process_count() == 1 else   # all hosts' shards
              multihost_utils.process_allgather(x0, tiled=True))
      images = inference.to_pixels(x0, config, vae)
    if prompts and writer:
      np.savez(os.path.join(out_dir, "images.npz"), images=images,
               prompts=np.array(per_sample))
      inference.image_grid(images, rows=len(prompts), scale=max(1, 64 // images.shape[1])
                           ).save(os.path.join(out_dir, "images.png"))
      logging.info("wrote %d images to %s (images.png, images.npz)", len(images), out_dir)

    if editing:
      _edit(model, tokenizer, config, images_read, vae, num_steps, cfg_scale, out_dir, writer)
    if _INTERLEAVED.value:
      _interleaved(model, tokenizer, config, images_read, vae, num_steps, cfg_scale, out_dir,
                   writer)
    elif _IMAGE.value and not editing:
      questions = list(_TEXT_PROMPT.value) * (len(_IMAGE.value) // len(_TEXT_PROMPT.value))
      completions = inference.describe_images(
          model, tokenizer, images_read, questions, config=config, vae=vae,
          max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
          top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value, use_cache=_CACHE.value)
      lines = [f"{i} {q!r} -> {c!r}" for i, q, c in zip(_IMAGE.value, questions, completions)]
    elif _TEXT_PROMPT.value:
      completions = inference.complete_text(
          model, tokenizer, _TEXT_PROMPT.value, max_new_tokens=_MAX_NEW_TOKENS.value,
          temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
          seed=_SEED.value, use_cache=_CACHE.value)
      lines = [f"{p!r} -> {c!r}" for p, c in zip(_TEXT_PROMPT.value, completions)]
    if _TEXT_PROMPT.value and writer and not _INTERLEAVED.value:
      with open(os.path.join(out_dir, "text.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
      print("\n".join(lines))


def _edit(model, tokenizer, config, sources, vae, num_steps, cfg_scale, out_dir, writer):
  """--image with --prompt: `--num_samples` edits of each image (edits.png: a
  row per image, the image first; edits.npz)."""
  n = _NUM_SAMPLES.value
  instructions = list(_PROMPT.value) * (len(sources) // len(_PROMPT.value))
  guidance = _EDIT_GUIDANCE.value
  scale = (cfg_scale, _IMAGE_CFG_SCALE.value) if guidance == "two_scale" else cfg_scale
  logging.info("%d edits: %s guidance %s", len(sources) * n, guidance, scale)
  with tqdm.tqdm(total=num_steps, desc=f"{_SAMPLER.value} steps") as bar:
    x0 = inference.edit_images(
        model, tokenizer, [s for s in sources for _ in range(n)],
        [i for i in instructions for _ in range(n)], config=config, vae=vae, guidance=guidance,
        cfg_scale=scale, num_steps=num_steps, sampler=_SAMPLER.value, eta=_ETA.value,
        seed=_SEED.value, progress=lambda _: bar.update(1))
  edits = inference.to_pixels(jax.device_get(x0), config, vae)
  if not writer:
    return
  size = edits.shape[1]
  shown = [np.asarray(s.convert("L" if edits.shape[-1] == 1 else "RGB").resize((size, size)),
                      np.float32).reshape(size, size, -1) / 255.0 for s in sources]
  grid = np.concatenate([np.concatenate([shown[i][None], edits[i * n:(i + 1) * n]])
                         for i in range(len(sources))])
  inference.image_grid(grid, rows=len(sources), scale=max(1, 64 // size)).save(
      os.path.join(out_dir, "edits.png"))
  np.savez(os.path.join(out_dir, "edits.npz"), images=edits,
           instructions=np.array([i for i in instructions for _ in range(n)]),
           sources=np.array([p for p in _IMAGE.value for _ in range(n)]))
  logging.info("wrote %d edits to %s (edits.png, edits.npz)", len(edits), out_dir)


def _interleaved(model, tokenizer, config, images_read, vae, num_steps, cfg_scale, out_dir,
                 writer):
  """--interleaved: `--num_samples` answers per --text_prompt, text and images."""
  n = _NUM_SAMPLES.value
  prompts = [p for p in _TEXT_PROMPT.value for _ in range(n)]
  reads = [x for x in images_read for _ in range(n)] if images_read else None
  answers = inference.generate_interleaved(
      model, tokenizer, prompts, config=config, images=reads, vae=vae,
      max_new_tokens=_MAX_NEW_TOKENS.value, num_steps=num_steps, sampler=_SAMPLER.value,
      eta=_ETA.value, cfg_scale=cfg_scale or None, temperature=_TEMPERATURE.value,
      top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value, progress=logging.info)
  if writer:
    page = inference.write_interleaved_page(answers, prompts, out_dir,
                                            scale=max(1, 64 // config.model.image_size))
    logging.info("wrote %s (%d answers, %d images)", page, len(answers),
                 sum(k == "image" for a in answers for k, _ in a.pieces))


if __name__ == "__main__":
  cli.run(main)
