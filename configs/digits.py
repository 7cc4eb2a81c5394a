r"""The embedded default: a tiny MonoFormer on scikit-learn's 8x8 digits.

Images are the digits themselves (pixel space, 1 channel, scaled to [-1, 1]),
prompted with the reference's templates and the class names "zero".."nine";
text-only rows come from a small generated corpus about numbers, reading
rows show a real digit as a read image and name it ("which digit is this?" ->
"it is seven."), interleaved rows name digits and draw them ("here is a seven:
<image>."), and edits read a digit and draw the next one. Nothing is downloaded.

  python -m monoformer_jax.train --config=configs/digits.py --workdir=/tmp/digits

trains in 2 to 8 minutes on 2 CPU cores (800 steps, then 200 guided
samples, the reading and the edits of 180 held-out digits, 20 interleaved
answers) and writes them to /tmp/digits/samples/. Override any field on the
command line, e.g. `--config.train.num_steps=200 --config.model.attention_impl=pallas`.

Variants (`--config=configs/digits.py:VARIANT`):
  tiny   the test-size model the test suite trains: 2 layers, 8 rows of 64
         tokens, one image per row, no warmup, FSDP over every device, a log
         line every step; 50 steps and 20 samples take about a minute on 2 CPU
         cores:
           python -m monoformer_jax.train --config=configs/digits.py:tiny --workdir=/tmp/tiny
"""

import ml_collections

from monoformer_jax.parallel import sharding

VARIANTS = ("", "tiny")


def get_config(variant=None):
  variant = variant or ""
  if variant not in VARIANTS:
    raise ValueError(f"configs/digits.py has no variant {variant!r}; use one of {VARIANTS} "
                     "(e.g. --config=configs/digits.py:tiny)")
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=264,           # byte tokenizer (263) rounded up to a multiple of 8
      hidden_size=128,
      num_layers=4,
      num_heads=4,
      num_kv_heads=2,
      head_dim=32,
      mlp_dim=352,
      rms_norm_eps=1e-5,
      rope_theta=10000.0,
      image_size=8,             # latent side (here: pixels, there is no VAE)
      in_channels=1,
      patch_size=2,             # 8x8 -> 4x4 = 16 image tokens of 4 features
      learn_sigma=True,
      timestep_freq_dim=256,
      conditioning="adaln_before_decoder",
      vision_encoder="vae",     # it reads digits too: their pixel patches -> im_embedder
                                # ("": generates images only; clip: a CLIP tower)
      vision=None,              # clip: the tower's sizes (vision.clip.clip_config_from_hf)
      read_bidirectional=False,  # read images: causal like text (the reference) or one block
      attention_impl="auto",    # Pallas kernels on TPU/GPU, dense XLA on CPU
      dtype="float32",          # compute dtype; parameters are always float32
      remat=False,
      scan_unroll=4,            # all 4 layers unrolled (a plain loop): faster steps here than a scan
  ))

  c.diffusion = ml_collections.ConfigDict(dict(
      num_timesteps=1000,
      beta_schedule="linear",
  ))

  c.data = ml_collections.ConfigDict(dict(
      name="digits",
      dir="",                   # where its TFDS copy is prepared on first use
                                # ("": $MONOFORMER_DATA_DIR or ~/.cache/monoformer_jax)
      prefetch=2,               # batches packed ahead in a thread
      workers=0,                # processes that make the examples (the digits are cheap)
      shards=0,                 # the stream and batch cut in this many (0: one per process)
      tokenizer="bytes",        # text.tokenizer.load_tokenizer: bytes, or a tokenizer.model
      seq_len=128,
      batch_size=28,            # global rows per step: ~75 examples, first-fit packed (92%
                                # full; 32 rows had as many at next-fit's 80%). On 8 devices
                                # use a multiple of 8: --config.data.batch_size=32
                                # --config.train.num_steps=700 sees as many examples in the
                                # same time (docs/benchmarks.md, "First-fit packing")
      max_images_per_row=4,
      max_read_images_per_row=4,
      text_fraction=0.15,       # share of examples that are text-only
      read_fraction=0.2,        # share that read a digit and name it (held-out: every tenth)
      interleaved_fraction=0.1,  # share of text naming digits with drawings inline
      edit_fraction=0.1,        # share that read a digit and draw the next one
      cfg_drop_prob=0.1,        # prompt dropped (empty) for guidance
  ))

  c.loss = ml_collections.ConfigDict(dict(
      w_diff=1.0,
      # The reference's is 0.01. Here reading, interleaved text and edits share
      # the read pathway with the diffusion loss, which drowns CE at 0.01: reading
      # fell from 82% to 36% of held-out digits; at 0.05 it reads 92% (README).
      w_lm=0.05,
      # False: cross-entropy on text-only examples only (the reference).
      # True: also on the prompts/captions of image examples (Transfusion).
      text_on_image_examples=False,
  ))

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3,
      warmup_steps=100,
      weight_decay=0.0,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      grad_clip=2.0,
      ema_decay=0.99,           # the reference: 0.9999 over 500k steps
      grad_accum_steps=1,
  ))

  # Mesh ('data', 'fsdp', 'tensor'); -1 takes the devices left over. dcn_data:
  # TPU slices the data axis spans over DCN (multi-slice; the sizes split one slice).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1))
  # Logical axis -> mesh axes: the project's rules (parallel/sharding.py).
  c.sharding_rules = sharding.RULES

  c.train = ml_collections.ConfigDict(dict(
      num_steps=800,
      log_every=50,
      checkpoint_every=500,
      keep_checkpoints=2,
      init_from="",             # a model checkpoint to start from (e.g. `convert llama`)
      # Resuming or starting from a checkpoint made with other model settings
      # (rope_theta, eps, ...) is an error unless this is True.
      allow_model_changes=False,
      tensorboard=True,         # metrics also as TensorBoard events in workdir/tensorboard
      profile_steps=0,          # > 0: a jax.profiler trace of that many steps in workdir/profile
      debug_nan_step=0,         # > 0: that step's loss and gradients made NaN (tests the stop)
  ))

  c.sample = ml_collections.ConfigDict(dict(
      num_per_class=20,
      num_classes=0,            # 0: every class
      num_steps=50,             # respaced DDPM steps
      cfg_scale=2.0,
      text_prompts=("three plus four is", "the number after five", "two times"),
      max_new_tokens=24,
      # What the end-of-run samples are scored with (monoformer_jax/eval/score.py).
      metrics=("digits",),
  ))

  # Evaluators inside training (monoformer_jax/eval/score.py): every `every`
  # steps, sample metrics of num_samples class-balanced samples from the EMA
  # weights, logged as eval/... beside the training metrics. The shapes are the
  # end-of-run samples', so both share one compiled sampler.
  c.evals = ml_collections.ConfigDict(dict(
      every=400,                # 0: off
      # digits: accuracy and Fréchet distance in the classifier's features;
      # reading: the share of held-out real digits the model names (eval/digits.py)
      metrics=("digits", "reading"),
      num_samples=200,
      num_steps=50,
      cfg_scale=2.0,
      inception="",             # fid/sfid/is/precision_recall: pytorch-fid's weights file
      reference="",             # and a reference batch npz
  ))

  if variant == "tiny":
    c.model.update(num_layers=2, vision_encoder="")
    c.data.update(batch_size=8, seq_len=64, max_images_per_row=1, max_read_images_per_row=0,
                  read_fraction=0.0, interleaved_fraction=0.0, edit_fraction=0.0,
                  text_fraction=0.25)
    c.loss.w_lm = 0.01
    c.optim.warmup_steps = 0
    c.mesh.update(data=1, fsdp=-1)
    c.train.update(num_steps=50, log_every=1, checkpoint_every=10, keep_checkpoints=3)
    c.sample.update(num_per_class=2, num_steps=10)
    c.evals.update(every=0, metrics=("digits",), num_samples=20, num_steps=10)
  return c
