"""Per-sample loss weights w: pure functions on tensors.

* :func:`soft_weights` -- NoiseRater's soft weighting: rater scores s -> w = n * softmax(s / tau) along
  one dimension, so mean(w) == 1 there and uniform scores give the plain loss.
* :func:`candidate_soft_weights` -- the per-candidate scope used in meta-training by default: for each
  (x0, t) group of N candidate noises, w = N * softmax(s / tau) over that group's N scores.
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


WEIGHTING_SCOPES = ("candidates", "batch")


def candidate_soft_weights(scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    r"""Per-candidate soft weights: one softmax per (x0, t) group of N candidate noises.

    w_bn = N * exp(s_bn / tau) / sum_m exp(s_bm / tau), so every group's weights have mean 1 and the
    weighted loss (1 / (B N)) sum_bn w_bn l_bn gives every image x0_b the same total weight; only the
    split of that weight among its N noises is learned. This is the question stage 2 asks the rater
    (which of N noises for this x0 at this t): as tau -> 0 the weights tend to N * one_hot(argmax_n s_bn),
    i.e. the soft weighting becomes the hard argmax selection of
    :class:`noise_rater.NoiseSelectingSampler` (up to the factor N, which the mean over B*N samples
    cancels). A batch-wide softmax (:func:`soft_weights` over all B*N scores) instead also trades weight
    between images and timesteps, which stage 2 cannot use.

    Args:
        scores (`torch.Tensor` of shape `(B, N)`): rater scores of N candidates for each of B groups.
        temperature (`float`): tau > 0.

    Returns:
        `torch.Tensor` of shape `(B, N)`: weights, mean 1 along dim 1. Differentiable.

    Raises:
        ValueError: if ``scores`` is not 2-D or ``temperature`` <= 0.
    """
    if scores.dim() != 2:
        raise ValueError(f"candidate scores must have shape (B, N), got {tuple(scores.shape)}")
    return soft_weights(scores, temperature, dim=1)


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
