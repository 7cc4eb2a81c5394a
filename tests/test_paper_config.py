"""`configs/imagenet256.py:paper` against the reference's training settings, row by
row, and against our checks; the default stays the released checkpoint's.

The reference values are written here, each with the file of MonoFormer/MonoFormer
(commit 8087266) it comes from, not read from our config: a changed `:paper`
must disagree with them."""

import hashlib
import importlib.util
import pathlib

import numpy as np
import pytest

from monoformer_jax.config import CONFIGS_DIR, base, complete, config_file
from monoformer_jax.data.datasets import class_prompt_rows
from monoformer_jax.errors import ConfigError
from monoformer_jax.text.tokenizer import tokenizer_of
from monoformer_jax.train.checks import check_train_config

REPO = pathlib.Path(__file__).resolve().parents[1]
# Mistral-7B v0.1's 32,000-piece SentencePiece BPE: Llama's settings, a real vocabulary
# (tests/fixtures/llama_style_tokenizer/README.md).
LLAMA_STYLE = REPO / "tests" / "fixtures" / "llama_style_tokenizer" / "tokenizer.model"
LLAMA_STYLE_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"

# configs/train_imagenet.py
TRAIN_IMAGENET = dict(
  llm_pretrained_path="TinyLlama/TinyLlama-1.1B-Chat-v1.0",
  patch_size=2,
  in_channels=4,
  learn_sigma=True,
  decoder_t_embed="add_before_image_tokens",
  tokenizer_max_length=512,
  use_lr_decay=False,
  loss_dict={"loss_lm": 0.01, "loss_diffusion": 1.0},
)
# scripts/train_imagenet.sh (the command line it runs train.py with)
TRAIN_IMAGENET_SH = dict(
  gradient_accumulation_steps=2,
  batch_size_per_gpu=16,
  nproc_per_node=8,
  lr=1e-4,
  max_grad_norm=2.0,
  max_steps=500_000,
  log_steps=100,
  mixed_precision="bf16",
  resolution=256,
)
# train.py: argparse defaults the script does not override, and the code
TRAIN_PY = dict(
  weight_decay=0.0,  # --weight_decay
  text_dropout_prob=0.1,  # --text_dropout_prob
  seed=0,  # --seed
  ema_decay=0.9999,  # update_ema(decay=0.9999)
  adamw_betas=(0.9, 0.999),  # torch.optim.AdamW(lr, weight_decay): torch's defaults
  adamw_eps=1e-8,
  random_flip=False,  # build_transforms: transforms.RandomHorizontalFlip() commented out
  num_timesteps=1000,  # create_diffusion(timestep_respacing=""): 1000 linear betas
  noise_schedule="linear",
)
# TinyLlama/TinyLlama-1.1B-Chat-v1.0's config.json (the start; `convert llama`
# takes the model's sizes from it), plus the 4 tokens train.py's setup_tokenizer adds.
CHAT_CONFIG_JSON = dict(
  hidden_size=2048,
  num_hidden_layers=22,
  num_attention_heads=32,
  num_key_value_heads=4,
  intermediate_size=5632,
  vocab_size=32000,
)
ADDED_TOKENS = 4  # <PAD>, <image>, <|im_start|>, <|im_end|> (constants.py)
# The SD-VAE's downsampling factor (stabilityai/sd-vae-ft-mse, the config's VAE).
VAE_FACTOR = 8
# data/dataset.py: ImageNetDataset's prompt templates (one drawn per image; "an photo" as
# written there) and its class names (the 1000 ImageNet-1k names, one per class).
TEMPLATES = ("Please generate an image of {}.", "{}", "an image of {}.", "an photo of {}.")

# (our field, the value the reference's settings make it); the model's sizes
# come from the start checkpoint's config.json through `convert llama`.
ROWS = [
  ("model.hidden_size", CHAT_CONFIG_JSON["hidden_size"]),
  ("model.num_layers", CHAT_CONFIG_JSON["num_hidden_layers"]),
  ("model.num_heads", CHAT_CONFIG_JSON["num_attention_heads"]),
  ("model.num_kv_heads", CHAT_CONFIG_JSON["num_key_value_heads"]),
  ("model.mlp_dim", CHAT_CONFIG_JSON["intermediate_size"]),
  ("model.vocab_size", CHAT_CONFIG_JSON["vocab_size"] + ADDED_TOKENS),
  ("model.conditioning", TRAIN_IMAGENET["decoder_t_embed"]),
  ("model.patch_size", TRAIN_IMAGENET["patch_size"]),
  ("model.in_channels", TRAIN_IMAGENET["in_channels"]),
  ("model.learn_sigma", TRAIN_IMAGENET["learn_sigma"]),
  ("model.image_size", TRAIN_IMAGENET_SH["resolution"] // VAE_FACTOR),
  ("model.dtype", {"bf16": "bfloat16"}[TRAIN_IMAGENET_SH["mixed_precision"]]),
  ("data.name", "imagenet"),
  (
    "data.batch_size",
    TRAIN_IMAGENET_SH["batch_size_per_gpu"]
    * TRAIN_IMAGENET_SH["nproc_per_node"]
    * TRAIN_IMAGENET_SH["gradient_accumulation_steps"],
  ),
  ("data.cfg_drop_prob", TRAIN_PY["text_dropout_prob"]),
  ("data.random_flip", TRAIN_PY["random_flip"]),
  ("data.latent_sample", True),  # vae.encode(x).latent_dist.sample() in train.py
  ("loss.w_lm", TRAIN_IMAGENET["loss_dict"]["loss_lm"]),
  ("loss.w_diff", TRAIN_IMAGENET["loss_dict"]["loss_diffusion"]),
  # models/monoformer.py: cross-entropy only on the rows not used for diffusion
  ("loss.text_on_image_examples", False),
  ("optim.lr", TRAIN_IMAGENET_SH["lr"]),
  ("optim.schedule", "cosine" if TRAIN_IMAGENET["use_lr_decay"] else "constant"),
  ("optim.warmup_steps", 0),  # warmup_iters applies only with use_lr_decay=True
  ("optim.weight_decay", TRAIN_PY["weight_decay"]),
  ("optim.b1", TRAIN_PY["adamw_betas"][0]),
  ("optim.b2", TRAIN_PY["adamw_betas"][1]),
  ("optim.eps", TRAIN_PY["adamw_eps"]),
  ("optim.grad_clip", TRAIN_IMAGENET_SH["max_grad_norm"]),
  ("optim.ema_decay", TRAIN_PY["ema_decay"]),
  ("train.num_steps", TRAIN_IMAGENET_SH["max_steps"]),
  ("train.log_every", TRAIN_IMAGENET_SH["log_steps"]),
  ("diffusion.num_timesteps", TRAIN_PY["num_timesteps"]),
  ("diffusion.beta_schedule", TRAIN_PY["noise_schedule"]),
  ("seed", TRAIN_PY["seed"]),
  # The start: the chat model's folder as downloaded, its `convert llama`.
  ("data.tokenizer", TRAIN_IMAGENET["llm_pretrained_path"].split("/")[1]),
  ("train.init_from", TRAIN_IMAGENET["llm_pretrained_path"].split("/")[1] + "-monoformer"),
]


def _get(config, path):
  for name in path.split("."):
    config = config[name]
  return config


@pytest.fixture(scope="module")
def paper():
  return config_file("imagenet256:paper")


@pytest.mark.parametrize("field, value", ROWS, ids=[r[0] for r in ROWS])
def test_paper_is_the_references_setting(paper, field, value):
  assert _get(paper, field) == value


def test_paper_differs_from_the_default_only_where_the_reference_does(paper):
  """The default stays the released checkpoint's (adaln_before_decoder, flips)."""
  default = config_file("imagenet256")
  assert default.to_dict() == base().to_dict()
  assert default.model.conditioning == "adaln_before_decoder" and default.data.random_flip
  changed = {
    f"{section}.{name}"
    for section, fields in paper.items()
    if isinstance(fields, dict) or hasattr(fields, "items")
    for name in fields
    if fields[name] != default[section][name]
  }
  changed |= {k for k in ("seed", "sharding_rules") if paper[k] != default[k]}
  assert changed == {"model.conditioning", "data.random_flip", "data.tokenizer", "train.init_from"}
  assert complete(paper).to_dict() == paper.to_dict()


def test_the_docstring_table_names_every_reference_setting():
  spec = importlib.util.spec_from_file_location("imagenet256", CONFIGS_DIR / "imagenet256.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  doc = module.__doc__
  for key in [*TRAIN_IMAGENET, "source_max_length", "use_chat_template", "warmup_iters"]:
    assert key in doc, key
  for key in ("checkpointing_steps", "max_grad_norm", "text_dropout_prob", "weight_decay"):
    assert f"--{key}" in doc, key
  for path, _ in ROWS:
    assert path.split(".")[-1] in doc, path


def test_paper_passes_the_training_checks_once_its_start_exists(paper, tmp_path, monkeypatch):
  """No weights are read: the check sees the start's folder and the schedule."""
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ConfigError) as caught:
    check_train_config(paper, reads_data=False)
  assert str(caught.value).startswith(
    "train.init_from='TinyLlama-1.1B-Chat-v1.0-monoformer': is not a folder"
  )
  assert "convert llama" in str(caught.value)
  (tmp_path / paper.train.init_from).mkdir()
  checked = check_train_config(paper, reads_data=False)
  assert checked.to_dict() == paper.to_dict()
  # Its decay, as the docstring gives it, passes too.
  decayed = config_file("imagenet256:paper")
  decayed.optim.update(schedule="cosine", warmup_steps=500, decay_steps=300_000)
  assert check_train_config(decayed, reads_data=False).optim.min_lr_ratio == 0.1


@pytest.mark.parametrize("variant", ["", "paper"])
def test_the_paper_layout_pads_at_most_a_tenth_of_its_columns(variant):
  """The packer's rows of made ImageNet examples (the 1000 real class names under
  the reference's templates, a real-size Llama-style tokenizer) against the
  padding their token counts imply, and the 512-column rows they replaced."""
  assert hashlib.sha256(LLAMA_STYLE.read_bytes()).hexdigest() == LLAMA_STYLE_SHA256
  config = config_file(f"imagenet256:{variant}")
  config.data.tokenizer = str(LLAMA_STYLE)
  tokenizer = tokenizer_of(config)
  tsv = REPO / "monoformer_jax" / "data" / "imagenet_classes.tsv"
  names = [line.split("\t")[1] for line in tsv.read_text().splitlines()]
  assert len(names) == 1000  # two names serve two classes each: crane, maillot
  # <s> prompt <|im_start|> [timestep token] 256 image tokens <|im_end|> \n </s>
  prompt_lengths = [len(tokenizer.encode(t.format(n))) for n in names for t in TEMPLATES]
  specials = 4 + len(tokenizer.encode("\n")) + (variant == "paper")
  fixed = specials + (TRAIN_IMAGENET_SH["resolution"] // VAE_FACTOR // 2) ** 2
  drop = TRAIN_PY["text_dropout_prob"]
  expected_length = (1 - drop) * (np.mean(prompt_lengths) + fixed) + drop * fixed

  rows = class_prompt_rows(config, tokenizer)
  assert config.data.seq_len == 288 and rows.seq_len == 288
  assert rows.padding <= 0.10
  np.testing.assert_allclose(rows.padding, 1 - expected_length / 288, atol=0.004)
  assert rows.examples == rows.images == rows.rows  # one image per row
  assert rows.longest == max(prompt_lengths) + fixed <= 288
  # The reference cuts text at 512 tokens: never an ImageNet prompt.
  assert max(prompt_lengths) < TRAIN_IMAGENET["tokenizer_max_length"]

  config.data.seq_len = 512  # the rows before: half of every one was padding
  before = class_prompt_rows(config, tokenizer)
  np.testing.assert_allclose(before.padding, 1 - expected_length / 512, atol=0.004)
  assert before.padding > 0.45

  config.data.seq_len = rows.longest - 1  # a row one column short is refused, naming it
  with pytest.raises(ConfigError, match=rf"data.seq_len={rows.longest - 1}: the class prompt "):
    class_prompt_rows(config, tokenizer)
