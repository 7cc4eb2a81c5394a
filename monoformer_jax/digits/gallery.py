"""The README's gallery: what a trained digits model does, as PNG files.

    python -m monoformer_jax.digits.gallery CHECKPOINT OUT_DIR

CHECKPOINT is a digits model (the README's `python -m monoformer_jax.train
--config=configs/digits.py --workdir=/tmp/digits`, EMA weights); OUT_DIR gets

    digits.png        a row per digit 0..9 (its name as the prompt), 8 guided samples each
    interleaved.png   answers to "here is a": the text it writes, its drawings inline
    reading.png       real digits training never read, each beside what the model reads
    editing.png       real digits (top) and the model's "the next digit:" edits (bottom)

Fixed seeds: the same checkpoint gives the same files. Text is drawn with
PIL's built-in bitmap font (no font file needed).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from monoformer_jax import cli, inference
from monoformer_jax.checkpoints import load_model
from monoformer_jax.errors import ConfigError

SCALE = 4  # each 8x8 digit drawn 32x32
OUTPUTS = ("digits.png", "interleaved.png", "reading.png", "editing.png")
_INK, _PAPER, _GAP = (0, 0, 0), (255, 255, 255), 6


def _font():
  return ImageFont.load_default()


def _digit(pixels_hxwxC) -> Image.Image:
  """One image in [0, 1] as an RGB PIL image, SCALE times its size."""
  one = np.asarray(pixels_hxwxC)[None]
  return inference.image_grid(one, rows=1, scale=SCALE, pad=0).convert("RGB")


def strip(pieces) -> Image.Image:
  """One line of ("text", str) and ("image", [h, w, C] in [0, 1]) pieces, in
  order, text drawn in black and images pasted where they stand."""
  font, parts = _font(), []
  for kind, value in pieces:
    if kind == "image":
      parts.append(_digit(value))
    elif value.strip():
      box = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), value, font=font)
      word = Image.new("RGB", (box[2] + 1, box[3] + 1), _PAPER)
      ImageDraw.Draw(word).text((0, 0), value, fill=_INK, font=font)
      parts.append(word)
  height = max([p.height for p in parts] + [1])
  line = Image.new("RGB", (sum(p.width + _GAP for p in parts) + _GAP, height + 2 * _GAP), _PAPER)
  x = _GAP
  for p in parts:
    line.paste(p, (x, _GAP + (height - p.height) // 2))
    x += p.width + _GAP
  return line


def stack(lines) -> Image.Image:
  """Images one under another, left-aligned on white."""
  page = Image.new("RGB", (max(i.width for i in lines), sum(i.height for i in lines)), _PAPER)
  y = 0
  for i in lines:
    page.paste(i, (0, y))
    y += i.height
  return page


def make_gallery(model, tokenizer, config, out_dir: str, *, num_steps: int = 50) -> list[str]:
  """Writes OUTPUTS into `out_dir` (made if missing); returns their paths."""
  from monoformer_jax.data import class_names
  from monoformer_jax.digits import source
  from monoformer_jax.vision.pixels import to_unit_range

  if config.data.name != "digits" or not config.model.vision_encoder:
    raise ConfigError(
      f"the gallery shows a digits model that reads images; this one is data.name="
      f"{config.data.name!r}, model.vision_encoder={config.model.vision_encoder!r}: train "
      "one with --config=configs/digits.py"
    )
  os.makedirs(out_dir, exist_ok=True)
  draw = dict(config=config, num_steps=num_steps, cfg_scale=2.0)
  names = list(class_names(config))
  prompts = [inference.class_name_prompt(n, config) for n in names for _ in range(8)]
  x0 = inference.generate_images(model, tokenizer, prompts, seed=0, **draw)
  grid = [strip([("text", f"{n:>5}"), *[("image", x) for x in x0[8 * i : 8 * i + 8]]])
          for i, n in enumerate(names)]  # fmt: skip
  paths = [os.path.join(out_dir, name) for name in OUTPUTS]
  stack(grid).save(paths[0])

  answers = inference.generate_interleaved(
    model,
    tokenizer,
    ["here is a"] * 6,
    max_new_tokens=120,
    seed=0,
    **draw,
    temperature=1.0,
    top_k=0,
    top_p=1.0,  # as trained: each answer names its own digits
  )
  stack([strip([("text", "here is a"), *a.pieces]) for a in answers]).save(paths[1])

  # real digits training never read (source.reading_split's held-out ones), 8 of them
  _, held = source.reading_split(source.digit_records(config))
  records = [held[i] for i in range(0, len(held), len(held) // 8)][:8]
  real = [to_unit_range(np.asarray(r["image"], np.float32)) for r in records]
  read = inference.describe_images(model, tokenizer, real, source.READ_PROMPT, config=config)
  stack(
    [strip([("image", x), ("text", f"{names[int(r['label'])]} -> read: {a.strip()}")])
     for x, r, a in zip(real, records, read)]
  ).save(paths[2])  # fmt: skip

  edited = inference.edit_images(model, tokenizer, real, "the next digit:", seed=0, **draw)
  stack(
    [strip([("text", "read"), *[("image", x) for x in real]]),
     strip([("text", "next"), *[("image", x) for x in inference.to_pixels(edited, config)]])]
  ).save(paths[3])  # fmt: skip
  return paths


def main(argv):
  if len(argv) != 3:
    raise ConfigError(
      f"usage: python -m monoformer_jax.digits.gallery CHECKPOINT OUT_DIR (got {argv[1:]})"
    )
  model, config = load_model(argv[1])
  for path in make_gallery(model, inference.tokenizer_of(config), config, argv[2]):
    print(path)


if __name__ == "__main__":
  cli.run(main)
