r"""Text-to-image with image understanding, the reference's JourneyDB + LLaVA 1:1 mix.

The reference's configs/train_llava_journeydb.py: TinyLlama-Chat as the
backbone, SD-VAE latents of 256-pixel JourneyDB images under their prompts
(generated), mixed 1:1 with LLaVA-1.5's instruction data
(llava_v1_5_mix665k.json: conversations about an image the model READS
through the frozen CLIP ViT-L/14, openai/clip-vit-large-patch14, its 256
second-to-last-layer features per 224-pixel image); `add_before_image_tokens`
time conditioning (one timestep token before every image, t = 0 for a read
one); rows of 512 tokens; loss weights 1.0 (diffusion) and 0.01 (LM). What
we do differently with LLaVA's records (the image inside <|im_start|>
<|im_end|>, the loss on the answers only, the 1:1 weights applied) is in
monoformer_jax/data/sources/llava.py. The recipe is configs/imagenet256.py's (global
batch 256; the reference's script trains this mix with 16: 4 rows per GPU, 2
GPUs, 2 accumulation steps).

  python -m monoformer_jax.data.prepare text_to_image --input_dir=JourneyDB/train/images \
      --annotations=JourneyDB/train/train_anno.jsonl --output_dir=/data/prepared \
      --vae=sd-vae-ft-mse --image_size=256
  python -m monoformer_jax.data.prepare llava --input_dir=instruction_tuning \
      --annotations=llava_v1_5_mix665k.json --output_dir=/data/prepared
  python -m monoformer_jax.convert llama --input=TinyLlama-1.1B-Chat-v1.0 --output=/ckpt/llava \
      --config=configs/t2i_llava.py --config.data.tokenizer=TinyLlama-1.1B-Chat-v1.0 \
      --clip=clip-vit-large-patch14
  python -m monoformer_jax.train --config=configs/t2i_llava.py --workdir=... \
      --config.train.init_from=/ckpt/llava \
      --config.data.tokenizer=TinyLlama-1.1B-Chat-v1.0/tokenizer.model \
      --config.data.dirs.text_to_image=/data/prepared/monoformer_text_to_image/1.0.0 \
      --config.data.dirs.llava=/data/prepared/monoformer_llava/1.0.0

`--input_dir` of llava is the folder LLaVA's "image" paths are relative to
(holding coco/, gqa/, ocr_vqa/, textvqa/, vg/). The CLIP tower is frozen; its
weights are openai/clip-vit-large-patch14's, put into the starting checkpoint
by `convert llama --clip=DIR` (an HF CLIPVisionModel or CLIPModel folder, in
safetensors), its sizes are `model.vision` below.
"""

from monoformer_jax.config import base
from monoformer_jax.model.clip import clip_config_from_hf

# openai/clip-vit-large-patch14's vision config (its config.json's vision part).
CLIP_VIT_L14 = dict(
  hidden_size=1024,
  intermediate_size=4096,
  num_hidden_layers=24,
  num_attention_heads=16,
  image_size=224,
  patch_size=14,
  num_channels=3,
  hidden_act="quick_gelu",
  layer_norm_eps=1e-5,
)


VARIANTS = ("",)  # none but the default (checked by the loader, config/files.py)


def get_config(variant=""):
  del variant  # "" only: ml_collections passes the "" of `--config=FILE:`
  c = base()  # the paper's backbone, recipe and mesh (configs/imagenet256.py); other
  # data, and a reader. Read images are causal like text (the reference:
  # model.read_bidirectional=False); the loss is on the assistant's
  # answers, in the reference's template (the data section's defaults).
  c.model.update(
    conditioning="add_before_image_tokens",
    vision_encoder="clip",
    vision=clip_config_from_hf(CLIP_VIT_L14, "openai/clip-vit-large-patch14"),
  )
  # One LLaVA image per record; rows of the reference's 512 for captions and answers.
  c.data.update(name="mix", seq_len=512, max_read_images_per_row=1)
  c.data.mix = dict(text_to_image=1.0, llava=1.0)
  c.data.dirs = dict(text_to_image="", llava="")
  c.sample.update(
    num_per_class=0,
    num_classes=0,
    text_prompts=("### Human: What is the capital of France?### Assistant: ",),
  )
  return c
