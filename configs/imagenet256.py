r"""The paper's model: MonoFormer 1.1B (TinyLlama backbone) on ImageNet 256x256.

Images are SD-VAE latents (256x256 pixels -> 32x32x4, `latent = sample *
0.18215`), patch 2 -> 256 tokens, prompted with the class name in text. A
step is 256 rows of 288 columns, one image and its prompt per row (the
longest prompt and its image take 277 columns; 7% of the columns are padding:
`python -m monoformer_jax.compile` measures it with the config's tokenizer).
The default is the released checkpoint MonoFormer_ImageNet_256's settings
(`adaln_before_decoder` time conditioning, what its config.json says), so that
its converted weights sample and fine-tune as they are; `:paper` is the
reference's current training code instead (below). Training recipe of the
reference: AdamW lr 1e-4, no weight decay, constant lr, grad-norm clip 2.0,
global batch 256, EMA 0.9999, bf16 compute, up to 500k steps; sampling: 20
respaced DDPM steps, CFG 1.5.

Start from TinyLlama (the reference's starting point) and train, or convert the
released weights and sample:

  python -m monoformer_jax.convert llama --input=TinyLlama-1.1B --output=/ckpt/tinyllama \
      --config=configs/imagenet256.py --config.data.tokenizer=TinyLlama-1.1B/tokenizer.model
  python -m monoformer_jax.train --config=configs/imagenet256.py --workdir=gs://... \
      --config.train.init_from=/ckpt/tinyllama
  python -m monoformer_jax.convert official --input=MonoFormer/MonoFormer_ImageNet_256 \
      --output=/ckpt/mf256 --vae=stabilityai/sd-vae-ft-mse \
      --tokenizer=TinyLlama/TinyLlama-1.1B-Chat-v1.0
  python -m monoformer_jax.sample images --checkpoint=/ckpt/mf256 --class_name="golden retriever"

(hub ids are downloaded once into the Hugging Face cache; local folders work
as well; the VAE and tokenizer are recorded in the converted config.)

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
  paper  the reference's current configs/train_imagenet.py with its train.py and
         scripts/train_imagenet.sh (MonoFormer/MonoFormer at 8087266), field by
         field: `add_before_image_tokens` from TinyLlama-1.1B-Chat-v1.0, no flips.
         Download the chat model, make its start and train, from one folder:

  python -m monoformer_jax.convert llama --input=TinyLlama-1.1B-Chat-v1.0 \
      --output=TinyLlama-1.1B-Chat-v1.0-monoformer --config=configs/imagenet256.py:paper
  python -m monoformer_jax.train --config=configs/imagenet256.py:paper --workdir=... \
      --config.data.dir=/data/prepared/monoformer_imagenet/1.0.0 --config.vae.path=sd-vae-ft-mse

  (the latents prepared as above; --flip is not needed, no image is mirrored).
  Each setting of the reference and what `:paper` makes of it (= : the
  schema's default already):

  reference setting            | its value              | our field               | ours
  -----------------------------+------------------------+-------------------------+------------
  llm_pretrained_path          | TinyLlama/TinyLlama-   | train.init_from         | its `convert
                               |   1.1B-Chat-v1.0       |                         |   llama` (a)
  (its tokenizer, + 4 tokens)  | 32000 + 4              | data.tokenizer          | its folder
                               |                        | model.vocab_size        | = 32004
  (its config.json)            | 2048, 22 layers, 32/4  | model.hidden_size,      | = the same
                               |   heads, MLP 5632      |   num_layers, num_heads,|
                               |                        |   num_kv_heads, mlp_dim |
  vae_pretrained_path          | stabilityai/sd-vae-    | vae.path; data.prepare  | set on the
                               |   ft-mse               |   --vae                 |   command (b)
  datasets                     | ImageNetDataset, w. 1  | data.name               | = imagenet
  patch_size, in_channels      | 2, 4                   | model.patch_size, ...   | = 2, 4
  learn_sigma                  | True                   | model.learn_sigma       | = True
  decoder_t_embed              | add_before_image_tokens| model.conditioning      | add_before_
                               |                        |                         |   image_tokens
  use_pos_embed, use_adaln_    | True, True, True       | none: the only mode     | always
    final_layer, use_bi_attn_  |                        |   (convert/official.py  |
    img_tokens                 |                        |   _FIXED_SWITCHES)      |
  use_flash_attn               | False                  | model.attention_impl    | = auto (c)
  tokenizer_max_length         | 512                    | data.seq_len            | = 288 (d)
  source_max_length            | 128                    | not ours (e)            | -
  use_chat_template,           | False, "### Human: ..."| data.chat_template      | = human_
    chat_template              |                        |   (chat sources only)   |   assistant
  use_lr_decay                 | False                  | optim.schedule          | = constant
  warmup_iters, lr_decay_iters,| 500, 300000, 0.1       | optim.warmup_steps,     | = 0, 0, 0.1
    lr_decay_rate (only with   |                        |   decay_steps,          |   (f)
    use_lr_decay=True)         |                        |   min_lr_ratio          |
  loss_dict loss_lm            | 0.01                   | loss.w_lm               | = 0.01
  loss_dict loss_diffusion     | 1.0                    | loss.w_diff             | = 1.0
  models/monoformer.py: cross- | rows that generate no  | loss.text_on_image_...  | = False (i)
    entropy only on            |   image (lm_indices)   |                         |
  --lr                         | 1e-4                   | optim.lr                | = 1e-4
  --weight_decay; AdamW betas, | 0; 0.9, 0.999, 1e-8    | optim.weight_decay, b1, | = 0; 0.9,
    eps (torch's defaults)     |                        |   b2, eps               |   0.999, 1e-8
  --max_grad_norm              | 2.0                    | optim.grad_clip         | = 2.0
  update_ema decay             | 0.9999                 | optim.ema_decay         | = 0.9999
  batch_size_per_gpu x 8 GPUs  | 16 x 8 x 2 = 256       | data.batch_size         | = 256
    x gradient_accum._steps    |                        | optim.grad_accum_steps  | = 1 (g)
  --max_steps                  | 500000                 | train.num_steps         | = 500000
  --log_steps                  | 100                    | train.log_every         | = 100
  --checkpointing_steps        | 50000                  | train.checkpoint_every  | = 5000 (h)
  --mixed_precision,           | bf16, fp32             | model.dtype (params and | = bfloat16
    --grad_precision           |                        |   grads float32)        |
  --resolution                 | 256                    | model.image_size        | = 32 (/ 8)
  --text_dropout_prob          | 0.1                    | data.cfg_drop_prob      | = 0.1
  --seed                       | 0                      | seed                    | = 0
  build_transforms             | no flip (commented out)| data.random_flip        | False
  vae.encode(x).latent_dist    | a fresh draw per step  | data.latent_sample      | = True
    .sample() * 0.18215        |                        |                         |
  create_diffusion("")         | 1000 linear steps      | diffusion.num_timesteps,| = 1000,
                               |                        |   beta_schedule         |   linear

  (a) the folder `convert llama` writes from the downloaded chat model, by this
      config (the start must have this conditioning's t_projector); a missing
      folder fails the config check before anything loads. (b) a local folder
      only the user knows, as in the default. (c) an implementation, the same
      attention. (d) the reference cuts a row's text at 512 tokens before
      <image> expands (no ImageNet prompt comes near) and pads each batch to its
      longest row, ~275 columns; ours is a fixed row of 288 columns, one example
      per row, which holds the longest class prompt with its image (277 columns
      with a Llama tokenizer; 278 with the timestep token): 7% padding, where
      512 would be 48%. (e) the reference cuts the prompt at
      128 tokens; the longest ImageNet prompt ("Please generate an image of
      American Staffordshire terrier.") is 61 characters, so it never cuts one.
      (f) the reference warms up only with use_lr_decay=True: its constant lr
      has no warmup; its decay is `--config.optim.schedule=cosine
      --config.optim.warmup_steps=500 --config.optim.decay_steps=300000`
      (train/schedule.py). (g) the reference accumulates 2 micro-batches of
      128 on 8 GPUs for memory; the update is the same mean over 256 examples
      (set optim.grad_accum_steps where memory needs it). (h) ours saves more
      often: preemptible slices lose less. (i) loss.text_on_image_examples.
"""

from monoformer_jax.config import base

VARIANTS = ("", "tiny", "7b", "paper")
# `:paper`'s start: TinyLlama-1.1B-Chat-v1.0 as downloaded, and its `convert llama`.
PAPER_TOKENIZER = "TinyLlama-1.1B-Chat-v1.0"
PAPER_START = "TinyLlama-1.1B-Chat-v1.0-monoformer"


def get_config(variant=None):  # one of VARIANTS, checked by the loader (config/files.py)
  # The schema's defaults ARE this job (monoformer_jax/config/schema.py): the 1.1B
  # model, the reference's recipe, FSDP over every device, 20 respaced DDPM steps at
  # guidance 1.5 (the reference also reports 2.0 and 4.0). Evaluators inside
  # training are off by default since they need files: a small FID every 10k steps is
  #   --config.evals.metrics=fid --config.evals.inception=pt_inception-2015-12-05-6726825d.pth
  #   --config.evals.reference=VIRTUAL_imagenet256_labeled.npz
  c = base()

  if variant == "paper":  # the reference's train_imagenet.py (the docstring's table)
    c.model.conditioning = "add_before_image_tokens"
    c.train.init_from = PAPER_START
    c.data.update(tokenizer=PAPER_TOKENIZER, random_flip=False)
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
