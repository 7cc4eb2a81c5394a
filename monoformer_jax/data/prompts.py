"""The reference's prompt layout: how a prompt, an image and text become token ids.

Every dataset with images and every sampler uses this one format:

    image example (training)   <s> prompt <|im_start|> <image> <|im_end|> \\n </s>
    image to generate          <s> prompt <|im_start|>   then the image's P slots
    text example               <s> text </s>
    text to complete           <s> text                  then the new tokens
    image to read              <s> <|im_start|> <image> <|im_end|> \n prompt   then the answer
    reading example (training) <s> <|im_start|> <image> <|im_end|> \n prompt answer </s>

`<image>` is ONE placeholder that packing (packing.py) expands into the
image's P slots (a read image's Q slots). Reading follows the reference's
infer_mllm.py: the image first, then the question, then the answer, with
cross-entropy on the answer only. A class-conditional prompt is one of the reference's ImageNet
templates filled with the class name; for classifier-free guidance the prompt
is dropped (empty, `<s> <|im_start|> ...`) with probability `data.cfg_drop_prob`
in training, and the empty prompt is the null prompt when sampling. A dataset
supplies only its class names and its images or texts.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from monoformer_jax.data.packing import Example, PromptRows, prompt_rows

# The reference's ImageNet prompt templates, its "an photo" included.
TEMPLATES = ("Please generate an image of {}.", "{}", "an image of {}.", "an photo of {}.")


def class_prompt(name: str) -> str:
  """The first template, the one sampling uses: "Please generate an image of seven."."""
  return TEMPLATES[0].format(name)


def training_prompt(name: str, rng: np.random.Generator, drop_prob: float) -> str | None:
  """A random template filled with `name`, or None (dropped for guidance) with
  probability `drop_prob`."""
  if rng.random() < drop_prob:
    return None
  return TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(name)


def image_prefix_ids(prompt: str | None, tokenizer) -> list[int]:
  """<s> prompt <|im_start|>: what an image to generate sees; None/"": no prompt."""
  return [tokenizer.bos_id] + tokenizer.encode(prompt or "") + [tokenizer.im_start_id]


def image_example_ids(prompt: str | None, tokenizer) -> list[int]:
  """<s> prompt <|im_start|> <image> <|im_end|> \\n </s>; no prompt for None/""."""
  t = tokenizer
  return (image_prefix_ids(prompt, t) + [t.image_id, t.im_end_id] + t.encode("\n")
          + [t.eos_id])


def image_example(prompt: str | None, image: np.ndarray, tokenizer) -> Example:
  """A training example: the image under its prompt. Its text may train CE;
  whether image prompts do is the packer's switch (loss.text_on_image_examples)."""
  return Example(image_example_ids(prompt, tokenizer), [image], train_text=True)


def image_prompt_example(prompt: str | None, tokenizer, image_shape) -> Example:
  """The row of an image to generate as an example, with a zero image in its
  slot (None or "": the guidance-null prompt). Its text trains nothing."""
  return Example(image_example_ids(prompt, tokenizer),
                 [np.zeros(tuple(image_shape), np.float32)], train_text=False)


def text_ids(text: str, tokenizer) -> list[int]:
  """<s> text </s>: a text-only training example's ids."""
  return [tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id]


def text_prompt_ids(text: str, tokenizer) -> list[int]:
  """<s> text: a prompt to complete."""
  return [tokenizer.bos_id] + tokenizer.encode(text)


def image_rows(prompts: Sequence[str | None], tokenizer, tokens_per_image: int, *,
               guidance: bool, cond_token: bool = False) -> PromptRows:
  """The rows that generate one image per prompt (None: unconditional); with
  `cond_token` (add_before_image_tokens) the image's timestep token first.

  With `guidance` the batch is doubled as in the reference: the prompts, then
  as many null (empty) prompts.
  """
  prefixes = [image_prefix_ids(p, tokenizer) for p in prompts]
  if guidance:
    prefixes += [image_prefix_ids(None, tokenizer)] * len(prompts)
  return prompt_rows(prefixes, pad_id=tokenizer.pad_id, new_tokens=tokens_per_image,
                     new_token_id=tokenizer.image_id, image=True, cond_token=cond_token)


def read_prefix_ids(tokenizer) -> list[int]:
  """<s> <|im_start|> <image> <|im_end|>: a read image at the start of a prompt."""
  t = tokenizer
  return [t.bos_id, t.im_start_id, t.image_id, t.im_end_id]


def read_prompt_example(prompt: str, image: np.ndarray, tokenizer) -> Example:
  """A prompt that reads `image` (the vision encoder's input) and asks
  `prompt` about it; the answer is what the model generates next."""
  ids = read_prefix_ids(tokenizer) + tokenizer.encode("\n" + prompt)
  return Example(ids, [image], train_text=False, read=[True])


def reading_example(prompt: str, answer: str, image: np.ndarray, tokenizer) -> Example:
  """A training example about a read image: cross-entropy on `answer` and </s> only."""
  question = read_prefix_ids(tokenizer) + tokenizer.encode("\n" + prompt)
  reply = tokenizer.encode(answer) + [tokenizer.eos_id]
  return Example(question + reply, [image], train_text=True,
                 text_mask=[False] * len(question) + [True] * len(reply), read=[True])
