"""The sampling entry points end to end: the CLI in a subprocess and the
notebook executed headless, both on a random tiny checkpoint (conftest's
digits_checkpoint)."""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import digits_config, random_checkpoint

from monoformer_jax import inference
from monoformer_jax.checkpoints import load_model, save_model
from monoformer_jax.model.build import init_params

REPO = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # every test starts a process (the CLI, the notebook's kernel)


def _cli(*flags, cwd=REPO):
  return subprocess.run(
    [sys.executable, "-m", "monoformer_jax.sample", *flags],
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=300,
  )


# Runs `sample.main` on each command line of a JSON list of argv lists, in one
# process (a process costs seconds), its programs in the suite's compilation
# cache as the CLI's are. The entry point around it (`python -m
# monoformer_jax.sample`) runs here in test_cli_usage_lists_the_commands and
# the latent model's test, and samples in tests/test_read_images.py's and
# tests/test_hub.py's CLI tests.
_SAMPLE_COMMANDS = r"""
import json, sys
from absl import flags
from monoformer_jax import cli, sample

cli.use_compilation_cache()
for argv in json.loads(sys.argv[1]):
  flags.FLAGS.unparse_flags()
  sample.main(flags.FLAGS(["sample", *argv]))
"""


def test_cli_writes_what_the_library_samples(digits_checkpoint, tmp_path):
  """`images`, then `text` into the same folder (beside images.*: no
  --overwrite), one after the other in one process (_SAMPLE_COMMANDS): what
  the library samples and completes."""
  out = tmp_path / "out"
  images_argv = [
    "images",
    f"--checkpoint={digits_checkpoint}",
    "--class_name=seven",
    "--prompt=an image of two.",
    "--num_samples=2",
    "--num_steps=3",
    "--cfg_scale=2",
    f"--output_dir={out}",
  ]
  text_argv = [
    "text",
    f"--checkpoint={digits_checkpoint}",
    "--text_prompt=two plus",
    "--max_new_tokens=5",
    "--temperature=0",
    f"--output_dir={out}",
  ]
  run = subprocess.run(
    [sys.executable, "-c", _SAMPLE_COMMANDS, json.dumps([images_argv, text_argv])],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  saved = np.load(out / "images.npz")
  images, prompts = saved["images"], saved["prompts"].tolist()
  assert images.shape == (4, 8, 8, 1) and images.dtype == np.float32
  assert prompts == ["an image of two."] * 2 + ["Please generate an image of seven."] * 2
  assert (out / "images.png").stat().st_size > 0
  assert "ddpm steps: 100%" in run.stderr and "3/3" in run.stderr  # the progress bar

  model, config = load_model(digits_checkpoint)
  tok = inference.tokenizer_of(config)
  x0 = inference.generate_images(
    model, tok, prompts, config=config, num_steps=3, cfg_scale=2.0, seed=0
  )
  np.testing.assert_allclose(images, inference.to_pixels(x0, config), atol=1e-4)
  text = inference.complete_text(
    model, tok, ["two plus"], config=config, max_new_tokens=5, temperature=0
  )
  assert f"'two plus' -> {text[0]!r}" in run.stdout
  assert (out / "text.txt").read_text().strip() == f"'two plus' -> {text[0]!r}"


def test_cli_decodes_a_latent_model_with_the_vae(tmp_path):
  """A 4-channel latent model: the tiny SD-VAE fixture (2x downsampling) turns
  its 8x8x4 samples into 16x16 RGB; without a VAE the CLI says what to pass."""
  config = digits_config()
  config.data.name = "latents"
  config.model.in_channels = 4
  params = jax.jit(lambda: init_params(config.model, seed=3))()
  save_model(tmp_path / "ckpt", config, params, ema=params)
  flags = (
    "images",
    f"--checkpoint={tmp_path / 'ckpt'}",
    "--prompt=a cat",
    "--num_samples=2",
    "--num_steps=2",
    f"--output_dir={tmp_path / 'out'}",
  )
  run = _cli(*flags)
  assert run.returncode != 0 and "pass --vae=DIR" in run.stderr
  run = _cli(*flags, f"--vae={REPO / 'tests' / 'fixtures' / 'tiny_vae'}")
  assert run.returncode == 0, run.stderr[-3000:]
  images = np.load(tmp_path / "out" / "images.npz")["images"]
  assert images.shape == (2, 16, 16, 3) and 0 <= images.min() <= images.max() <= 1


def test_notebook_runs_headless(tmp_path, monkeypatch):
  """As Colab runs it: a copy in a folder of its own (not the clone's
  notebooks/), REPO unset (the installed package is used), on a digits model
  that reads images, so that every section draws or writes its output."""
  import shutil

  import nbclient
  import nbformat

  config = digits_config()
  config.model.vision_encoder = "vae"  # the digits default reads; :tiny alone does not
  checkpoint = random_checkpoint(tmp_path / "ckpt", config)
  monkeypatch.delenv("MONOFORMER_JAX_REPO", raising=False)
  monkeypatch.setenv("MONOFORMER_CHECKPOINT", str(checkpoint))
  monkeypatch.setenv("MONOFORMER_SAMPLE_STEPS", "3")
  monkeypatch.setenv("MONOFORMER_SAMPLES_PER_CLASS", "2")
  elsewhere = tmp_path / "content"
  elsewhere.mkdir()
  shutil.copy(REPO / "notebooks" / "sampling.ipynb", elsewhere)
  nb = nbformat.read(elsewhere / "sampling.ipynb", as_version=4)
  nbclient.NotebookClient(
    nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(elsewhere)}}
  ).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  figures = [o for o in outputs if "image/png" in o.get("data", {})]
  texts = "".join(o.get("text", "") for o in outputs)
  assert "runtime: cpu; monoformer_jax from" in texts  # detected; nothing installed
  # the class grid, the free prompts, the digits read and the edits (read above, drawn below)
  assert len(figures) == 4
  assert "'three plus four is' -> " in texts  # the completion
  assert all(f"image {k}: " in texts for k in range(4))  # the four digits read
  pages = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
  assert len(pages) == 1 and pages[0].count("class=answer") == 4  # interleaved answers
  assert not [o for o in outputs if o.get("output_type") == "error"]


@pytest.mark.parametrize("jax_version, extra", [("0.10.2", ""), ("0.4.30", "[cuda]")])
def test_notebook_install_cell_clones_and_keeps_a_new_enough_jax(
  tmp_path, monkeypatch, jax_version, extra
):
  """The install cell where the package is missing, on a GPU runtime: REPO (a
  git URL) cloned into ~/monoformer_jax and installed editable (pip is only
  recorded here), with the [cuda] extra only when jax is older than the floor."""
  import importlib.metadata
  import importlib.util
  import json
  import shutil as shutil_module
  import subprocess as subprocess_module

  cell = "".join(
    json.loads((REPO / "notebooks" / "sampling.ipynb").read_text())["cells"][2]["source"]
  )
  real_run, pips = subprocess_module.run, []

  def run(argv, *args, **kwargs):
    if argv[:3] == [sys.executable, "-m", "pip"]:
      pips.append(argv[3:])
      return subprocess_module.CompletedProcess(argv, 0)
    if argv[0].endswith("nvidia-smi"):
      return subprocess_module.CompletedProcess(argv, 0)  # a GPU runtime
    return real_run(argv, *args, **kwargs)

  find_spec = importlib.util.find_spec
  monkeypatch.setattr(subprocess_module, "run", run)
  monkeypatch.setattr(shutil_module, "which", lambda name: "/usr/bin/" + name)
  monkeypatch.setattr(importlib.metadata, "version", lambda name: jax_version)
  monkeypatch.setattr(
    importlib.util, "find_spec", lambda n, *a: None if n == "monoformer_jax" else find_spec(n, *a)
  )
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.setenv("MONOFORMER_JAX_REPO", f"file://{REPO}")
  for name in ("COLAB_TPU_ADDR", "TPU_NAME"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(sys, "path", list(sys.path))
  with pytest.raises(AttributeError):  # the last line's find_spec(...).origin: nothing installed
    exec(cell, {})
  clone = tmp_path / "monoformer_jax"
  origin = subprocess_module.run(
    ["git", "-C", str(clone), "remote", "get-url", "origin"], capture_output=True, text=True
  )
  assert origin.stdout.strip() == f"file://{REPO}" and (clone / "setup.py").exists()
  assert pips == [["install", "-q", "-e", f"{clone}{extra}"]]
  assert sys.path[0] == str(clone)


# What each command refuses before reading a file: a flag that is not its
# own, a missing input, a bad value, an unknown command; checked in
# test_cli_refuses_what_the_model_cannot_do_before_loading_it's process, with
# everything that reads a file or a model replaced by a failure (a process
# costs seconds).
COMMAND_REFUSALS = {
  (
    "text",
    "--checkpoint=/nowhere",
    "--text_prompt=two",
    "--num_samples=2",
  ): "ConfigError: --num_samples is not a flag of `text`: `images`, `interleaved` and "
  "`edit` take it",
  (
    "--checkpoint=/nowhere",
    "--nocache",
    "edit",
    "--image=seven.png",
    "--prompt=p",
  ): "ConfigError: --cache is not a flag of `edit`: `images`, `text` and `read` take it",
  (
    "edit",
    "--checkpoint=/nowhere",
    "--image=seven.png",
    "--prompt=p",
    "--class_name=3",
  ): "ConfigError: --class_name is not a flag of `edit`: `images` takes it",
  (
    "read",
    "--checkpoint=/nowhere",
    "--text_prompt=what?",
  ): "ConfigError: `read` needs --image: a PNG or JPEG file (repeatable)",
  (
    "images",
    "--class_name=seven",
  ): "ConfigError: `images` needs --checkpoint: a training workdir, one of its step "
  "folders, or a converted model",
  (
    "images",
    "--checkpoint=/nowhere",
  ): "ConfigError: nothing to draw: give --prompt or --class_name (repeatable)",
  (
    "interleaved",
    "--checkpoint=/nowhere",
    "--image=seven.png",
  ): "ConfigError: `interleaved` continues --text_prompt: give at least one",
  (
    "edit",
    "--checkpoint=/nowhere",
    "--image=a.png",
    "--image=b.png",
    "--prompt=p",
    "--prompt=q",
    "--prompt=r",
  ): "ConfigError: 2 --image but 3 --prompt: give one instruction for all the images, or one each",
  (
    "edit",
    "--checkpoint=/nowhere",
    "--image=a.png",
    "--prompt=p",
    "--image_cfg_scale=2",
  ): "ConfigError: --image_cfg_scale is the image's scale of --edit_guidance=two_scale, "
  "not of 'both': pass --edit_guidance=two_scale or leave it out",
  (
    "text",
    "--checkpoint=/nowhere",
    "--text_prompt=two",
    "--top_p=2",
  ): "ConfigError: --top_p=2.0: must be in (0, 1]; 1 keeps every token",
  (  # was the default folder beside the checkpoint, silently
    "text",
    "--checkpoint=/nowhere",
    "--text_prompt=two",
    "--output_dir=",
  ): "ConfigError: --output_dir is empty; pass a folder for the outputs, or leave the flag "
  "out for a new folder beside the checkpoint",
  ("sideways", "--checkpoint=/nowhere"): "UsageError: usage: python -m monoformer_jax.sample "
  "{images|text|read|interleaved|edit} --checkpoint=CKPT --flags (got ['sideways'])",
  (): "UsageError: usage: python -m monoformer_jax.sample "
  "{images|text|read|interleaved|edit} --checkpoint=CKPT --flags (got [])",
}


def test_cli_usage_lists_the_commands():
  run = _cli()
  assert run.returncode != 0 and "(got [])" in run.stderr
  for command, line in [
    ("images", "draw --num_samples images of each --prompt"),
    ("text", "continue each --text_prompt"),
    ("read", "read each --image and answer --text_prompt"),
    ("interleaved", "continue each --text_prompt with text and images"),
    ("edit", "redraw each --image as --prompt says"),
  ]:
    assert f"\n  {command}" in run.stderr and line in run.stderr


# Runs `sample.main` on each [check_only, argv] of a JSON list in one process
# with the model's loading replaced by a failure: a refusal must come before
# it (so before any compile); with check_only, reading the config or an image
# fails too (and so everything after them: the tokenizer, the VAE). Prints the module's flags that no
# command declares, then each line's [error type, error].
_BEFORE_THE_MODEL = r"""
import json, sys
from absl import app, flags
from monoformer_jax import sample
from monoformer_jax.errors import UserError

def loaded(*_, **__):
  raise AssertionError("loaded the model before refusing")

def read(*_, **__):
  raise AssertionError("read a file or loaded a model before checking the flags")

readers = {name: getattr(sample, name) for name in ("load_config", "load_image")}
sample.load_model = loaded
defined = {f.name for f in flags.FLAGS.get_flags_for_module(sample.__name__)}
print(json.dumps(sorted(defined.symmetric_difference(sample.ALL_FLAGS))))
for check_only, argv in json.loads(sys.argv[1]):
  for name, reader in readers.items():
    setattr(sample, name, read if check_only else reader)
  flags.FLAGS.unparse_flags()
  try:
    sample.main(flags.FLAGS(["sample", *argv]))
    error = ["", "no error"]
  except (app.UsageError, UserError) as e:
    error = [type(e).__name__, str(e)]
  print(json.dumps(error))
"""


@pytest.mark.timeout(120)
def test_cli_refuses_what_the_model_cannot_do_before_loading_it(digits_checkpoint, tmp_path):
  """The trained length (tiny digits: data.seq_len 64), --num_samples past
  free memory, a VAE for a pixel model, DDIM's --eta with DDPM, more guided
  channels than the model has, a prompt that is not UTF-8, an interleaved
  answer too short for an image, an --image that is not one or that a model
  without a vision encoder cannot read, an --output_dir that holds outputs:
  each refused in one line, before the model loads, with no output folder made (the default one beside the
  checkpoint neither). So are the commonest mistakes, named by the fix: no
  prompt, a class that is not a digit, a checkpoint that is not there (once
  three CLI processes of their own; the CLI's exit status on a refusal is
  test_cli_usage_lists_the_commands' and the latent VAE test's). The same
  process checks COMMAND_REFUSALS first, reading no file (once a process of
  its own): every flag belongs to SHARED or a command, and each command
  refuses what it does not take before anything is read."""
  import json

  from PIL import Image

  long = "two " * 1400  # 5,601 tokens with bos
  past = "of the rows the model was trained on (data.seq_len)"
  ckpt = f"--checkpoint={digits_checkpoint}"
  (tmp_path / "in").mkdir()  # the images --image reads
  seven, notes = tmp_path / "in" / "seven.png", tmp_path / "in" / "notes.png"
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(seven)
  notes.write_text("not an image")
  held = tmp_path / "in" / "held"  # a folder of an earlier run's outputs
  held.mkdir()
  (held / "text.txt").write_text("an earlier answer")
  cases = [
    (
      ("text", "--text_prompt=" + long, "--max_new_tokens=4"),
      f"prompt 0 takes 5,601 positions and --max_new_tokens asks for 4: 5,605 in all, past the "
      f"64 {past}; shorten it by 5,541 tokens",
    ),
    (
      ("text", "--text_prompt=two", "--max_new_tokens=100000"),
      f"prompt 0 takes 4 positions and --max_new_tokens asks for 100,000: 100,004 in all, past "
      f"the 64 {past}; lower --max_new_tokens to 60",
    ),
    (
      ("images", "--prompt=" + long),
      f"prompt 0 takes 5,602 positions and its image takes 16: 5,618 in all, past the 64 "
      f"{past}; shorten it by 5,554 tokens",
    ),
    (
      ("interleaved", "--text_prompt=" + long),
      f"prompt 0 takes 5,601 positions and an image takes 18: 5,619 in all, past the 64 "
      f"{past}; shorten it by 5,555 tokens",
    ),
    (
      ("images", "--class_name=seven", f"--vae={REPO / 'tests' / 'fixtures' / 'tiny_vae'}"),
      f"--vae='{REPO / 'tests' / 'fixtures' / 'tiny_vae'}' given, but this model works in "
      "pixels (data.name='digits'): there are no latents for an SD-VAE to decode or encode; "
      "leave --vae out",
    ),
    (
      ("images", "--class_name=seven", "--eta=0.5"),
      "--eta=0.5: is DDIM's noise, which the 'ddpm' sampler does not use; pass "
      "--sampler=ddim or leave --eta out",
    ),
    (
      ("images", "--class_name=seven", "--guide_eps_0_to_2"),
      "--guide_eps_0_to_2=True: guides 3 epsilon channels, but the model has "
      "model.in_channels=1; leave it out to guide every channel",
    ),
    (  # a byte of a command line that is not UTF-8 (Python keeps it as a surrogate)
      ("text", "--text_prompt=two \udcff"),
      "--text_prompt[0]='two \\udcff' is not UTF-8 text (character 4, '\\udcff', is a byte "
      "that no UTF-8 decoding gave); save the prompt as UTF-8",
    ),
    (  # <|im_start|>, 16 image tokens, <|im_end|> (no timestep token in this model)
      ("interleaved", "--text_prompt=here is a", "--max_new_tokens=5"),
      "--max_new_tokens=5 leaves no room for one image: an image takes <|im_start|> and 17 "
      "columns (a timestep token where the model has one, its tokens, <|im_end|>); raise "
      "--max_new_tokens to at least 18",
    ),
    (
      ("read", f"--image={notes}", "--text_prompt=what?"),
      f"image {notes}: not an image file Pillow reads (UnidentifiedImageError); pass a PNG, "
      "JPEG or another image file Pillow reads",
    ),
    (  # an --output_dir given that holds outputs is never written over
      ("text", "--text_prompt=two", f"--output_dir={held}"),
      f"--output_dir='{held}' already holds ['text.txt']; pass another --output_dir or "
      "--overwrite to replace them",
    ),
    (
      ("read", f"--image={seven}", "--text_prompt=what?"),
      f"{digits_checkpoint} was trained without a vision encoder (model.vision_encoder is ''), "
      "so it cannot read --image; use a model trained with model.vision_encoder=vae or clip "
      "(the digits default reads digits)",
    ),
  ]
  argvs = []
  for i, (argv, _) in enumerate(cases):
    steps = [] if argv[0] in ("text", "read") else ["--num_steps=2"]
    given = any(a.startswith("--output_dir=") for a in argv)
    argvs.append([*argv, ckpt, *steps, *([] if given else [f"--output_dir={tmp_path / str(i)}"])])
  # Bounds checked by the flags' own checks, before the room or the model.
  bounds = {
    "--num_steps=0": "--num_steps=0: must be in [1, 1000]",
    "--cfg_scale=nan": "--cfg_scale=nan: must be a finite number",
    "--num_samples=0": "--num_samples=0: must be >= 1",
  }
  argvs += [["images", ckpt, "--class_name=3", flag] for flag in bounds]
  # The commonest mistakes, each named with its fix (a part of the line).
  fixes = {
    ("images", ckpt): "give --prompt or --class_name",
    ("images", ckpt, "--class_name=eleven"): "'eleven' is not a digit",
    ("images", f"--checkpoint={tmp_path / 'nowhere'}", "--class_name=1"): "does not exist",
  }
  argvs += [[*argv, f"--output_dir={tmp_path / 'fix'}"] for argv in fixes]
  # 10^9 images of 8x8x1 need ~5.4 TB of memory (256 B of latents, 3 x 256 B of
  # float32 pixels and the 66 x 66 B cell of images.png each): past any machine.
  argvs.append(["images", ckpt, "--class_name=seven", "--num_samples=1000000000"])
  before = sorted(os.listdir(digits_checkpoint))
  checks = [[True, list(argv)] for argv in COMMAND_REFUSALS] + [[False, a] for a in argvs]
  run = subprocess.run(
    [sys.executable, "-c", _BEFORE_THE_MODEL, json.dumps(checks)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=110,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  undeclared, *results = map(json.loads, run.stdout.splitlines())
  assert undeclared == []  # every flag belongs to SHARED or a command
  refused = [f"{kind}: {e}" for kind, e in results[: len(COMMAND_REFUSALS)]]
  assert dict(zip(COMMAND_REFUSALS, refused)) == COMMAND_REFUSALS
  results = [e for _, e in results[len(COMMAND_REFUSALS) :]]
  assert results[: len(cases)] == [message for _, message in cases]
  got = results[len(cases) : len(cases) + len(bounds)]
  assert [e.split(";")[0] for e in got] == list(bounds.values()), got
  got = results[len(cases) + len(bounds) : -1]
  assert len(got) == len(fixes) and all(part in e for e, part in zip(got, fixes.values())), got
  memory = results[-1]
  assert re.fullmatch(
    r"--num_samples=1000000000: 1,000,000,000 images of 8x8x1 need about 5,380,000,000,000 "
    r"bytes of memory \(the float32 images and the PNGs\), more than the [\d,]+ free; lower "
    r"--num_samples to at most [\d,]+",
    memory,
  ), memory
  assert os.listdir(tmp_path) == ["in"] and sorted(os.listdir(digits_checkpoint)) == before
  assert os.listdir(held) == ["text.txt"] and (held / "text.txt").read_text() == "an earlier answer"
