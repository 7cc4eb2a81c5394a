"""Weights named by their Hugging Face hub id: the one place that tells a hub id from a path.

    local_path(spec, flag, kind)   `spec` as a path the readers open: a local path
                                   or a bucket's (`gs://...`) as given; a hub id
                                   `ORG/NAME` or `ORG/NAME@REVISION` downloaded
                                   (only the files `kind` reads) through
                                   `huggingface_hub.snapshot_download`, or found in
                                   its cache, and its snapshot folder returned
    is_hub_id(spec)                whether `spec` would be looked up on the hub
    recorded(spec)                 what a converted model's config records for
                                   `spec`: a hub id or a bucket path as given, a
                                   local path made absolute

A spec is a hub id when it is not a local path that exists, has no scheme,
and reads `ORG/NAME[@REVISION]` (two names, no leading `.` or `/`). So
`--vae=stabilityai/sd-vae-ft-mse` downloads once into the hub cache (`HF_HOME`,
`HF_HUB_CACHE`) and reads it from there afterwards; `HF_HUB_OFFLINE=1` reads
only the cache; `HF_TOKEN` (or `hf auth login`) opens gated and private repos.
A download is only of what the reader opens (`KINDS`): the SD-VAE's
safetensors and not its PyTorch .bin, TinyLlama's tokenizer and not its
weights. A repo whose snapshot holds no safetensors weights of that kind gets a
second download of its PyTorch files instead (`TORCH_KINDS`: pytorch_model.bin,
its shards and index, diffusion_pytorch_model.bin), read without torch
(safetensors_io.open_weights); never both. Offline the same two looks go to the
cache. Every failure is one line (a `MissingPathError`, or a `PathError`
for a gated repo or a failed download) naming the flag, the repo and the fix.
"""

from __future__ import annotations

import os
import re

from monoformer_jax.errors import MissingPathError, NotInstalledError, PathError

# What each reader opens, as snapshot_download's allow_patterns ('*' also
# matches '/': "*.safetensors" takes a release's ema/ folder too).
KINDS = {
  # official MonoFormer weights: config.json and the safetensors, root and ema/
  "official": ("*.json", "*.safetensors"),
  # an HF Llama (TinyLlama): its config, weights and tokenizer
  "llama": ("*.json", "*.safetensors", "tokenizer.model"),
  # a diffusers AutoencoderKL, alone or as a pipeline's vae/
  "vae": (
    "config.json",
    "diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
  ),
  "tokenizer": ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"),
  # an HF CLIP model: its config and weights (not its tokenizer, TF or Flax files)
  "clip": ("config.json", "model.safetensors"),
}
# The PyTorch files of each kind that reads weights, downloaded only when its
# safetensors are not in the repo.
TORCH_KINDS = {
  "official": ("*.json", "*.bin", "*.pt", "*.pth"),
  "llama": ("*.json", "*.bin", "tokenizer.model"),
  "vae": (
    "config.json",
    "diffusion_pytorch_model.bin",
    "vae/config.json",
    "vae/diffusion_pytorch_model.bin",
  ),
  "clip": (
    "config.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "pytorch_model-*.bin",
  ),
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HUB_ID = re.compile(rf"^({_NAME}/{_NAME})(?:@([A-Za-z0-9._/-]+))?$")


def _split(spec: str) -> tuple[str, str | None] | None:
  """(repo, revision) of a spec that reads as a hub id, else None."""
  if not spec or "://" in spec or os.path.exists(spec):
    return None
  match = _HUB_ID.match(spec)
  if not match or match.group(1).endswith((".", "-")):
    return None
  return match.group(1), match.group(2)


def is_hub_id(spec) -> bool:
  return _split(os.fspath(spec) if spec is not None else "") is not None


def recorded(spec: str) -> str:
  """`spec` as a converted model's config keeps it: usable from any folder."""
  if not spec or spec == "bytes" or "://" in spec or is_hub_id(spec):
    return spec
  return os.path.abspath(spec)


def local_path(spec, flag: str, kind: str) -> str:
  """`spec` as a local or bucket path; a hub id resolved to its snapshot folder
  (downloaded if need be) holding the files of `kind` (a key of KINDS)."""
  spec = os.fspath(spec)
  parts = _split(spec)
  if parts is None:
    return spec
  repo, revision = parts
  try:
    import huggingface_hub
    from huggingface_hub import errors
  except ImportError as e:  # an install without the package's requirements
    raise NotInstalledError(
      f"{flag}={spec!r} is no local path and reads as a hub id, but huggingface_hub "
      "is not installed: `pip install huggingface_hub`, or pass a local folder"
    ) from e
  where = f"{flag}={spec!r} is no local path and, as a hub id,"
  folder = _download(huggingface_hub, errors, repo, revision, KINDS[kind], where)
  if kind in TORCH_KINDS and not _holds(folder, (".safetensors",)):
    folder = _download(huggingface_hub, errors, repo, revision, TORCH_KINDS[kind], where)
  if not any(files for _, _, files in os.walk(folder)) or (
    kind in TORCH_KINDS and not _holds(folder, WEIGHT_SUFFIXES)
  ):
    patterns = KINDS[kind] + TORCH_KINDS.get(kind, ())
    raise MissingPathError(
      f"{flag}={spec!r}: the hub repo {repo} holds none of the files read here "
      f"({', '.join(dict.fromkeys(patterns))}); pass a repo or folder with safetensors "
      "or PyTorch weights"
    )
  return str(folder)


def _holds(folder: str, suffixes: tuple[str, ...]) -> bool:
  """Whether the snapshot `folder` holds a file ending in one of `suffixes`."""
  return any(n.endswith(suffixes) for _, _, names in os.walk(folder) for n in names)


def _download(huggingface_hub, errors, repo, revision, patterns, where) -> str:
  """snapshot_download of `patterns`; each failure one line (`where` opens it)."""
  try:
    return huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=list(patterns))
  except errors.GatedRepoError as e:
    raise PathError(
      f"{where} is a gated repo: accept its terms on https://huggingface.co/{repo} and log "
      "in on this machine (`hf auth login`, or set HF_TOKEN)"
    ) from e
  except errors.RepositoryNotFoundError as e:
    raise MissingPathError(
      f"{where} names no hub repo {repo!r} (or a private one: set HF_TOKEN); check the "
      "spelling, or pass a local folder"
    ) from e
  except errors.RevisionNotFoundError as e:
    raise MissingPathError(
      f"{where} names a revision {revision!r} that {repo} does not have; pass a branch, "
      "tag or commit of it"
    ) from e
  except errors.LocalEntryNotFoundError as e:
    # offline (HF_HUB_OFFLINE=1, or no connection) and not in the cache
    raise MissingPathError(
      f"{where} is not in the hub cache ({_cache()}) and the hub cannot be reached "
      f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r}): download it once "
      "online, point HF_HOME at a cache that holds it, or pass a local folder"
    ) from e
  except (errors.HfHubHTTPError, OSError) as e:
    why = " ".join(str(e).split())[:200] or type(e).__name__
    raise PathError(
      f"{where} could not be downloaded ({type(e).__name__}: {why}); retry, or pass a local folder"
    ) from e


def _cache() -> str:
  from huggingface_hub import constants

  return str(constants.HF_HUB_CACHE)
