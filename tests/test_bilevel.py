"""Meta-gradient tests: finite differences (float64), a hand-unrolled reference, torch.optim parity."""

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from noise_rater import NoiseRaterModel
from noise_rater.bilevel import meta_objective, unroll


def tiny_unet(attention=True, dtype=torch.float64, num_class_embeds=None):
    torch.manual_seed(0)
    down = ("DownBlock2D", "AttnDownBlock2D") if attention else ("DownBlock2D", "DownBlock2D")
    up = ("AttnUpBlock2D", "UpBlock2D") if attention else ("UpBlock2D", "UpBlock2D")
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 8), layers_per_block=1,
        norm_num_groups=4, down_block_types=down, up_block_types=up, attention_head_dim=4,
        num_class_embeds=num_class_embeds,
    )
    return unet.to(dtype)


def tiny_rater(dtype=torch.float64, num_class_embeds=None):
    torch.manual_seed(1)
    r = NoiseRaterModel(sample_size=8, in_channels=1, block_out_channels=(4, 8), downsample=(True, False),
                        time_embedding_dim=8, norm_num_groups=2, num_class_embeds=num_class_embeds)
    # random (not default-init) head so the weights are far from uniform
    with torch.no_grad():
        for p in r.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return r.to(dtype)


def batches(K, B=4, dtype=torch.float64, seed=2, labels=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(K + 1):
        b = {
            "x0": torch.rand(B, 1, 8, 8, generator=g, dtype=dtype) * 2 - 1,
            "noise": torch.randn(B, 1, 8, 8, generator=g, dtype=dtype),
            "timesteps": torch.randint(0, 100, (B,), generator=g),
        }
        if labels:
            b["class_labels"] = torch.randint(0, 3, (B,), generator=g)
        out.append(b)
    return out[:K], out[K]


class Lin(torch.nn.Module):
    """A linear denoiser eps_hat = a * x_t + b (a = 0.3, b = -0.1), simple enough to unroll by hand."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(-0.1, dtype=torch.float64))

    def forward(self, x_t, t, class_labels=None):
        return (self.a * x_t + self.b,)


def flat_grad(rater, J):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(J, list(rater.parameters()))])


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_meta_gradient_matches_central_finite_differences(opt, pred):
    unet, rater = tiny_unet(attention=True), tiny_rater()
    sched = DDPMScheduler(num_train_timesteps=100, prediction_type=pred)
    train, val = batches(K=2)
    lr = 0.5 if opt == "sgd" else 0.01
    # Adam's first update g/sqrt(g^2) is nearly a sign function for small |g|: its third derivative
    # is large, so central differences need a smaller step (h = 1e-7, still fine in float64).
    h = 1e-5 if opt == "sgd" else 1e-7
    f = lambda: meta_objective(rater, unet, sched, train, val, inner_lr=lr, inner_optimizer=opt, temperature=0.7)
    grad = flat_grad(rater, f())
    params = list(rater.parameters())
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        d = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
        with torch.no_grad():
            for p, di in zip(params, d):
                p.add_(h * di)
            jp = f().item()
            for p, di in zip(params, d):
                p.sub_(2 * h * di)
            jm = f().item()
            for p, di in zip(params, d):
                p.add_(h * di)
        fd = (jp - jm) / (2 * h)
        analytic = torch.dot(grad, torch.cat([x.reshape(-1) for x in d])).item()
        assert abs(fd) > 1e-8, "direction derivative should not vanish"
        assert analytic == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_meta_gradient_matches_hand_unrolled_reference():
    """A tiny linear denoiser eps_hat = a * x_t + b, unrolled by hand with plain tensors."""

    model, rater = Lin(), tiny_rater()
    sched = DDPMScheduler(num_train_timesteps=100)
    train, val = batches(K=3)
    lr, tau = 0.2, 1.3
    J = meta_objective(rater, model, sched, train, val, inner_lr=lr, temperature=tau)
    grad = flat_grad(rater, J)

    abar = sched.alphas_cumprod.to(torch.float64)
    def xt(b):
        ab = abar[b["timesteps"]].view(-1, 1, 1, 1)
        return ab.sqrt() * b["x0"] + (1 - ab).sqrt() * b["noise"]

    a = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    bb = torch.tensor(-0.1, dtype=torch.float64, requires_grad=True)
    for b in train:
        s = rater(b["x0"], b["noise"], b["timesteps"]).scores
        w = len(s) * torch.exp(s / tau) / torch.exp(s / tau).sum()
        x = xt(b)
        # closed-form gradients of mean_i w_i * mean_pix (a x + b - eps)^2
        r = a * x + bb - b["noise"]
        n_pix = x[0].numel()
        ga = (w.view(-1, 1, 1, 1) * 2 * r * x).sum() / (n_pix * len(s))
        gb = (w.view(-1, 1, 1, 1) * 2 * r).sum() / (n_pix * len(s))
        a, bb = a - lr * ga, bb - lr * gb
    xv = xt(val)
    J_ref = ((a * xv + bb - val["noise"]) ** 2).mean()
    assert J.item() == pytest.approx(J_ref.item(), rel=1e-12)
    grad_ref = flat_grad(rater, J_ref)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-12)


def test_inner_adam_matches_torch_optim_adam_values():
    unet, rater = tiny_unet(attention=False), tiny_rater()
    sched = DDPMScheduler(num_train_timesteps=100)
    train, _ = batches(K=3)
    res = unroll(rater, unet, sched, train, inner_lr=0.01, inner_optimizer="adam", create_graph=False,
                 adam_eps_root=0.0)
    ref = tiny_unet(attention=False)
    opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    for b in train:
        with torch.no_grad():
            w = 4 * torch.softmax(rater(b["x0"], b["noise"], b["timesteps"]).scores, 0)
        x_t = sched.add_noise(b["x0"], b["noise"], b["timesteps"])
        per = (ref(x_t, b["timesteps"]).sample - b["noise"]).pow(2).flatten(1).mean(1)
        opt.zero_grad()
        (w * per).mean().backward()
        opt.step()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(res.state.params[n], p.detach(), rtol=1e-7, atol=1e-9)


def test_unet_untouched_and_float32_with_class_labels():
    unet, rater = tiny_unet(dtype=torch.float32, num_class_embeds=3), tiny_rater(torch.float32, num_class_embeds=3)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    sched = DDPMScheduler(num_train_timesteps=100)
    train, val = batches(K=2, dtype=torch.float32, labels=True)
    J = meta_objective(rater, unet, sched, train, val, inner_lr=0.1)
    g = torch.autograd.grad(J, list(rater.parameters()))
    assert all(torch.isfinite(x).all() for x in g) and any(x.abs().sum() > 0 for x in g)
    for n, p in unet.named_parameters():
        assert torch.equal(before[n], p.detach()) and p.grad is None


def test_deterministic_and_uniform_rater_equals_plain_steps():
    unet, rater = tiny_unet(attention=False), tiny_rater()
    sched = DDPMScheduler(num_train_timesteps=100)
    train, val = batches(K=2)
    a = meta_objective(rater, unet, sched, train, val, inner_lr=0.3)
    b = meta_objective(rater, unet, sched, train, val, inner_lr=0.3)
    assert a.item() == b.item()
    # a rater with constant scores gives w = 1, i.e. exactly the uniform (rater=None) unroll
    with torch.no_grad():
        for p in rater.head[-1].parameters():
            p.zero_()
        for p in rater.head[0].parameters():
            p.zero_()
    s_uniform = unroll(None, unet, sched, train, inner_lr=0.3, create_graph=False).state.params
    s_const = unroll(rater, unet, sched, train, inner_lr=0.3, create_graph=False).state.params
    for n in s_uniform:
        torch.testing.assert_close(s_const[n], s_uniform[n], rtol=0, atol=1e-14)


def test_truncated_window_differs_only_in_gradient():
    unet, rater = tiny_unet(attention=False), tiny_rater()
    sched = DDPMScheduler(num_train_timesteps=100)
    train, val = batches(K=3)
    full = meta_objective(rater, unet, sched, train, val, inner_lr=0.5)
    trunc = meta_objective(rater, unet, sched, train, val, inner_lr=0.5, truncate_window=1)
    assert full.item() == pytest.approx(trunc.item(), rel=1e-12)
    g_full, g_trunc = flat_grad(rater, full), flat_grad(rater, trunc)
    assert not torch.allclose(g_full, g_trunc)
    # window == K is the exact gradient
    g_k = flat_grad(rater, meta_objective(rater, unet, sched, train, val, inner_lr=0.5, truncate_window=3))
    torch.testing.assert_close(g_k, g_full)


def test_bad_arguments():
    unet, rater = tiny_unet(attention=False), tiny_rater()
    sched = DDPMScheduler(num_train_timesteps=100)
    train, val = batches(K=1)
    with pytest.raises(ValueError, match="inner_optimizer"):
        meta_objective(rater, unet, sched, train, val, inner_lr=0.1, inner_optimizer="rmsprop")
    with pytest.raises(ValueError, match="inner_lr"):
        meta_objective(rater, unet, sched, train, val, inner_lr=0.0)
    with pytest.raises(ValueError, match="at least one"):
        meta_objective(rater, unet, sched, [], val, inner_lr=0.1)


# ---- grouped layout (B images x N candidate noises), per-candidate scope, forward-mode K = 1 ----------------
from noise_rater.bilevel import (  # noqa: E402
    InnerState, adam_update_derivative, flatten_candidates, meta_gradient, per_sample_loss_jvp,
)


def grouped_batches(K, B=3, N=4, dtype=torch.float64, seed=5, labels=False, V=5):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(K):
        b = {"x0": torch.rand(B, 1, 8, 8, generator=g, dtype=dtype) * 2 - 1,
             "noise": torch.randn(B, N, 1, 8, 8, generator=g, dtype=dtype),
             "timesteps": torch.randint(0, 100, (B,), generator=g)}
        if labels:
            b["class_labels"] = torch.randint(0, 3, (B,), generator=g)
        out.append(b)
    val = {"x0": torch.rand(V, 1, 8, 8, generator=g, dtype=dtype) * 2 - 1,
           "noise": torch.randn(V, 1, 8, 8, generator=g, dtype=dtype),
           "timesteps": torch.randint(0, 100, (V,), generator=g)}
    if labels:
        val["class_labels"] = torch.randint(0, 3, (V,), generator=g)
    return out, val


def _fd_check(rater, f, grad, h, n_dirs=2, rel=1e-5):
    params = list(rater.parameters())
    g = torch.Generator().manual_seed(3)
    for _ in range(n_dirs):
        d = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
        with torch.no_grad():
            for p, di in zip(params, d):
                p.add_(h * di)
            jp = f()
            for p, di in zip(params, d):
                p.sub_(2 * h * di)
            jm = f()
            for p, di in zip(params, d):
                p.add_(h * di)
        fd = (jp - jm) / (2 * h)
        analytic = torch.dot(grad, torch.cat([x.reshape(-1) for x in d])).item()
        assert abs(fd) > 1e-9, "directional derivative should not vanish"
        assert analytic == pytest.approx(fd, rel=rel, abs=1e-10)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("scope", ["candidates", "batch"])
def test_grouped_meta_gradient_matches_central_finite_differences(opt, scope):
    """K = 2 (reverse mode) and K = 1 (forward mode), grouped layout, attention UNet, float64."""
    unet, rater = tiny_unet(attention=True), tiny_rater()
    sched = DDPMScheduler(num_train_timesteps=100)
    lr = 0.5 if opt == "sgd" else 0.01
    h = 1e-5 if opt == "sgd" else 1e-7
    for K in (2, 1):
        train, val = grouped_batches(K)
        kw = dict(inner_lr=lr, inner_optimizer=opt, temperature=0.7, weighting_scope=scope)
        mg = meta_gradient(rater, unet, sched, train, val, **kw)
        assert mg.method == ("forward" if K == 1 else "reverse")
        grad = torch.cat([x.reshape(-1) for x in mg.grads])
        f = lambda: meta_objective(rater, unet, sched, train, val, **kw).item()  # noqa: E731
        assert mg.value.item() == pytest.approx(f(), rel=1e-12)
        _fd_check(rater, f, grad, h)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("scope", ["candidates", "batch"])
def test_forward_mode_one_step_equals_reverse_mode(opt, scope):
    """The JVP route equals backpropagation through the unrolled step to 1e-6 relative (float64), with an
    attention UNet, class labels, and an Adam state that is not fresh (step 3, non-zero moments)."""
    unet, rater = tiny_unet(attention=True, num_class_embeds=3), tiny_rater(num_class_embeds=3)
    sched = DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction")
    (train,), val = grouped_batches(1, labels=True)
    lr = 0.5 if opt == "sgd" else 0.01
    state = InnerState.from_module(unet)
    if opt == "adam":  # a warm optimiser state: two previous uniform steps
        warm, _ = grouped_batches(2, labels=True, seed=11)
        state = unroll(None, unet, sched, warm, inner_lr=lr, inner_optimizer="adam", state=state,
                       create_graph=False).state
        assert state.step == 2
    kw = dict(inner_lr=lr, inner_optimizer=opt, temperature=0.7, weighting_scope=scope, state=state)
    fwd = meta_gradient(rater, unet, sched, [train], val, method="forward", **kw)
    rev = meta_gradient(rater, unet, sched, [train], val, method="reverse", **kw)
    a = torch.cat([x.reshape(-1) for x in fwd.grads])
    b = torch.cat([x.reshape(-1) for x in rev.grads])
    assert b.norm() > 0
    assert ((a - b).norm() / b.norm()).item() < 1e-6
    assert fwd.value.item() == pytest.approx(rev.value.item(), rel=1e-12)
    for n in rev.inner.state.params:  # the same theta_1
        torch.testing.assert_close(fwd.inner.state.params[n], rev.inner.state.params[n], rtol=1e-9, atol=1e-11)


def test_grouped_meta_gradient_matches_hand_unrolled_reference():
    """Per-candidate softmax on a linear denoiser eps_hat = a x_t + b, unrolled by hand (K = 2)."""

    model, rater = Lin(), tiny_rater()
    sched = DDPMScheduler(num_train_timesteps=100)
    train, val = grouped_batches(K=2)
    lr, tau = 0.2, 1.3
    J = meta_objective(rater, model, sched, train, val, inner_lr=lr, temperature=tau, weighting_scope="candidates")
    grad = flat_grad(rater, J)
    abar = sched.alphas_cumprod.to(torch.float64)
    a = torch.tensor(0.3, dtype=torch.float64)
    bb = torch.tensor(-0.1, dtype=torch.float64)
    for b in train:
        B, N = b["noise"].shape[:2]
        ab = abar[b["timesteps"]].view(B, 1, 1, 1, 1)
        x = ab.sqrt() * b["x0"][:, None] + (1 - ab).sqrt() * b["noise"]  # (B, N, 1, 8, 8)
        s = torch.stack([rater(b["x0"], b["noise"][:, n], b["timesteps"]).scores for n in range(N)], dim=1)  # (B, N)
        w = N * torch.exp(s / tau) / torch.exp(s / tau).sum(dim=1, keepdim=True)
        r = a * x + bb - b["noise"]
        n_pix = x[0, 0].numel()
        wv = w.view(B, N, 1, 1, 1)
        ga = (wv * 2 * r * x).sum() / (n_pix * B * N)
        gb = (wv * 2 * r).sum() / (n_pix * B * N)
        a, bb = a - lr * ga, bb - lr * gb
    ab = abar[val["timesteps"]].view(-1, 1, 1, 1)
    xv = ab.sqrt() * val["x0"] + (1 - ab).sqrt() * val["noise"]
    J_ref = ((a * xv + bb - val["noise"]) ** 2).mean()
    assert J.item() == pytest.approx(J_ref.item(), rel=1e-12)
    torch.testing.assert_close(grad, flat_grad(rater, J_ref), rtol=1e-9, atol=1e-12)


def test_per_sample_loss_jvp_matches_per_sample_gradients():
    unet = tiny_unet(attention=True)
    sched = DDPMScheduler(num_train_timesteps=100)
    (b,), _ = grouped_batches(1)
    flat, B, N = flatten_candidates(b)
    params = {n: p.detach() for n, p in unet.named_parameters()}
    g = torch.Generator().manual_seed(0)
    v = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
    got = per_sample_loss_jvp(unet, sched, params, flat, v, chunk_size=5)
    ref = []
    for i in range(B * N):  # one backward pass per sample
        unet.zero_grad()
        x_t = sched.add_noise(flat["x0"][i:i + 1], flat["noise"][i:i + 1], flat["timesteps"][i:i + 1])
        loss = (unet(x_t, flat["timesteps"][i:i + 1]).sample - flat["noise"][i:i + 1]).pow(2).mean()
        grads = torch.autograd.grad(loss, list(unet.parameters()))
        ref.append(sum((gr * v[n]).sum() for (n, _), gr in zip(unet.named_parameters(), grads)))
    torch.testing.assert_close(got, torch.stack(ref), rtol=1e-10, atol=1e-12)


def test_adam_update_derivative_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    grads = {"w": torch.randn(50, generator=g, dtype=torch.float64) * 1e-3}
    state = InnerState({"w": torch.zeros(50, dtype=torch.float64)},
                       {"w": torch.randn(50, generator=g, dtype=torch.float64) * 1e-3},
                       {"w": torch.rand(50, generator=g, dtype=torch.float64) * 1e-6}, step=4)
    from noise_rater.bilevel import _adam_update
    d = adam_update_derivative(state, grads)["w"]
    h = 1e-9
    up = _adam_update(state, {"w": grads["w"] + h}, lr=1.0).params["w"]
    dn = _adam_update(state, {"w": grads["w"] - h}, lr=1.0).params["w"]
    torch.testing.assert_close(d, -(up - dn) / (2 * h), rtol=1e-5, atol=1e-6)


def test_scope_and_layout_errors():
    unet, rater = tiny_unet(attention=False), tiny_rater()
    sched = DDPMScheduler(num_train_timesteps=100)
    train, val = batches(K=1)  # flat layout: N = 1
    with pytest.raises(ValueError, match="N >= 2"):
        meta_objective(rater, unet, sched, train, val, inner_lr=0.1, weighting_scope="candidates")
    with pytest.raises(ValueError, match="weighting_scope"):
        meta_objective(rater, unet, sched, train, val, inner_lr=0.1, weighting_scope="image")
    bad = dict(train[0], noise=torch.randn(4, 2, 1, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="noise must have shape"):
        meta_objective(rater, unet, sched, [bad], val, inner_lr=0.1)
    with pytest.raises(ValueError, match="K = 1"):
        meta_gradient(rater, unet, sched, train * 2, val, method="forward", inner_lr=0.1)


def test_candidate_scope_weights_have_mean_one_per_group():
    rater = tiny_rater()
    (b,), _ = grouped_batches(1, B=3, N=4)
    from noise_rater.bilevel import rater_weights
    w = rater_weights(rater, b, temperature=0.5, weighting_scope="candidates").reshape(3, 4)
    torch.testing.assert_close(w.mean(dim=1), torch.ones(3, dtype=w.dtype))
    wb = rater_weights(rater, b, temperature=0.5, weighting_scope="batch")
    assert wb.mean().item() == pytest.approx(1.0) and not torch.allclose(wb.reshape(3, 4).mean(1), torch.ones(3, dtype=w.dtype))
