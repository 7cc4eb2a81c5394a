"""The fid family: FID, sFID, Inception Score, precision/recall of uint8 samples.

ADM's evaluator's metrics (eval/fid.py) against a reference batch, on the
features of the FID Inception-v3 (eval/inception.py). The paper's FID-50K
is `--metrics=fid` on 50,000 samples drawn as the reference's sample_ddp.py
draws them (its defaults, which the paper's numbers came from): 20 DDPM
steps, guidance scale 1.5 on eps channels 0-2 only (DiT's
forward_with_cfg; the variance and the fourth latent channel stay
conditional). That protocol is this class's (`num_steps`, `cfg_scale`,
`guided_channels`); evaluate and config.evals default to it
(registry.sampling_protocol). The Inception weights and the reference batch
are read when the evaluator is made, before any sampling; a folder of
reference images (fid.ReferenceFolder) is decoded, cropped to the samples'
size and turned into features when the samples' shape is checked, also before
any sampling, so a broken image stops the run before hours of samples.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import logging

from monoformer_jax.errors import ConfigError, FileFormatError
from monoformer_jax.eval import fid
from monoformer_jax.eval.registry import Evaluator


class InceptionMetrics(Evaluator):
  files = {
    "inception": "pytorch-fid's Inception weights (pt_inception-2015-12-05-6726825d"
    ".pth; nothing is downloaded)",
    "reference": "an ADM reference batch npz (mu, sigma, mu_s, sigma_s, arr_0), e.g. "
    "VIRTUAL_imagenet256_labeled.npz, or a folder of reference images",
  }
  folders = ("reference",)  # a folder of reference images (fid.ReferenceFolder)
  num_samples = 50_000  # the papers' FID-50K
  # The reference's sample_ddp.py defaults: create_diffusion("20"), --cfg-scale
  # 1.5, forward_with_cfg guiding eps[:, :3].
  num_steps = 20
  cfg_scale = 1.5
  guided_channels = 3

  def __init__(self, names, settings):
    super().__init__(names, settings)
    from monoformer_jax.eval.inception import load_inception

    if not settings.get("inception") or not settings.get("reference"):
      raise ConfigError(
        f"{list(self.names)} need the Inception weights (--inception=pt_"
        "inception-2015-12-05-6726825d.pth, pytorch-fid's file) and a "
        "reference batch (--reference=VIRTUAL_imagenet256_labeled.npz)"
      )
    self.inception = load_inception(settings["inception"])
    self.reference = fid.reference_of(settings["reference"])  # an npz or a folder of images
    self.reference.check(self.names)
    self.batch_size = int(settings.get("batch_size") or 200)  # images per Inception call
    self._folder_features: dict[int, dict] = {}  # a folder reference's, by sample size

  @classmethod
  def min_samples(cls, names) -> int:
    return max(fid.MIN_IMAGES[name] for name in names)

  def check_samples(self, shape, source):
    if shape[-1] != 3:
      raise FileFormatError(
        f"Inception metrics need RGB samples; {source} holds images of "
        f"{shape[-1]} channel(s) (grayscale samples have their own metrics)"
      )
    held = self.reference.num_images
    if isinstance(self.reference, fid.ReferenceFolder) and held < shape[0]:
      raise FileFormatError(
        f"reference folder {self.reference.path} holds {held} image(s), fewer than the "
        f"{shape[0]} samples of {source}: score at most {held} samples (--num_samples="
        f"{held}) or give a folder of more reference images"
      )
    resolution = self.reference.resolution
    if resolution is not None and (resolution, resolution) != tuple(shape[1:3]):
      raise FileFormatError(
        f"{source} holds {shape[1]}x{shape[2]} images but the reference batch is "
        f"{resolution}x{resolution}: sample at the reference's "
        "resolution (or give the reference batch of this resolution)"
      )
    if isinstance(self.reference, fid.ReferenceFolder) and set(self.names) - {"is"}:
      self._reference_folder_features(shape)  # now: a bad image stops it before sampling

  def _reference_folder_features(self, shape) -> dict:
    """The Inception features of the folder's images cropped to the samples'
    size, computed once per size, FOLDER_CHUNK images at a time."""
    size = int(shape[1])
    if size not in self._folder_features:
      folder, parts = self.reference, []
      for start in range(0, folder.num_images, FOLDER_CHUNK):
        images = folder.images_like(shape, start, start + FOLDER_CHUNK)
        parts.append(self._features(images, "reference"))
      self._folder_features[size] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return self._folder_features[size]

  def score_samples(self, images_NxHxWxC, labels_N) -> dict:
    images, reference = images_NxHxWxC, self.reference
    wanted = self.names
    sample_features = self._features(images, "samples")
    needs_reference_images = (
      "precision_recall" in wanted
      or ("fid" in wanted and reference.fid is None)
      or ("sfid" in wanted and reference.sfid is None)
    )
    reference_features = None
    if needs_reference_images and isinstance(reference, fid.ReferenceFolder):
      reference_features = self._reference_folder_features(images.shape)
    elif needs_reference_images and reference.images is not None:
      reference_features = self._features(np.asarray(reference.images), "reference")
    return fid.image_metrics(sample_features, reference_features, reference, wanted)

  def _features(self, images, what: str):
    import tqdm

    from monoformer_jax.eval.inception import inception_features

    t0 = time.perf_counter()
    writer = jax.process_index() == 0
    # This host's devices: the scores are computed by one process (process 0).
    local = jax.sharding.Mesh(np.array(jax.local_devices()), ("batch",))
    with tqdm.tqdm(
      total=len(images), unit="img", desc=f"Inception ({what})", disable=not writer
    ) as bar:
      features = inception_features(
        self.inception,
        images,
        batch_size=self.batch_size,
        mesh=local,
        progress=lambda done: bar.update(done - bar.n),
      )
    logging.info(
      "Inception features of %d %s in %.1f s", len(images), what, time.perf_counter() - t0
    )
    return features


# Reference images of a folder decoded and scored at a time (memory: 1000 x 256 x 256 x 3).
FOLDER_CHUNK = 1000


EVALUATORS = dict.fromkeys(fid.METRICS, InceptionMetrics)
