r"""Text-to-image alone: the reference's configs/train_journeydb.py.

TinyLlama-1.1B-Chat-v1.0 as the backbone, SD-VAE latents of 256-pixel images
under their own prompts (JourneyDB-style annotations: `img_path`, `prompt`),
`add_before_image_tokens` time conditioning, rows of 512 tokens, loss weights
1.0 (diffusion) and 0.01 (LM); with its train.py and scripts/train_journeydb.sh
(MonoFormer/MonoFormer at 8087266). A prompt longer than the reference's 128
ids (with <s>) or than a row holds beside its image is cut from its end as the
reference cuts it, and the training log counts the examples cut
(data/prompts.py `image_example`). The end-of-run images are drawn from
`sample.prompts` (a tuple, or one .txt file of prompts), 20 DDPM steps at
guidance 4.0 as the reference's scripts/sample_t2i.sh.

  python -m monoformer_jax.data.prepare text_to_image --input_dir=JourneyDB/train/images \
      --annotations=JourneyDB/train/train_anno.jsonl --output_dir=/data/prepared \
      --vae=sd-vae-ft-ema --image_size=256
  python -m monoformer_jax.convert llama --input=TinyLlama-1.1B-Chat-v1.0 \
      --output=TinyLlama-1.1B-Chat-v1.0-monoformer --config=configs/t2i.py
  python -m monoformer_jax.train --config=configs/t2i.py --workdir=... \
      --config.data.dir=/data/prepared/monoformer_text_to_image/1.0.0 \
      --config.vae.path=sd-vae-ft-ema --config.sample.prompts=my_prompts.txt

FID against a folder of reference images, with the prompts from a file (as
COCO-style evaluations do): docs/evaluation.md.

Variants (`--config=configs/t2i.py:VARIANT`):
  tiny   the same pipeline on a test-size model (8x8x4 latents, the byte
         tokenizer, rows of 96 tokens): what the tests train on CPU

Each setting of the reference and what this config makes of it (= : the
schema's default already):

  reference setting            | its value              | our field               | ours
  -----------------------------+------------------------+-------------------------+------------
  llm_pretrained_path          | TinyLlama-1.1B-Chat-   | train.init_from         | its `convert
                               |   v1.0 (a local copy)  |                         |   llama` (a)
  (its tokenizer, + 4 tokens)  | 32000 + 4              | data.tokenizer          | its folder
                               |                        | model.vocab_size        | = 32004
  (its config.json)            | 2048, 22 layers, 32/4  | model.hidden_size,      | = the same
                               |   heads, MLP 5632      |   num_layers, num_heads,|
                               |                        |   num_kv_heads, mlp_dim |
  vae_pretrained_path          | sd-vae-ft-ema (the     | vae.path; data.prepare  | set on the
                               |   second assignment)   |   --vae                 |   command (b)
  use_iterable_dataset         | False                  | none: one dataset       | -
  datasets                     | JourneyDBDataset, w. 1 | data.name               | text_to_
                               |                        |                         |   image
    prompt_type                | 'prompt'               | the annotation's        | prompt
                               |                        |   `prompt` (c)          |
  patch_size, in_channels      | 2, 4                   | model.patch_size, ...   | = 2, 4
  learn_sigma                  | True                   | model.learn_sigma       | = True
  use_flash_attn               | False                  | model.attention_impl    | = auto (d)
  use_pos_embed, use_adaln_    | True, True, True       | none: the only mode     | always
    final_layer, use_bi_attn_  |                        |                         |
    img_tokens                 |                        |                         |
  decoder_t_embed              | add_before_image_tokens| model.conditioning      | add_before_
                               |                        |                         |   image_tokens
  tokenizer_max_length         | 512                    | data.seq_len            | 512
  source_max_length            | 128                    | prompts.PROMPT_MAX_IDS  | 128 (e)
  use_chat_template,           | False, "### Human: ..."| none: no chat source    | -
    chat_template              |                        |                         |
  use_lr_decay                 | False                  | optim.schedule          | = constant
  warmup_iters, lr_decay_iters,| 500, 300000, 0.1       | (only with use_lr_decay:| -
    lr_decay_rate              |                        |   imagenet256.py (f))   |
  loss_dict loss_lm            | 0.01                   | loss.w_lm               | = 0.01
  loss_dict loss_diffusion     | 1.0                    | loss.w_diff             | = 1.0
  --lr                         | 1e-4                   | optim.lr                | = 1e-4
  --weight_decay (default)     | 0                      | optim.weight_decay      | = 0
  --max_grad_norm              | 2.0                    | optim.grad_clip         | = 2.0
  update_ema decay             | 0.9999                 | optim.ema_decay         | = 0.9999
  batch_size_per_gpu x 8 GPUs  | 16 x 8 x 2 = 256       | data.batch_size         | = 256
    x gradient_accum._steps    |                        | optim.grad_accum_steps  | = 1 (g)
  --max_steps                  | 500000                 | train.num_steps         | = 500000
  --log_steps                  | 100                    | train.log_every         | = 100
  --checkpointing_steps        | 50000                  | train.checkpoint_every  | = 5000 (h)
  --mixed_precision, grad_prec.| bf16, fp32             | model.dtype             | = bfloat16
  --resolution                 | 256                    | model.image_size        | = 32 (/ 8)
  --text_dropout_prob (default)| 0.1                    | data.cfg_drop_prob      | = 0.1
  --seed (default)             | 0                      | seed                    | = 0
  build_transforms             | no flip (commented out)| data.random_flip        | False
  vae.encode(x).latent_dist    | a fresh draw per step  | data.latent_sample      | = True
    .sample() * 0.18215        |                        |                         |
  sample_t2i.sh --num-sampling-| 20, 4                  | sample.num_steps,       | = 20, 4.0
    steps, --cfg-scale         |                        |   sample.cfg_scale      |
  sample_t2i.sh --prompts-path | parti_prompts.json     | sample.prompts          | yours (i)

  (a) the folder `convert llama` writes from the downloaded chat model, by this
      config (the start needs this conditioning's t_projector). (b) a local
      folder only the user knows. (c) `prepare text_to_image` keeps `prompt`
      and `caption`; training reads `prompt`. The reference writes the prompt
      into "Please generate an image of {prompt}" in training and sampling;
      ours is the prompt as written, in both. (d) an implementation, the same
      attention. (e) a constant, not a field: `<s> prompt` is cut at 128 ids
      (and so that the example fits a row beside its image), the rest kept.
      (f) configs/imagenet256.py's note (f): its decay as optim.schedule.
      (g) the reference accumulates 2 micro-batches of 128 for memory; the
      update is the same mean over 256 examples. (h) ours saves more often.
      (i) free text, one image each: the config names none, a run sets it.
"""

from monoformer_jax.config import base

VARIANTS = ("", "tiny")
# The start: TinyLlama-1.1B-Chat-v1.0 as downloaded, and its `convert llama`.
TOKENIZER = "TinyLlama-1.1B-Chat-v1.0"
START = "TinyLlama-1.1B-Chat-v1.0-monoformer"


def get_config(variant=None):  # one of VARIANTS, checked by the loader (config/files.py)
  c = base()  # the 1.1B model and the reference's recipe (configs/imagenet256.py)
  # Rows of the reference's 512 (captions run long; the schema's 288 is ImageNet's).
  c.data.update(name="text_to_image", tokenizer=TOKENIZER, random_flip=False, seq_len=512)
  c.model.conditioning = "add_before_image_tokens"
  c.train.init_from = START
  # No classes and no text prompts: the end-of-run samples are sample.prompts' images.
  c.sample.update(num_per_class=0, num_classes=0, text_prompts=(), cfg_scale=4.0)
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
    c.data.update(tokenizer="bytes", seq_len=96, batch_size=8, workers=0)
    c.optim.update(lr=1e-3)
    c.train.update(init_from="", num_steps=4, log_every=1, checkpoint_every=2)
    c.sample.update(num_steps=2, prompts=("a red square", "a blue circle"))
  return c
