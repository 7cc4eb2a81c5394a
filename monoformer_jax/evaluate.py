r"""Evaluate a MonoFormer, or a file of its samples, from the command line.

    # the embedded default (the README main job's workdir): digits accuracy and distance
    python -m monoformer_jax.evaluate --checkpoint=/tmp/digits --metrics=digits

    # the paper's FID-50K on ImageNet 256 (ADM's reference batch, pytorch-fid's weights
    # file), sampled as the reference's sample_ddp.py: 20 DDPM steps, guidance 1.5 on
    # eps channels 0-2 (the defaults of these metrics; --guide_all_channels guides all 4)
    python -m monoformer_jax.evaluate --checkpoint=/ckpt/mf256 --vae=sd-vae-ft-mse \
        --metrics=fid,sfid,is,precision_recall --num_samples=50000 \
        --inception=pt_inception-2015-12-05-6726825d.pth \
        --reference=VIRTUAL_imagenet256_labeled.npz --output=results.json

    # text-to-image FID (COCO-style): one image per prompt of a text file (one
    # prompt a line, repeated when fewer than the samples) against a folder of
    # reference images, each ADM-centre-cropped to the samples' size
    python -m monoformer_jax.evaluate --checkpoint=/ckpt/t2i --vae=sd-vae-ft-ema \
        --metrics=fid --num_samples=30000 --prompts=coco_captions.txt \
        --reference=coco/val2014 --inception=pt_inception-2015-12-05-6726825d.pth

    # the same metrics of an existing ADM sample npz, without a model
    python -m monoformer_jax.evaluate --samples=samples.npz \
        --reference=VIRTUAL_imagenet256_labeled.npz --inception=pt_inception-...pth \
        --metrics=fid,sfid,is,precision_recall

    # the digits model reading held-out real digits (greedy "it is seven."), writing
    # text with drawings inline, and redrawing held-out digits as the next digit
    python -m monoformer_jax.evaluate --checkpoint=/tmp/digits \
        --metrics=reading,interleaved,editing

    # zero-shot commonsense reasoning from local task files
    python -m monoformer_jax.evaluate --checkpoint=/ckpt/mf256 --metrics=commonsense \
        --tasks_dir=/data/commonsense --tasks=hellaswag,piqa,arc_easy

With a checkpoint, the sample metrics sample first (eval/sampling.py: the
reference's protocol, in chunks under `--sample_dir` that a restarted run
of the same checkpoint skips, sharded over every device of every host), then
score the finished `samples.npz`. How they sample is the metrics' own
protocol (registry.sampling_protocol): for the Inception metrics that of the
reference's sample_ddp.py, whose defaults gave the paper's FID (DDPM, 20
steps, guidance 1.5 applied to eps channels 0-2 only, as DiT's
forward_with_cfg); `--num_steps` and `--cfg_scale` override the steps and
scale, `--guide_all_channels` guides every channel. The sample folder's
run.json records all three, so a folder sampled one way never resumes
another. `--config` replaces the config saved with
the checkpoint (for another mesh, say); the model fields must still match the
weights. Every flag, the output path, the sample folder and what the samples
will be (score.check_samples: their count, shape and labels for each metric)
are checked before a model is loaded, and a sample file before anything is
scored. Results are printed, then written to `--output` (JSON; default
SAMPLE_DIR/results.json).
"""

import os

import jax
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from monoformer_jax import cli, inference
from monoformer_jax.checkpoints import beside, fingerprint, load_config, model_on_mesh
from monoformer_jax.config import complete
from monoformer_jax.config.fields import integer
from monoformer_jax.config.schema import ALL_SAMPLERS, sampler_for
from monoformer_jax.data.datasets import class_names
from monoformer_jax.data.prompts import read_prompts
from monoformer_jax.errors import ConfigError, PathError
from monoformer_jax.eval import finite_json, registry
from monoformer_jax.eval.fid import load_samples_npz
from monoformer_jax.eval.sampling import (
  bind_folder,
  check_chunk_size,
  class_labels,
  default_chunk_size,
  prompt_labels,
  prompts_digest,
  run_settings,
  sample_run,
  sample_shape,
)
from monoformer_jax.eval.score import check_samples, score_images, score_model
from monoformer_jax.paths import whole_file, writable_dir, writable_file

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config replacing the one saved with --checkpoint (optional).", lock_config=True
)
_CHECKPOINT = flags.DEFINE_string(
  "checkpoint", None, "Training workdir, step folder or converted model."
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_METRICS = flags.DEFINE_list("metrics", None, f"Metrics among {registry.METRICS}.")
_OUTPUT = flags.DEFINE_string(
  "output", None, "Results JSON (default SAMPLE_DIR/results.json, or beside --samples)."
)
# samples
_SAMPLES = flags.DEFINE_string(
  "samples",
  None,
  "An ADM sample npz (arr_0 uint8 [N, H, W, 3], arr_1 labels) to score instead of sampling.",
)
_SAMPLE_DIR = flags.DEFINE_string(
  "sample_dir",
  None,
  "Where the chunks and samples.npz go (default: eval_step{N} beside the checkpoint).",
)
_NUM_SAMPLES = flags.DEFINE_integer(
  "num_samples",
  None,
  "Images to sample (default: the "
  "largest the metrics ask for: 50000 for the Inception "
  "metrics, else 1000).",
)
_CHUNK_SIZE = flags.DEFINE_integer(
  "chunk_size",
  None,
  "Images per chunk, a multiple of the device count and no more than --num_samples take "
  "(default: the largest multiple not above 500, at least one per device: 500 on 1 device, "
  "496 on 8, 480 on 32; fewer for fewer samples); a restarted run skips finished chunks.",
)
_PROMPTS = flags.DEFINE_string(
  "prompts",
  None,
  "A text file (local or gs://) of image prompts, one per line, to sample instead of the "
  "config's classes: sample i draws prompt i mod the prompts' count.",
)
_BALANCED = flags.DEFINE_bool(
  "balanced",
  False,
  "The same number of samples of every class (the reference draws each class uniformly at random).",
)
_NUM_STEPS = flags.DEFINE_integer(
  "num_steps",
  None,
  "Respaced DDPM steps (default: what the metrics ask for, 20 for the Inception metrics "
  "as the reference's sample_ddp.py; else config.sample.num_steps).",
)
_CFG_SCALE = flags.DEFINE_float(
  "cfg_scale",
  None,
  "Guidance scale, 0 for none (default: the metrics', 1.5 for the Inception metrics as "
  "the reference's sample_ddp.py; else config.sample.cfg_scale).",
)
_GUIDE_ALL_CHANNELS = flags.DEFINE_bool(
  "guide_all_channels",
  False,
  "Guide every eps channel; by default the Inception metrics guide channels 0-2 only, as "
  "the reference's sample_ddp.py (DiT's forward_with_cfg).",
)
_SAMPLER = flags.DEFINE_enum(
  "sampler",
  None,
  list(ALL_SAMPLERS),
  "iddpm models: ddpm (the reference) or ddim; flow models: euler or heun (default: the "
  "checkpoint's diffusion.objective's first: ddpm, euler).",
)
_SEED = flags.DEFINE_integer("seed", 0, "The run's seed (labels and noise).")
_WEIGHTS = flags.DEFINE_enum(
  "weights", "ema", ["ema", "raw"], "EMA weights (the reference) or raw."
)
_VAE = flags.DEFINE_string(
  "vae", None, "diffusers AutoencoderKL folder for latent models (default config.vae.path)."
)
_DECODE_BATCH = flags.DEFINE_integer("decode_batch", 64, "Latents decoded per VAE call.")
# image metrics
_INCEPTION = flags.DEFINE_string(
  "inception",
  None,
  "pytorch-fid's Inception weights, pt_inception-2015-12-05-6726825d.pth (nothing is downloaded).",
)
_REFERENCE = flags.DEFINE_string(
  "reference",
  None,
  "ADM reference batch npz (mu, sigma, mu_s, sigma_s, arr_0), any npz of images (arr_0), or "
  "a folder of reference images (ADM-centre-cropped to the samples' size).",
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 200, "Images per Inception call.")
_TEXT_BATCH = flags.DEFINE_integer("text_batch", 16, "Rows per commonsense forward pass.")
# commonsense
_TASKS_DIR = flags.DEFINE_string("tasks_dir", None, "Folder of the commonsense task files.")
_TASKS = flags.DEFINE_list("tasks", None, "Commonsense tasks (default: all seven).")
_LIMIT = flags.DEFINE_integer("limit", None, "At most this many examples per task.")
_MAX_LEN = flags.DEFINE_integer(
  "max_len",
  2048,
  "Longest scored row (TinyLlama's 2048); longer contexts are cut from the left, and counted.",
)
_TOKENIZER = flags.DEFINE_string(
  "tokenizer", None, "tokenizer.model / tokenizer.json / 'bytes' (default config.data.tokenizer)."
)


def _settings() -> dict:
  """What the evaluators may read of the flags (registry.Evaluator: files, options)."""
  return dict(
    inception=_INCEPTION.value,
    reference=_REFERENCE.value,
    batch_size=_BATCH_SIZE.value,
    tasks_dir=_TASKS_DIR.value,
    tasks=_TASKS.value,
    limit=_LIMIT.value,
    text_batch=_TEXT_BATCH.value,
    max_len=_MAX_LEN.value,
  )


def _check_flags(metrics) -> list[str] | None:
  """Every flag, before anything is loaded; returns --prompts' prompts (None without)."""
  if not _CHECKPOINT.value and not _SAMPLES.value:
    raise app.UsageError(
      "give --checkpoint (a model to sample and score) or --samples (an npz of samples to score)"
    )
  if _CHECKPOINT.value and _SAMPLES.value:
    raise app.UsageError("give --checkpoint or --samples, not both")
  if _PROMPTS.value is not None and not _CHECKPOINT.value:
    raise app.UsageError("--prompts are drawn by a model: give --checkpoint, not --samples")
  if _PROMPTS.value is not None and not registry.sample_metrics(metrics):
    raise app.UsageError(
      f"--prompts are drawn for the sample metrics, and --metrics={','.join(metrics)} "
      "names none; leave --prompts out"
    )
  for cls, names in registry.families(metrics).items():
    if cls.scores == "model" and not _CHECKPOINT.value:
      raise ConfigError(
        f"--metrics={','.join(names)} scores a model itself: give "
        "--checkpoint (--samples holds images only)"
      )
    cls.check(names, _settings(), lambda name: f"--{name}")
  if _SAMPLES.value and not epath.Path(_SAMPLES.value).is_file():
    raise PathError(f"--samples={_SAMPLES.value!r} is not a file")
  integer("--batch_size", _BATCH_SIZE.value, low=1)
  integer("--text_batch", _TEXT_BATCH.value, low=1)
  integer("--max_len", _MAX_LEN.value, low=2)
  integer("--decode_batch", _DECODE_BATCH.value, low=1)
  if _NUM_SAMPLES.value is not None:
    integer("--num_samples", _NUM_SAMPLES.value, low=1)
  if _CHUNK_SIZE.value is not None:  # before the evaluators' files and the model load
    check_chunk_size(_CHUNK_SIZE.value, _NUM_SAMPLES.value)
  if _LIMIT.value is not None:
    integer("--limit", _LIMIT.value, low=1)
  return None if _PROMPTS.value is None else read_prompts(_PROMPTS.value, "--prompts")


def _sample_dir(step: int) -> str:
  if _SAMPLE_DIR.value:
    return writable_dir(_SAMPLE_DIR.value, "samples", "--sample_dir")
  base = beside(_CHECKPOINT.value, step, "eval")
  return writable_dir(base, "samples (or pass --sample_dir)", "the default --sample_dir")


def _write_results(results: dict, output: str):
  """Prints the results, then writes them to `output` (local or on a bucket)
  whole: a write that fails anyway loses nothing printed."""
  text = finite_json(results, indent=1)
  print(text, flush=True)
  try:
    with whole_file(output) as f:
      f.write((text + "\n").encode())
  except OSError as e:
    raise PathError(
      f"the results could not be written to {output!r} ({e.strerror or e}); they are printed above"
    ) from e
  logging.info("wrote %s", output)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not _METRICS.value:
    raise app.UsageError(f"give --metrics, among {registry.METRICS}")
  metrics = registry.check_metrics(_METRICS.value)
  prompts = _check_flags(metrics)
  evaluators = registry.make(metrics, _settings())  # their files are read before any sampling
  classes = [type(e) for e in evaluators]
  results = {}
  sample_metrics = registry.sample_metrics(metrics)
  writer = jax.process_index() == 0

  if _SAMPLES.value:
    output = _OUTPUT.value or os.path.splitext(_SAMPLES.value)[0] + "_results.json"
    writable_file(output, "results", "--output")
    images, labels = load_samples_npz(_SAMPLES.value)
    results.update(score_images(images, labels, evaluators, f"--samples={_SAMPLES.value}"))
  else:
    config, step = load_config(_CHECKPOINT.value, _STEP.value)
    if _CONFIG.value is not None:  # checked as training's are (sample's choices, bounds)
      config = complete(_CONFIG.value, "--config")
    for name in metrics:
      problem = registry.evaluator_class(name).problem(name, config)
      if problem:
        raise ConfigError(f"--metrics={name}: {problem} in {_CHECKPOINT.value}")
    num_samples = _NUM_SAMPLES.value
    if num_samples is None:
      num_samples = (
        max(cls.num_samples for cls in classes if cls.scores == "samples")
        if sample_metrics
        else 1000
      )
    protocol = registry.sampling_protocol(
      metrics,
      config,
      num_steps=_NUM_STEPS.value,
      cfg_scale=_CFG_SCALE.value,
      guide_all_channels=_GUIDE_ALL_CHANNELS.value,
    )
    num_steps, cfg_scale = protocol["num_steps"], protocol["cfg_scale"]
    run = dict(
      checkpoint=_CHECKPOINT.value,
      step=step,
      weights=_WEIGHTS.value,
      num_samples=num_samples,
      chunk_size=_CHUNK_SIZE.value or default_chunk_size(num_samples),
      # None: the checkpoint's objective's own, recorded by name
      sampler=sampler_for(config.diffusion.objective, _SAMPLER.value, "--sampler"),
      seed=_SEED.value,
      balanced=_BALANCED.value,
      **protocol,
    )
    if prompts is not None:
      run["prompts"] = prompts
    if sample_metrics:  # the settings before the tokenizer, the VAE and the model load
      settings = run_settings(config, **run)
    tokenizer = inference.tokenizer_of(config, _TOKENIZER.value)
    if prompts is not None:  # each with its image within the rows the model trained on
      inference.check_budget(config, tokenizer, "images", prompts, label="--prompts[{}]")
    vae = inference.load_vae_of(config, _VAE.value) if sample_metrics else None
    if sample_metrics:  # all that the samples will meet, before the model loads
      check_samples(
        (num_samples,) + sample_shape(config, vae),
        class_labels(
          num_samples, len(class_names(config)), seed=_SEED.value, balanced=_BALANCED.value
        )
        if prompts is None
        else prompt_labels(num_samples, len(prompts)),
        evaluators,
        f"the sampling run of {_CHECKPOINT.value} (--num_samples={num_samples})",
      )
    sample_dir = _sample_dir(step) if writer and (sample_metrics or not _OUTPUT.value) else None
    output = _OUTPUT.value or (sample_dir and os.path.join(sample_dir, "results.json"))
    if sample_metrics:
      bind_folder(sample_dir or "", settings)
    if writer:
      writable_file(output, "results", "--output" if _OUTPUT.value else "the default --output")
    with model_on_mesh(_CHECKPOINT.value, weights=_WEIGHTS.value, config=config, step=step) as (
      model,
      config,
    ):
      if sample_metrics:
        path = sample_run(
          model,
          config,
          tokenizer,
          sample_dir or "",
          vae=vae,
          decode_batch=_DECODE_BATCH.value,
          **run,
        )
        if writer:
          images, labels = load_samples_npz(path)
          results.update(score_images(images, labels, evaluators, path))
          results["samples"] = dict(
            path=path,
            num_samples=num_samples,
            num_steps=num_steps,
            cfg_scale=cfg_scale,
            guided_channels=protocol["guided_channels"],
            chunk_size=run["chunk_size"],
            sampler=run["sampler"],
            seed=_SEED.value,
            balanced=_BALANCED.value,
            weights=_WEIGHTS.value,
          )
          if prompts is not None:
            results["samples"]["prompts"] = dict(path=_PROMPTS.value, **prompts_digest(prompts))
      results.update(
        score_model(
          evaluators,
          model,
          tokenizer,
          config,
          num_steps=num_steps,
          cfg_scale=cfg_scale,
          seed=config.seed,
        )
      )
    results["checkpoint"] = dict(
      path=_CHECKPOINT.value,
      step=step,
      weights=_WEIGHTS.value,
      fingerprint=fingerprint(_CHECKPOINT.value, step),
    )
  if writer:
    _write_results(results, output)


if __name__ == "__main__":
  cli.run(main)
