"""ADM's image metrics (monoformer_jax.eval.fid) against independent
implementations written here: the Frechet distance by eigenvalues and in closed
form, Inception Scores that are known analytically, precision and recall by a
brute-force float64 k-NN; the reference batch and sample npz readers on
hand-written files, and image_metrics combining them."""

import warnings
import zipfile

import numpy as np
import pytest

from monoformer_jax.errors import ConfigError, FileFormatError, MissingPathError, PathError
from monoformer_jax.eval import fid

# --------------------------------------------------------------------------- independent twins


def frechet_by_eigenvalues(mu1, s1, mu2, s2):
  """|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(sqrt(S1) S2 sqrt(S1)), the
  square roots of symmetric PSD matrices taken by eigh."""
  w, v = np.linalg.eigh(s1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  middle = root1 @ s2 @ root1
  middle = (middle + middle.T) / 2
  tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(middle), 0, None)).sum()
  return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def mean_cov(x):
  mu = x.mean(0)
  centred = x - mu
  return mu, centred.T @ centred / (len(x) - 1)


def brute_force_pr(real, fake, k):
  """Precision and recall with full float64 distance matrices: radius of a
  point = distance to its k-th nearest OTHER point of its own set."""
  real, fake = real.astype(np.float64), fake.astype(np.float64)

  def sq(a, b):
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

  def radii(x):
    d = sq(x, x)
    others = [np.sort(np.delete(d[i], i))[k - 1] for i in range(len(x))]
    return np.array(others)

  r_real, r_fake = radii(real), radii(fake)
  d_fr = sq(fake, real)
  precision = np.mean([(d_fr[i] <= r_real).any() for i in range(len(fake))])
  recall = np.mean([(d_fr[:, j] <= r_fake).any() for j in range(len(real))])
  return precision, recall


# --------------------------------------------------------------------------- FID


def test_statistics_match_mean_and_unbiased_covariance():
  x = np.random.default_rng(0).normal(size=(40, 5)).astype(np.float32)
  stats = fid.statistics(x)
  mu, cov = mean_cov(x.astype(np.float64))
  assert stats.mu.dtype == stats.sigma.dtype == np.float64
  np.testing.assert_allclose(stats.mu, mu, rtol=1e-12)
  np.testing.assert_allclose(stats.sigma, cov, rtol=1e-10)
  with pytest.raises(ValueError, match="N=1"):
    fid.statistics(x[:1])


@pytest.mark.parametrize("n,d", [(200, 8), (500, 32), (90, 64)])
def test_frechet_distance_matches_eigenvalue_route(n, d):
  rng = np.random.default_rng(d)
  a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3
  b = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + rng.normal(size=d)
  sa, sb = fid.statistics(a), fid.statistics(b)
  expected = frechet_by_eigenvalues(*mean_cov(a), *mean_cov(b))
  assert fid.frechet_distance(sa, sb) == pytest.approx(expected, rel=1e-8)
  assert fid.frechet_distance(sb, sa) == pytest.approx(expected, rel=1e-8)
  assert abs(fid.frechet_distance(sa, sa)) < 1e-8 * np.trace(sa.sigma)


def test_frechet_distance_of_diagonal_gaussians_in_closed_form():
  rng = np.random.default_rng(1)
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  v1, v2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
  closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
  got = fid.frechet_distance(fid.Statistics(mu1, np.diag(v1)), fid.Statistics(mu2, np.diag(v2)))
  assert got == pytest.approx(closed, rel=1e-10)


def test_singular_covariances_take_the_eps_offset_and_stay_close(monkeypatch):
  """N < D: both covariances are rank-deficient. scipy >= 1.16's sqrtm stays
  finite on such products, so the non-finite case ADM guards against is
  forced by returning NaN for the un-offset product."""
  rng = np.random.default_rng(2)
  a, b = rng.normal(size=(12, 40)), rng.normal(size=(15, 40)) + 0.2
  sa, sb = fid.statistics(a), fid.statistics(b)
  expected = frechet_by_eigenvalues(*mean_cov(a), *mean_cov(b))
  assert fid.frechet_distance(sa, sb) == pytest.approx(expected, rel=1e-6)  # plain route

  real_sqrtm, calls = fid.linalg.sqrtm, []

  def sqrtm_failing_when_singular(m):
    calls.append(m)
    return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

  monkeypatch.setattr(fid.linalg, "sqrtm", sqrtm_failing_when_singular)
  with pytest.warns(RuntimeWarning, match="adding 1e-06 to the diagonal"):
    got = fid.frechet_distance(sa, sb)
  assert len(calls) == 2
  offset = 1e-6 * np.eye(40)
  np.testing.assert_allclose(calls[1], (sa.sigma + offset) @ (sb.sigma + offset))
  # The offset lifts each null direction's eigenvalue by ~eps * lambda, so the
  # trace of the square root moves by at most ~D sqrt(eps lambda_max).
  lambda_max = max(np.linalg.eigvalsh(sa.sigma)[-1], np.linalg.eigvalsh(sb.sigma)[-1])
  assert 0 < abs(got - expected) < 40 * np.sqrt(1e-6 * lambda_max)


def test_frechet_distance_errors(monkeypatch):
  s8 = fid.Statistics(np.zeros(8), np.eye(8))
  s9 = fid.Statistics(np.zeros(9), np.eye(9))
  with pytest.raises(ValueError, match="different dimensions: 8 and 9"):
    fid.frechet_distance(s8, s9)
  with pytest.raises(ValueError, match=r"mu \(8,\) and sigma \(9, 9\)"):
    fid.frechet_distance(fid.Statistics(np.zeros(8), np.eye(9)), s8)
  monkeypatch.setattr(fid.linalg, "sqrtm", lambda m: m + 0.5j * np.eye(len(m)))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    with pytest.raises(ValueError, match="imaginary component of 0.5"):
      fid.frechet_distance(s8, s8)


# --------------------------------------------------------------------------- Inception Score


def test_uniform_predictions_score_one():
  assert fid.inception_score(np.zeros((100, 1008))) == pytest.approx(1.0, abs=1e-12)
  assert fid.inception_score(np.full((37, 10), 3.0), splits=3) == pytest.approx(1.0, abs=1e-12)


def test_confident_predictions_over_k_used_classes_score_k():
  k, per_split = 8, 5 * 8
  labels = np.tile(np.arange(k), 10 * per_split // k)  # every split uses all K
  logits = np.full((len(labels), 20), -60.0)  # 12 classes never predicted
  logits[np.arange(len(labels)), labels] = 60.0
  score, std = fid.inception_score(logits, splits=10, return_std=True)
  assert score == pytest.approx(k, rel=1e-9) and std < 1e-9
  # One class per split: p(y) is one-hot too, the score is 1.
  assert fid.inception_score(logits[np.argsort(labels, kind="stable")], splits=k) == pytest.approx(
    1.0, rel=1e-9
  )


def test_split_bounds_match_improved_gan_and_adm():
  """splits=S: improved-GAN's i*N//S bounds; split_size: ADM's fixed chunks,
  the last keeping the remainder (here 5, 5, 2)."""
  logits = np.random.default_rng(3).normal(size=(12, 6)) * 2

  def score(rows):
    p = np.exp(rows) / np.exp(rows).sum(1, keepdims=True)
    py = p.mean(0)
    return np.exp(np.mean([(pi * np.log(pi / py)).sum() for pi in p]))

  by_count = [score(logits[i * 12 // 5 : (i + 1) * 12 // 5]) for i in range(5)]
  np.testing.assert_allclose(fid.inception_score_splits(logits, 5), by_count, rtol=1e-12)
  by_size = [score(logits[0:5]), score(logits[5:10]), score(logits[10:12])]
  np.testing.assert_allclose(fid.inception_score_splits(logits, split_size=5), by_size, rtol=1e-12)
  assert fid.inception_score(logits, split_size=5) == pytest.approx(np.mean(by_size))
  with pytest.raises(ValueError, match="splits=13 for 12 samples"):
    fid.inception_score(logits, splits=13)


# --------------------------------------------------------------------------- precision, recall


@pytest.mark.parametrize(
  "n,m,d,k,batch,shift",
  [
    (30, 25, 4, 3, 7, 0.8),
    (50, 41, 16, 3, 11, 0.8),
    (23, 60, 8, 1, 4, 0.8),
    (40, 40, 3, 5, 1000, 1.5),
  ],
)
def test_precision_recall_match_brute_force_knn(n, m, d, k, batch, shift):
  rng = np.random.default_rng(n * m + d)
  real = rng.normal(size=(n, d)).astype(np.float32)
  fake = (rng.normal(size=(m, d)) * 1.3 + shift).astype(np.float32)
  expected = brute_force_pr(real, fake, k)
  assert fid.precision_recall(real, fake, k=k, batch_size=batch) == pytest.approx(
    expected, abs=1e-12
  )
  assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # the case is not trivial


def test_radii_are_kth_neighbour_excluding_self_with_duplicates():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(20, 6)).astype(np.float32) * 10
  x[5] = x[6] = x[7] = x[8] = x[9]  # 5 copies: 4 others at distance 0
  radii = fid.manifold_radii(x, k=3, batch_size=6)
  d = ((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1)
  expected = [np.sort(np.delete(d[i], i))[2] for i in range(len(x))]
  np.testing.assert_allclose(radii, expected, rtol=1e-5)
  assert (radii[5:10] == 0).all()
  # A sample equal to the duplicated point is on the manifold (radius 0, distance 0).
  precision, _ = fid.precision_recall(x, np.repeat(x[5:6], 4, axis=0), k=3, batch_size=3)
  assert precision == 1.0


def test_precision_recall_analytic_cases():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(33, 10)).astype(np.float32)
  assert fid.precision_recall(x, x.copy(), batch_size=8) == (1.0, 1.0)
  assert fid.precision_recall(x, x + 1000.0, batch_size=8) == (0.0, 0.0)
  with pytest.raises(ValueError, match="3 features for k=3"):
    fid.precision_recall(x[:3], x)
  with pytest.raises(ValueError, match="10 dimensions and fake ones 9"):
    fid.precision_recall(x, x[:, :9])


# --------------------------------------------------------------------------- npz files


def reference_npz(path, *, stats=True, images=True, compressed=False, res=8):
  rng = np.random.default_rng(7)
  arrays = {}
  if stats:
    arrays.update(
      mu=rng.normal(size=6), sigma=np.eye(6) * 2, mu_s=rng.normal(size=4), sigma_s=np.eye(4) * 3
    )
  if images:
    arrays["arr_0"] = rng.integers(0, 256, size=(5, res, res, 3), dtype=np.uint8)
  (np.savez_compressed if compressed else np.savez)(path, **arrays)
  return arrays


@pytest.mark.parametrize("compressed", [False, True])
def test_reference_batch_with_statistics_and_images(tmp_path, compressed):
  arrays = reference_npz(tmp_path / "ref.npz", compressed=compressed)
  ref = fid.ReferenceBatch(tmp_path / "ref.npz")
  assert ref.resolution == 8 and ref.num_images == 5
  np.testing.assert_array_equal(ref.fid.mu, arrays["mu"])
  np.testing.assert_array_equal(ref.fid.sigma, arrays["sigma"])
  np.testing.assert_array_equal(ref.sfid.sigma, arrays["sigma_s"])
  assert ref.fid.sigma.dtype == np.float64
  np.testing.assert_array_equal(ref.images, arrays["arr_0"])
  assert isinstance(ref.images, np.memmap) != compressed  # memory-mapped when stored
  assert "fid" in repr(ref)


def test_reference_batch_of_images_only_or_statistics_only(tmp_path):
  reference_npz(tmp_path / "images.npz", stats=False)
  ref = fid.ReferenceBatch(tmp_path / "images.npz")
  assert ref.fid is None and ref.sfid is None and ref.images.shape == (5, 8, 8, 3)
  reference_npz(tmp_path / "stats.npz", images=False)
  ref = fid.ReferenceBatch(tmp_path / "stats.npz")
  assert ref.images is None and ref.resolution is None and ref.fid.mu.shape == (6,)


def test_reference_batch_errors(tmp_path):
  with pytest.raises(MissingPathError, match="is not there"):
    fid.ReferenceBatch(tmp_path / "nope.npz")
  with pytest.raises(PathError, match="is a folder"):
    fid.ReferenceBatch(tmp_path)
  (tmp_path / "text.npz").write_text("not a zip")
  with pytest.raises(FileFormatError, match="not an npz file"):
    fid.ReferenceBatch(tmp_path / "text.npz")
  np.savez(tmp_path / "half.npz", mu=np.zeros(3))
  with pytest.raises(FileFormatError, match="has 'mu' but not 'sigma'"):
    fid.ReferenceBatch(tmp_path / "half.npz")
  np.savez(tmp_path / "other.npz", x=np.zeros(3))
  with pytest.raises(FileFormatError, match="none of mu/sigma"):
    fid.ReferenceBatch(tmp_path / "other.npz")


def test_load_images_npz_valid(tmp_path):
  adm = np.random.default_rng(8).integers(0, 256, size=(4, 6, 6, 3), dtype=np.uint8)
  np.savez(tmp_path / "adm.npz", arr_0=adm)
  got = fid.load_images_npz(tmp_path / "adm.npz", expect_resolution=6)
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got, adm)
  ours = np.random.default_rng(9).uniform(size=(5, 6, 6, 3)).astype(np.float32)
  ours[0, 0, 0] = [0.0, 1.0, 1.0 + 1e-4]  # rounding slack is clipped
  np.savez(tmp_path / "ours.npz", images=ours, prompts=np.array(["a"] * 5))
  got = fid.load_images_npz(tmp_path / "ours.npz", chunk=2)
  np.testing.assert_array_equal(got, np.clip(np.round(ours * 255), 0, 255).astype(np.uint8))
  assert got[0, 0, 0].tolist() == [0, 255, 255]
  gray = np.zeros((3, 8, 8, 1), np.uint8)  # the digits model's samples
  np.savez(tmp_path / "gray.npz", arr_0=gray, arr_1=np.arange(3))
  assert fid.load_images_npz(tmp_path / "gray.npz", channels=None).shape == (3, 8, 8, 1)
  with pytest.raises(
    FileFormatError, match=r"shape \(3, 8, 8, 1\); expected images \[N, H, W, 3\]"
  ):
    fid.load_images_npz(tmp_path / "gray.npz")


@pytest.mark.parametrize(
  "arrays,phrase",
  [
    (dict(x=np.zeros((2, 4, 4, 3), np.uint8)), "neither 'arr_0'"),
    (
      dict(arr_0=np.zeros((4, 4, 3), np.uint8)),
      r"shape \(4, 4, 3\); expected images \[N, H, W, 3\]",
    ),
    (dict(arr_0=np.zeros((2, 4, 4, 4), np.uint8)), r"shape \(2, 4, 4, 4\)"),
    (
      dict(arr_0=np.zeros((2, 4, 4, 3), np.float32)),
      "'arr_0' is float32; ADM's sample format is uint8",
    ),
    (dict(images=np.zeros((2, 4, 4, 3), np.uint8)), "'images' is uint8; expected float"),
    (dict(images=np.full((2, 4, 4, 3), -1.0, np.float32)), r"outside \[0, 1\] \(\[-1, -1\]"),
    (dict(images=np.full((2, 4, 4, 3), np.nan, np.float32)), "NaN/inf"),
  ],
)
def test_load_images_npz_rejects(tmp_path, arrays, phrase):
  np.savez(tmp_path / "bad.npz", **arrays)
  with pytest.raises(FileFormatError, match=phrase):
    fid.load_images_npz(tmp_path / "bad.npz")


def test_load_images_npz_missing_and_wrong_resolution(tmp_path):
  with pytest.raises(MissingPathError, match="nope.npz is not there"):
    fid.load_images_npz(tmp_path / "nope.npz")
  np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
  with pytest.raises(
    FileFormatError,
    match="samples are 4x4 but the reference batch is 8x8; sample at the reference's resolution",
  ):
    fid.load_images_npz(tmp_path / "s.npz", expect_resolution=8)
  with zipfile.ZipFile(tmp_path / "s.npz") as z:
    assert z.namelist() == ["arr_0.npy"]


# --------------------------------------------------------------------------- image_metrics


def features(rng, n, shift=0.0):
  return dict(
    pool=rng.normal(size=(n, 6)) + shift,
    spatial=rng.normal(size=(n, 4)) * 2,
    logits=rng.normal(size=(n, 10)) * 3,
  )


def test_image_metrics_with_stored_statistics(tmp_path):
  arrays = reference_npz(tmp_path / "ref.npz")
  ref = fid.ReferenceBatch(tmp_path / "ref.npz")
  rng = np.random.default_rng(10)
  samples, reals = features(rng, 60), features(rng, 50, shift=0.5)
  out = fid.image_metrics(samples, reals, ref, ("fid", "sfid", "is", "precision_recall"))
  assert set(out) == {"fid", "sfid", "inception_score", "precision", "recall"}
  mu, cov = mean_cov(samples["pool"])
  assert out["fid"] == pytest.approx(
    frechet_by_eigenvalues(mu, cov, arrays["mu"], arrays["sigma"]), rel=1e-8
  )
  mu_s, cov_s = mean_cov(samples["spatial"])
  assert out["sfid"] == pytest.approx(
    frechet_by_eigenvalues(mu_s, cov_s, arrays["mu_s"], arrays["sigma_s"]), rel=1e-8
  )
  assert out["inception_score"] == pytest.approx(
    fid.inception_score(samples["logits"], splits=1)
  )  # 60 < 5000
  assert (out["precision"], out["recall"]) == pytest.approx(
    brute_force_pr(reals["pool"], samples["pool"], 3), abs=1e-12
  )
  assert fid.image_metrics(samples, None, ref, ["fid"]).keys() == {"fid"}


def test_image_metrics_from_reference_features_only():
  rng = np.random.default_rng(11)
  samples, reals = features(rng, 40), features(rng, 45)
  out = fid.image_metrics(samples, reals, None, ("fid", "sfid"))
  for key, feature in (("fid", "pool"), ("sfid", "spatial")):
    expected = frechet_by_eigenvalues(*mean_cov(samples[feature]), *mean_cov(reals[feature]))
    assert out[key] == pytest.approx(expected, rel=1e-8)
  with pytest.raises(ConfigError, match="fid needs the reference Inception features 'pool'"):
    fid.image_metrics(samples, None, None, ["fid"])


def test_image_metrics_errors(tmp_path):
  reference_npz(tmp_path / "stats.npz", images=False)
  ref = fid.ReferenceBatch(tmp_path / "stats.npz")
  rng = np.random.default_rng(12)
  samples = features(rng, 20)
  with pytest.raises(ConfigError, match="holds only statistics; use a reference npz with arr_0"):
    fid.image_metrics(samples, None, ref, ["precision_recall"])
  with pytest.raises(
    ConfigError,
    match=r"\['kid'\] are not known; the known ones are "
    r"\('fid', 'sfid', 'is', 'precision_recall'\)",
  ):
    fid.image_metrics(samples, None, ref, ["fid", "kid"])
  assert set(fid.image_metrics(samples, None, ref, "fid")) == {"fid"}  # a single name
