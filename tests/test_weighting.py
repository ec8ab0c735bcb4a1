"""Per-sample loss weights against closed forms, hand-typed numbers and independent numpy computations."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from noise_rater.weighting import compute_snr, min_snr_weights, soft_weights

PRED_TYPES = ("epsilon", "v_prediction", "sample")


# --------------------------------------------------------------------------------------------------
# soft_weights
# --------------------------------------------------------------------------------------------------


def test_soft_weights_matches_numpy_by_hand():
    s = np.array([0.3, -1.2, 2.0, 0.7, 0.0], dtype=np.float64)
    tau = 0.5
    e = np.exp(s / tau)
    expected = len(s) * e / e.sum()
    w = soft_weights(torch.tensor(s), temperature=tau)
    assert w.shape == (5,)
    assert w.dtype == torch.float64
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-12, atol=0)
    # hand-typed sanity values for two scores: w = 2 * sigmoid(+-(s1 - s0) / tau)
    w2 = soft_weights(torch.tensor([0.0, math.log(3.0)], dtype=torch.float64), temperature=1.0)
    np.testing.assert_allclose(w2.numpy(), [0.5, 1.5], rtol=1e-12)


def test_soft_weights_mean_is_one():
    g = torch.Generator().manual_seed(0)
    for tau in (0.01, 0.3, 1.0, 7.0):
        s = 3 * torch.randn(17, generator=g, dtype=torch.float64)
        w = soft_weights(s, temperature=tau)
        assert abs(w.mean().item() - 1.0) < 1e-12
        assert (w >= 0).all()
    s32 = torch.randn(64, generator=g)
    assert abs(soft_weights(s32).mean().item() - 1.0) < 1e-6


def test_soft_weights_along_dim():
    s = np.array([[0.1, 0.4, -2.0], [1.0, 1.0, 3.0]], dtype=np.float64)
    w = soft_weights(torch.tensor(s), temperature=2.0, dim=1).numpy()
    e = np.exp(s / 2.0)
    np.testing.assert_allclose(w, 3 * e / e.sum(axis=1, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(w.mean(axis=1), [1.0, 1.0], rtol=1e-12)
    w0 = soft_weights(torch.tensor(s), temperature=2.0, dim=0).numpy()
    np.testing.assert_allclose(w0, 2 * e / e.sum(axis=0, keepdims=True), rtol=1e-12)


def test_soft_weights_temperature_limits():
    s = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=torch.float64)
    # tau -> infinity: the plain loss
    np.testing.assert_allclose(soft_weights(s, temperature=1e9).numpy(), np.ones(4), atol=1e-6, rtol=0)
    # tau -> 0: n * one_hot(argmax)
    np.testing.assert_allclose(soft_weights(s, temperature=1e-3).numpy(), [0.0, 0.0, 4.0, 0.0], atol=1e-6, rtol=0)
    # no overflow for huge s / tau
    w = soft_weights(torch.tensor([1e3, 0.0, -1e3]), temperature=1e-3)
    assert torch.isfinite(w).all()
    np.testing.assert_allclose(w.numpy(), [3.0, 0.0, 0.0], atol=1e-6)


def test_soft_weights_uniform_scores_give_ones():
    for c in (-5.0, 0.0, 12.3):
        w = soft_weights(torch.full((6,), c, dtype=torch.float64), temperature=0.2)
        np.testing.assert_allclose(w.numpy(), np.ones(6), rtol=1e-12)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan")])
def test_soft_weights_invalid_temperature(tau):
    with pytest.raises(ValueError):
        soft_weights(torch.zeros(3), temperature=tau)


def test_soft_weights_gradient_closed_form():
    # L = sum_i l_i w_i(s), w = n softmax(s / tau):  dL/ds_j = (w_j l_j - p_j sum_i w_i l_i) / tau
    s = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=torch.float64, requires_grad=True)
    l = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    tau = 0.7
    (grad,) = torch.autograd.grad((soft_weights(s, temperature=tau) * l).sum(), s)
    sn = s.detach().numpy()
    p = np.exp(sn / tau) / np.exp(sn / tau).sum()
    w = 4 * p
    ln = l.numpy()
    expected = (w * ln - p * (w * ln).sum()) / tau
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-10)
    assert np.abs(expected).max() > 0.1  # the check is not vacuous


# --------------------------------------------------------------------------------------------------
# compute_snr
# --------------------------------------------------------------------------------------------------


def linear_schedule_snr_f64():
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    return abar, abar / (1.0 - abar)


def test_compute_snr_matches_linear_schedule_formula():
    abar, snr_ref = linear_schedule_snr_f64()
    sched = DDPMScheduler(num_train_timesteps=1000)
    t = torch.tensor([0, 1, 10, 100, 250, 500, 750, 999])
    snr = compute_snr(sched.alphas_cumprod, t)
    assert snr.shape == (8,)
    assert snr.dtype == torch.float32
    # diffusers builds the schedule in float32: near t=0 1 - abar ~ 1e-4 carries ~1e-4 relative error.
    np.testing.assert_allclose(snr.numpy(), snr_ref[t.numpy()], rtol=2e-3)
    np.testing.assert_allclose(snr.numpy()[2:], snr_ref[t.numpy()][2:], rtol=2e-4)
    # hand value: SNR(0) = (1 - 1e-4) / 1e-4 = 9999
    assert snr[0].item() == pytest.approx(9999.0, rel=2e-3)
    # with a float64 schedule the only rounding is the float32 output
    snr64 = compute_snr(torch.tensor(abar), t)
    np.testing.assert_allclose(snr64.numpy(), snr_ref[t.numpy()], rtol=1e-6)
    # SNR decreases monotonically in t
    all_snr = compute_snr(sched.alphas_cumprod, torch.arange(1000))
    assert (all_snr[1:] < all_snr[:-1]).all()


def test_compute_snr_edge_values():
    ac = torch.tensor([1.0, 0.8, 0.5, 0.0], dtype=torch.float64)
    snr = compute_snr(ac, torch.tensor([0, 1, 2, 3, 2]))
    assert math.isinf(snr[0].item()) and snr[0].item() > 0
    np.testing.assert_allclose(snr[1:].numpy(), [4.0, 1.0, 0.0, 1.0], rtol=1e-7)


# --------------------------------------------------------------------------------------------------
# min_snr_weights
# --------------------------------------------------------------------------------------------------

SNR = torch.tensor([0.0, 0.5, 5.0, 20.0, float("inf")])
EXPECTED = {
    # min(snr, 5) / snr, with the limit 1 at snr = 0 and 0 at snr = inf
    "epsilon": [1.0, 1.0, 1.0, 0.25, 0.0],
    # min(snr, 5) / (snr + 1)
    "v_prediction": [0.0, 0.5 / 1.5, 5.0 / 6.0, 5.0 / 21.0, 0.0],
    # min(snr, 5)
    "sample": [0.0, 0.5, 5.0, 5.0, 5.0],
}


@pytest.mark.parametrize("pred", PRED_TYPES)
def test_min_snr_weights_hand_values(pred):
    w = min_snr_weights(SNR, gamma=5.0, prediction_type=pred)
    assert w.shape == SNR.shape
    assert torch.isfinite(w).all()
    np.testing.assert_allclose(w.numpy(), EXPECTED[pred], rtol=1e-6, atol=1e-7)


def test_min_snr_weights_float64_and_gamma_one():
    snr = torch.tensor([0.25, 1.0, 4.0], dtype=torch.float64)
    np.testing.assert_allclose(min_snr_weights(snr, 1.0, "epsilon").numpy(), [1.0, 1.0, 0.25], rtol=1e-12)
    np.testing.assert_allclose(min_snr_weights(snr, 1.0, "v_prediction").numpy(), [0.2, 0.5, 0.2], rtol=1e-12)
    np.testing.assert_allclose(min_snr_weights(snr, 1.0, "sample").numpy(), [0.25, 1.0, 1.0], rtol=1e-12)
    assert min_snr_weights(snr, 1.0).dtype == torch.float64


def test_min_snr_weights_invalid_args():
    with pytest.raises(ValueError):
        min_snr_weights(SNR, gamma=0.0)
    with pytest.raises(ValueError):
        min_snr_weights(SNR, gamma=-5.0)
    with pytest.raises(ValueError):
        min_snr_weights(SNR, gamma=5.0, prediction_type="flow")


@pytest.mark.parametrize("pred", PRED_TYPES)
def test_min_snr_weights_zero_terminal_snr_are_finite(pred):
    sched = DDPMScheduler(num_train_timesteps=1000, rescale_betas_zero_snr=True, prediction_type=pred)
    snr = compute_snr(sched.alphas_cumprod, torch.arange(1000))
    assert snr[-1].item() == 0.0  # the schedule really reaches SNR 0
    w = min_snr_weights(snr, gamma=5.0, prediction_type=pred)
    assert torch.isfinite(w).all()
    assert (w >= 0).all()
    expected_last = {"epsilon": 1.0, "v_prediction": 0.0, "sample": 0.0}[pred]
    assert w[-1].item() == expected_last


# --------------------------------------------------------------------------------------------------
# Semantics: the weights turn each target's MSE into the x0-MSE clipped at gamma
# --------------------------------------------------------------------------------------------------


def _semantic_setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    sched = DDPMScheduler(num_train_timesteps=1000)
    # timesteps on both sides of SNR = gamma = 5 (SNR(t) crosses 5 around t ~ 130)
    t = torch.tensor([1, 20, 60, 120, 200, 400, 700, 990])
    abar = sched.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    b = t.numel()
    x0 = torch.rand(b, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(b, 3, 4, 4, generator=g, dtype=torch.float64)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    snr = compute_snr(sched.alphas_cumprod.double(), t).double()
    return g, sched, t, abar, x0, eps, x_t, snr


def sqnorm(x):
    return x.flatten(1).pow(2).sum(1)


def test_min_snr_epsilon_equals_clipped_x0_mse():
    g, sched, t, abar, x0, eps, x_t, snr = _semantic_setup()
    assert (snr > 5).any() and (snr < 5).any()
    eps_hat = eps + 0.3 * torch.randn(eps.shape, generator=g, dtype=torch.float64)
    x0_hat = (x_t - (1 - abar).sqrt() * eps_hat) / abar.sqrt()
    # ||x0_hat - x0||^2 = (1 - abar)/abar ||eps_hat - eps||^2 = ||eps_hat - eps||^2 / snr
    np.testing.assert_allclose(sqnorm(x0_hat - x0).numpy(), (sqnorm(eps_hat - eps) / snr).numpy(), rtol=1e-5)
    w = min_snr_weights(snr, 5.0, "epsilon")
    lhs = w * sqnorm(eps_hat - eps)
    rhs = torch.minimum(snr, torch.full_like(snr, 5.0)) * sqnorm(x0_hat - x0)
    np.testing.assert_allclose(lhs.numpy(), rhs.numpy(), rtol=1e-5)


def test_min_snr_v_prediction_equals_clipped_x0_mse():
    g, sched, t, abar, x0, eps, x_t, snr = _semantic_setup(seed=1)
    v = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    torch.testing.assert_close(sched.get_velocity(x0, eps, t), v, rtol=1e-5, atol=1e-6)
    v_hat = v + 0.3 * torch.randn(v.shape, generator=g, dtype=torch.float64)
    x0_hat = abar.sqrt() * x_t - (1 - abar).sqrt() * v_hat
    torch.testing.assert_close(abar.sqrt() * x_t - (1 - abar).sqrt() * v, x0)  # the inversion is exact
    # ||x0_hat - x0||^2 = (1 - abar) ||v_hat - v||^2 = ||v_hat - v||^2 / (snr + 1)
    np.testing.assert_allclose(sqnorm(x0_hat - x0).numpy(), (sqnorm(v_hat - v) / (snr + 1)).numpy(), rtol=1e-5)
    w = min_snr_weights(snr, 5.0, "v_prediction")
    lhs = w * sqnorm(v_hat - v)
    rhs = torch.minimum(snr, torch.full_like(snr, 5.0)) * sqnorm(x0_hat - x0)
    np.testing.assert_allclose(lhs.numpy(), rhs.numpy(), rtol=1e-5)


def test_min_snr_sample_equals_clipped_x0_mse():
    g, sched, t, abar, x0, eps, x_t, snr = _semantic_setup(seed=2)
    x0_hat = x0 + 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    w = min_snr_weights(snr, 5.0, "sample")
    np.testing.assert_allclose(
        (w * sqnorm(x0_hat - x0)).numpy(),
        (torch.minimum(snr, torch.full_like(snr, 5.0)) * sqnorm(x0_hat - x0)).numpy(),
        rtol=1e-12,
    )


def test_candidate_soft_weights_closed_form_and_argmax_limit():
    from noise_rater.weighting import candidate_soft_weights

    s = torch.tensor([[0.0, 1.0, 2.0], [3.0, 3.0, -1.0]], dtype=torch.float64)
    w = candidate_soft_weights(s, temperature=2.0)
    e = torch.exp(s / 2.0)
    torch.testing.assert_close(w, 3 * e / e.sum(dim=1, keepdim=True))
    torch.testing.assert_close(w.mean(dim=1), torch.ones(2, dtype=torch.float64))
    # tau -> 0: N * one_hot(argmax) (stage 2's hard selection); a tie splits the weight
    w0 = candidate_soft_weights(s, temperature=1e-4)
    torch.testing.assert_close(w0, torch.tensor([[0.0, 0.0, 3.0], [1.5, 1.5, 0.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="B, N"):
        candidate_soft_weights(s[0], 1.0)
    with pytest.raises(ValueError, match="temperature"):
        candidate_soft_weights(s, 0.0)
