"""The reference's prompt layout: how a prompt, an image and text become token ids.

Every dataset with images and every sampler uses this one format:

    image example (training)   <s> prompt <|im_start|> <image> <|im_end|> \\n </s>
    image to generate          <s> prompt <|im_start|>   then the image's P slots
    text example               <s> text </s>
    text to complete           <s> text                  then the new tokens
    image to read              <s> <|im_start|> <image> <|im_end|> \n prompt   then the answer
    reading example (training) <s> <|im_start|> <image> <|im_end|> \n prompt answer </s>
    interleaved (training)     <s> text <|im_start|> <image> <|im_end|> text ... </s>
    edit (training)            <s> <|im_start|> <image:read> <|im_end|> \n instruction
                                   <|im_start|> <image> <|im_end|> \n </s>
    edit to generate           <s> <|im_start|> <image:read> <|im_end|> \n instruction
                                   <|im_start|>   then the image's P slots

An interleaved example trains cross-entropy on its text (`Example.interleaved`),
so the model learns to write `<|im_start|>` where an image belongs; the
sampler (text/interleaved.py) then draws it and writes `<|im_end|>` itself, so
`<|im_end|>` is never a target. An edit reads its source image and draws the
result; for guidance the instruction, the source image or both are dropped
(InstructPix2Pix), the last being the null prompt of every image.

`<image>` is ONE placeholder that the row layout (layout.py) expands into the
image's P slots (a read image's Q slots). Reading follows the reference's
infer_mllm.py: the image first, then the question, then the answer, with
cross-entropy on the answer only. A class-conditional prompt is one of the reference's ImageNet
templates filled with the class name; a user's own caption (text-to-image)
is cut to fit as the reference cuts it (`image_example`'s `max_ids`). For
classifier-free guidance the prompt
is dropped (empty, `<s> <|im_start|> ...`) with probability `data.cfg_drop_prob`
in training, and the empty prompt is the null prompt when sampling. A dataset
supplies only its class names and its images or texts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from monoformer_jax.errors import ConfigError, FileFormatError, MissingPathError
from monoformer_jax.layout import Example, PromptRows, RowSpec, prompt_rows
from monoformer_jax.paths import path_kind, read_all

# The reference's source_max_length: its train.py tokenizes the prompt side,
# "<s>" + the prompt, with max_length=128 and truncation=True (the tokenizer's
# default, from the right: the caption's end is lost), then adds the
# `<|im_start|> <image> <|im_end|> \n </s>` side, which it never cuts.
PROMPT_MAX_IDS = 128

# The reference's ImageNet prompt templates, its "an photo" included.
TEMPLATES = ("Please generate an image of {}.", "{}", "an image of {}.", "an photo of {}.")


def class_prompt(name: str) -> str:
  """The first template, the one sampling uses: "Please generate an image of seven."."""
  if not isinstance(name, str) or not name.strip():
    raise ConfigError(f"class name {name!r}: give the class's name as text, e.g. 'seven'")
  return TEMPLATES[0].format(name)


def training_prompt(name: str, rng: np.random.Generator, drop_prob: float) -> str | None:
  """A random template filled with `name`, or None (dropped for guidance) with
  probability `drop_prob`."""
  if rng.random() < drop_prob:
    return None
  return TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(name)


def is_prompts_file(value: Sequence[str]) -> bool:
  """Whether a `sample.prompts` value names a file of prompts: ONE entry ending in .txt."""
  return len(value) == 1 and value[0].strip().lower().endswith(".txt")


def read_prompts(value: Sequence[str] | str, what: str = "sample.prompts") -> list[str]:
  """The image prompts `value` holds: its entries, or when it is one path
  ending in .txt (or a str: always a path) the lines of that text file, local
  or on a bucket. Raises, naming `what` and the fix, for a file that is not
  there or not UTF-8, one with no prompt, a blank line between prompts (a
  prompt lost or split) or an empty entry; trailing blank lines end the file."""
  if isinstance(value, str) or is_prompts_file(value):
    path = value if isinstance(value, str) else value[0].strip()
    kind = path_kind(path, what)
    if kind != "file":
      raise MissingPathError(
        f"{what}: {path!r} is {'a folder' if kind == 'folder' else 'not there'}; give a "
        "text file of image prompts, one per line"
      )
    try:
      # utf-8-sig: a byte-order mark (Windows editors write one) is not prompt text.
      lines = read_all(path).decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
      raise FileFormatError(
        f"{what}: {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
      ) from None
    while lines and not lines[-1].strip():
      lines.pop()
    for n, line in enumerate(lines, 1):
      if not line.strip():
        raise FileFormatError(
          f"{what}: line {n} of {path} is blank between prompts; give one prompt per "
          "line, with no blank line"
        )
    if not lines:
      raise FileFormatError(f"{what}: {path} holds no prompt; write one prompt per line")
    return lines
  prompts = list(value)
  for i, prompt in enumerate(prompts):
    if not isinstance(prompt, str) or not prompt.strip():
      raise ConfigError(f"{what}[{i}]={prompt!r} is not a prompt; give each image prompt some text")
  return prompts


def image_prefix_ids(prompt: str | None, tokenizer) -> list[int]:
  """<s> prompt <|im_start|>: what an image to generate sees; None/"": no prompt."""
  return [tokenizer.bos_id] + tokenizer.encode(prompt or "") + [tokenizer.im_start_id]


def image_example_ids(prompt: str | None, tokenizer) -> list[int]:
  """<s> prompt <|im_start|> <image> <|im_end|> \\n </s>; no prompt for None/""."""
  t = tokenizer
  return image_prefix_ids(prompt, t) + [t.image_id, t.im_end_id] + t.encode("\n") + [t.eos_id]


def image_example(
  prompt: str | None, image: np.ndarray, tokenizer, *, max_ids: int | None = None
) -> Example:
  """A training example: the image under its prompt. Its text may train CE;
  whether image prompts do is the packer's switch (loss.text_on_image_examples).

  With `max_ids` (a caption's example: `caption_room`), the prompt's ids are
  cut from the end, as the reference cuts them, so that `<s> prompt` is at
  most PROMPT_MAX_IDS ids and the whole example at most `max_ids`;
  `Example.cut` says how many went. When even the empty prompt leaves no
  room, nothing is cut and packing refuses the example (layout.pieces_of)."""
  t = tokenizer
  ids = image_example_ids(prompt, t)
  if max_ids is None:
    return Example(ids, [image], train_text=True)
  prompt_ids = t.encode(prompt or "")
  n = len(prompt_ids)
  fixed = len(ids) - n  # <s> and the image's side
  keep = min(n, PROMPT_MAX_IDS - 1)
  if fixed <= max_ids:  # else no cut makes it fit
    keep = min(keep, max_ids - fixed)
  if keep == n:
    return Example(ids, [image], train_text=True)
  return Example(ids[: 1 + keep] + ids[1 + n :], [image], train_text=True, cut=n - keep)


def caption_room(spec: RowSpec) -> int:
  """The most ids an example of ONE generated image may have in a row of
  `spec`: the row's columns less those its image expands to beyond its
  placeholder (its tokens, and its timestep token with `spec.cond_token`)."""
  return spec.seq_len - spec.tokens_per_image - int(spec.cond_token) + 1


def image_prompt_example(prompt: str | None, tokenizer, image_shape) -> Example:
  """The row of an image to generate as an example, with a zero image in its
  slot (None or "": the guidance-null prompt). Its text trains nothing."""
  return Example(
    image_example_ids(prompt, tokenizer),
    [np.zeros(tuple(image_shape), np.float32)],
    train_text=False,
  )


def text_ids(text: str, tokenizer) -> list[int]:
  """<s> text </s>: a text-only training example's ids."""
  return [tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id]


def text_prompt_ids(text: str, tokenizer) -> list[int]:
  """<s> text: a prompt to complete."""
  return [tokenizer.bos_id] + tokenizer.encode(text)


def image_rows(
  prompts: Sequence[str | None],
  tokenizer,
  tokens_per_image: int,
  *,
  guidance: bool,
  cond_token: bool = False,
) -> PromptRows:
  """The rows that generate one image per prompt (None: unconditional); with
  `cond_token` (add_before_image_tokens) the image's timestep token first.

  With `guidance` the batch is doubled as in the reference: the prompts, then
  as many null (empty) prompts.
  """
  prefixes = [image_prefix_ids(p, tokenizer) for p in prompts]
  if guidance:
    prefixes += [image_prefix_ids(None, tokenizer)] * len(prompts)
  return prompt_rows(
    prefixes,
    pad_id=tokenizer.pad_id,
    new_tokens=tokens_per_image,
    new_token_id=tokenizer.image_id,
    image=True,
    cond_token=cond_token,
  )


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
  return Example(
    question + reply,
    [image],
    train_text=True,
    text_mask=[False] * len(question) + [True] * len(reply),
    read=[True],
  )


def interleaved_example(texts: Sequence[str], images: Sequence[np.ndarray], tokenizer) -> Example:
  """<s> texts[0] <|im_start|> <image> <|im_end|> texts[1] ... texts[-1] </s>, one
  more text than images; cross-entropy on the text and on each <|im_start|>."""
  t = tokenizer
  if len(texts) != len(images) + 1:
    raise ValueError(
      f"{len(texts)} texts around {len(images)} images; give one text "
      "before each image and one after the last"
    )
  ids = [t.bos_id] + t.encode(texts[0])
  for text in texts[1:]:
    ids += [t.im_start_id, t.image_id, t.im_end_id] + t.encode(text)
  ids.append(t.eos_id)
  mask = [i not in (t.image_id, t.im_end_id) for i in ids]
  return Example(ids, list(images), train_text=True, text_mask=mask, interleaved=True)


EDIT_GUIDANCE = ("both", "text", "image", "two_scale")


def edit_prefix(instruction: str | None, source: np.ndarray | None, tokenizer) -> Example:
  """What an edited image sees: the source image read, the instruction, then
  <|im_start|>; None drops either (both None: the null prompt)."""
  t = tokenizer
  if source is None:
    return Example(image_prefix_ids(instruction, t), (), train_text=False)
  ids = read_prefix_ids(t) + t.encode("\n" + (instruction or "")) + [t.im_start_id]
  return Example(ids, [source], train_text=False, read=[True])


def edit_example(
  instruction: str | None, source: np.ndarray | None, target: np.ndarray, tokenizer
) -> Example:
  """A training edit: `target` drawn after `edit_prefix` (either part may be
  dropped, None, for guidance)."""
  t = tokenizer
  prefix = edit_prefix(instruction, source, t)
  ids = list(prefix.ids) + [t.image_id, t.im_end_id] + t.encode("\n") + [t.eos_id]
  read = [True] * len(prefix.images) + [False]
  return Example(ids, list(prefix.images) + [target], train_text=True, read=read)


def edit_rows(
  sources: Sequence[np.ndarray],
  instructions: Sequence[str],
  tokenizer,
  spec,
  *,
  guidance: str | None = "both",
) -> PromptRows:
  """Rows that draw one edit of each source image by its instruction.

  `guidance` says which condition the guided rows drop, group after group:
  None: no guidance (B rows); "both": [full; null]; "text": [full; image
  only]; "image": [full; instruction only]; "two_scale": [full; image only;
  null], InstructPix2Pix's (text scale, image scale) guidance.
  """
  if guidance is not None and guidance not in EDIT_GUIDANCE:
    raise ValueError(f"guidance={guidance!r}: choose None or one of {EDIT_GUIDANCE}")
  if len(sources) != len(instructions):
    raise ValueError(f"{len(sources)} source images for {len(instructions)} instructions")
  drops = {
    None: [],
    "both": [(None, None)],
    "text": [(None, "src")],
    "image": [("text", None)],
    "two_scale": [(None, "src"), (None, None)],
  }[guidance]
  prompts = [edit_prefix(i, x, tokenizer) for x, i in zip(sources, instructions)]
  for text, image in drops:
    prompts += [
      edit_prefix(i if text else None, x if image else None, tokenizer)
      for x, i in zip(sources, instructions)
    ]
  return prompt_rows(
    [p if p.images else list(p.ids) for p in prompts],
    pad_id=tokenizer.pad_id,
    new_tokens=spec.tokens_per_image,
    new_token_id=tokenizer.image_id,
    image=True,
    cond_token=spec.cond_token,
    spec=spec,
  )
