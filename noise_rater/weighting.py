"""Per-sample loss weights w: pure functions on tensors.

* :func:`soft_weights` -- NoiseRater's soft weighting used in meta-training: rater scores s of a
  batch -> w = B * softmax(s / tau), so mean(w) == 1 and uniform scores give the plain loss.
* :func:`min_snr_weights` -- the Min-SNR-gamma baseline (Hang et al. 2023).
* :func:`compute_snr` -- SNR(t) = alpha_bar_t / (1 - alpha_bar_t) from a scheduler.
"""

from typing import Optional

import torch


def soft_weights(scores: torch.Tensor, temperature: float = 1.0, dim: int = 0) -> torch.Tensor:
    r"""Softmax-normalised weights with mean 1.

    w_i = n * exp(s_i / tau) / sum_j exp(s_j / tau), where n is the size of ``dim``.

    * tau -> infinity: w -> 1 (the plain, unweighted loss).
    * tau -> 0: w -> n * one_hot(argmax s) (all weight on the best sample).

    Args:
        scores (`torch.Tensor` of shape `(B,)` or `(..., B, ...)`): rater scores s.
        temperature (`float`): tau > 0.
        dim (`int`): the batch dimension the softmax runs over.

    Returns:
        `torch.Tensor` with the shape of ``scores``: weights w, mean 1 along ``dim``. Differentiable.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    n = scores.shape[dim]
    return n * torch.softmax(scores / temperature, dim=dim)


def compute_snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    r"""SNR(t) = alpha_bar_t / (1 - alpha_bar_t).

    Args:
        alphas_cumprod (`torch.Tensor` of shape `(T,)`): e.g. ``DDPMScheduler.alphas_cumprod``.
        timesteps (`torch.Tensor` of shape `(B,)`, int64).

    Returns:
        `torch.Tensor` of shape `(B,)`, float32 (computed in float64); +inf where alpha_bar_t == 1.
    """
    ac = alphas_cumprod.to(device=timesteps.device, dtype=torch.float64)[timesteps.long()]
    return (ac / (1.0 - ac)).float()


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str = "epsilon") -> torch.Tensor:
    r"""Min-SNR-gamma loss weights for the MSE on each prediction target.

    The weight that turns each target's MSE into the x0-MSE clipped at gamma:

    * ``"epsilon"``: w = min(SNR, gamma) / SNR (= 1 where SNR <= gamma, so finite at SNR = 0)
    * ``"v_prediction"``: w = min(SNR, gamma) / (SNR + 1)
    * ``"sample"``: w = min(SNR, gamma)

    Args:
        snr (`torch.Tensor` of shape `(B,)`): signal-to-noise ratios, >= 0.
        gamma (`float`): clipping value, > 0 (5 in the paper).
        prediction_type (`str`): the scheduler's ``prediction_type``.

    Returns:
        `torch.Tensor` of shape `(B,)`.
    """
    if not gamma > 0:
        raise ValueError(f"snr_gamma must be > 0, got {gamma!r}")
    gamma_t = torch.full_like(snr, float(gamma))
    clipped = torch.minimum(snr, gamma_t)
    if prediction_type == "epsilon":
        # min(snr, g) / snr, written so that snr == 0 (zero terminal SNR) gives 1, not NaN.
        return torch.where(snr <= gamma_t, torch.ones_like(snr), gamma_t / snr)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    if prediction_type == "sample":
        return clipped
    raise ValueError(
        f"Unknown prediction_type {prediction_type!r}; expected 'epsilon', 'v_prediction' or 'sample'."
    )


def normalize_weights(weights: torch.Tensor, eps: Optional[float] = None) -> torch.Tensor:
    """Rescale weights `(B,)` to mean 1 (a constant factor; keeps the loss scale comparable)."""
    mean = weights.mean()
    if eps is not None:
        mean = mean.clamp_min(eps)
    return weights / mean
