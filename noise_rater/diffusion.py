"""The diffusion loss, defined once for stage 1, stage 2 and evaluation.

Paper symbols: x0 (clean images), eps (noise), t (timesteps), x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,
the model prediction and its target (eps, v or x0 depending on ``prediction_type``).
"""

from typing import Any, Callable, Optional

import torch


def noisy_sample(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """x_t = scheduler.add_noise(x0, eps, t). Shapes: `(B, C, H, W)`, `(B, C, H, W)`, `(B,)`."""
    return scheduler.add_noise(x0, noise, timesteps)


def diffusion_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The regression target for the scheduler's ``prediction_type``.

    ``"epsilon"`` -> eps, ``"v_prediction"`` -> v = sqrt(abar) eps - sqrt(1 - abar) x0, ``"sample"`` -> x0.
    Shapes `(B, C, H, W)`.
    """
    pred_type = scheduler.config.prediction_type
    if pred_type == "epsilon":
        return noise
    if pred_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    if pred_type == "sample":
        return x0
    raise ValueError(f"Unknown prediction_type {pred_type!r}; expected 'epsilon', 'v_prediction' or 'sample'.")


def model_output(out: Any) -> torch.Tensor:
    """Extract the prediction tensor from a diffusers model output (`.sample`, tuple or tensor)."""
    if torch.is_tensor(out):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return out[0]


def call_denoiser(model: Callable, x_t: torch.Tensor, timesteps: torch.Tensor, class_labels=None) -> torch.Tensor:
    """Call a denoiser with the diffusers signature ``model(x_t, t, class_labels=...)``."""
    if class_labels is None:
        return model_output(model(x_t, timesteps))
    return model_output(model(x_t, timesteps, class_labels=class_labels))


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample: `(B, ...)` x `(B, ...)` -> `(B,)` (computed in float32 or wider)."""
    diff = pred.float() - target.float() if pred.dtype in (torch.float16, torch.bfloat16) else pred - target
    return diff.pow(2).flatten(1).mean(dim=1)


def per_sample_diffusion_loss(
    model: Callable,
    scheduler,
    x0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    class_labels: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""l_i = || model(x_t, t) - target(x0, eps, t) ||^2 / d for each sample i.

    Args:
        model: denoiser called as ``model(x_t, t, class_labels=...)`` (a ``UNet2DModel``, a DiT, or a
            ``functools.partial`` of ``torch.func.functional_call``).
        scheduler: a diffusers ``DDPMScheduler`` (or any scheduler with ``add_noise``/``get_velocity``).
        x0, noise (`torch.Tensor` of shape `(B, C, H, W)`), timesteps (`(B,)` int64).

    Returns:
        `torch.Tensor` of shape `(B,)`.
    """
    x_t = noisy_sample(scheduler, x0, noise, timesteps)
    pred = call_denoiser(model, x_t, timesteps, class_labels)
    return per_sample_mse(pred, diffusion_target(scheduler, x0, noise, timesteps))


def sample_timesteps(batch_size: int, num_train_timesteps: int, generator=None, device=None) -> torch.Tensor:
    """t ~ Uniform{0, ..., T-1}, shape `(B,)` int64, drawn with ``generator`` (on CPU, then moved)."""
    gen_device = generator.device if generator is not None else "cpu"
    t = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=gen_device)
    return t.to(device) if device is not None else t
