"""Evaluation of trained diffusion models, one job per module.

* :mod:`.validation`: held-out diffusion loss on fixed (x0, eps, t) triples, overall and per timestep band.
* :mod:`.features`: offline image feature extractors (EfficientNet-Lite0, local Inception-v3, DINOv2 through
  ``transformers``).
* :mod:`.distances`: Frechet distance and KID between two feature sets.
* :mod:`.generation`: sampling a ``DDPMPipeline`` deterministically.
* ``fd_metric/``: FD / KID as an ``evaluate`` metric, ``evaluate.load(FD_METRIC_PATH)``.
* :mod:`.pipeline_metrics`: :func:`evaluate_pipeline`, all of the above for one trained pipeline.

FD-EffLite0 (the default) is **not** FID and is **not comparable to published FID numbers**; use it to rank
models evaluated with this same code.
"""

from .distances import (
    RankDeficientCovarianceWarning,
    covariance_rank_warning,
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
    polynomial_mmd2_unbiased,
)
from .features import (
    FEATURE_EXTRACTORS,
    Dinov2Features,
    EfficientNetLite0Features,
    InceptionFeatures,
    build_feature_extractor,
    compute_features,
)
from .generation import generate_images, load_pipeline
from .pipeline_metrics import FD_METRIC_PATH, evaluate_pipeline, load_fd_metric
from .validation import make_eval_triples, make_validation_triples, run_validation, validation_loss

__all__ = [
    "make_eval_triples",
    "validation_loss",
    "make_validation_triples",
    "run_validation",
    "feature_statistics",
    "frechet_distance",
    "polynomial_mmd2_unbiased",
    "kernel_inception_distance",
    "covariance_rank_warning",
    "RankDeficientCovarianceWarning",
    "EfficientNetLite0Features",
    "InceptionFeatures",
    "Dinov2Features",
    "FEATURE_EXTRACTORS",
    "build_feature_extractor",
    "compute_features",
    "generate_images",
    "load_pipeline",
    "FD_METRIC_PATH",
    "load_fd_metric",
    "evaluate_pipeline",
]
