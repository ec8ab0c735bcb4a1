"""noise_rater.training.training_step: against a hand-written step, common random numbers across selectors,
other denoiser signatures, and gradient accumulation == one large batch (via accelerate)."""

import copy

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

from noise_rater import NoiseRaterModel
from noise_rater.sampling import (
    AssignmentNoiseSampler,
    KNNNoiseSampler,
    NoiseSelectingSampler,
    UniformNoiseSampler,
)
from noise_rater.training import NoiseGenerators, training_step

B, C, H, N, T = 6, 1, 8, 4, 50


def tiny_unet(channels=C, dtype=torch.float32, seed=0, **kwargs):
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=H, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                       layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), **kwargs)
    return unet.to(dtype)


def tiny_rater(seed=1, channels=C, dtype=torch.float32):
    torch.manual_seed(seed)
    r = NoiseRaterModel(sample_size=H, in_channels=channels, block_out_channels=(4, 8), downsample=(True, False),
                        time_embedding_dim=8, norm_num_groups=2, num_train_timesteps=T)
    with torch.no_grad():
        for p in r.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return r.to(dtype)


def x0_batch(b=B, channels=C, seed=5, dtype=torch.float32):
    return torch.rand(b, channels, H, H, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 - 1


def scheduler(prediction_type="epsilon"):
    return DDPMScheduler(num_train_timesteps=T, prediction_type=prediction_type)


class Recorder:
    """Wraps a selector and records what the step hands it."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def select(self, x0, timesteps, candidates, class_labels=None, generator=None, return_weights=False):
        self.seen.append((timesteps.clone(), candidates.clone()))
        return self.inner.select(x0, timesteps, candidates, class_labels, generator, return_weights)


# ----------------------------------------------------------------------------------------------------------------
# the step against a hand-written one
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighting", ["uniform", "min_snr"])
def test_step_matches_hand_written_step(weighting):
    unet, sched, x0 = tiny_unet(dtype=torch.float64), scheduler(), x0_batch(dtype=torch.float64)
    gamma = 3.0
    out = training_step(unet, sched, x0, UniformNoiseSampler(), generators=NoiseGenerators.from_seed(3),
                        num_candidates=N, loss_weighting=weighting, snr_gamma=gamma)
    # the same streams, drawn by hand
    ref = NoiseGenerators.from_seed(3)
    t = torch.randint(0, T, (B,), generator=ref.timesteps)
    pool = torch.randn(B, N, C, H, H, generator=ref.candidates, dtype=torch.float64)
    eps = pool[:, 0]
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T), 0).double()[t].view(-1, 1, 1, 1)  # as DDPMScheduler
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    with torch.no_grad():
        pred = unet(x_t, t).sample
    loss_ref = ((pred - eps) ** 2).mean(dim=(1, 2, 3))
    snr = (abar / (1 - abar)).flatten()
    w_ref = torch.ones(B, dtype=torch.float64) if weighting == "uniform" else torch.clamp(snr, max=gamma) / snr
    assert torch.equal(out.timesteps, t) and torch.equal(out.noise, eps)
    torch.testing.assert_close(out.per_sample_loss.double().detach(), loss_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.weights.double(), w_ref, rtol=1e-6, atol=1e-7)  # weights are float32
    torch.testing.assert_close(out.loss.double().detach(), (w_ref * loss_ref).mean(), rtol=1e-6, atol=1e-8)
    if weighting == "min_snr":
        assert (out.weights < 1).any() and (out.weights == 1).any()  # both branches of the clipping occur
    assert out.loss.requires_grad and not out.weights.requires_grad
    assert out.select_time_s >= 0 and set(out.logs()) >= {"select_time_s", "weight_mean"}


def test_importance_weights_compose_with_min_snr_and_rater_soft():
    unet, sched, x0, rater = tiny_unet(), scheduler(), x0_batch(), tiny_rater()
    selector = NoiseSelectingSampler(rater, num_candidates=N, selection="importance")
    out = training_step(unet, sched, x0, selector, generators=NoiseGenerators.from_seed(4), num_candidates=N,
                        loss_weighting="rater_soft", rater=rater, rater_temperature=0.5)
    # importance weight 1 / (N q) of the chosen candidate, times B softmax(s / 0.5) of the chosen noises
    ref = NoiseGenerators.from_seed(4)
    t = torch.randint(0, T, (B,), generator=ref.timesteps)
    pool = torch.randn(B, N, C, H, H, generator=ref.candidates)
    with torch.no_grad():
        scores = torch.stack([rater(x0, pool[:, n], t).scores for n in range(N)], dim=1)  # (B, N)
        q = torch.softmax(scores, dim=1)
        idx = torch.multinomial(q, 1, generator=ref.selection).squeeze(1)
        chosen = pool[torch.arange(B), idx]
        s_chosen = rater(x0, chosen, t).scores
    w_ref = 1.0 / (N * q[torch.arange(B), idx]) * B * torch.softmax(s_chosen / 0.5, dim=0)
    assert torch.equal(out.noise, chosen)
    torch.testing.assert_close(out.weights, w_ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out.weights, torch.ones(B))


def test_nonfinite_scores_raise_or_are_flagged():
    rater = tiny_rater()
    with torch.no_grad():
        rater.head[-1].bias.fill_(float("nan"))
    selector = NoiseSelectingSampler(rater, num_candidates=N)
    args = (tiny_unet(), scheduler(), x0_batch(), selector)
    with pytest.raises(FloatingPointError):
        training_step(*args, generators=NoiseGenerators.from_seed(0), num_candidates=N)
    out = training_step(*args, generators=NoiseGenerators.from_seed(0), num_candidates=N, catch_nonfinite_scores=True)
    assert out.selection_failed and torch.equal(out.noise, torch.zeros_like(out.noise))


def test_bad_arguments():
    args = (tiny_unet(), scheduler(), x0_batch(), UniformNoiseSampler())
    with pytest.raises(ValueError, match="num_candidates"):
        training_step(*args, num_candidates=0)
    with pytest.raises(ValueError, match="loss_weighting"):
        training_step(*args, loss_weighting="snr")
    with pytest.raises(ValueError, match="needs a rater"):
        training_step(*args, loss_weighting="rater_soft")
    with pytest.raises(ValueError, match="candidates"):
        training_step(*args, candidates=torch.randn(B, N, C, H, H + 1))


# ----------------------------------------------------------------------------------------------------------------
# common random numbers
# ----------------------------------------------------------------------------------------------------------------


def test_every_selector_sees_the_same_timesteps_pools_and_global_rng():
    rater = tiny_rater()
    selectors = {
        "uniform": UniformNoiseSampler(),
        "knn": KNNNoiseSampler(N),
        "assignment": AssignmentNoiseSampler(),
        "rater_argmax": NoiseSelectingSampler(rater, num_candidates=N, selection="argmax"),
        "rater_importance": NoiseSelectingSampler(rater, num_candidates=N, selection="importance"),
    }
    seen, chosen, rng_after = {}, {}, {}
    for name, inner in selectors.items():
        unet, sched, gens, rec = tiny_unet(), scheduler(), NoiseGenerators.from_seed(7), Recorder(inner)
        torch.manual_seed(123)  # the global stream (random flips in the data) must not depend on the method
        chosen[name] = []
        for k in range(3):
            out = training_step(unet, sched, x0_batch(seed=k), rec, generators=gens, num_candidates=N)
            out.loss.backward()
            chosen[name].append(out.noise)
        seen[name], rng_after[name] = rec.seen, torch.get_rng_state()
    for name in selectors:
        for (t_a, p_a), (t_b, p_b) in zip(seen["uniform"], seen[name]):
            assert torch.equal(t_a, t_b) and torch.equal(p_a, p_b), name
        assert torch.equal(rng_after[name], rng_after["uniform"]), name
    assert not torch.equal(seen["uniform"][0][1], seen["uniform"][1][1])  # the pool changes from step to step
    for k, (t, pool) in enumerate(seen["uniform"]):
        x0 = x0_batch(seed=k)
        assert torch.equal(chosen["uniform"][k], pool[:, 0])
        nearest = (pool - x0[:, None]).flatten(2).pow(2).sum(-1).argmin(1)
        assert torch.equal(chosen["knn"][k], pool[torch.arange(B), nearest])
        # assignment permutes candidate 0 of the pool across the batch
        match = (chosen["assignment"][k][:, None] == pool[None, :, 0]).flatten(2).all(-1)  # (B, B)
        assert (match.sum(1) == 1).all() and (match.sum(0) == 1).all()
    assert any(not torch.equal(chosen["uniform"][k], chosen["knn"][k]) for k in range(3))


def test_generators_are_distinct_reproducible_and_per_process():
    a, b, c = NoiseGenerators.from_seed(0), NoiseGenerators.from_seed(0), NoiseGenerators.from_seed(0, 1)
    draws = lambda g: [torch.rand(4, generator=x) for x in g.as_dict().values()]  # noqa: E731
    da, db, dc = draws(a), draws(b), draws(c)
    assert all(torch.equal(x, y) for x, y in zip(da, db))
    assert not torch.equal(da[0], da[1]) and not torch.equal(da[1], da[2])
    assert not any(torch.equal(x, y) for x, y in zip(da, dc))
    state = a.state_dict()
    first = draws(a)
    a.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(first, draws(a)))
    with pytest.raises(KeyError, match="selection"):
        a.load_state_dict({"timesteps": state["timesteps"]})


def test_uniform_and_assignment_select_keep_their_call_behaviour():
    x0, g = x0_batch(), lambda: torch.Generator().manual_seed(9)  # noqa: E731
    assert torch.equal(UniformNoiseSampler()(x0, generator=g()), torch.randn(x0.shape, generator=g()))
    pool = torch.randn(B, N, C, H, H, generator=g())
    assert torch.equal(UniformNoiseSampler().select(x0, None, pool), pool[:, 0])
    assign = AssignmentNoiseSampler()
    assert torch.equal(assign.select(x0, None, pool), assign.select(x0, None, pool[:, 0]))
    with pytest.raises(ValueError, match="do not match"):
        UniformNoiseSampler().select(x0, None, pool[:, :, :, :4])


# ----------------------------------------------------------------------------------------------------------------
# other denoiser signatures
# ----------------------------------------------------------------------------------------------------------------


def test_class_labels_and_encoder_hidden_states():
    x0, labels = x0_batch(), torch.arange(B) % 3
    cond = tiny_unet(num_class_embeds=3)
    out = training_step(cond, scheduler(), x0, UniformNoiseSampler(), generators=NoiseGenerators.from_seed(1),
                        num_candidates=2, class_labels=labels)
    ref = NoiseGenerators.from_seed(1)
    t = torch.randint(0, T, (B,), generator=ref.timesteps)
    eps = torch.randn(B, 2, C, H, H, generator=ref.candidates)[:, 0]
    with torch.no_grad():
        x_t = scheduler().add_noise(x0, eps, t)
        per_ref = ((cond(x_t, t, class_labels=labels).sample - eps) ** 2).mean(dim=(1, 2, 3))
        per_other = ((cond(x_t, t, class_labels=(labels + 1) % 3).sample - eps) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.per_sample_loss.detach(), per_ref)
    assert not torch.allclose(per_ref, per_other)  # the labels reach the model

    torch.manual_seed(0)
    text_unet = UNet2DConditionModel(sample_size=H, in_channels=C, out_channels=C, block_out_channels=(8, 16),
                                     layers_per_block=1, norm_num_groups=4, cross_attention_dim=12,
                                     attention_head_dim=4,
                                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    ehs = torch.randn(B, 5, 12, generator=torch.Generator().manual_seed(2))
    out = training_step(text_unet, scheduler(), x0, KNNNoiseSampler(N), generators=NoiseGenerators.from_seed(1),
                        num_candidates=N, model_kwargs={"encoder_hidden_states": ehs})
    with torch.no_grad():
        x_t = scheduler().add_noise(x0, out.noise, out.timesteps)
        per_ref = ((text_unet(x_t, out.timesteps, encoder_hidden_states=ehs).sample - out.noise) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(out.per_sample_loss.detach(), per_ref)
    out.loss.backward()
    assert all(p.grad is not None for p in text_unet.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------------------
# gradient accumulation (accelerate) == one large batch; gradient checkpointing; bf16 autocast
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("selector_name,weighting", [("knn", "min_snr"), ("rater_argmax", "uniform")])
def test_gradient_accumulation_equals_large_batch(selector_name, weighting, fresh_accelerate_state):
    from accelerate import Accelerator

    dtype = torch.float64
    selector = KNNNoiseSampler(N) if selector_name == "knn" else \
        NoiseSelectingSampler(tiny_rater(dtype=dtype), num_candidates=N, selection="argmax")
    sched, x0 = scheduler(), x0_batch(8, dtype=dtype)
    gens = NoiseGenerators.from_seed(2)
    t = torch.randint(0, T, (8,), generator=gens.timesteps)
    pool = torch.randn(8, N, C, H, H, generator=gens.candidates, dtype=dtype)
    kw = dict(loss_weighting=weighting, snr_gamma=1.0, num_candidates=N)

    big = tiny_unet(dtype=dtype)
    small = copy.deepcopy(big)
    opt_big = torch.optim.AdamW(big.parameters(), lr=1e-2)
    training_step(big, sched, x0, selector, timesteps=t, candidates=pool, **kw).loss.backward()
    grads_big = [p.grad.clone() for p in big.parameters()]
    opt_big.step()

    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
    opt_small = torch.optim.AdamW(small.parameters(), lr=1e-2)
    small, opt_small = accelerator.prepare(small, opt_small)
    for k in range(2):
        sl = slice(4 * k, 4 * k + 4)
        with accelerator.accumulate(small):
            out = training_step(small, sched, x0[sl], selector, timesteps=t[sl], candidates=pool[sl], **kw)
            accelerator.backward(out.loss)
            if k == 0:
                assert not accelerator.sync_gradients
            else:
                for p, g in zip(small.parameters(), grads_big):
                    torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)
            opt_small.step()  # a no-op on the first micro-batch
            opt_small.zero_grad()
    for p, q in zip(small.parameters(), big.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    assert any(not torch.equal(p, q) for p, q in zip(big.parameters(), tiny_unet(dtype=dtype).parameters()))


def test_gradient_checkpointing_gives_the_same_gradients():
    x0, sched = x0_batch(dtype=torch.float64), scheduler()
    grads = []
    for checkpointing in (False, True):
        unet = tiny_unet(dtype=torch.float64)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        training_step(unet, sched, x0, KNNNoiseSampler(N), generators=NoiseGenerators.from_seed(0),
                      num_candidates=N).loss.backward()
        grads.append([p.grad for p in unet.parameters()])
    assert unet.is_gradient_checkpointing
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_bf16_autocast_gives_a_float32_loss_close_to_fp32():
    unet, sched, x0 = tiny_unet(), scheduler(), x0_batch()
    kw = dict(generators=None, num_candidates=N, timesteps=torch.arange(B) * 8, candidates=torch.randn(B, N, C, H, H))
    ref = training_step(unet, sched, x0, UniformNoiseSampler(), **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = training_step(unet, sched, x0, UniformNoiseSampler(), **kw)
    assert low.per_sample_loss.dtype == torch.float32 and low.loss.dtype == torch.float32
    torch.testing.assert_close(low.per_sample_loss, ref.per_sample_loss, rtol=5e-2, atol=1e-2)
    assert not torch.equal(low.per_sample_loss, ref.per_sample_loss)  # autocast did run in bf16


def test_build_selector_and_rater(tmp_path):
    from noise_rater.training import build_selector_and_rater
    from noise_rater.training_utils import UsageError

    tiny_rater().save_pretrained(str(tmp_path / "rater"))
    selector, rater = build_selector_and_rater("knn", num_candidates=3)
    assert isinstance(selector, KNNNoiseSampler) and selector.num_candidates == 3 and rater is None
    selector, rater = build_selector_and_rater("rater", num_candidates=3, selection_rule="importance",
                                               rater_model_name_or_path=str(tmp_path / "rater"), in_channels=C)
    assert isinstance(selector, NoiseSelectingSampler) and selector.rater is rater and not rater.training
    selector, rater = build_selector_and_rater("uniform", loss_weighting="rater_soft",
                                               rater_model_name_or_path=str(tmp_path / "rater"))
    assert isinstance(selector, UniformNoiseSampler) and not any(p.requires_grad for p in rater.parameters())
    with pytest.raises(UsageError, match="in_channels=1, the data have 4"):
        build_selector_and_rater("rater", rater_model_name_or_path=str(tmp_path / "rater"), in_channels=4)
    with pytest.raises(UsageError, match="no such folder"):
        build_selector_and_rater("rater", rater_model_name_or_path=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="cannot load the rater"):
        build_selector_and_rater("rater", rater_model_name_or_path=str(tmp_path / "empty"))
