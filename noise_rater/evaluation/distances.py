"""Distances between two sets of image features: Frechet distance (FID-style) and KID.

* :func:`feature_statistics`: mean and covariance of `(N, D)` features.
* :func:`frechet_distance`: the Frechet distance between two Gaussians (Dowson & Landau, 1982; used as FID by
  Heusel et al., 2017, and as FD_DINOv2 by Stein et al., 2023 / EDM2).
* :func:`polynomial_mmd2_unbiased`, :func:`kernel_inception_distance`: unbiased polynomial-kernel MMD^2
  (KID, Binkowski et al., 2018).
* :func:`covariance_rank_warning`: the message for a feature set too small for a full-rank covariance.

Nothing here depends on which network produced the features.
"""

import warnings
from typing import Optional, Tuple

import numpy as np
import torch

__all__ = [
    "feature_statistics",
    "frechet_distance",
    "polynomial_mmd2_unbiased",
    "kernel_inception_distance",
    "covariance_rank_warning",
    "RankDeficientCovarianceWarning",
]


class RankDeficientCovarianceWarning(UserWarning):
    """A feature set has no more samples than feature dimensions, so its covariance is singular."""


def covariance_rank_warning(num_samples: int, feature_dim: int, what: str = "real images",
                            feature_name: str = "image") -> Optional[str]:
    r"""The reason why the covariance of ``num_samples`` feature vectors of dimension ``feature_dim`` is singular.

    A sample covariance of `n` vectors in `R^D` has rank at most `n - 1`, so for `n <= D` it is singular: the
    Frechet distance then rests on a degenerate Gaussian and is biased upwards and unstable (and
    ``scipy.linalg.sqrtm`` may report a singular matrix).

    Args:
        num_samples (`int`): `n`. feature_dim (`int`): `D`.
        what (`str`): what the samples are, for the message (e.g. ``"real images"``).
        feature_name (`str`): the feature space, for the message (e.g. ``"FD-EffLite0"``).

    Returns:
        The message (a `str`) when `n <= D`, else None.
    """
    n, d = int(num_samples), int(feature_dim)
    if n > d:
        return None
    return (
        f"Only {n} {what} for {d}-dimensional {feature_name} features: a covariance of n <= D samples has rank at "
        f"most n - 1 = {n - 1} < {d}, so it is singular and the Frechet distance is biased and unstable. Use more "
        f"than {d} {what} (several times {d} is better), or a feature extractor with fewer dimensions; KID does "
        "not need a full-rank covariance."
    )


def feature_statistics(feats) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of features.

    Args:
        feats (`np.ndarray` or `torch.Tensor` of shape `(N, D)`), `N >= 2`.

    Returns:
        ``(mu, sigma)``: `(D,)` and `(D, D)` float64 (unbiased covariance, ``np.cov(rowvar=False)``).
    """
    feats = _as_numpy_2d(feats)
    if feats.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {feats.shape[0]}")
    return feats.mean(axis=0), np.atleast_2d(np.cov(feats, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "sqrtm") -> float:
    r"""Frechet distance between `N(mu1, sigma1)` and `N(mu2, sigma2)`.

    `FD = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2})`, computed like pytorch-fid with
    ``scipy.linalg.sqrtm``: if the matrix square root is not finite (singular product, e.g. fewer samples
    than feature dimensions) ``eps * I`` is added to both covariances; negligible imaginary parts from
    numerical error are dropped (a significant one raises ``ValueError``).

    Args:
        mu1, mu2 (`(D,)`), sigma1, sigma2 (`(D, D)`): means and covariances (e.g. from
            :func:`feature_statistics`).
        eps (`float`, defaults to 1e-6): diagonal offset used only when the plain square root fails.
        method (`str`, defaults to ``"sqrtm"``): ``"sqrtm"`` is the pytorch-fid computation (slow for large `D`:
            ~10-20 s for `D = 1280` on 2 CPU cores). ``"eigh"`` computes the same trace term exactly for
            symmetric PSD covariances as `sum_i sqrt(lambda_i(R^T sigma2 R))` with `sigma1 = R R^T` (Cholesky,
            or an eigendecomposition if `sigma1` is singular) and one symmetric eigenvalue solve (~0.5 s for
            `D = 1280`; eigenvalues clipped at 0, robust for singular covariances, no eps needed); the two
            methods agree to numerical precision.

    Returns:
        `float`.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different lengths: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape:
        raise ValueError(f"covariances have different dimensions: {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    if method == "eigh":
        tr = np.trace(sigma1) + np.trace(sigma2) - 2.0 * _trace_sqrt_product_psd(sigma1, sigma2)
        return float(diff.dot(diff) + tr)
    if method != "sqrtm":
        raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}")

    def _sqrt_trace(a, b):
        # A singular product is handled below (eps * I retry); scipy's own bare warning about it is not shown
        # (see covariance_rank_warning for the reason users get instead).
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            covmean = linalg.sqrtm(a.dot(b))
        covmean = np.asarray(covmean)
        if not np.isfinite(covmean).all():
            return None
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                return None
            covmean = covmean.real
        return float(np.trace(covmean))

    tr_covmean = _sqrt_trace(sigma1, sigma2)
    if tr_covmean is None:
        offset = np.eye(sigma1.shape[0]) * eps
        tr_covmean = _sqrt_trace(sigma1 + offset, sigma2 + offset)
        if tr_covmean is None:
            raise ValueError("frechet_distance: sqrtm(sigma1 @ sigma2) is not finite or has a large imaginary "
                             "component even after adding eps * I; use more samples or a larger eps")
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def _trace_sqrt_product_psd(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """`Tr((sigma1 sigma2)^{1/2})` for symmetric PSD matrices.

    With any factorisation `sigma1 = R R^T` (Cholesky, or `V diag(sqrt(w))` from an eigendecomposition when
    `sigma1` is singular), `R^T sigma2 R` is symmetric PSD and has the same eigenvalues as `sigma1 sigma2`, so
    the trace of the square root is `sum_i sqrt(lambda_i(R^T sigma2 R))` (negative round-off clipped to 0).
    """
    sigma1 = (sigma1 + sigma1.T) / 2.0
    try:
        root = np.linalg.cholesky(sigma1)
    except np.linalg.LinAlgError:
        w, v = np.linalg.eigh(sigma1)
        root = v * np.sqrt(np.clip(w, 0.0, None))
    m = root.T @ sigma2 @ root
    ev = np.linalg.eigvalsh((m + m.T) / 2.0)
    return float(np.sqrt(np.clip(ev, 0.0, None)).sum())


def polynomial_mmd2_unbiased(x, y) -> float:
    r"""Unbiased MMD^2 between samples ``x`` `(m, D)` and ``y`` `(n, D)` with the KID kernel.

    Kernel `k(a, b) = (a . b / D + 1)^3` (Binkowski et al., 2018). Estimator:
    `sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1)) - 2 sum_{i, j} k(x_i, y_j) / (m n)`.
    Its expectation is the population MMD^2 (0 for equal distributions), so a value can be negative.
    """
    x, y = _as_numpy_2d(x), _as_numpy_2d(y)
    m, n, d = x.shape[0], y.shape[0], x.shape[1]
    if y.shape[1] != d:
        raise ValueError(f"feature dimensions differ: {d} vs {y.shape[1]}")
    if m < 2 or n < 2:
        raise ValueError("unbiased MMD^2 needs at least 2 samples on each side")
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    return float(
        (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
        + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
        - 2.0 * k_xy.sum() / (m * n)
    )


def kernel_inception_distance(
    f1, f2, *, num_subsets: int = 10, subset_size: int = 1000, seed: int = 0
) -> Tuple[float, float]:
    r"""Kernel (Inception) Distance: unbiased polynomial-kernel MMD^2 averaged over random subsets.

    For each of ``num_subsets`` subsets, `m = min(subset_size, len(f1), len(f2))` rows are drawn without
    replacement from each feature set (``np.random.default_rng(seed)``) and :func:`polynomial_mmd2_unbiased`
    is computed. Despite the name, works on any features (e.g. EfficientNet-Lite0).

    Args:
        f1 (`(N1, D)`), f2 (`(N2, D)`): feature arrays (numpy or torch).
        num_subsets (`int`, defaults to 10), subset_size (`int`, defaults to 1000), seed (`int`, defaults to 0).

    Returns:
        ``(mean, std)`` over subsets (floats; ``std`` is the population std of the subset values).
    """
    f1, f2 = _as_numpy_2d(f1), _as_numpy_2d(f2)
    m = min(int(subset_size), f1.shape[0], f2.shape[0])
    if m < 2:
        raise ValueError(f"KID needs subsets of at least 2 samples, got {m}")
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets, dtype=np.float64)
    for s in range(num_subsets):
        x = f1[rng.choice(f1.shape[0], m, replace=False)]
        y = f2[rng.choice(f2.shape[0], m, replace=False)]
        values[s] = polynomial_mmd2_unbiased(x, y)
    return float(values.mean()), float(values.std())


def _as_numpy_2d(a) -> np.ndarray:
    if torch.is_tensor(a):
        a = a.detach().cpu().double().numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"expected features of shape (N, D), got {a.shape}")
    return a

