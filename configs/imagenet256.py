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
  python -m monoformer_jax.sample images --checkpoint=/ckpt/mf256 --class_name="golden retriever" \
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

from monoformer_jax.config import base

VARIANTS = ("", "tiny", "7b")


def get_config(variant=None):  # one of VARIANTS, checked by the loader (config/files.py)
  # The schema's defaults ARE this job (monoformer_jax/config/schema.py): the 1.1B
  # model, the reference's recipe, FSDP over every device, 20 respaced DDPM steps at
  # guidance 1.5 (the reference also reports 2.0 and 4.0). Evaluators inside
  # training are off by default since they need files: a small FID every 10k steps is
  #   --config.evals.metrics=fid --config.evals.inception=pt_inception-2015-12-05-6726825d.pth
  #   --config.evals.reference=VIRTUAL_imagenet256_labeled.npz
  c = base()

  if variant == "7b":  # Llama-2-7B's decoder; the same data, recipe and mesh
    c.model.update(
      hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, mlp_dim=11008
    )
  if variant == "tiny":
    c.model.update(
      vocab_size=264,
      hidden_size=64,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=16,
      mlp_dim=128,
      image_size=8,
      in_channels=4,
      dtype="float32",
      remat=False,
    )
    c.data.update(
      tokenizer="bytes",
      seq_len=96,
      batch_size=8,  # long class names in bytes
      workers=0,
    )
    c.optim.update(lr=1e-3)
    c.train.update(num_steps=4, log_every=1, checkpoint_every=2)
    c.sample.update(
      num_per_class=1, num_classes=2, num_steps=2, max_new_tokens=4, text_prompts=("a",)
    )
  return c
