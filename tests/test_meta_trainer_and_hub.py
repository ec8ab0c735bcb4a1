"""MetaTrainer population mechanics, DiT-style denoisers in the meta-objective, and the hub paths (offline)."""

import os

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from noise_rater import NoiseRaterModel, NoiseSelectingSampler
from noise_rater.bilevel import meta_objective
from noise_rater.meta_trainer import MetaTrainer, add_noise_and_timesteps

torch.set_num_threads(1)


def factory():
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))


def member_batches(P, K, g, B=4, N=2):
    """P members x (K grouped training batches of B images x N candidate noises, one flat validation batch)."""
    mk = lambda n: add_noise_and_timesteps(torch.rand(B, 1, 8, 8, generator=g) * 2 - 1, 100, g,  # noqa: E731
                                           num_candidates=n)
    return [([mk(N) for _ in range(K)], mk(None)) for _ in range(P)]


def make_trainer(**kw):
    torch.manual_seed(0)
    rater = NoiseRaterModel(sample_size=8, in_channels=1, block_out_channels=(4, 8), downsample=(True, False),
                            time_embedding_dim=8, norm_num_groups=2, num_train_timesteps=100)
    return MetaTrainer(rater, factory, DDPMScheduler(num_train_timesteps=100), **kw)


def test_staggered_lifetimes_and_members_keep_training():
    tr = make_trainer(population_size=4, inner_steps=2, inner_model_lifetime=4, inner_lr=1e-2)
    assert tr.ages == [0, 1, 2, 3]  # staggered: age_m = m * lifetime / P
    g = torch.Generator().manual_seed(0)
    before = [{k: v.clone() for k, v in m.params.items()} for m in tr.members]
    rater_before = [p.detach().clone() for p in tr.rater.parameters()]
    tr.meta_step(member_batches(4, 2, g))
    # member 3 reached age 4 -> re-initialised with a new generation; the others kept their updated theta
    assert tr.ages == [1, 2, 3, 0] and tr.resets == [0, 0, 0, 1]
    for m in range(3):
        assert tr.members[m].step == 2
        assert any(not torch.equal(before[m][k], tr.members[m].params[k]) for k in before[m])
    assert tr.members[3].step == 0
    assert any(not torch.equal(before[3][k], tr.members[3].params[k]) for k in before[3])  # a fresh init
    assert any(not torch.equal(a, b.detach()) for a, b in zip(rater_before, tr.rater.parameters()))
    for st in tr.members:
        assert all(not v.requires_grad and v.grad_fn is None for v in st.params.values())  # graphs released


def test_mean_meta_gradient_is_average_of_member_gradients():
    """With clipping off and plain SGD outer steps, the update equals -lr * mean_m dJ_m/dphi."""
    tr = make_trainer(population_size=2, inner_steps=1, inner_optimizer="sgd", inner_lr=0.1, max_grad_norm=None)
    tr.optimizer = torch.optim.SGD(tr.rater.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(1)
    mb = member_batches(2, 1, g)
    params = list(tr.rater.parameters())
    grads = []
    for m, (tb, vb) in enumerate(mb):
        J = meta_objective(tr.rater, tr.template, tr.scheduler, tb, vb, inner_lr=0.1, state=tr.members[m])
        grads.append(torch.autograd.grad(J, params))
    expected = [p.detach() - 0.5 * (g0 + g1) / 2 for p, g0, g1 in zip(params, *grads)]
    tr.meta_step(mb)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-7)


def test_save_and_load_state_roundtrip(tmp_path):
    tr = make_trainer(population_size=2, inner_steps=1, inner_model_lifetime=3)
    g = torch.Generator().manual_seed(2)
    tr.meta_step(member_batches(2, 1, g))
    tr.save_state(str(tmp_path))
    tr2 = make_trainer(population_size=2, inner_steps=1, inner_model_lifetime=3)
    tr2.load_state(str(tmp_path))
    assert (tr2.step, tr2.ages, tr2.resets) == (tr.step, tr.ages, tr.resets)
    for a, b in zip(tr.members, tr2.members):
        assert a.step == b.step
        for k in a.params:
            assert torch.equal(a.params[k], b.params[k])
            assert torch.equal(a.exp_avg[k], b.exp_avg[k]) and torch.equal(a.exp_avg_sq[k], b.exp_avg_sq[k])
    with pytest.raises(ValueError, match="population_size"):
        make_trainer(population_size=3, inner_steps=1).load_state(str(tmp_path))


def test_nonfinite_meta_loss_raises_or_skips():
    tr = make_trainer(population_size=1, inner_steps=1)
    g = torch.Generator().manual_seed(3)
    mb = member_batches(1, 1, g)
    mb[0][1]["x0"] = mb[0][1]["x0"] * float("nan")
    with pytest.raises(FloatingPointError, match="non-finite meta-loss.*meta-step 0"):
        tr.meta_step(mb)
    tr.nonfinite = "skip"
    before = [p.detach().clone() for p in tr.rater.parameters()]
    assert tr.meta_step(mb)["skipped"] == 1.0 and tr.skipped_steps == 1
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, tr.rater.parameters()))


def test_meta_gradient_through_dit_transformer():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=100).double()
    dit.eval()  # its label embedding drops classes at random in train mode (classifier-free guidance)
    rater = NoiseRaterModel(sample_size=8, in_channels=1, block_out_channels=(4, 8), downsample=(True, False),
                            time_embedding_dim=8, norm_num_groups=2, num_class_embeds=3).double()
    g = torch.Generator().manual_seed(0)
    mk = lambda: {"x0": torch.rand(3, 1, 8, 8, generator=g, dtype=torch.float64), "noise": torch.randn(  # noqa: E731
        3, 1, 8, 8, generator=g, dtype=torch.float64), "timesteps": torch.randint(0, 100, (3,), generator=g),
        "class_labels": torch.randint(0, 3, (3,), generator=g)}
    tb, vb = [mk(), mk()], mk()
    sched = DDPMScheduler(num_train_timesteps=100)
    f = lambda: meta_objective(rater, dit, sched, tb, vb, inner_lr=0.5)  # noqa: E731
    J = f()
    grads = torch.autograd.grad(J, list(rater.parameters()))
    assert any(x.abs().sum() > 0 for x in grads)
    # directional derivative against central differences
    p = rater.head[-1].weight
    i = [q is p for q in rater.parameters()].index(True)
    d = torch.randn(p.shape, generator=g, dtype=p.dtype)
    h = 1e-5
    with torch.no_grad():
        p.add_(h * d); jp = f().item(); p.sub_(2 * h * d); jm = f().item(); p.add_(h * d)
    assert (grads[i] * d).sum().item() == pytest.approx((jp - jm) / (2 * h), rel=1e-5, abs=1e-10)


def test_push_to_hub_offline_uploads_weights_and_card(tmp_path, monkeypatch):
    import diffusers.utils.hub_utils as hub_utils

    calls = {}

    class Repo:
        repo_id = "someone/rater"

    monkeypatch.setattr(hub_utils, "create_repo", lambda repo_id, **kw: Repo())
    monkeypatch.setattr(hub_utils, "load_or_create_model_card",
                        lambda repo_id, **kw: hub_utils.ModelCard("---\nlibrary_name: diffusers\n---\n# rater\n"))

    def fake_upload(self, working_dir, repo_id, token=None, commit_message=None, create_pr=False, **kw):
        calls["files"] = sorted(os.listdir(working_dir))
        calls["repo_id"] = repo_id

    monkeypatch.setattr(NoiseRaterModel, "_upload_folder", fake_upload)
    NoiseRaterModel(sample_size=8).push_to_hub("someone/rater")
    assert calls["repo_id"] == "someone/rater"
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md"} <= set(calls["files"])


def test_sampler_from_hub_id_offline_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises((OSError, EnvironmentError, ValueError)):
        NoiseSelectingSampler.from_pretrained("someone/not-a-local-rater")
