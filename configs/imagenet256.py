r"""The paper's model: MonoFormer 1.1B (TinyLlama backbone) on ImageNet 256x256.

Images are SD-VAE latents (256x256 pixels -> 32x32x4, `latent = sample *
0.18215`), patch 2 -> 256 tokens, prompted with the class name in text;
`adaln_before_decoder` time conditioning, as the released checkpoint
MonoFormer_ImageNet_256. Training recipe of the reference: AdamW lr 1e-4, no
weight decay, constant lr, grad-norm clip 2.0, global batch 256, EMA 0.9999,
bf16 compute, up to 500k steps; sampling: 20 respaced DDPM steps, CFG 1.5.

Start from TinyLlama (the reference's starting point) and train, or convert the
released weights and sample:

  python -m monoformer_jax.convert llama --input=TinyLlama-1.1B --output=/ckpt/tinyllama \
      --config=configs/imagenet256.py --config.data.tokenizer=TinyLlama-1.1B/tokenizer.model
  python -m monoformer_jax.train --config=configs/imagenet256.py --workdir=gs://... \
      --config.train.init_from=/ckpt/tinyllama
  python -m monoformer_jax.convert official --input=MonoFormer_ImageNet_256 --output=/ckpt/mf256
  python -m monoformer_jax.sample --checkpoint=/ckpt/mf256 --class_name="golden retriever" \
      --vae=sd-vae-ft-mse

Training reads ImageNet prepared once into array_record (SD-VAE posteriors,
nothing decoded at training time):

  python -m monoformer_jax.data.prepare imagenet --input_dir=/data/imagenet \
      --output_dir=/data/prepared --vae=sd-vae-ft-mse --image_size=256 --flip
  python -m monoformer_jax.train --config=configs/imagenet256.py --workdir=... \
      --config.data.dir=/data/prepared/monoformer_imagenet/1.0.0

Conversion uses this file as its base config (the model fields then come from
the weights' config.json).

Variants (`--config=configs/imagenet256.py:VARIANT`):
  tiny   the same pipeline (prepared ImageNet layout, class prompts, posterior
         sampling, flips) with a test-size model on 8x8x4 latents (16-pixel
         images through the tiny VAE of tests/fixtures) and the byte tokenizer:
         what the tests train on CPU
  7b     the Llama-2-7B shape (hidden 4096, 32 layers, 32 heads and 32 kv heads of
         128, MLP 11008, vocabulary 32004) on the same data layout; what it needs
         per chip: `python -m monoformer_jax.compile --config=configs/imagenet256.py:7b
         --topology=v5p-64` (docs/scaling.md)
"""

import ml_collections

from monoformer_jax.parallel import sharding


VARIANTS = ("", "tiny", "7b")


def get_config(variant=None):
  variant = variant or ""
  if variant not in VARIANTS:
    raise ValueError(f"configs/imagenet256.py has no variant {variant!r}; use one of "
                     f"{VARIANTS}")
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=32004,         # Llama's 32000 + <PAD>, <image>, <|im_start|>, <|im_end|>
      hidden_size=2048,
      num_layers=22,
      num_heads=32,
      num_kv_heads=4,
      head_dim=64,
      mlp_dim=5632,
      rms_norm_eps=1e-5,
      rope_theta=10000.0,
      image_size=32,            # latent side: 256 pixels / SD-VAE factor 8
      in_channels=4,
      patch_size=2,             # 32x32 -> 16x16 = 256 image tokens
      learn_sigma=True,
      timestep_freq_dim=256,
      conditioning="adaln_before_decoder",
      vision_encoder="",        # "": generates images only; vae / clip: also reads them
      vision=None,              # clip: the tower's sizes (vision.clip.clip_config_from_hf)
      read_bidirectional=False,  # read images: causal like text (the reference) or one block
      attention_impl="auto",    # Pallas kernels on TPU/GPU, dense XLA on CPU
      dtype="bfloat16",         # compute dtype; parameters are always float32
      remat=True,
  ))

  c.diffusion = ml_collections.ConfigDict(dict(
      num_timesteps=1000,
      beta_schedule="linear",
  ))

  c.data = ml_collections.ConfigDict(dict(
      name="imagenet",
      dir="",                   # from `python -m monoformer_jax.data.prepare imagenet`
      split="train",
      latent_sample=True,       # a fresh draw from each stored posterior; False: its mean
      random_flip=True,         # mirror half the images (when prepared with --flip)
      prefetch=2,               # batches packed ahead in a thread
      workers=8,                # processes that read and make the examples (0: in-process)
      shards=0,                 # the stream and batch cut in this many (0: one per process)
      tokenizer="",             # TinyLlama's tokenizer.model (text/tokenizer.load_tokenizer)
      seq_len=512,              # the reference truncates rows to 512 tokens
      batch_size=256,           # global rows per step
      max_images_per_row=1,
      text_fraction=0.0,        # ImageNet only; the reference's text mix is JourneyDB+UltraChat 9:1
      cfg_drop_prob=0.1,        # prompt dropped (empty) for guidance
  ))

  c.loss = ml_collections.ConfigDict(dict(
      w_diff=1.0,
      w_lm=0.01,
      text_on_image_examples=False,  # the reference: CE on text-only rows only
  ))

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-4,
      warmup_steps=0,           # constant lr
      weight_decay=0.0,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      grad_clip=2.0,
      ema_decay=0.9999,
      grad_accum_steps=1,
  ))

  # FSDP over every device by default; tensor parallelism is `--config.mesh.tensor=N`.
  # dcn_data: TPU slices the data axis spans over DCN (multi-slice; the sizes above
  # split one slice).
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, dcn_data=1))
  c.sharding_rules = sharding.RULES   # the project's rules (parallel/sharding.py)

  c.train = ml_collections.ConfigDict(dict(
      num_steps=500_000,
      log_every=100,
      checkpoint_every=5_000,
      keep_checkpoints=3,
      init_from="",             # a model checkpoint, e.g. from `convert llama`
      allow_model_changes=False,  # True: resume/start from a checkpoint with other model settings
      tensorboard=True,         # metrics also as TensorBoard events in workdir/tensorboard
      profile_steps=0,          # > 0: a jax.profiler trace of that many steps in workdir/profile
      debug_nan_step=0,         # > 0: that step's loss and gradients made NaN (tests the stop)
  ))

  c.sample = ml_collections.ConfigDict(dict(
      num_per_class=4,
      num_classes=16,           # the first 16 classes at the end of a run (0: all 1000)
      num_steps=20,             # respaced DDPM steps
      cfg_scale=1.5,            # the reference also reports 2.0 and 4.0
      text_prompts=("The capital of France is", "A recipe for pancakes:"),
      max_new_tokens=256,
      metrics=(),               # FID-50K: python -m monoformer_jax.evaluate (README)
  ))

  # Evaluators inside training (monoformer_jax/eval/score.py), off by default
  # since they need files: a small FID every 10k steps is
  #   --config.evals.metrics=fid --config.evals.inception=pt_inception-2015-12-05-6726825d.pth
  #   --config.evals.reference=VIRTUAL_imagenet256_labeled.npz
  c.evals = ml_collections.ConfigDict(dict(
      every=10_000,
      metrics=(),
      num_samples=1_000,        # FID-1K: biased upwards against FID-50K, for trends only
      num_steps=20,
      cfg_scale=1.5,
      inception="",
      reference="",
  ))

  # SD-VAE (sd-vae-ft-mse, a diffusers AutoencoderKL folder) that decodes samples.
  c.vae = ml_collections.ConfigDict(dict(path=""))

  if variant == "7b":   # Llama-2-7B's decoder; the same data, recipe and mesh
    c.model.update(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                   head_dim=128, mlp_dim=11008)
  if variant == "tiny":
    c.model.update(vocab_size=264, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=16, mlp_dim=128, image_size=8, in_channels=4, dtype="float32",
                   remat=False)
    c.data.update(tokenizer="bytes", seq_len=96, batch_size=8,   # long class names in bytes
                  workers=0)
    c.optim.update(lr=1e-3)
    c.train.update(num_steps=4, log_every=1, checkpoint_every=2)
    c.sample.update(num_per_class=1, num_classes=2, num_steps=2, max_new_tokens=4,
                    text_prompts=("a",))
  return c
