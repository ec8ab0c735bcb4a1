"""One call that evaluates a trained ``DDPMPipeline``: held-out diffusion loss, then FD / KID of its samples.

The FD / KID numbers come from the project's ``evaluate`` metric (:data:`FD_METRIC_PATH`, loaded with
``evaluate.load``), the samples from :func:`noise_rater.evaluation.generation.generate_images` and the loss from
:func:`noise_rater.evaluation.validation.validation_loss`.
"""

import os
from typing import Dict, Optional, Union

import numpy as np
import torch

from .generation import generate_images, load_pipeline
from .validation import validation_loss

__all__ = ["FD_METRIC_PATH", "load_fd_metric", "evaluate_pipeline"]

#: Folder of the FD / KID ``evaluate`` metric: ``evaluate.load(FD_METRIC_PATH)`` returns it, offline.
FD_METRIC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fd_metric")


def load_fd_metric(config_name: Optional[str] = None, **kwargs):
    """``evaluate.load(FD_METRIC_PATH, config_name, **kwargs)``: the FD / KID metric (see its README.md)."""
    import evaluate

    return evaluate.load(FD_METRIC_PATH, config_name, **kwargs)


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
    dinov2_checkpoint: Optional[str] = None,
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

    ``real_features`` (optional) maps an extractor name (``"efflite0"``, ``"inception"``, ``"dinov2"``) to the
    precomputed `(M, D)` features of ``real_images``; it is filled in place with those computed here, so a caller
    that evaluates many pipelines against the same real images extracts their features once.

    Generated samples are quantised to 8 bits (as saved PNGs would be) before feature extraction. FD / KID come
    from the ``evaluate`` metric at :data:`FD_METRIC_PATH`; it warns (``RankDeficientCovarianceWarning``) when a
    side has no more images than feature dimensions.

    Args:
        pipeline_path: ``DDPMPipeline`` folder (or a loaded pipeline).
        real_images (`torch.Tensor` `(M, C, H, W)` in `[-1, 1]`, *optional*): held-out real images. If None or
            ``num_samples == 0``, no sampling metrics are computed.
        num_samples (`int`): number of generated images.
        num_inference_steps, scheduler (``"ddim"``/``"ddpm"``), seed: see :func:`generate_images`; ``seed`` also
            seeds the KID subsets.
        feature_extractor (`str` or None, defaults to ``"efflite0"``): ``"efflite0"`` computes FD-EffLite0 and
            KID on EfficientNet-Lite0 features (not comparable to published FID); None skips it.
        inception_weights (`str`, *optional*): local pytorch-fid Inception weights; adds ``"fid_inception"``
            (and ``"kid_inception_mean/std"``).
        dinov2_checkpoint (`str`, *optional*): a local DINOv2 folder or Hub id (e.g. ``facebook/dinov2-large``);
            adds ``"fd_dinov2"`` (FD_DINOv2) and ``"kid_dinov2_mean/std"``.
        triples (`dict`, *optional*): from :func:`make_eval_triples`; adds ``"val_loss"``,
            ``"val_loss_band_k"``, ``"val_band_edges"`` computed with the pipeline's unet and (training)
            scheduler config.
        batch_size (`int`): sampling / feature / loss batch size. device: defaults to CUDA if available.
        kid_subset_size, kid_num_subsets, loss_bands, fd_method: see :func:`kernel_inception_distance`,
            :func:`validation_loss`, :func:`frechet_distance` (``"eigh"`` is much faster for 1280/2048-D
            features and agrees with ``"sqrtm"`` to numerical precision).

    Returns:
        `dict` of floats: ``"fd_efflite0"``, ``"kid_efflite0_mean"``, ``"kid_efflite0_std"``, optionally
        ``"fid_inception"``, ``"kid_inception_*"``, ``"fd_dinov2"``, ``"kid_dinov2_*"``, ``"val_*"``, plus
        ``"num_samples"`` and ``"num_real"``.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if feature_extractor not in (None, "efflite0"):
        raise ValueError(f"feature_extractor must be 'efflite0' or None, got {feature_extractor!r}")
    pipe = load_pipeline(pipeline_path)
    metrics: Dict[str, Union[float, int, list]] = {}

    if triples is not None:
        from diffusers import DDPMScheduler

        train_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        unet = pipe.unet.to(device)
        val = validation_loss(unet, train_scheduler, triples, batch_size=max(batch_size, 1), bands=loss_bands)
        for k, v in val.items():
            metrics[f"val_{k}"] = v

    # (extractor name, FD key, weights)
    extractors = []
    if feature_extractor == "efflite0":
        extractors.append(("efflite0", "fd_efflite0", None))
    if inception_weights is not None:
        extractors.append(("inception", "fid_inception", inception_weights))
    if dinov2_checkpoint is not None:
        extractors.append(("dinov2", "fd_dinov2", dinov2_checkpoint))

    if real_images is not None and num_samples > 0 and extractors:
        fake = generate_images(pipe, num_samples, batch_size=batch_size, num_inference_steps=num_inference_steps,
                               scheduler=scheduler, seed=seed, device=device, quantize=True)
        metrics["num_samples"] = int(fake.shape[0])
        metrics["num_real"] = int(real_images.shape[0])
        real01 = (real_images.float() + 1.0) / 2.0
        fake01 = (fake + 1.0) / 2.0
        for name, fd_key, weights in extractors:
            metric = load_fd_metric(name, weights_path=weights, device=str(device), batch_size=max(batch_size, 1),
                                    keep_in_memory=True)
            if real_features is not None and name in real_features:
                f_real = real_features[name]
            else:
                f_real = metric.extract_features(real01, "real images")
                if real_features is not None:
                    real_features[name] = f_real
            metric.add_features(predictions=metric.extract_features(fake01, "generated images"), references=f_real)
            result = metric.compute(fd_method=fd_method, kid_subset_size=kid_subset_size,
                                    kid_num_subsets=kid_num_subsets, kid_seed=seed)
            del metric
            metrics[fd_key] = result["fd"]
            metrics[f"kid_{name}_mean"] = result["kid_mean"]
            metrics[f"kid_{name}_std"] = result["kid_std"]
    return metrics
