"""monoformer_jax: MonoFormer (one transformer for autoregressive text and
diffusion images) in JAX/Flax NNX, for TPU pods, GPU clusters and laptops.

Shape letters. Arrays are named with their shapes (`x_BxLxE`, `latents_BxMxhxwxC`),
and each letter means one thing everywhere in the package:

    B   rows of a batch (or images of a flat batch of images)
    L   tokens of a row; Lq the queries of one call (Lq <= L), Lp a prompt's columns
    E   hidden width (model.hidden_size)
    H   query heads, K key/value heads, G = H / K query heads per kv head
    D   head dim
    F   MLP width (model.mlp_dim)
    V   vocabulary
    N   decoder layers
    M   image slots of a row
    P   tokens (patches) of one image, (image_size / patch_size)^2
    Z   features of one patch token (C * p * p in, p * p * 2C out; p the patch size)
    h, w, C   height, width and channels of an image or latent (lowercase h, w:
              H is heads)
    T   diffusion timesteps of a schedule
    I, J    query blocks and key blocks of the attention kernels

A product of two letters is written together (`img_BMxPxE`: B*M images of P
tokens); `x2C` is twice C.
"""

__version__ = "0.1.0"

import glob as _glob
import importlib.util as _importlib_util
import os as _os
import sys as _sys
import tempfile as _tempfile

# What JAX's CUDA plugin prints, as INFO lines on stderr, each time one of its
# libraries loads on a host without CUDA (3 at `import jax`, 1 when the CPU
# backend starts): no GPU is the expected state there.
_CUDA_PLUGIN_NOISE = (
  "Could not find cuda drivers on your machine, GPU will not be used.",
  "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
)


def _load_cuda_plugin_library() -> None:
  """Loads JAX's CUDA plugin library (xla_cuda_plugin.so), as its backend
  would later: the same file loads once per process, so its line is printed now."""
  import ctypes

  try:
    spec = _importlib_util.find_spec("jax_plugins.xla_cuda12")
  except (ImportError, ValueError):
    return
  for folder in spec.submodule_search_locations or () if spec else ():
    for path in _glob.glob(_os.path.join(folder, "xla_cuda_plugin*.so")):
      try:
        ctypes.CDLL(path)
      except OSError:  # the backend will say why when it loads it
        pass


def import_jax_without_cuda_noise() -> None:
  """Imports jax, and the CUDA plugin's library that the backend loads later,
  with the plugin's no-GPU lines left out of stderr (everything else printed
  meanwhile is passed on). Only where they are noise: JAX_PLATFORMS names the
  platforms and CUDA is not one of them (the tests, `compile`), the plugin is
  installed (the `test` extra has it, to compile for GPUs) and the host has no
  NVIDIA device files. Done when the package is imported; an entry point that
  sets JAX_PLATFORMS itself calls it again after (jax reads it on import)."""
  platforms = _os.environ.get("JAX_PLATFORMS", "").lower().replace(" ", "").split(",")
  if "jax" in _sys.modules or not any(platforms) or {"cuda", "gpu"} & set(platforms):
    return
  if _glob.glob("/dev/nvidia[0-9]*"):
    return
  try:
    if _importlib_util.find_spec("jax_cuda12_plugin") is None:
      return
  except (ImportError, ValueError):
    return
  _sys.stderr.flush()
  saved = _os.dup(2)
  with _tempfile.TemporaryFile() as held:
    _os.dup2(held.fileno(), 2)
    try:
      import jax  # noqa: F401

      _load_cuda_plugin_library()
    finally:
      _os.dup2(saved, 2)
      _os.close(saved)
      held.seek(0)
      lines = held.read().decode(errors="replace").splitlines(keepends=True)
      _sys.stderr.write("".join(x for x in lines if not x.rstrip().endswith(_CUDA_PLUGIN_NOISE)))
      _sys.stderr.flush()


import_jax_without_cuda_noise()
