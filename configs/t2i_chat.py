r"""Text-to-image with chat, the reference's JourneyDB + UltraChat 9:1 mix.

The reference's configs/train_journeydb_ultrachat_9_1.py: TinyLlama-Chat as the
backbone, SD-VAE latents of 256-pixel JourneyDB images under their prompts,
mixed 9:1 with UltraChat conversations; rows of 512 tokens; loss weights 1.0
(diffusion) and 0.01 (LM), and `add_before_image_tokens` time conditioning
(one timestep token before each image, as every official training config).

  python -m monoformer_jax.data.prepare text_to_image --input_dir=JourneyDB/train/images \
      --annotations=JourneyDB/train/train_anno.jsonl --output_dir=/data/prepared \
      --vae=sd-vae-ft-mse --image_size=256
  python -m monoformer_jax.data.prepare chat --input_dir=ultrachat/ --output_dir=/data/prepared
  python -m monoformer_jax.convert llama --input=TinyLlama-1.1B-Chat-v1.0 --output=/ckpt/chat \
      --config=configs/t2i_chat.py --config.data.tokenizer=TinyLlama-1.1B-Chat-v1.0
  python -m monoformer_jax.train --config=configs/t2i_chat.py --workdir=... \
      --config.train.init_from=/ckpt/chat \
      --config.data.tokenizer=TinyLlama-1.1B-Chat-v1.0/tokenizer.model \
      --config.data.dirs.text_to_image=/data/prepared/monoformer_text_to_image/1.0.0 \
      --config.data.dirs.chat=/data/prepared/monoformer_chat/1.0.0
"""

from monoformer_jax.config import base

VARIANTS = ("",)  # none but the default (checked by the loader, config/files.py)


def get_config(variant=""):
  del variant  # "" only: ml_collections passes the "" of `--config=FILE:`
  c = base()  # the paper's model, recipe and mesh (configs/imagenet256.py); other data
  c.data.update(name="mix", seq_len=512)  # captions and chats: the reference's 512
  # The loss on the assistant's answers only, in the reference's template
  # (data.train_on_source=False, data.chat_template="human_assistant": the defaults).
  c.data.mix = dict(text_to_image=9.0, chat=1.0)
  c.data.dirs = dict(text_to_image="", chat="")
  c.model.conditioning = "add_before_image_tokens"
  c.sample.update(
    num_per_class=0,
    num_classes=0,
    text_prompts=("### Human: What is the capital of France?### Assistant: ",),
  )
  return c
