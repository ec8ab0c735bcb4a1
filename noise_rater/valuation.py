r"""The exact one-step value of a training noise, the oracle selector built on it, and how well a rater
ranks noises (valuation accuracy).

For a denoiser at parameters theta, one SGD step of learning rate lr on the sample (x0, eps, t) changes
the validation loss by

    L_val(theta - lr * grad l(x0, eps, t)) - L_val(theta) = -lr * <grad_theta l(x0, eps, t), grad_theta L_val> + O(lr^2),

so the influence c(x0, eps, t) = <grad_theta l(x0, eps, t), grad_theta L_val(theta)> is the first-order
decrease of the validation loss per unit learning rate (larger = more useful; the quantity of
influence functions / TracIn, Pruthi et al. 2020, taken at one step). Within a group of N candidate
noises for one (x0, t), the candidate of highest c is the greedy optimum: the oracle every rater is
measured against. All B*N influences come from ONE forward-mode JVP of the per-sample loss vector
along grad L_val (:func:`noise_rater.bilevel.per_sample_loss_jvp`), after one backward pass for
grad L_val.
"""

import math
from typing import Callable, Dict, Mapping, Optional

import numpy as np
import torch

from .bilevel import _sdpa_context, flatten_candidates, per_sample_loss_jvp, validation_loss_at
from .sampling import draw_candidates


def _trainable_params(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def validation_gradient(model, scheduler, val_batch: Mapping[str, torch.Tensor], params=None):
    """grad_theta L_val at ``params`` (default: the model's trainable parameters): name -> tensor."""
    params = _trainable_params(model) if params is None else {k: v.detach() for k, v in params.items()}
    with torch.enable_grad():
        th = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        loss = validation_loss_at(model, scheduler, th, val_batch)
        grads = torch.autograd.grad(loss, list(th.values()))
    return dict(zip(th.keys(), grads)), params


def one_step_influence(
    model: torch.nn.Module,
    scheduler,
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    candidates: torch.Tensor,
    val_batch: Mapping[str, torch.Tensor],
    class_labels: Optional[torch.Tensor] = None,
    *,
    params: Optional[Mapping[str, torch.Tensor]] = None,
    chunk_size: Optional[int] = 1024,
) -> torch.Tensor:
    r"""Exact one-step influence of every candidate noise on the validation loss.

    Entry (b, n) is c_bn = <grad_theta l(x0_b, eps_bn, t_b), grad_theta L_val> at the model's current
    parameters, where l is the per-sample diffusion loss (:func:`noise_rater.diffusion.per_sample_diffusion_loss`,
    the scheduler's ``prediction_type``) and L_val the mean loss on ``val_batch``: the first-order
    decrease of the validation loss per unit SGD learning rate if the model trained on that noise
    (larger = more useful).

    Args:
        model: the denoiser (unwrapped, not a DDP wrapper), called as ``model(x_t, t, class_labels=...)``;
            only read, never modified.
        scheduler: ``DDPMScheduler``.
        x0 (`torch.Tensor` of shape `(B, C, H, W)`): clean images (any channel count, e.g. latents).
        timesteps (`torch.Tensor` of shape `(B,)`, int64).
        candidates (`torch.Tensor` of shape `(B, N, C, H, W)`): N candidate noises per image.
        val_batch: mapping with ``"x0"``, ``"noise"`` `(V, C, H, W)`, ``"timesteps"`` `(V,)` and optional
            ``"class_labels"``.
        class_labels (`torch.Tensor` of shape `(B,)`, *optional*).
        params: evaluate at these parameters (name -> tensor) instead of the model's own.
        chunk_size: samples per forward-mode pass (memory bound); ``None``: all B*N at once.

    Returns:
        `torch.Tensor` of shape `(B, N)` (detached, the parameters' dtype).

    Raises:
        ValueError: if ``candidates`` is not `(B, N, C, H, W)` for x0's B, C, H, W.
    """
    if candidates.dim() != x0.dim() + 1 or candidates.shape[0] != x0.shape[0] or candidates.shape[2:] != x0.shape[1:]:
        raise ValueError(f"candidates must have shape (B, N, C, H, W) matching x0 {tuple(x0.shape)}, "
                         f"got {tuple(candidates.shape)}")
    grad_val, params = validation_gradient(model, scheduler, val_batch, params)
    batch = {"x0": x0, "noise": candidates, "timesteps": torch.as_tensor(timesteps, device=x0.device).reshape(-1)}
    if class_labels is not None:
        batch["class_labels"] = class_labels
    flat, b, n = flatten_candidates(batch)
    c = per_sample_loss_jvp(model, scheduler, params, flat, grad_val, chunk_size=chunk_size)
    return c.reshape(b, n)


class ValidationMinibatches:
    """Validation minibatches for the oracle: call k returns ``batch_size`` images of ``dataset`` with
    eps ~ N(0, I) and t ~ U{0..T-1}, all drawn from a generator seeded by (``seed``, k) only, so the
    stream is resumed exactly by setting :attr:`calls` (the number of calls made so far).

    Args:
        dataset: map-style dataset of ``{"pixel_values": (C, H, W), ["class_labels": ()]}`` items.
        batch_size (`int`): images per minibatch (capped at ``len(dataset)``).
        num_train_timesteps (`int`): T.
        seed (`int`): base seed.
        device: where the tensors go.
    """

    def __init__(self, dataset, batch_size: int, num_train_timesteps: int, seed: int, device=None):
        if len(dataset) < 1 or batch_size < 1:
            raise ValueError(f"need a non-empty dataset and batch_size >= 1, got {len(dataset)} and {batch_size}")
        self.dataset, self.batch_size = dataset, min(int(batch_size), len(dataset))
        self.num_train_timesteps, self.seed, self.device, self.calls = int(num_train_timesteps), int(seed), device, 0

    def __call__(self) -> Dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.calls)
        self.calls += 1
        idx = torch.randperm(len(self.dataset), generator=g)[: self.batch_size]
        items = [self.dataset[int(i)] for i in idx]
        x0 = torch.stack([it["pixel_values"] for it in items])
        out = {"x0": x0, "noise": torch.randn(x0.shape, generator=g, dtype=x0.dtype),
               "timesteps": torch.randint(0, self.num_train_timesteps, (x0.shape[0],), generator=g)}
        if "class_labels" in items[0]:
            out["class_labels"] = torch.stack([it["class_labels"] for it in items])
        return {k: v.to(self.device) for k, v in out.items()} if self.device is not None else out


class OracleNoiseSelector:
    r"""Stage-2 selector that keeps, in each group, the candidate of highest exact one-step influence.

    Every call draws a fresh validation minibatch from ``val_batch_fn`` and computes
    :func:`one_step_influence` at the model's current parameters: the greedy ceiling of any rater
    (it costs about one backward pass plus one forward-mode pass over the B*N candidates per step).
    Same call interface as the selectors of :mod:`noise_rater.sampling`.

    Args:
        model: the denoiser being trained (unwrapped; read at call time, so it follows training).
        scheduler: ``DDPMScheduler``.
        val_batch_fn: ``() -> mapping`` with x0, noise, timesteps (and class_labels), a fresh validation
            minibatch per call (e.g. :class:`ValidationMinibatches`).
        num_candidates (`int`): N, for :meth:`__call__` (which draws the candidates itself).
        chunk_size: samples per forward-mode pass.
    """

    def __init__(self, model: torch.nn.Module, scheduler, val_batch_fn: Callable[[], Mapping[str, torch.Tensor]],
                 num_candidates: int = 8, chunk_size: Optional[int] = 1024):
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        self.model, self.scheduler, self.val_batch_fn, self.chunk_size = model, scheduler, val_batch_fn, chunk_size
        self.num_candidates = int(num_candidates)

    def __call__(self, x0, timesteps, class_labels=None, generator=None, return_weights=False):
        """Draw N candidates per sample with ``generator`` and keep the most useful -> noise `(B, C, H, W)`."""
        candidates = draw_candidates(x0, self.num_candidates, generator)
        return self.select(x0, timesteps, candidates, class_labels, generator, return_weights)

    def select(self, x0, timesteps, candidates, class_labels=None, generator=None, return_weights=False):
        """candidates `(B, N, C, H, W)` -> the most useful one per sample `(B, C, H, W)` (and weights `(B,)` = 1)."""
        c = one_step_influence(self.model, self.scheduler, x0, timesteps, candidates, self.val_batch_fn(),
                               class_labels=class_labels, chunk_size=self.chunk_size)
        index = c.argmax(dim=1).to(candidates.device)
        noise = candidates[torch.arange(candidates.shape[0], device=candidates.device), index]
        ones = torch.ones(x0.shape[0], device=x0.device, dtype=x0.dtype)
        return (noise, ones) if return_weights else noise


def _ranks(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(a, axis=1)


def valuation_accuracy(scores: torch.Tensor, influence: torch.Tensor) -> Dict[str, float]:
    r"""How well scores rank noises within groups, against the exact influence.

    Args:
        scores (`torch.Tensor` of shape `(G, N)`): rater scores of N candidates in each of G groups.
        influence (`torch.Tensor` of shape `(G, N)`): exact one-step influence c (:func:`one_step_influence`).

    Returns:
        dict with
        ``spearman_rho``: mean over groups of the within-group Spearman rank correlation of score and c
        (groups where either is constant are left out; ``num_groups_rho`` counts those kept);
        ``gain_rater``: mean c of the highest-scored candidate; ``gain_random``: mean c of a random pick
        (the group mean); ``gain_oracle``: mean max c; ``gain_worst``: mean min c;
        ``fraction_of_oracle``: (gain_rater - gain_random) / (gain_oracle - gain_random), the share of the
        oracle's gain over random that the rater captures (1 = oracle, 0 = random, < 0 worse than random).
    """
    if scores.shape != influence.shape or scores.dim() != 2:
        raise ValueError(f"scores and influence must both be (G, N); got {tuple(scores.shape)}, {tuple(influence.shape)}")
    s = scores.detach().double().cpu().numpy()
    c = influence.detach().double().cpu().numpy()
    rs, rc = _ranks(s), _ranks(c)
    rs = rs - rs.mean(1, keepdims=True)
    rc = rc - rc.mean(1, keepdims=True)
    den = np.sqrt((rs**2).sum(1) * (rc**2).sum(1))
    ok = den > 0
    rho = (rs * rc).sum(1)[ok] / den[ok]
    g = np.arange(s.shape[0])
    gain_rater = float(c[g, s.argmax(1)].mean())
    gain_random = float(c.mean())
    gain_oracle = float(c.max(1).mean())
    span = gain_oracle - gain_random
    return {
        "spearman_rho": float(rho.mean()) if ok.any() else float("nan"),
        "num_groups_rho": int(ok.sum()),
        "gain_rater": gain_rater,
        "gain_random": gain_random,
        "gain_oracle": gain_oracle,
        "gain_worst": float(c.min(1).mean()),
        "fraction_of_oracle": (gain_rater - gain_random) / span if span > 0 else float("nan"),
        "num_groups": int(s.shape[0]),
    }


@torch.no_grad()
def rate_candidates(rater, x0, timesteps, candidates, class_labels=None) -> torch.Tensor:
    """Rater scores `(B, N)` for candidates `(B, N, C, H, W)` (no grad, flat order of
    :func:`noise_rater.bilevel.flatten_candidates`)."""
    batch = {"x0": x0, "noise": candidates, "timesteps": timesteps}
    if class_labels is not None:
        batch["class_labels"] = class_labels
    flat, b, n = flatten_candidates(batch)
    s = rater(flat["x0"], flat["noise"], flat["timesteps"], class_labels=flat.get("class_labels")).scores
    return s.reshape(b, n)


def evaluate_valuation(
    rater, model, scheduler, groups: Mapping[str, torch.Tensor], val_batch: Mapping[str, torch.Tensor],
    params: Optional[Mapping[str, torch.Tensor]] = None, chunk_size: Optional[int] = 1024,
) -> Dict[str, float]:
    """:func:`valuation_accuracy` of ``rater`` on held-out ``groups`` (x0 `(G, C, H, W)`, noise
    `(G, N, C, H, W)`, timesteps `(G,)`, optional class_labels) for the denoiser at ``params``
    (default: ``model``'s own)."""
    was_training = rater.training
    rater.eval()
    try:
        scores = rate_candidates(rater, groups["x0"], groups["timesteps"], groups["noise"], groups.get("class_labels"))
    finally:
        rater.train(was_training)
    with _sdpa_context():
        c = one_step_influence(model, scheduler, groups["x0"], groups["timesteps"], groups["noise"], val_batch,
                               class_labels=groups.get("class_labels"), params=params, chunk_size=chunk_size)
    out = valuation_accuracy(scores.float(), c)
    if not all(math.isfinite(v) for k, v in out.items() if k not in ("spearman_rho", "fraction_of_oracle")):
        raise FloatingPointError("non-finite influence or rater score in the valuation measurement")
    return out


def summarize_valuation(report, num_candidates: int) -> Dict:
    """Mean over the population's members of a :meth:`noise_rater.meta_trainer.MetaTrainer.valuation_report`,
    with the per-member rows (age included) under ``members``."""
    keys = ["spearman_rho", "gain_rater", "gain_random", "gain_oracle", "gain_worst", "fraction_of_oracle"]
    out = {k: sum(r[k] for r in report) / len(report) for k in keys}
    out.update(num_groups=report[0]["num_groups"], num_candidates=num_candidates,
               members=[{k: r[k] for k in keys + ["member", "age"]} for r in report])
    return out
