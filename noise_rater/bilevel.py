r"""The bilevel meta-objective of NoiseRater, written functionally.

Inner problem (K steps, one per training batch k):

    s_k = rater_phi(x0_k, eps_k, t_k)                      scores, (B,)
    w_k = B * softmax(s_k / tau)                            soft weights, mean 1
    L_k(theta) = mean_i w_ki * l(theta; x0_ki, eps_ki, t_ki) weighted diffusion loss
    theta_{k+1} = U(theta_k, grad_theta L_k(theta_k))       SGD or Adam, kept in the autograd graph

Outer objective: the plain (unweighted) diffusion loss on a validation batch after K steps,

    J(phi) = mean_i l(theta_K(phi); x0_val_i, eps_val_i, t_val_i),

and ``torch.autograd.grad(J, rater.parameters())`` is the exact meta-gradient dJ/dphi through
all K unrolled updates (second-order terms included). The denoiser's own parameters are never
modified: the updates are applied to a dictionary of tensors through ``torch.func.functional_call``.
"""

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Sequence

import torch
from torch.func import functional_call

from .diffusion import per_sample_diffusion_loss
from .weighting import soft_weights

INNER_OPTIMIZERS = ("sgd", "adam")


@dataclass
class InnerState:
    """Parameters theta and inner-optimiser state of one inner diffusion model.

    Attributes:
        params: name -> tensor, the denoiser's trainable parameters.
        exp_avg, exp_avg_sq: Adam moments (empty for SGD).
        step: number of inner optimiser steps taken so far (Adam's bias correction uses it).
    """

    params: Dict[str, torch.Tensor]
    exp_avg: Dict[str, torch.Tensor] = field(default_factory=dict)
    exp_avg_sq: Dict[str, torch.Tensor] = field(default_factory=dict)
    step: int = 0

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> "InnerState":
        """Detached copies of ``module``'s trainable parameters, zero Adam state."""
        params = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        return cls(params=params)

    def detached(self) -> "InnerState":
        """The same state cut out of any autograd graph (used between meta-steps)."""
        d = lambda m: {k: v.detach() for k, v in m.items()}  # noqa: E731
        return InnerState(d(self.params), d(self.exp_avg), d(self.exp_avg_sq), self.step)


@dataclass
class InnerResult:
    """What :func:`unroll` returns: the final state and the K weighted inner losses (detached floats)."""

    state: InnerState
    inner_losses: list
    weights: list


def _sdpa_context(device: torch.device):
    """Double backward through scaled_dot_product_attention needs the math backend."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    except Exception:  # pragma: no cover - very old torch
        return contextlib.nullcontext()


def _sgd_update(state: InnerState, grads: Dict[str, torch.Tensor], lr: float) -> InnerState:
    """theta <- theta - lr * g."""
    params = {k: p - lr * grads[k] for k, p in state.params.items()}
    return InnerState(params, state.exp_avg, state.exp_avg_sq, state.step + 1)


def _adam_update(
    state: InnerState, grads: Dict[str, torch.Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
    eps_root: float = 1e-16,
) -> InnerState:
    r"""Differentiable Adam (Kingma & Ba), as ``torch.optim.Adam`` with weight_decay=0:

    m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;
    theta <- theta - lr * (m / (1-b1^k)) / (sqrt(v / (1-b2^k) + eps_root) + eps).

    ``eps_root`` (default 1e-16) keeps d sqrt(v)/dv finite at v == 0 for the second-order graph; it
    changes the update by at most ~1e-8 relative to ``torch.optim.Adam``.
    """
    b1, b2 = betas
    k = state.step + 1
    params, m_new, v_new = {}, {}, {}
    for name, p in state.params.items():
        g = grads[name]
        m = state.exp_avg.get(name)
        v = state.exp_avg_sq.get(name)
        m = (1 - b1) * g if m is None else b1 * m + (1 - b1) * g
        v = (1 - b2) * g * g if v is None else b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**k)
        v_hat = v / (1 - b2**k)
        params[name] = p - lr * m_hat / (torch.sqrt(v_hat + eps_root) + eps)
        m_new[name], v_new[name] = m, v
    return InnerState(params, m_new, v_new, k)


def _functional_denoiser(unet: torch.nn.Module, params: Mapping[str, torch.Tensor]):
    """A callable ``f(x_t, t, class_labels=None)`` evaluating ``unet`` at parameters ``params``."""

    def f(x_t, t, class_labels=None):
        kwargs = {} if class_labels is None else {"class_labels": class_labels}
        return functional_call(unet, dict(params), (x_t, t), kwargs)

    return f


def rater_weights(rater, batch: Mapping[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """w = soft_weights(rater(x0, eps, t)) for one batch -> `(B,)`, differentiable w.r.t. the rater."""
    scores = rater(batch["x0"], batch["noise"], batch["timesteps"], class_labels=batch.get("class_labels")).scores
    return soft_weights(scores.to(batch["x0"].dtype), temperature)


def unroll(
    rater: Optional[torch.nn.Module],
    unet: torch.nn.Module,
    scheduler,
    train_batches: Sequence[Mapping[str, torch.Tensor]],
    *,
    inner_lr: float,
    inner_optimizer: str = "sgd",
    temperature: float = 1.0,
    state: Optional[InnerState] = None,
    adam_betas=(0.9, 0.999),
    adam_eps: float = 1e-8,
    adam_eps_root: float = 1e-16,
    create_graph: bool = True,
    truncate_window: Optional[int] = None,
) -> InnerResult:
    r"""Run K functional inner steps theta_0 -> theta_K on rater-weighted losses.

    Args:
        rater: :class:`NoiseRaterModel` giving the soft weights, or ``None`` for uniform weights w = 1
            (the baseline used to measure what the rater buys).
        unet: denoiser with the diffusers signature ``unet(x_t, t, class_labels=...)``; only used as a
            function of ``state.params``, never modified.
        scheduler: ``DDPMScheduler`` defining x_t and the target (its ``prediction_type``).
        train_batches: K mappings with ``"x0"`` `(B, C, H, W)`, ``"noise"`` `(B, C, H, W)`,
            ``"timesteps"`` `(B,)` int64 and optional ``"class_labels"`` `(B,)`.
        inner_lr: inner learning rate.
        inner_optimizer: ``"sgd"`` or ``"adam"`` (both differentiable).
        adam_betas, adam_eps, adam_eps_root: Adam's hyperparameters (see :func:`_adam_update`);
            ``adam_eps_root=0`` reproduces ``torch.optim.Adam`` exactly but may give infinite
            second-order terms where a gradient entry is exactly zero.
        temperature: tau of the soft weights.
        state: starting theta_0 and optimiser state; default: the unet's current parameters.
        create_graph: keep the updates in the autograd graph (needed for meta-gradients).
        truncate_window: if set, only the last ``truncate_window`` inner steps are differentiated
            through (earlier states are detached): an approximation of the meta-gradient
            (truncated backpropagation), cheaper in memory.

    Returns:
        :class:`InnerResult` with the final state (in the graph if ``create_graph``).
    """
    if inner_optimizer not in INNER_OPTIMIZERS:
        raise ValueError(f"inner_optimizer must be one of {INNER_OPTIMIZERS}, got {inner_optimizer!r}")
    if not inner_lr > 0:
        raise ValueError(f"inner_lr must be > 0, got {inner_lr!r}")
    if len(train_batches) == 0:
        raise ValueError("train_batches must hold at least one batch (K >= 1)")
    if truncate_window is not None and truncate_window < 1:
        raise ValueError(f"truncate_window must be >= 1, got {truncate_window!r}")
    if state is None:
        state = InnerState.from_module(unet)
    K = len(train_batches)
    losses, weights_seen = [], []
    device = next(iter(state.params.values())).device
    with _sdpa_context(device):
        for k, batch in enumerate(train_batches):
            in_graph = create_graph and (truncate_window is None or k >= K - truncate_window)
            if not in_graph or (truncate_window is not None and k == K - truncate_window):
                state = state.detached()
            params = {n: (p if p.requires_grad else p.detach().requires_grad_(True)) for n, p in state.params.items()}
            state = InnerState(params, state.exp_avg, state.exp_avg_sq, state.step)
            with torch.set_grad_enabled(True):
                if rater is None:
                    w = torch.ones(batch["x0"].shape[0], device=batch["x0"].device, dtype=batch["x0"].dtype)
                else:
                    w = rater_weights(rater, batch, temperature)
                    if not in_graph:
                        w = w.detach()
                per_sample = per_sample_diffusion_loss(
                    _functional_denoiser(unet, params), scheduler, batch["x0"], batch["noise"],
                    batch["timesteps"], batch.get("class_labels"),
                )
                loss = (w * per_sample).mean()
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=in_graph)
            grads = dict(zip(params.keys(), grads))
            if inner_optimizer == "sgd":
                state = _sgd_update(state, grads, inner_lr)
            else:
                state = _adam_update(state, grads, inner_lr, adam_betas, adam_eps, adam_eps_root)
            losses.append(float(loss.detach()))
            weights_seen.append(w.detach())
    if not create_graph:
        state = state.detached()
    return InnerResult(state=state, inner_losses=losses, weights=weights_seen)


def validation_loss_at(unet, scheduler, params: Mapping[str, torch.Tensor], val_batch) -> torch.Tensor:
    """Plain mean diffusion loss of ``unet`` evaluated at ``params`` on ``val_batch`` (scalar)."""
    with _sdpa_context(next(iter(params.values())).device):
        return per_sample_diffusion_loss(
            _functional_denoiser(unet, params), scheduler, val_batch["x0"], val_batch["noise"],
            val_batch["timesteps"], val_batch.get("class_labels"),
        ).mean()


def meta_objective(
    rater: torch.nn.Module,
    unet: torch.nn.Module,
    scheduler,
    train_batches: Sequence[Mapping[str, torch.Tensor]],
    val_batch: Mapping[str, torch.Tensor],
    *,
    inner_lr: float,
    inner_optimizer: str = "sgd",
    temperature: float = 1.0,
    state: Optional[InnerState] = None,
    adam_betas=(0.9, 0.999),
    adam_eps: float = 1e-8,
    adam_eps_root: float = 1e-16,
    truncate_window: Optional[int] = None,
    return_inner: bool = False,
):
    r"""J(phi): validation diffusion loss after K rater-weighted inner steps.

    ``torch.autograd.grad(meta_objective(...), rater.parameters())`` is the exact meta-gradient
    through all K steps (unless ``truncate_window`` is set; see :func:`unroll`). All randomness
    lives in the inputs, so the function is deterministic. Works in float32 and float64.

    Args:
        rater, unet, scheduler, train_batches, inner_lr, inner_optimizer, temperature, state,
            truncate_window: see :func:`unroll`.
        val_batch: one mapping like the train batches (x0, noise, timesteps, class_labels).
        return_inner: also return the :class:`InnerResult` (final theta_K and optimiser state).

    Returns:
        scalar `torch.Tensor` J, or ``(J, InnerResult)`` if ``return_inner``.
    """
    inner = unroll(
        rater, unet, scheduler, train_batches, inner_lr=inner_lr, inner_optimizer=inner_optimizer,
        temperature=temperature, state=state, adam_betas=adam_betas, adam_eps=adam_eps,
        adam_eps_root=adam_eps_root, create_graph=True, truncate_window=truncate_window,
    )
    val = validation_loss_at(unet, scheduler, inner.state.params, val_batch)
    return (val, inner) if return_inner else val
