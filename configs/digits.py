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

from monoformer_jax.config import base

VARIANTS = ("", "tiny")


def get_config(variant=None):  # one of VARIANTS, checked by the loader (config/files.py)
  c = base()  # every field and its default: monoformer_jax/config/schema.py

  c.model.update(
    vocab_size=264,  # byte tokenizer (263) rounded up to a multiple of 8
    hidden_size=128,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    mlp_dim=352,
    image_size=8,  # latent side (here: pixels, there is no VAE)
    in_channels=1,  # 8x8 -> 4x4 = 16 image tokens of 4 features
    vision_encoder="vae",  # it reads digits too: their pixel patches -> im_embedder
    dtype="float32",
    remat=False,
    scan_unroll=4,  # all 4 layers unrolled (a plain loop): faster steps here than a scan
  )

  c.data.update(
    name="digits",
    dir="",  # where its TFDS copy is prepared on first use
    # ("": $MONOFORMER_DATA_DIR or ~/.cache/monoformer_jax)
    workers=0,  # the digits are cheap to make in-process
    tokenizer="bytes",
    seq_len=128,
    batch_size=28,  # global rows per step: ~75 examples, first-fit packed (92%
    # full; 32 rows had as many at next-fit's 80%). On 8 devices
    # use a multiple of 8: --config.data.batch_size=32
    # --config.train.num_steps=700 sees as many examples in the
    # same time (docs/experiments.md, "First-fit packing")
    max_images_per_row=4,
    max_read_images_per_row=4,
    text_fraction=0.15,  # share of examples that are text-only
    read_fraction=0.2,  # share that read a digit and name it (held-out: every tenth)
    interleaved_fraction=0.1,  # share of text naming digits with drawings inline
    edit_fraction=0.1,  # share that read a digit and draw the next one
  )

  # The reference's w_lm is 0.01. Here reading, interleaved text and edits share
  # the read pathway with the diffusion loss, which drowns CE at 0.01: reading
  # fell from 82% to 36% of held-out digits; at 0.05 it reads 92%
  # (docs/experiments.md).
  c.loss.w_lm = 0.05
  c.optim.update(lr=1e-3, warmup_steps=100, ema_decay=0.99)  # the reference: 0.9999 over 500k steps
  c.mesh.update(data=-1, fsdp=1)

  c.train.update(num_steps=800, log_every=50, checkpoint_every=500, keep_checkpoints=2)

  c.sample.update(
    num_per_class=20,
    num_classes=0,  # every class
    num_steps=50,
    cfg_scale=2.0,
    text_prompts=("three plus four is", "the number after five", "two times"),
    max_new_tokens=24,
    metrics=("digits",),  # the end-of-run samples' scores (eval/)
  )

  # Evaluators inside training (eval/): every `every` steps, logged as eval/...
  # beside the training metrics. The shapes are the end-of-run samples', so both
  # share one compiled sampler. digits: accuracy and Fréchet distance in the
  # classifier's features; reading: the share of held-out real digits the model
  # names.
  c.evals.update(
    every=400, metrics=("digits", "reading"), num_samples=200, num_steps=50, cfg_scale=2.0
  )

  if variant == "tiny":
    c.model.update(num_layers=2, vision_encoder="")
    c.data.update(
      batch_size=8,
      seq_len=64,
      max_images_per_row=1,
      max_read_images_per_row=0,
      read_fraction=0.0,
      interleaved_fraction=0.0,
      edit_fraction=0.0,
      text_fraction=0.25,
    )
    c.loss.w_lm = 0.01
    c.optim.warmup_steps = 0
    c.mesh.update(data=1, fsdp=-1)
    c.train.update(num_steps=50, log_every=1, checkpoint_every=10, keep_checkpoints=3)
    c.sample.update(num_per_class=2, num_steps=10)
    c.evals.update(every=0, metrics=("digits",), num_samples=20, num_steps=10)
  return c
