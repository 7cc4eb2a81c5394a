"""Image metrics as ADM's evaluator defines them: FID, sFID, Inception Score,
improved precision and recall; and ADM's reference batches.

The definitions follow openai/guided-diffusion's `evaluations/evaluator.py`
(the numbers the ADM, DiT and MonoFormer papers report), written anew in numpy
and scipy. Everything here works on Inception-v3 features that another module
computes (a dict of `pool` [N, 2048], `spatial` [N, 2023] and `logits`
[N, 1008]); nothing here runs a network.

    statistics, frechet_distance   FID (pool features), sFID (spatial ones)
    inception_score                exp E_x KL(p(y|x) || p(y)), mean over splits
    precision_recall               Kynkaanniemi et al. 2019, k = 3 neighbours
    ReferenceBatch                 an ADM reference npz (mu, sigma, mu_s, sigma_s, arr_0)
    ReferenceFolder                a folder of reference images (COCO-style), ADM-cropped
    reference_of                   the one of the two a --reference path names
    load_images_npz                a sample npz (ADM's arr_0 or this project's images)
    load_samples_npz               the same with its labels (arr_1 or labels)
    NpzReader                      an npz read member by member, errors naming the file
    image_metrics                  the asked metrics from the two feature dicts

Where this differs from ADM's evaluator (all below the precision the papers
report): statistics are float64 throughout (ADM's mean is float32); softmax
and KL are float64 from log-softmax (ADM takes np.log of a float32 softmax,
NaN when a probability underflows to 0); pairwise distances are float32 (ADM
tries float16 first); squared distances within float32 rounding noise of 0
count as 0, so exact duplicates are at distance 0; and when the matrix square
root's imaginary part is too large the eps offset is tried before giving up
(ADM raises at once).
"""

from __future__ import annotations

import functools
import os
import struct
import warnings
import zipfile
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
from etils import epath
from scipy import linalg

from monoformer_jax.errors import ConfigError, FileFormatError, MissingPathError, PathError
from monoformer_jax.paths import is_local, open_binary

METRICS = ("fid", "sfid", "is", "precision_recall")
# The fewest images each metric is defined on: a covariance needs 2, the
# k = 3 nearest neighbours of an image other than itself 4.
MIN_IMAGES = dict(fid=2, sfid=2, precision_recall=4, **{"is": 1})
# ADM's evaluator scores the Inception Score over contiguous chunks of 5000
# samples (the last chunk keeps the remainder); 10 splits of a 50k batch.
ADM_IS_SPLIT_SIZE = 5000
# Squared distances |x|^2 - 2 x.y + |y|^2 below this share of |x|^2 + |y|^2 are
# float32 rounding noise (measured <= 5e-7 for 2048-d features; nearest real
# Inception neighbours are ~0.3): they are set to 0.
_SNAP_TO_ZERO = 1e-5
# Half a pixel level: float images this far outside [0, 1] are another
# convention ([-1, 1], [0, 255]), not rounding.
_RANGE_SLACK = 0.5 / 255


# --------------------------------------------------------------------------- FID, sFID


class Statistics(NamedTuple):
  """Mean mu [D] and covariance sigma [D, D] (float64) of a set of features."""

  mu: np.ndarray
  sigma: np.ndarray


def statistics(features_NxD) -> Statistics:
  """The mean and the unbiased covariance (np.cov, rowvar=False, as ADM) of
  N >= 2 feature vectors [N, D], in float64."""
  features_NxD = np.asarray(features_NxD)
  if features_NxD.ndim != 2:
    raise ValueError(f"features have shape {features_NxD.shape}; statistics need [N, D]")
  if features_NxD.shape[0] < 2:
    raise ValueError(
      f"statistics need at least 2 feature vectors for a covariance, got "
      f"N={features_NxD.shape[0]}; compute features of more images"
    )
  features_NxD = features_NxD.astype(np.float64, copy=False)
  return Statistics(mu=features_NxD.mean(axis=0), sigma=np.cov(features_NxD, rowvar=False))


def _checked(stats: Statistics, name: str) -> tuple[np.ndarray, np.ndarray]:
  mu_D = np.atleast_1d(np.asarray(stats.mu, dtype=np.float64))
  sigma_DxD = np.atleast_2d(np.asarray(stats.sigma, dtype=np.float64))
  if mu_D.ndim != 1 or sigma_DxD.shape != (mu_D.shape[0],) * 2:
    raise ValueError(
      f"statistics {name} have mu {mu_D.shape} and sigma {sigma_DxD.shape}; "
      "expected mu [D] and sigma [D, D]"
    )
  if not (np.isfinite(mu_D).all() and np.isfinite(sigma_DxD).all()):
    raise ValueError(
      f"statistics {name} hold non-finite values; the features they come from have NaN or infinity"
    )
  return mu_D, sigma_DxD


def frechet_distance(a: Statistics, b: Statistics, eps: float = 1e-6) -> float:
  """The Frechet distance of two Gaussians (ADM's and pytorch-fid's formula):

      |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr sqrtm(S_a S_b)

  sqrtm is scipy's. When the product is singular enough that sqrtm is not
  finite, eps is added to both diagonals (with a warning), as ADM does; the
  square root's imaginary part (numerical noise of a real product of PSD
  matrices) is dropped when its diagonal is within 1e-3 of 0, else the offset
  is tried and, if that does not help either, a ValueError names it.
  """
  mu_a, sigma_a = _checked(a, "a")
  mu_b, sigma_b = _checked(b, "b")
  if mu_a.shape != mu_b.shape:
    raise ValueError(
      f"the statistics have different dimensions: {mu_a.shape[0]} and "
      f"{mu_b.shape[0]}; compute both from the same feature layer "
      "(pool: 2048 for FID, spatial: 2023 for sFID)"
    )

  def sqrt_product(offset):
    shift_DxD = np.eye(mu_a.shape[0]) * offset
    with warnings.catch_warnings():  # scipy warns of singular products; handled below
      warnings.simplefilter("ignore", linalg.LinAlgWarning)
      return linalg.sqrtm((sigma_a + shift_DxD) @ (sigma_b + shift_DxD))

  def imaginary(covmean):
    return float(np.abs(np.diagonal(covmean).imag).max()) if np.iscomplexobj(covmean) else 0.0

  covmean_DxD = sqrt_product(0.0)
  if not np.isfinite(covmean_DxD).all() or imaginary(covmean_DxD) > 1e-3:
    why = (
      "not finite"
      if not np.isfinite(covmean_DxD).all()
      else f"complex (imaginary diagonal up to {imaginary(covmean_DxD):.3g})"
    )
    warnings.warn(
      f"the square root of the covariance product is {why}; adding {eps} to "
      "the diagonal of both covariances",
      RuntimeWarning,
      stacklevel=2,
    )
    covmean_DxD = sqrt_product(eps)
  if not np.isfinite(covmean_DxD).all():
    raise ValueError(
      f"the square root of the covariance product is not finite even with "
      f"eps={eps} on the diagonal; use a larger eps or more features"
    )
  if np.iscomplexobj(covmean_DxD):
    if imaginary(covmean_DxD) > 1e-3:
      raise ValueError(
        f"the square root of the covariance product has an imaginary "
        f"component of {np.abs(covmean_DxD.imag).max():.3g} (diagonal "
        f"{imaginary(covmean_DxD):.3g}, tolerance 1e-3) even with eps={eps}; "
        "compute the statistics from more features than dimensions, or "
        "use a larger eps"
      )
    covmean_DxD = covmean_DxD.real
  diff_D = mu_a - mu_b
  return float(
    diff_D @ diff_D + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean_DxD)
  )


# --------------------------------------------------------------------------- Inception Score


def _split_bounds(n: int, splits: int, split_size: int | None) -> list[tuple[int, int]]:
  if split_size is not None:
    if split_size < 1:
      raise ValueError(f"split_size={split_size}; it must be a positive number of samples")
    return [(i, min(i + split_size, n)) for i in range(0, n, split_size)]
  if not 1 <= splits <= n:
    raise ValueError(f"splits={splits} for {n} samples; use 1 <= splits <= N")
  return [(i * n // splits, (i + 1) * n // splits) for i in range(splits)]


def inception_score_splits(
  logits_NxK, splits: int = 10, *, split_size: int | None = None
) -> np.ndarray:
  """The Inception Score of each split [S]: exp of the mean over the split's
  samples of KL(p(y|x) || p(y)), p(y|x) the softmax of a sample's logits and
  p(y) their mean over the split.

  Splits are contiguous. With `split_size` (ADM: 5000) they are chunks of that
  many samples and the last keeps the remainder, as ADM's evaluator; else
  `splits` chunks whose sizes differ by at most one (improved-GAN's
  i*N//splits bounds), which for N = 50000 are ADM's 10 chunks of 5000.
  """
  logits_NxK = np.asarray(logits_NxK, dtype=np.float64)
  if logits_NxK.ndim != 2 or logits_NxK.shape[0] == 0:
    raise ValueError(f"logits have shape {logits_NxK.shape}; expected [N, K] with N >= 1")
  log_p_NxK = logits_NxK - logits_NxK.max(axis=1, keepdims=True)
  log_p_NxK -= np.log(np.exp(log_p_NxK).sum(axis=1, keepdims=True))
  p_NxK = np.exp(log_p_NxK)
  scores = []
  for begin, end in _split_bounds(len(p_NxK), splits, split_size):
    p_SxK, log_p_SxK = p_NxK[begin:end], log_p_NxK[begin:end]
    p_y_K = p_SxK.mean(axis=0)
    # p log p is 0 where p is: classes with p(y) = 0 have p(y|x) = 0 throughout.
    log_p_y_K = np.log(np.where(p_y_K > 0, p_y_K, 1.0))
    kl_S = (p_SxK * (log_p_SxK - log_p_y_K)).sum(axis=1)
    scores.append(np.exp(kl_S.mean()))
  return np.array(scores)


def inception_score(
  logits_NxK, splits: int = 10, *, split_size: int | None = None, return_std: bool = False
):
  """The mean over splits of `inception_score_splits` (ADM reports the mean);
  (mean, std) with return_std."""
  scores_S = inception_score_splits(logits_NxK, splits, split_size=split_size)
  if return_std:
    return float(scores_S.mean()), float(scores_S.std())
  return float(scores_S.mean())


# --------------------------------------------------------------------------- precision, recall


def _squared_distances(a_BxD, a_norms_B, b_CxD, b_norms_C) -> np.ndarray:
  """Pairwise squared distances [B, C] in float32 as |a|^2 - 2 a.b + |b|^2,
  clamped at 0, with rounding noise around 0 set to 0."""
  scale_BxC = np.add(a_norms_B[:, None], b_norms_C[None, :])
  d_BxC = a_BxD @ b_CxD.T
  d_BxC *= -2.0
  d_BxC += scale_BxC
  scale_BxC *= _SNAP_TO_ZERO
  d_BxC[d_BxC <= scale_BxC] = 0.0  # also clamps the negative ones
  return d_BxC


def _as_features(x, name: str) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"{name} have shape {x.shape}; expected [N, D]")
  return x.astype(np.float32, copy=False)


def manifold_radii(features_NxD, *, k: int = 3, batch_size: int = 10000) -> np.ndarray:
  """Each feature's squared distance [N] to its k-th nearest neighbour in the
  same set, self excluded: ADM's index k of the sorted distances with the
  self-distance (0) at index 0, i.e. the (k+1)-th smallest. A duplicate counts
  as a neighbour at distance 0.

  Rows and columns go in blocks of batch_size, keeping the k+1 smallest
  distances of each row, so memory is batch_size^2 floats, not N^2.
  """
  features_NxD = _as_features(features_NxD, "features")
  n = features_NxD.shape[0]
  if k < 1 or batch_size < 1:
    raise ValueError(f"k={k}, batch_size={batch_size}; both must be >= 1")
  if n < k + 1:
    raise ValueError(f"{n} features for k={k} nearest neighbours; need at least {k + 1}")
  norms_N = np.einsum("nd,nd->n", features_NxD, features_NxD)
  radii_N = np.empty(n, dtype=np.float32)
  for r0 in range(0, n, batch_size):
    rows_BxD, rows_norms_B = features_NxD[r0 : r0 + batch_size], norms_N[r0 : r0 + batch_size]
    best_Bxk1 = np.full((len(rows_BxD), k + 1), np.inf, dtype=np.float32)
    for c0 in range(0, n, batch_size):
      d_BxC = _squared_distances(
        rows_BxD, rows_norms_B, features_NxD[c0 : c0 + batch_size], norms_N[c0 : c0 + batch_size]
      )
      merged = np.concatenate([best_Bxk1, d_BxC], axis=1)
      best_Bxk1 = np.partition(merged, k, axis=1)[:, : k + 1]
    radii_N[r0 : r0 + batch_size] = best_Bxk1.max(axis=1)
  return radii_N


def precision_recall(
  real_features_NxD, fake_features_MxD, *, k: int = 3, batch_size: int = 10000
) -> tuple[float, float]:
  """Improved precision and recall (Kynkaanniemi et al. 2019) as ADM's
  ManifoldEstimator: each set's manifold is the union of balls around its
  features with radius the distance to the k-th nearest neighbour (self
  excluded). Precision is the share of fake features inside the real manifold
  (within the radius of ANY real feature: d(fake, real_j) <= radius_j);
  recall the share of real features inside the fake one.

  Squared float32 distances, computed in blocks of batch_size x batch_size.
  """
  real_NxD = _as_features(real_features_NxD, "real features")
  fake_MxD = _as_features(fake_features_MxD, "fake features")
  if real_NxD.shape[1] != fake_MxD.shape[1]:
    raise ValueError(
      f"real features have {real_NxD.shape[1]} dimensions and fake ones "
      f"{fake_MxD.shape[1]}; compute both with the same feature layer"
    )
  radii_real_N = manifold_radii(real_NxD, k=k, batch_size=batch_size)
  radii_fake_M = manifold_radii(fake_MxD, k=k, batch_size=batch_size)
  norms_real_N = np.einsum("nd,nd->n", real_NxD, real_NxD)
  norms_fake_M = np.einsum("nd,nd->n", fake_MxD, fake_MxD)
  real_in_fake_N = np.zeros(len(real_NxD), dtype=bool)
  fake_in_real_M = np.zeros(len(fake_MxD), dtype=bool)
  for r0 in range(0, len(real_NxD), batch_size):
    r1 = r0 + batch_size
    for f0 in range(0, len(fake_MxD), batch_size):
      f1 = f0 + batch_size
      d_BxC = _squared_distances(
        real_NxD[r0:r1], norms_real_N[r0:r1], fake_MxD[f0:f1], norms_fake_M[f0:f1]
      )
      real_in_fake_N[r0:r1] |= (d_BxC <= radii_fake_M[None, f0:f1]).any(axis=1)
      fake_in_real_M[f0:f1] |= (d_BxC <= radii_real_N[r0:r1, None]).any(axis=0)
  return float(fake_in_real_M.mean()), float(real_in_fake_N.mean())


# --------------------------------------------------------------------------- npz files


def _member_header(zip_f: zipfile.ZipFile, name: str):
  """(shape, fortran_order, dtype) of member `name`.npy without reading its
  data, or None for an npy format version numpy has no public reader for."""
  with zip_f.open(f"{name}.npy") as f:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
      return np.lib.format.read_array_header_2_0(f)
  return None


def _mapped_member(path: str, zip_f: zipfile.ZipFile, name: str) -> np.ndarray | None:
  """Member `name` as a read-only np.memmap when it is stored uncompressed
  (np.savez), else None (np.savez_compressed: it has to be read)."""
  info = zip_f.getinfo(f"{name}.npy")
  if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:  # deflated, encrypted
    return None
  if "://" in path:  # on a bucket: read, not mapped
    return None
  with open(path, "rb") as f:
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
      return None
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    f.seek(info.header_offset + 30 + name_len + extra_len)
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
      return None
    offset = f.tell()
  if dtype.hasobject or int(np.prod(shape)) == 0:
    return None
  return np.memmap(
    path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape), order="F" if fortran else "C"
  )


class NpzReader:
  """An npz opened for reading members one at a time (memory-mapped where the
  file is local and allows it), with errors that name the file. On a bucket
  (`gs://...`) it is read through epath: only the members asked for are fetched."""

  def __init__(self, path, what: str):
    self.path = os.fspath(path)
    where = epath.Path(self.path)
    if not where.exists():
      raise MissingPathError(f"{what} {self.path} is not there; give the path of an .npz file")
    if where.is_dir():
      raise PathError(f"{what} {self.path} is a folder; give the path of an .npz file in it")
    # zipfile opens a local path itself; a bucket's file is opened here and closed in close().
    self._file = None if is_local(self.path) else open_binary(self.path)
    try:
      self._zip = zipfile.ZipFile(self.path if self._file is None else self._file)
    except (zipfile.BadZipFile, OSError) as e:
      self.close()
      raise FileFormatError(
        f"{what} {self.path} is not an npz file ({type(e).__name__}: "
        f"{e}); give a file written by np.savez"
      ) from e
    self.files = [n[:-4] for n in self._zip.namelist() if n.endswith(".npy")]

  def close(self) -> None:
    if getattr(self, "_zip", None) is not None:
      self._zip.close()  # a memory map made from the file stays valid
    if self._file is not None:
      self._file.close()

  def __contains__(self, name: str) -> bool:
    return name in self.files

  def header(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
      header = _member_header(self._zip, name)
    except Exception as e:
      raise FileFormatError(
        f"{self.path}: array {name!r} is broken ({type(e).__name__}: {e}); write the file again"
      ) from e
    if header is None:
      array = self.read(name)
      return array.shape, array.dtype
    shape, _, dtype = header
    return tuple(shape), dtype

  def read(self, name: str, *, mmap: bool = False) -> np.ndarray:
    try:
      if mmap and is_local(self.path):
        array = _mapped_member(self.path, self._zip, name)
        if array is not None:
          return array
      with self._zip.open(f"{name}.npy") as f:
        return np.lib.format.read_array(f, allow_pickle=False)
    except Exception as e:
      raise FileFormatError(
        f"{self.path}: array {name!r} cannot be read ({type(e).__name__}: "
        f"{e}); write the file again with np.savez"
      ) from e


def _check_images_shape(
  path: str, key: str, shape, expected_dtype: str, channels: int | None = 3
) -> None:
  if len(shape) != 4 or (channels is not None and shape[3] != channels):
    c = "C" if channels is None else channels
    raise FileFormatError(
      f"{path}: {key!r} has shape {tuple(shape)}; expected images "
      f"[N, H, W, {c}] ({expected_dtype}), channels last"
    )


class ReferenceBatch:
  """An ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz), read lazily.

  ADM's file holds `mu` [2048] and `sigma` [2048, 2048] (Inception pool_3
  statistics, for FID), `mu_s` [2023] and `sigma_s` [2023, 2023] (the first 7
  channels of mixed_6/conv, 17x17x7, for sFID), and `arr_0` uint8
  [N, H, W, 3], the reference images (10000 of them at 256x256: ~2 GB, which
  `.images` memory-maps when the npz is stored uncompressed). An npz of images
  only has no statistics: `.fid` and `.sfid` are then None and the caller
  computes them from features of `.images`.
  """

  def __init__(self, path):
    self._npz = NpzReader(path, "reference batch")
    self.path = self._npz.path
    for mu, sigma in (("mu", "sigma"), ("mu_s", "sigma_s")):
      if (mu in self._npz) != (sigma in self._npz):
        have, lack = (mu, sigma) if mu in self._npz else (sigma, mu)
        raise FileFormatError(
          f"reference batch {self.path} has {have!r} but not {lack!r}; "
          "an ADM reference batch holds both (or neither)"
        )
    if "arr_0" not in self._npz and "mu" not in self._npz and "mu_s" not in self._npz:
      raise FileFormatError(
        f"reference batch {self.path} holds {self._npz.files}, none of "
        "mu/sigma, mu_s/sigma_s or arr_0; give an ADM reference batch "
        "such as VIRTUAL_imagenet256_labeled.npz"
      )
    if "arr_0" in self._npz:
      shape, dtype = self._npz.header("arr_0")
      _check_images_shape(self.path, "arr_0", shape, "uint8")
      if dtype != np.uint8:
        raise FileFormatError(
          f"reference batch {self.path}: 'arr_0' is {dtype}; ADM's "
          "reference images are uint8 in [0, 255]"
        )
      self._images_shape = shape
    else:
      self._images_shape = None

  def _statistics(self, mu: str, sigma: str) -> Statistics | None:
    if mu not in self._npz:
      return None
    stats = Statistics(
      self._npz.read(mu).astype(np.float64), self._npz.read(sigma).astype(np.float64)
    )
    d = stats.mu.shape[0] if stats.mu.ndim == 1 else None
    if d is None or stats.sigma.shape != (d, d):
      raise FileFormatError(
        f"reference batch {self.path}: {mu!r} has shape {stats.mu.shape} "
        f"and {sigma!r} {stats.sigma.shape}; expected [D] and [D, D]"
      )
    if not (np.isfinite(stats.mu).all() and np.isfinite(stats.sigma).all()):
      raise FileFormatError(
        f"reference batch {self.path}: {mu!r} or {sigma!r} holds NaN or infinity; "
        "compute the statistics again (or give the reference images only, arr_0)"
      )
    return stats

  def check(self, metrics: Iterable[str]) -> None:
    """Whether it can serve `metrics` (among METRICS), before any sample is
    scored: its statistics readable and finite, or else enough images to
    compute them from; the images precision_recall needs."""
    for metric in metrics:
      stored = getattr(self, metric) if metric in ("fid", "sfid") else None
      if stored is not None or metric == "is":
        continue
      if self.num_images is None:
        raise ConfigError(
          f"{metric} needs the reference images, and reference batch "
          f"{self.path} holds only statistics; use a reference npz with "
          f"arr_0 (ADM's VIRTUAL_*.npz has it) or drop {metric}"
        )
      if self.num_images < MIN_IMAGES[metric]:
        raise FileFormatError(
          f"reference batch {self.path} holds {self.num_images} image(s), but {metric} "
          f"needs at least {MIN_IMAGES[metric]} reference images: give a larger reference batch"
        )

  @functools.cached_property
  def fid(self) -> Statistics | None:
    """The stored pool_3 statistics (mu, sigma), or None."""
    return self._statistics("mu", "sigma")

  @functools.cached_property
  def sfid(self) -> Statistics | None:
    """The stored spatial statistics (mu_s, sigma_s), or None."""
    return self._statistics("mu_s", "sigma_s")

  @functools.cached_property
  def images(self) -> np.ndarray | None:
    """arr_0, uint8 [N, H, W, 3] (memory-mapped where possible), or None."""
    if self._images_shape is None:
      return None
    return self._npz.read("arr_0", mmap=True)

  @property
  def num_images(self) -> int | None:
    return None if self._images_shape is None else self._images_shape[0]

  @property
  def resolution(self) -> int | None:
    """The images' height H (from the file's header, without reading them), or None."""
    return None if self._images_shape is None else self._images_shape[1]

  def __repr__(self) -> str:
    held = [
      name
      for name, v in (
        ("fid", "mu" in self._npz),
        ("sfid", "mu_s" in self._npz),
        ("images", self._images_shape is not None),
      )
      if v
    ]
    return (
      f"ReferenceBatch({self.path!r}, holds {held}"
      + (f", images {self._images_shape}" if self._images_shape else "")
      + ")"
    )


# The files of a reference folder that are images (by their name's ending).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ReferenceFolder:
  """A folder of reference images (e.g. COCO val2014 for text-to-image FID),
  with the interface of `ReferenceBatch`: no stored statistics (`.fid` and
  `.sfid` are None), so FID is computed from the Inception features of its
  images, each made as ADM made its reference batches: ADM's centre crop to
  the samples' size (data/encode.py adm_center_crop), RGB uint8 (`images_like`).
  Its image files (IMAGE_SUFFIXES, sorted, in subfolders too) are listed when
  it is made (a folder with none is refused then); the evaluator decodes them
  when it checks the samples' shape, before any sampling."""

  def __init__(self, path):
    from monoformer_jax.paths import files_under, path_kind

    self.path = os.fspath(path)
    if path_kind(self.path, "reference folder") != "folder":
      raise MissingPathError(f"reference folder {self.path} is not there")
    self.files = [
      str(entry)
      for name, entry in files_under(self.path)
      if name.lower().endswith(IMAGE_SUFFIXES) and not name.rsplit("/", 1)[-1].startswith(".")
    ]
    if not self.files:
      raise FileFormatError(
        f"reference folder {self.path} holds no image ({', '.join(IMAGE_SUFFIXES)}); give "
        "the folder of the reference images"
      )
    self.fid = self.sfid = None
    self.resolution = None  # any: each image is cropped to the samples' size

  @property
  def num_images(self) -> int:
    return len(self.files)

  def check(self, metrics: Iterable[str]) -> None:
    """Whether it holds enough images for `metrics`, before any sample is scored."""
    for metric in metrics:
      if metric != "is" and self.num_images < MIN_IMAGES[metric]:
        raise FileFormatError(
          f"reference folder {self.path} holds {self.num_images} image(s), but {metric} "
          f"needs at least {MIN_IMAGES[metric]}: give a folder of more reference images"
        )

  def images_like(self, shape, start: int = 0, stop: int | None = None) -> np.ndarray:
    """uint8 [n, H, W, 3]: images start..stop - 1 (default all), ADM-centre-
    cropped to the H x H of the samples' `shape` [N, H, W, C] (square samples)."""
    from monoformer_jax.data.encode import adm_center_crop
    from monoformer_jax.vision.images import UnreadableImage, load_image

    size = int(shape[1])
    files = self.files[start:stop]
    out = np.empty((len(files), size, size, 3), np.uint8)
    for i, path in enumerate(files):
      try:
        out[i] = np.asarray(adm_center_crop(load_image(path), size))
      except UnreadableImage as e:
        raise FileFormatError(f"reference folder {self.path}: {e} (or remove it)") from None
    return out

  def __repr__(self) -> str:
    return f"ReferenceFolder({self.path!r}, {self.num_images} images)"


def reference_of(path) -> ReferenceBatch | ReferenceFolder:
  """The reference `path` names: a folder of images, else an ADM npz."""
  from monoformer_jax.paths import path_kind

  if path_kind(os.fspath(path), "--reference") == "folder":
    return ReferenceFolder(path)
  return ReferenceBatch(path)


def load_images_npz(
  path, *, expect_resolution: int | None = None, channels: int | None = 3, chunk: int = 1024
) -> np.ndarray:
  """Sample images uint8 [N, H, W, 3] from an npz (channels=None: any C).

  ADM's sample format is `arr_0` uint8 [N, H, W, 3] (memory-mapped where the
  npz is uncompressed); this project's sample npz holds `images` float
  [N, H, W, 3] in [0, 1], converted as clip(round(x * 255)). With
  `expect_resolution` (the reference batch's) the images must be that many
  pixels high and wide: FID against a reference at another resolution is not
  comparable to published numbers.
  """
  npz = NpzReader(path, "sample images")
  try:
    return _read_images(npz, expect_resolution, channels, chunk)
  finally:
    npz.close()


def load_samples_npz(path, *, channels: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
  """(the images of `load_images_npz`, their labels or None): ADM's `arr_1`,
  else this project's `labels`, as stored (score.check_samples checks them)."""
  npz = NpzReader(path, "sample images")
  try:
    images = _read_images(npz, None, channels, 1024)
    key = next((k for k in ("arr_1", "labels") if k in npz), None)
    return images, None if key is None else npz.read(key)
  finally:
    npz.close()


def _read_images(
  npz: NpzReader, expect_resolution: int | None, channels: int | None, chunk: int
) -> np.ndarray:
  path = npz.path
  if "arr_0" in npz:
    key, expected = "arr_0", "uint8 in [0, 255]"
  elif "images" in npz:
    key, expected = "images", "float in [0, 1]"
  else:
    raise FileFormatError(
      f"{path} holds {npz.files}, neither 'arr_0' (ADM's samples: uint8 "
      "[N, H, W, 3]) nor 'images' (this project's: float [N, H, W, 3] in "
      "[0, 1]); write the samples under one of those keys"
    )
  shape, dtype = npz.header(key)
  _check_images_shape(path, key, shape, expected, channels)
  if key == "arr_0" and dtype != np.uint8:
    raise FileFormatError(
      f"{path}: 'arr_0' is {dtype}; ADM's sample format is uint8 in "
      "[0, 255] (write np.clip(np.round(x * 255), 0, 255).astype(np.uint8))"
    )
  if key == "images" and not np.issubdtype(dtype, np.floating):
    raise FileFormatError(
      f"{path}: 'images' is {dtype}; expected float in [0, 1] (or save uint8 images as 'arr_0')"
    )
  n, h, w, _ = shape
  if expect_resolution is not None and (h, w) != (expect_resolution, expect_resolution):
    raise FileFormatError(
      f"{path}: the samples are {h}x{w} but the reference batch is "
      f"{expect_resolution}x{expect_resolution}; sample at the reference's "
      "resolution (FID across resolutions is not comparable)"
    )
  array = npz.read(key, mmap=True)
  if key == "arr_0":
    return array
  images_NxHxWx3 = np.empty(shape, dtype=np.uint8)
  for begin in range(0, n, chunk):
    x = np.asarray(array[begin : begin + chunk], dtype=np.float32)
    bad = ~np.isfinite(x) | (x < -_RANGE_SLACK) | (x > 1 + _RANGE_SLACK)
    if bad.any():
      finite = x[np.isfinite(x)]
      found = f"[{finite.min():.4g}, {finite.max():.4g}]" if finite.size else "no finite values"
      raise FileFormatError(
        f"{path}: 'images' holds values outside [0, 1] ({found}"
        f"{', and NaN/inf' if not np.isfinite(x).all() else ''}); expected "
        "float in [0, 1] (map [-1, 1] images with (x + 1) / 2)"
      )
    images_NxHxWx3[begin : begin + chunk] = np.clip(np.round(x * 255.0), 0, 255)
  return images_NxHxWx3


# --------------------------------------------------------------------------- all together


def _feature(features: dict | None, key: str, whose: str, needed_for: str) -> np.ndarray:
  if features is None or key not in features:
    held = "none" if features is None else sorted(features)
    raise ConfigError(
      f"{needed_for} needs the {whose} Inception features {key!r} (given: "
      f"{held}); compute the {whose} features with the Inception network"
    )
  return np.asarray(features[key])


def _known_metrics(metrics: str | Iterable[str]) -> list[str]:
  asked = [metrics] if isinstance(metrics, str) else list(metrics)
  unknown = [m for m in asked if m not in METRICS]
  if unknown:
    raise ConfigError(f"image metric(s) {unknown} are not known; the known ones are {METRICS}")
  return asked


def image_metrics(
  sample_features: dict,
  reference_features: dict | None,
  reference: ReferenceBatch | None,
  metrics,
  *,
  is_split_size: int | None = ADM_IS_SPLIT_SIZE,
  k: int = 3,
) -> dict:
  """The asked metrics (a subset of METRICS) of the samples against the reference.

  Features dicts hold `pool` [N, 2048], `spatial` [N, 2023] and `logits`
  [N, 1008]. FID compares the samples' pool statistics with the reference's
  stored mu/sigma, or with statistics of reference_features['pool'] when the
  reference stores none; sFID likewise with mu_s/sigma_s and 'spatial'. The
  Inception Score uses the samples' logits only, in ADM's chunks of
  `is_split_size` samples (None: 10 equal splits). Precision and recall
  compare pool features, so they need the reference images' features.

  Returns {'fid', 'sfid', 'inception_score', 'precision', 'recall'}, the asked ones.
  """
  asked = _known_metrics(metrics)
  out = {}
  for metric, feature, stored_name, out_key in (
    ("fid", "pool", "fid", "fid"),
    ("sfid", "spatial", "sfid", "sfid"),
  ):
    if metric not in asked:
      continue
    stored = getattr(reference, stored_name) if reference is not None else None
    if stored is None:
      stored = statistics(_feature(reference_features, feature, "reference", metric))
    samples = statistics(_feature(sample_features, feature, "sample", metric))
    out[out_key] = frechet_distance(samples, stored)
  if "is" in asked:
    out["inception_score"] = inception_score(
      _feature(sample_features, "logits", "sample", "is"), split_size=is_split_size
    )
  if reference is not None:
    reference.check(asked)
  if "precision_recall" in asked:
    real = _feature(reference_features, "pool", "reference", "precision_recall")
    fake = _feature(sample_features, "pool", "sample", "precision_recall")
    out["precision"], out["recall"] = precision_recall(real, fake, k=k)
  return out
