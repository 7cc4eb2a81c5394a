r"""Text-to-image with chat, the reference's JourneyDB + UltraChat 9:1 mix.

The reference's configs/train_journeydb_ultrachat_9_1.py: TinyLlama-Chat as the
backbone, SD-VAE latents of 256-pixel JourneyDB images under their prompts,
mixed 9:1 with UltraChat conversations; rows of 512 tokens; loss weights 1.0
(diffusion) and 0.01 (LM). The reference trains it with
`add_before_image_tokens` time conditioning; that mode has not landed here
yet, so this config uses `adaln_before_decoder` (the released ImageNet
checkpoint's) and the same everything else.

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

import importlib.util
import pathlib

import ml_collections


def _imagenet256():
  path = pathlib.Path(__file__).with_name("imagenet256.py")
  spec = importlib.util.spec_from_file_location("monoformer_config_imagenet256", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config(variant=None):
  if variant:
    raise ValueError(f"configs/t2i_chat.py has no variant {variant!r}")
  c = _imagenet256()   # the same model, recipe and mesh; other data
  c.data.update(
      name="mix",
      dir="",
      split="train",
      text_fraction=0.0,
  )
  c.data.mix = ml_collections.ConfigDict(dict(text_to_image=9.0, chat=1.0))
  c.data.dirs = ml_collections.ConfigDict(dict(text_to_image="", chat=""))
  c.data.chat_template = "human_assistant"   # data/chat.py: the reference's template
  c.data.train_on_source = False             # loss on the assistant's answers only
  c.data.max_images_per_row = 1
  c.sample.update(num_per_class=0, num_classes=0,
                  text_prompts=("### Human: What is the capital of France?### Assistant: ",))
  return c
