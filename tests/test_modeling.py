"""NoiseRaterModel: the diffusers ModelMixin/ConfigMixin contract, dtypes, training and input dependence."""

import os

import pytest
import torch
from diffusers.training_utils import EMAModel

from noise_rater import NoiseRaterModel, NoiseSelectingSampler  # noqa: F401  (public import path)
from noise_rater.modeling_noise_rater import NoiseRaterOutput


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: intra-op threading only adds overhead (and stalls on a busy machine).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_rater(num_class_embeds=None, in_channels=1, seed=0, scale=0.3):
    torch.manual_seed(seed)
    r = NoiseRaterModel(sample_size=8, in_channels=in_channels, block_out_channels=(8, 16), downsample=(True, False),
                        time_embedding_dim=16, norm_num_groups=4, num_class_embeds=num_class_embeds)
    with torch.no_grad():  # move away from the default init so the output depends clearly on its inputs
        for p in r.parameters():
            p.add_(scale * torch.randn_like(p))
    return r.eval()


def inputs(b=4, c=1, size=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(b, c, size, size, generator=g, dtype=dtype) * 2 - 1
    eps = torch.randn(b, c, size, size, generator=g, dtype=dtype)
    t = torch.randint(0, 1000, (b,), generator=g)
    return x0, eps, t


def test_public_imports():
    import noise_rater

    assert noise_rater.NoiseRaterModel is NoiseRaterModel
    assert noise_rater.NoiseSelectingSampler is NoiseSelectingSampler


def test_output_shape_and_tuple_dict_equivalence():
    m = small_rater()
    x0, eps, t = inputs()
    out = m(x0, eps, t)
    assert isinstance(out, NoiseRaterOutput)
    assert out.scores.shape == (4,) and out.scores.dtype == torch.float32
    assert torch.isfinite(out.scores).all()
    tup = m(x0, eps, t, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 1
    assert torch.equal(tup[0], out.scores)
    assert torch.equal(out["scores"], out.scores) and torch.equal(out[0], out.scores)


def test_batch_of_one_and_batch_independence():
    m = small_rater()
    x0, eps, t = inputs(b=3)
    full = m(x0, eps, t).scores
    singles = torch.cat([m(x0[i:i + 1], eps[i:i + 1], t[i:i + 1]).scores for i in range(3)])
    assert full.shape == (3,) and singles.shape == (3,)
    torch.testing.assert_close(full, singles, rtol=1e-5, atol=1e-6)


def test_eval_determinism():
    m = small_rater()
    x0, eps, t = inputs()
    with torch.no_grad():
        assert torch.equal(m(x0, eps, t).scores, m(x0, eps, t).scores)


def test_save_and_load_roundtrip(tmp_path):
    m = small_rater(num_class_embeds=3)
    m.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "diffusion_pytorch_model.safetensors")
    assert os.path.isfile(tmp_path / "config.json")
    loaded = NoiseRaterModel.from_pretrained(tmp_path).eval()
    for key in ("sample_size", "in_channels", "time_embedding_dim", "num_train_timesteps", "num_class_embeds",
                "norm_num_groups"):
        assert loaded.config[key] == m.config[key], key
    assert list(loaded.config.block_out_channels) == [8, 16]
    assert list(loaded.config.downsample) == [True, False]
    sd0, sd1 = m.state_dict(), loaded.state_dict()
    assert sd0.keys() == sd1.keys()
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    x0, eps, t = inputs()
    labels = torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        assert torch.equal(m(x0, eps, t, labels).scores, loaded(x0, eps, t, labels).scores)


def test_fp16_variant_roundtrip(tmp_path):
    m = small_rater()
    m.save_pretrained(tmp_path, variant="fp16")
    assert os.path.isfile(tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    # as diffusers' ModelTesterMixin: the variant loads back identically, the plain name is absent
    same = NoiseRaterModel.from_pretrained(tmp_path, variant="fp16").eval()
    x0, eps, t = inputs()
    with torch.no_grad():
        ref = m(x0, eps, t).scores
        assert torch.equal(same(x0, eps, t).scores, ref)
    with pytest.raises(OSError):
        NoiseRaterModel.from_pretrained(tmp_path)
    half = NoiseRaterModel.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float16).eval()
    assert all(p.dtype == torch.float16 for p in half.parameters())
    for (k, p), q in zip(m.state_dict().items(), half.state_dict().values()):
        assert torch.equal(p.half(), q), k
    with torch.no_grad():
        s16 = half(x0.half(), eps.half(), t).scores
    assert s16.dtype == torch.float16 and torch.isfinite(s16).all()
    torch.testing.assert_close(s16.float(), ref, rtol=2e-2, atol=2e-2)


def test_fp16_saved_weights_load_as_fp16(tmp_path):
    m = small_rater().to(torch.float16)
    m.save_pretrained(tmp_path, variant="fp16")
    loaded = NoiseRaterModel.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float16)
    sd0, sd1 = m.state_dict(), loaded.state_dict()
    assert all(torch.equal(sd0[k], sd1[k]) and sd1[k].dtype == torch.float16 for k in sd0)


def test_float64_matches_float32():
    m32 = small_rater()
    m64 = small_rater().double()
    x0, eps, t = inputs(dtype=torch.float64)
    with torch.no_grad():
        s64 = m64(x0, eps, t).scores
        s32 = m32(x0.float(), eps.float(), t).scores
    assert s64.dtype == torch.float64
    torch.testing.assert_close(s64.float(), s32, rtol=1e-4, atol=1e-5)


def test_training_step_with_ema():
    m = small_rater(scale=0.0).train()
    ema = EMAModel(m.parameters(), decay=0.9)
    before = [p.detach().clone() for p in m.parameters()]
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x0, eps, t = inputs(b=8)
    target = torch.linspace(-1, 1, 8)
    losses = []
    for _ in range(5):
        loss = (m(x0, eps, t).scores - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
        opt.step()
        ema.step(m.parameters())
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    trained = [p.detach().clone() for p in m.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, trained))
    assert all(torch.isfinite(p).all() for p in trained)
    assert all(torch.isfinite(s).all() for s in ema.shadow_params)
    # the EMA (decay warm-up) lags behind the last iterate
    assert any(not torch.equal(s, p) for s, p in zip(ema.shadow_params, trained))
    ema.copy_to(m.parameters())
    assert all(torch.equal(p.detach(), s) for p, s in zip(m.parameters(), ema.shadow_params))
    assert torch.isfinite(m(x0, eps, t).scores).all()


def test_class_conditional():
    m = small_rater(num_class_embeds=4)
    x0, eps, t = inputs()
    with pytest.raises(ValueError):
        m(x0, eps, t)
    a = m(x0, eps, t, class_labels=torch.tensor([0, 1, 2, 3])).scores
    b = m(x0, eps, t, class_labels=torch.tensor([3, 2, 1, 0])).scores
    assert a.shape == (4,)
    assert (a - b).abs().min() > 1e-6
    # the label of one sample affects only that sample
    c = m(x0, eps, t, class_labels=torch.tensor([0, 1, 2, 0])).scores
    torch.testing.assert_close(a[:3], c[:3])
    assert (a[3] - c[3]).abs() > 1e-6


def test_bad_shapes_raise():
    m = small_rater()
    x0, eps, t = inputs(c=3)
    with pytest.raises(ValueError):
        m(x0, eps, t)  # 3 channels into a 1-channel rater
    x0, eps, t = inputs()
    with pytest.raises(ValueError):
        m(x0, eps[:, :, :4, :4], t)  # x0 and noise disagree
    with pytest.raises(ValueError):
        m(x0[:, 0], eps[:, 0], t)  # not 4-D
    with pytest.raises(ValueError):
        NoiseRaterModel(block_out_channels=(8, 16), downsample=(True,))
    rgb = NoiseRaterModel(in_channels=3, block_out_channels=(8,), downsample=(True,), time_embedding_dim=8,
                          norm_num_groups=4)
    x0, eps, t = inputs(c=3)
    assert rgb(x0, eps, t).scores.shape == (4,)


def test_default_parameter_count():
    n = sum(p.numel() for p in NoiseRaterModel().parameters())
    assert 2e4 <= n <= 5e5, n


def test_scores_depend_on_noise_x0_and_t():
    m = small_rater()
    x0, eps, t = inputs(b=6, seed=3)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        base = m(x0, eps, t).scores
        new_eps = m(x0, torch.randn(eps.shape, generator=g), t).scores
        new_x0 = m(torch.rand(x0.shape, generator=g) * 2 - 1, eps, t).scores
        new_t = m(x0, eps, (t + 300) % 1000).scores
        # per-sample changes: every sample's score moves, not just their sum
        for other in (new_eps, new_x0, new_t):
            assert (other - base).abs().min() > 1e-5
        # sign of eps matters (the x0 * eps channel) even though |eps|^2 is unchanged
        assert (m(x0, -eps, t).scores - base).abs().min() > 1e-6


def test_timestep_forms_agree():
    m = small_rater()
    x0, eps, _ = inputs()
    with torch.no_grad():
        ref = m(x0, eps, torch.full((4,), 250)).scores
        for t in (250, 250.0, torch.tensor(250), torch.tensor([250])):
            torch.testing.assert_close(m(x0, eps, t).scores, ref)


def test_num_train_timesteps_rescales_t():
    # t is divided by T (times 1000): t=50 of T=100 is the same embedding as t=500 of T=1000
    m1000 = small_rater()
    torch.manual_seed(0)
    m100 = NoiseRaterModel(sample_size=8, in_channels=1, block_out_channels=(8, 16), downsample=(True, False),
                           time_embedding_dim=16, norm_num_groups=4, num_train_timesteps=100)
    m100.load_state_dict(m1000.state_dict())
    m100.eval()
    x0, eps, _ = inputs()
    with torch.no_grad():
        torch.testing.assert_close(m100(x0, eps, 50).scores, m1000(x0, eps, 500).scores)
        assert not torch.allclose(m100(x0, eps, 50).scores, m1000(x0, eps, 50).scores)


def test_push_to_hub_exists():
    assert callable(NoiseRaterModel.push_to_hub)
    assert callable(NoiseRaterModel.from_pretrained) and callable(NoiseRaterModel.save_pretrained)


@pytest.mark.parametrize("size", [8, 28, 32])
def test_resolution_agnostic(size):
    m = NoiseRaterModel()  # default config, trained at 28
    x0, eps, t = inputs(b=2, size=size)
    s = m(x0, eps, t).scores
    assert s.shape == (2,) and torch.isfinite(s).all()
    s.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
