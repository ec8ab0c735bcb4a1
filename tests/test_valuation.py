"""Exact one-step influence, the oracle selector and valuation accuracy, against independent references."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from scipy.stats import spearmanr

from noise_rater import one_step_influence
from noise_rater.valuation import OracleNoiseSelector, evaluate_valuation, valuation_accuracy

from test_bilevel import tiny_rater, tiny_unet


def _data(B=3, N=4, V=6, dtype=torch.float64, labels=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(B, 1, 8, 8, generator=g, dtype=dtype) * 2 - 1
    cands = torch.randn(B, N, 1, 8, 8, generator=g, dtype=dtype)
    t = torch.randint(0, 100, (B,), generator=g)
    val = {"x0": torch.rand(V, 1, 8, 8, generator=g, dtype=dtype) * 2 - 1,
           "noise": torch.randn(V, 1, 8, 8, generator=g, dtype=dtype), "timesteps": torch.randint(0, 100, (V,), generator=g)}
    lab = None
    if labels:
        lab = torch.randint(0, 3, (B,), generator=g)
        val["class_labels"] = torch.randint(0, 3, (V,), generator=g)
    return x0, t, cands, val, lab


def _loss(unet, sched, x0, eps, t, lab=None):
    x_t = sched.add_noise(x0, eps, t)
    out = unet(x_t, t, class_labels=lab).sample if lab is not None else unet(x_t, t).sample
    target = sched.get_velocity(x0, eps, t) if sched.config.prediction_type == "v_prediction" else eps
    return (out - target).pow(2).flatten(1).mean(1)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_influence_equals_per_sample_gradient_dot_products(pred):
    unet = tiny_unet(attention=True, num_class_embeds=3)
    sched = DDPMScheduler(num_train_timesteps=100, prediction_type=pred)
    x0, t, cands, val, lab = _data(labels=True)
    c = one_step_influence(unet, sched, x0, t, cands, val, class_labels=lab, chunk_size=5)
    assert c.shape == (3, 4)
    params = list(unet.parameters())
    g_val = torch.autograd.grad(_loss(unet, sched, val["x0"], val["noise"], val["timesteps"], val["class_labels"]).mean(),
                                params)
    ref = torch.zeros(3, 4, dtype=torch.float64)
    for b in range(3):
        for n in range(4):
            l = _loss(unet, sched, x0[b:b + 1], cands[b:b + 1, n], t[b:b + 1], lab[b:b + 1]).sum()
            gl = torch.autograd.grad(l, params)
            ref[b, n] = sum((a * v).sum() for a, v in zip(gl, g_val))
    torch.testing.assert_close(c, ref, rtol=1e-9, atol=1e-12)
    for p in unet.parameters():
        assert p.grad is None


def test_influence_is_the_first_order_decrease_of_the_validation_loss():
    """L_val(theta - h grad l_bn) = L_val(theta) - h c_bn + O(h^2): central differences in h."""
    unet = tiny_unet(attention=False)
    sched = DDPMScheduler(num_train_timesteps=100)
    x0, t, cands, val, _ = _data(B=2, N=3)
    c = one_step_influence(unet, sched, x0, t, cands, val)
    params = list(unet.parameters())
    base = [p.detach().clone() for p in params]
    h = 1e-4
    for b, n in [(0, 0), (1, 2)]:
        gl = torch.autograd.grad(_loss(unet, sched, x0[b:b + 1], cands[b:b + 1, n], t[b:b + 1]).sum(), params)
        vals = []
        for sign in (+1, -1):
            with torch.no_grad():
                for p, p0, g in zip(params, base, gl):
                    p.copy_(p0 - sign * h * g)
                vals.append(_loss(unet, sched, val["x0"], val["noise"], val["timesteps"]).mean().item())
        with torch.no_grad():
            for p, p0 in zip(params, base):
                p.copy_(p0)
        decrease_per_lr = -(vals[0] - vals[1]) / (2 * h)
        assert c[b, n].item() == pytest.approx(decrease_per_lr, rel=1e-6)


def test_influence_shape_errors():
    unet = tiny_unet(attention=False)
    sched = DDPMScheduler(num_train_timesteps=100)
    x0, t, cands, val, _ = _data()
    with pytest.raises(ValueError, match="candidates must have shape"):
        one_step_influence(unet, sched, x0, t, cands[:, 0], val)
    with pytest.raises(ValueError, match="candidates must have shape"):
        one_step_influence(unet, sched, x0, t, cands[:2], val)


def test_oracle_selector_keeps_the_most_useful_candidate_and_latents():
    """Works on any channel count (4-channel latents) and picks argmax of the exact influence."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 8), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4)
    sched = DDPMScheduler(num_train_timesteps=100)
    g = torch.Generator().manual_seed(1)
    x0, cands = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 5, 4, 8, 8, generator=g)
    t = torch.randint(0, 100, (3,), generator=g)
    val = {"x0": torch.randn(4, 4, 8, 8, generator=g), "noise": torch.randn(4, 4, 8, 8, generator=g),
           "timesteps": torch.randint(0, 100, (4,), generator=g)}
    sel = OracleNoiseSelector(unet, sched, lambda: val)
    noise, w = sel.select(x0, t, cands, return_weights=True)
    c = one_step_influence(unet, sched, x0, t, cands, val)
    for b in range(3):
        assert torch.equal(noise[b], cands[b, int(c[b].argmax())])
    assert torch.equal(w, torch.ones(3))


def test_valuation_accuracy_against_scipy_and_by_hand():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(20, 8, generator=g, dtype=torch.float64)
    s = c + 0.8 * torch.randn(20, 8, generator=g, dtype=torch.float64)
    s[3] = 1.0  # a constant group: rho undefined, left out
    m = valuation_accuracy(s, c)
    rhos = [spearmanr(s[i].numpy(), c[i].numpy()).statistic for i in range(20) if i != 3]
    assert m["spearman_rho"] == pytest.approx(float(np.mean(rhos)), rel=1e-12)
    assert m["num_groups_rho"] == 19 and m["num_groups"] == 20
    pick = [c[i, int(s[i].argmax())].item() for i in range(20)]
    assert m["gain_rater"] == pytest.approx(float(np.mean(pick)))
    assert m["gain_random"] == pytest.approx(c.mean().item())
    assert m["gain_oracle"] == pytest.approx(c.max(1).values.mean().item())
    frac = (np.mean(pick) - c.mean().item()) / (c.max(1).values.mean().item() - c.mean().item())
    assert m["fraction_of_oracle"] == pytest.approx(frac)
    assert valuation_accuracy(c, c)["fraction_of_oracle"] == pytest.approx(1.0)
    assert valuation_accuracy(c, c)["spearman_rho"] == pytest.approx(1.0)
    worst = valuation_accuracy(-c, c)
    assert worst["spearman_rho"] == pytest.approx(-1.0) and worst["fraction_of_oracle"] < 0
    with pytest.raises(ValueError, match="G, N"):
        valuation_accuracy(s[:, :3], c)


def test_evaluate_valuation_and_meta_trainer_report():
    from diffusers import UNet2DModel

    from noise_rater.meta_trainer import MetaTrainer, add_noise_and_timesteps

    cfg = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 8), layers_per_block=1,
               norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    rater = tiny_rater(torch.float32)
    sched = DDPMScheduler(num_train_timesteps=100)
    trainer = MetaTrainer(rater, lambda: UNet2DModel(**cfg), sched, population_size=2, inner_steps=1,
                          inner_model_lifetime=4, inner_optimizer="sgd", inner_lr=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    groups = add_noise_and_timesteps(x, 100, g, num_candidates=4)
    assert groups["noise"].shape == (6, 4, 1, 8, 8)
    val = add_noise_and_timesteps(torch.rand(5, 1, 8, 8, generator=g) * 2 - 1, 100, g)
    rep = trainer.valuation_report(groups, val)
    assert [r["member"] for r in rep] == [0, 1] and [r["age"] for r in rep] == [0, 2]
    for r in rep:
        assert -1 <= r["spearman_rho"] <= 1 and r["gain_oracle"] >= r["gain_random"] >= r["gain_worst"]
    direct = evaluate_valuation(rater, trainer.template, sched, groups, val, params=trainer.members[1].params)
    assert direct["gain_rater"] == pytest.approx(rep[1]["gain_rater"])
    # one meta-step on grouped batches (forward-mode, K = 1) runs and changes the rater
    before = [p.detach().clone() for p in rater.parameters()]
    mb = [([add_noise_and_timesteps(x[:3], 100, g, num_candidates=4)], val) for _ in range(2)]
    metrics = trainer.meta_step(mb, compare_uniform=True)
    assert metrics["skipped"] == 0.0 and "val_loss_uniform" in metrics
    assert any(not torch.equal(a, b) for a, b in zip(before, rater.parameters()))


def test_validation_minibatches_depend_on_seed_and_call_index_only():
    from noise_rater.valuation import ValidationMinibatches

    ds = [{"pixel_values": torch.full((1, 2, 2), float(i)), "class_labels": torch.tensor(i % 3)} for i in range(10)]
    a = ValidationMinibatches(ds, 4, 100, seed=3)
    first = [a() for _ in range(3)]
    b = ValidationMinibatches(ds, 4, 100, seed=3)
    b.calls = 2  # resumed after two calls
    third = b()
    for k in first[2]:
        assert torch.equal(first[2][k], third[k])
    assert not torch.equal(first[0]["x0"], first[1]["x0"]) or not torch.equal(first[0]["noise"], first[1]["noise"])
    assert first[0]["x0"].shape == (4, 1, 2, 2) and first[0]["class_labels"].shape == (4,)
    # labels follow their images
    assert torch.equal(first[0]["class_labels"], first[0]["x0"][:, 0, 0, 0].long() % 3)
    assert ValidationMinibatches(ds, 50, 100, seed=0)()["x0"].shape[0] == 10


def test_held_out_valuation_batches_are_fixed_and_disjoint():
    from noise_rater.meta_trainer import held_out_valuation_batches

    ds = [{"pixel_values": torch.full((1, 2, 2), float(i))} for i in range(10)]
    groups, val = held_out_valuation_batches(ds, 8, 3, 4, 100, seed=5)
    assert groups["noise"].shape == (5, 3, 1, 2, 2) and val["x0"].shape == (4, 1, 2, 2)  # min(8, 10 // 2) groups
    ids_g, ids_v = set(groups["x0"][:, 0, 0, 0].tolist()), set(val["x0"][:, 0, 0, 0].tolist())
    assert not ids_g & ids_v  # the validation images are not the groups' images
    again, _ = held_out_valuation_batches(ds, 8, 3, 4, 100, seed=5)
    assert all(torch.equal(groups[k], again[k]) for k in groups)
    assert held_out_valuation_batches(ds[:3], 8, 3, 4, 100, seed=5) is None
