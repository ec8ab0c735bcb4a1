r"""The bilevel meta-objective of NoiseRater, written functionally.

Inner problem (K steps, one per training batch k). A batch holds B images x0_b, each with one
timestep t_b and N candidate noises eps_bn (the grouped layout, ``noise`` of shape `(B, N, C, H, W)`;
a plain `(B, C, H, W)` noise is the special case N = 1), i.e. M = B * N samples:

    s_bn = rater_phi(x0_b, eps_bn, t_b)                     scores, (B, N)
    w_bn = N * softmax_n(s_bn / tau)                        weighting_scope="candidates" (mean 1 per group)
      or = M * softmax_{all b, n}(s_bn / tau)               weighting_scope="batch" (mean 1 over the batch)
    L_k(theta) = (1/M) sum_bn w_bn * l(theta; x0_b, eps_bn, t_b)
    theta_{k+1} = U(theta_k, grad_theta L_k(theta_k))       SGD or Adam, kept in the autograd graph

Outer objective: the plain (unweighted) diffusion loss on a validation batch after K steps,

    J(phi) = mean_i l(theta_K(phi); x0_val_i, eps_val_i, t_val_i),

and ``torch.autograd.grad(J, rater.parameters())`` is the exact meta-gradient dJ/dphi through
all K unrolled updates (second-order terms included). The denoiser's own parameters are never
modified: the updates are applied to a dictionary of tensors through ``torch.func.functional_call``.

For K = 1 the same exact meta-gradient needs no second-order graph (:func:`one_step_meta_gradient`):
with theta_1 = U(theta_0, g), g = (1/M) sum_i w_i grad l_i(theta_0),

    dJ/dw_i = -(1/M) <grad_theta l_i(theta_0), u>,   u = -(dU/dg)^T grad_theta L_val(theta_1),

(u = lr * grad L_val for SGD; for Adam dU/dg is diagonal, :func:`adam_update_derivative`). All M
inner products are the directional derivative of the per-sample loss vector along u, i.e. ONE
forward-mode JVP (``torch.func.jvp``, :func:`per_sample_loss_jvp`), and dJ/dphi = sum_i (dw_i/dphi) dJ/dw_i
is one backward pass through the rater only. :func:`meta_gradient` picks it for K = 1.
"""

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Sequence

import torch
from torch.func import functional_call

from .diffusion import per_sample_diffusion_loss
from .weighting import WEIGHTING_SCOPES, candidate_soft_weights, soft_weights

INNER_OPTIMIZERS = ("sgd", "adam")
META_GRADIENT_METHODS = ("auto", "forward", "reverse")


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


def _sdpa_context(device: torch.device = None):
    """Double backward and forward-mode AD through scaled_dot_product_attention need the math backend."""
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


def _check_inner_optimizer(inner_optimizer: str, inner_lr: float) -> None:
    if inner_optimizer not in INNER_OPTIMIZERS:
        raise ValueError(f"inner_optimizer must be one of {INNER_OPTIMIZERS}, got {inner_optimizer!r}")
    if not inner_lr > 0:
        raise ValueError(f"inner_lr must be > 0, got {inner_lr!r}")


def _inner_update(state: InnerState, grads: Dict[str, torch.Tensor], inner_optimizer: str, lr: float,
                  adam_betas, adam_eps: float, adam_eps_root: float) -> InnerState:
    """One inner optimiser step U(theta, g): :func:`_sgd_update` or :func:`_adam_update`."""
    if inner_optimizer == "sgd":
        return _sgd_update(state, grads, lr)
    return _adam_update(state, grads, lr, adam_betas, adam_eps, adam_eps_root)


def _functional_denoiser(unet: torch.nn.Module, params: Mapping[str, torch.Tensor]):
    """A callable ``f(x_t, t, class_labels=None)`` evaluating ``unet`` at parameters ``params``."""

    def f(x_t, t, class_labels=None):
        kwargs = {} if class_labels is None else {"class_labels": class_labels}
        return functional_call(unet, dict(params), (x_t, t), kwargs)

    return f


def flatten_candidates(batch: Mapping[str, torch.Tensor]):
    """The grouped layout as M = B * N flat samples.

    Args:
        batch: ``"x0"`` `(B, C, H, W)`, ``"noise"`` `(B, N, C, H, W)` (N candidates per image) or
            `(B, C, H, W)` (one noise per image, N = 1), ``"timesteps"`` `(B,)`, optional
            ``"class_labels"`` `(B,)`.

    Returns:
        ``(flat, B, N)``: ``flat`` has x0, noise `(B*N, C, H, W)`, timesteps `(B*N,)` (and class_labels),
        sample ``b * N + n`` being image b with its candidate n.

    Raises:
        ValueError: if the noise shape matches neither layout.
    """
    x0, noise = batch["x0"], batch["noise"]
    if noise.shape == x0.shape:
        return batch, x0.shape[0], 1
    if noise.dim() != x0.dim() + 1 or noise.shape[0] != x0.shape[0] or noise.shape[2:] != x0.shape[1:]:
        raise ValueError(
            f"noise must have shape (B, C, H, W) = {tuple(x0.shape)} or (B, N, C, H, W) with the same B, C, H, W; "
            f"got {tuple(noise.shape)}"
        )
    b, n = noise.shape[:2]
    flat = {"x0": x0.repeat_interleave(n, dim=0), "noise": noise.reshape(b * n, *x0.shape[1:]),
            "timesteps": batch["timesteps"].repeat_interleave(n, dim=0)}
    if batch.get("class_labels") is not None:
        flat["class_labels"] = batch["class_labels"].repeat_interleave(n, dim=0)
    return flat, b, n


def resolve_weighting_scope(weighting_scope: Optional[str], num_candidates: int) -> str:
    """``None`` -> "candidates" for the grouped layout (N > 1), "batch" for one noise per image."""
    if weighting_scope is None:
        return "candidates" if num_candidates > 1 else "batch"
    if weighting_scope not in WEIGHTING_SCOPES:
        raise ValueError(f"weighting_scope must be one of {WEIGHTING_SCOPES}, got {weighting_scope!r}")
    if weighting_scope == "candidates" and num_candidates < 2:
        raise ValueError(
            "weighting_scope='candidates' needs N >= 2 candidate noises per image (noise of shape (B, N, C, H, W)); "
            "with one noise per image every weight would be 1"
        )
    return weighting_scope


def rater_weights(
    rater, batch: Mapping[str, torch.Tensor], temperature: float, weighting_scope: Optional[str] = None
) -> torch.Tensor:
    """Soft weights of a batch in either layout -> `(M,)` (M = B*N, flat sample order of
    :func:`flatten_candidates`), differentiable w.r.t. the rater.

    ``weighting_scope``: ``"candidates"`` (softmax within each image's N candidates, see
    :func:`noise_rater.weighting.candidate_soft_weights`), ``"batch"`` (one softmax over all M samples),
    or ``None`` (candidates if N > 1, else batch).
    """
    flat, b, n = flatten_candidates(batch)
    scope = resolve_weighting_scope(weighting_scope, n)
    scores = rater(flat["x0"], flat["noise"], flat["timesteps"], class_labels=flat.get("class_labels")).scores
    scores = scores.to(flat["x0"].dtype)
    if scope == "candidates":
        return candidate_soft_weights(scores.reshape(b, n), temperature).reshape(-1)
    return soft_weights(scores, temperature)


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
    weighting_scope: Optional[str] = None,
) -> InnerResult:
    r"""Run K functional inner steps theta_0 -> theta_K on rater-weighted losses.

    Args:
        rater: :class:`NoiseRaterModel` giving the soft weights, or ``None`` for uniform weights w = 1
            (the baseline used to measure what the rater buys).
        unet: denoiser with the diffusers signature ``unet(x_t, t, class_labels=...)``; only used as a
            function of ``state.params``, never modified.
        scheduler: ``DDPMScheduler`` defining x_t and the target (its ``prediction_type``).
        train_batches: K mappings with ``"x0"`` `(B, C, H, W)`, ``"noise"`` `(B, N, C, H, W)` (N candidate
            noises per image) or `(B, C, H, W)` (N = 1), ``"timesteps"`` `(B,)` int64 and optional
            ``"class_labels"`` `(B,)`; see :func:`flatten_candidates`.
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
        weighting_scope: ``"candidates"``, ``"batch"`` or ``None`` (see :func:`rater_weights`).

    Returns:
        :class:`InnerResult` with the final state (in the graph if ``create_graph``); its ``weights``
        are `(M,)` per step, in the flat sample order of :func:`flatten_candidates`.

    Raises:
        ValueError: bad optimiser, learning rate, window, scope or batch layout.
    """
    _check_inner_optimizer(inner_optimizer, inner_lr)
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
            flat, _, n = flatten_candidates(batch)
            with torch.set_grad_enabled(True):
                if rater is None:
                    w = torch.ones(flat["x0"].shape[0], device=flat["x0"].device, dtype=flat["x0"].dtype)
                else:
                    w = rater_weights(rater, batch, temperature, weighting_scope)
                    if not in_graph:
                        w = w.detach()
                per_sample = per_sample_diffusion_loss(
                    _functional_denoiser(unet, params), scheduler, flat["x0"], flat["noise"],
                    flat["timesteps"], flat.get("class_labels"),
                )
                loss = (w * per_sample).mean()
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=in_graph)
            grads = dict(zip(params.keys(), grads))
            state = _inner_update(state, grads, inner_optimizer, inner_lr, adam_betas, adam_eps, adam_eps_root)
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
    weighting_scope: Optional[str] = None,
    return_inner: bool = False,
):
    r"""J(phi): validation diffusion loss after K rater-weighted inner steps.

    ``torch.autograd.grad(meta_objective(...), rater.parameters())`` is the exact meta-gradient
    through all K steps (unless ``truncate_window`` is set; see :func:`unroll`). All randomness
    lives in the inputs, so the function is deterministic. Works in float32 and float64.

    Args:
        rater, unet, scheduler, train_batches, inner_lr, inner_optimizer, temperature, state,
            truncate_window, weighting_scope: see :func:`unroll` (grouped or flat batch layout).
        val_batch: one mapping like the train batches (x0, noise, timesteps, class_labels).
        return_inner: also return the :class:`InnerResult` (final theta_K and optimiser state).

    Returns:
        scalar `torch.Tensor` J, or ``(J, InnerResult)`` if ``return_inner``.
    """
    inner = unroll(
        rater, unet, scheduler, train_batches, inner_lr=inner_lr, inner_optimizer=inner_optimizer,
        temperature=temperature, state=state, adam_betas=adam_betas, adam_eps=adam_eps,
        adam_eps_root=adam_eps_root, create_graph=True, truncate_window=truncate_window,
        weighting_scope=weighting_scope,
    )
    val = validation_loss_at(unet, scheduler, inner.state.params, val_batch)
    return (val, inner) if return_inner else val


# ---------------------------------------------------------------------------------------------
# K = 1: the exact meta-gradient by one forward-mode JVP (no second-order graph)
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def forward_ad_safe(module: torch.nn.Module):
    """Make ``module`` forward-mode differentiable (``torch.func.jvp``) under torch 2.13.

    Two known limits of diffusers' UNet2DModel under forward-mode AD: attention needs the math SDPA
    backend (as double backward does), and ``group_norm`` fails on a non-contiguous tangent ("view size
    is not compatible ...") after the attention block's transpose. Inside this context the math backend
    is selected and every ``GroupNorm`` input is made contiguous by a forward pre-hook (a no-op on
    values). The hooks are removed on exit.
    """
    hooks = [m.register_forward_pre_hook(lambda _m, args: tuple(a.contiguous() for a in args))
             for m in module.modules() if isinstance(m, torch.nn.GroupNorm)]
    try:
        with _sdpa_context():
            yield
    finally:
        for h in hooks:
            h.remove()


def per_sample_loss_jvp(
    unet: torch.nn.Module,
    scheduler,
    params: Mapping[str, torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    tangent: Mapping[str, torch.Tensor],
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    r"""Directional derivatives <grad_theta l_i(theta), v> of every per-sample loss, by forward-mode AD.

    One ``torch.func.jvp`` of theta -> (l_1(theta), ..., l_M(theta)) along v gives all M inner products
    at the cost of about one forward pass with dual numbers, instead of M per-sample gradients.

    Args:
        unet: denoiser, evaluated functionally at ``params`` (never modified).
        scheduler: ``DDPMScheduler`` (x_t and the target of its ``prediction_type``).
        params: name -> tensor, theta (the trainable parameters of ``unet``).
        batch: a flat batch (x0, noise `(M, C, H, W)`, timesteps `(M,)`, optional class_labels).
        tangent: name -> tensor v, same shapes as ``params``.
        chunk_size: evaluate at most this many samples per JVP (memory); ``None``: all at once.

    Returns:
        `torch.Tensor` of shape `(M,)`: entry i is <grad_theta l_i(theta), v> (detached).
    """
    names = list(params.keys())
    primals = tuple(params[n].detach() for n in names)
    tangents = tuple(tangent[n].detach().to(params[n].dtype) for n in names)
    m = batch["x0"].shape[0]
    step = m if chunk_size is None else max(1, int(chunk_size))
    out = []
    with forward_ad_safe(unet), torch.no_grad():
        for s in range(0, m, step):
            part = {k: v[s:s + step] for k, v in batch.items() if v is not None}

            def f(*p, part=part):
                return per_sample_diffusion_loss(
                    _functional_denoiser(unet, dict(zip(names, p))), scheduler, part["x0"], part["noise"],
                    part["timesteps"], part.get("class_labels"),
                )

            _, dl = torch.func.jvp(f, primals, tangents)
            out.append(dl)
    return torch.cat(out)


def adam_update_derivative(
    state: InnerState, grads: Mapping[str, torch.Tensor], betas=(0.9, 0.999), eps: float = 1e-8,
    eps_root: float = 1e-16,
) -> Dict[str, torch.Tensor]:
    r"""Diagonal of d(step)/dg for one Adam update (:func:`_adam_update`), per parameter entry.

    The update is theta' = theta - lr * f(g) elementwise, with (k = state.step + 1, c1 = 1 - b1^k,
    c2 = 1 - b2^k, m, v the moments before the step, zero if absent)

        m_hat = (b1 m + (1 - b1) g) / c1,  v_hat = (b2 v + (1 - b2) g^2) / c2,
        r = sqrt(v_hat + eps_root),        f(g) = m_hat / (r + eps),

    so  df/dg = (1 - b1) / (c1 (r + eps)) - m_hat (1 - b2) g / (c2 r (r + eps)^2)  (0 where r == 0, the
    g = v = 0 corner with eps_root = 0, whose derivative does not exist). dtheta'/dg = -lr * df/dg.

    Returns:
        name -> tensor df/dg with the shapes of ``grads``.
    """
    b1, b2 = betas
    k = state.step + 1
    c1, c2 = 1 - b1**k, 1 - b2**k
    out = {}
    for name, g in grads.items():
        m = state.exp_avg.get(name)
        v = state.exp_avg_sq.get(name)
        m = (1 - b1) * g if m is None else b1 * m + (1 - b1) * g
        v = (1 - b2) * g * g if v is None else b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / c1, v / c2
        r = torch.sqrt(v_hat + eps_root)
        denom = r + eps
        second = torch.where(r > 0, m_hat * (1 - b2) * g / (c2 * r.clamp_min(torch.finfo(r.dtype).tiny) * denom**2),
                             torch.zeros_like(r))
        out[name] = (1 - b1) / (c1 * denom) - second
    return out


@dataclass
class MetaGradient:
    """What :func:`meta_gradient` returns.

    Attributes:
        value: J, the validation loss after the inner steps (detached scalar tensor).
        grads: dJ/dphi, one tensor (or ``None`` if unused) per trainable rater parameter, in the order
            of ``[p for p in rater.parameters() if p.requires_grad]``.
        inner: the :class:`InnerResult` (final theta and optimiser state, detached; weights per step).
        method: ``"forward"`` or ``"reverse"``.
    """

    value: torch.Tensor
    grads: list
    inner: InnerResult
    method: str


def one_step_meta_gradient(
    rater: torch.nn.Module,
    unet: torch.nn.Module,
    scheduler,
    train_batch: Mapping[str, torch.Tensor],
    val_batch: Mapping[str, torch.Tensor],
    *,
    inner_lr: float,
    inner_optimizer: str = "sgd",
    temperature: float = 1.0,
    state: Optional[InnerState] = None,
    adam_betas=(0.9, 0.999),
    adam_eps: float = 1e-8,
    adam_eps_root: float = 1e-16,
    weighting_scope: Optional[str] = None,
    chunk_size: Optional[int] = None,
) -> MetaGradient:
    r"""Exact dJ/dphi for K = 1 inner step, without a second-order graph.

    Steps (M = B*N samples, w = rater weights, l_i per-sample losses):

    1. g = grad_theta (1/M) sum_i w_i l_i(theta_0)      (first-order backward, w detached)
    2. theta_1 = U(theta_0, g);  J = L_val(theta_1);  G = grad_theta L_val(theta_1)
    3. u = lr * G (SGD) or lr * (df/dg) * G (Adam, :func:`adam_update_derivative`)
    4. c_i = <grad l_i(theta_0), u> for all i by ONE JVP (:func:`per_sample_loss_jvp`)
    5. dJ/dw_i = -c_i / M;  dJ/dphi = backward of w through the rater with these output gradients.

    Equal to ``torch.autograd.grad(meta_objective(..., K=1), rater.parameters())`` (tested to 1e-6
    relative in float64). Arguments as in :func:`unroll` with a single training batch.
    """
    _check_inner_optimizer(inner_optimizer, inner_lr)
    if state is None:
        state = InnerState.from_module(unet)
    state = state.detached()
    rater_params = [p for p in rater.parameters() if p.requires_grad]
    flat, _, n = flatten_candidates(train_batch)
    M = flat["x0"].shape[0]
    with torch.enable_grad():
        w = rater_weights(rater, train_batch, temperature, weighting_scope)  # (M,), graph to phi
    theta0 = {k: v.detach() for k, v in state.params.items()}
    with _sdpa_context(), torch.enable_grad():
        th = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
        per_sample = per_sample_diffusion_loss(
            _functional_denoiser(unet, th), scheduler, flat["x0"], flat["noise"], flat["timesteps"],
            flat.get("class_labels"),
        )
        inner_loss = (w.detach() * per_sample).mean()
        g = dict(zip(th.keys(), torch.autograd.grad(inner_loss, list(th.values()))))
    new_state = _inner_update(state, g, inner_optimizer, inner_lr, adam_betas, adam_eps, adam_eps_root).detached()
    with torch.enable_grad():
        th1 = {k: v.clone().requires_grad_(True) for k, v in new_state.params.items()}
        J = validation_loss_at(unet, scheduler, th1, val_batch)
        G = dict(zip(th1.keys(), torch.autograd.grad(J, list(th1.values()))))
    if inner_optimizer == "sgd":
        u = {k: inner_lr * G[k] for k in G}
    else:
        dfdg = adam_update_derivative(state, g, adam_betas, adam_eps, adam_eps_root)
        u = {k: inner_lr * dfdg[k] * G[k] for k in G}
    c = per_sample_loss_jvp(unet, scheduler, theta0, flat, u, chunk_size=chunk_size)
    dJ_dw = (-c / M).to(w.dtype)
    grads = torch.autograd.grad(w, rater_params, grad_outputs=dJ_dw, allow_unused=True)
    inner = InnerResult(state=new_state, inner_losses=[float(inner_loss.detach())], weights=[w.detach()])
    return MetaGradient(value=J.detach(), grads=list(grads), inner=inner, method="forward")


def meta_gradient(
    rater: torch.nn.Module,
    unet: torch.nn.Module,
    scheduler,
    train_batches: Sequence[Mapping[str, torch.Tensor]],
    val_batch: Mapping[str, torch.Tensor],
    *,
    method: str = "auto",
    inner_lr: float,
    inner_optimizer: str = "sgd",
    temperature: float = 1.0,
    state: Optional[InnerState] = None,
    adam_betas=(0.9, 0.999),
    adam_eps: float = 1e-8,
    adam_eps_root: float = 1e-16,
    truncate_window: Optional[int] = None,
    weighting_scope: Optional[str] = None,
    chunk_size: Optional[int] = None,
) -> MetaGradient:
    r"""J and the exact dJ/dphi, by the cheapest exact route.

    ``method``: ``"forward"`` (K = 1 only: :func:`one_step_meta_gradient`), ``"reverse"`` (backpropagation
    through the unrolled updates, :func:`meta_objective`; any K, optional ``truncate_window``), or
    ``"auto"`` (forward for K = 1 without truncation, reverse otherwise). ``chunk_size``: samples per
    forward-mode pass (bounds the JVP's memory; forward mode only).

    Raises:
        ValueError: ``method`` unknown, or ``"forward"`` with K != 1 or a truncation window.
    """
    if method not in META_GRADIENT_METHODS:
        raise ValueError(f"meta-gradient method must be one of {META_GRADIENT_METHODS}, got {method!r}")
    K = len(train_batches)
    if method == "auto":
        method = "forward" if K == 1 and truncate_window is None else "reverse"
    if method == "forward":
        if K != 1 or truncate_window is not None:
            raise ValueError(f"the forward-mode meta-gradient is exact for K = 1 inner step only (got K = {K}"
                             f"{', truncate_window' if truncate_window is not None else ''}); use 'reverse'")
        return one_step_meta_gradient(
            rater, unet, scheduler, train_batches[0], val_batch, inner_lr=inner_lr, inner_optimizer=inner_optimizer,
            temperature=temperature, state=state, adam_betas=adam_betas, adam_eps=adam_eps,
            adam_eps_root=adam_eps_root, weighting_scope=weighting_scope, chunk_size=chunk_size,
        )
    J, inner = meta_objective(
        rater, unet, scheduler, train_batches, val_batch, inner_lr=inner_lr, inner_optimizer=inner_optimizer,
        temperature=temperature, state=state, adam_betas=adam_betas, adam_eps=adam_eps, adam_eps_root=adam_eps_root,
        truncate_window=truncate_window, weighting_scope=weighting_scope, return_inner=True,
    )
    params = [p for p in rater.parameters() if p.requires_grad]
    grads = torch.autograd.grad(J, params, allow_unused=True) if J.requires_grad else [None] * len(params)
    inner = InnerResult(state=inner.state.detached(), inner_losses=inner.inner_losses, weights=inner.weights)
    return MetaGradient(value=J.detach(), grads=list(grads), inner=inner, method="reverse")
