"""Sampling images from a trained ``DDPMPipeline`` for evaluation (deterministic for a given seed)."""

import os
from typing import Union

import numpy as np
import torch

__all__ = ["generate_images", "load_pipeline"]


def load_pipeline(pipeline_or_path):
    """A ``DDPMPipeline`` from a folder saved with ``save_pretrained``, or the given pipeline object as is."""
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

    pipe = load_pipeline(pipeline_or_path)
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
