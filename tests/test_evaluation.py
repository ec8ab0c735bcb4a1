"""Tests for noise_rater.evaluation and the evaluate_pipeline.py CLI."""

import contextlib
import importlib.util
import json
import math
import os
import sys
import types

import numpy as np
import pytest
import torch

from noise_rater.evaluation import (
    EfficientNetLite0Features,
    InceptionFeatures,
    compute_features,
    evaluate_pipeline,
    feature_statistics,
    frechet_distance,
    generate_images,
    kernel_inception_distance,
    make_eval_triples,
    polynomial_mmd2_unbiased,
    validation_loss,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These tests use tiny tensors; one torch / BLAS thread avoids oversubscription slowdowns (10-30x seen on a
    busy 2-core machine) and is restored afterwards."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        import scipy.linalg  # noqa: F401  (load scipy's own BLAS first so that the limit applies to it too)
        from threadpoolctl import threadpool_limits

        ctx = threadpool_limits(limits=1)
    except ImportError:  # pragma: no cover
        ctx = contextlib.nullcontext()
    try:
        with ctx:
            yield
    finally:
        torch.set_num_threads(prev)


# ------------------------------------------------------------------------------------------------
# Frechet distance
# ------------------------------------------------------------------------------------------------


def _closed_form_commuting(mu1, mu2, eig1, eig2):
    d = mu1 - mu2
    return float(d @ d + np.sum(eig1 + eig2 - 2.0 * np.sqrt(eig1 * eig2)))


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    D = 6
    mu1, mu2 = rng.normal(size=D), rng.normal(size=D)
    s1, s2 = rng.uniform(0.1, 3.0, size=D), rng.uniform(0.1, 3.0, size=D)
    fd = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    expected = _closed_form_commuting(mu1, mu2, s1, s2)
    assert fd == pytest.approx(expected, rel=1e-8, abs=1e-10)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method="eigh") == pytest.approx(expected, rel=1e-9)
    # Means only.
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s1)) == pytest.approx(float(((mu1 - mu2) ** 2).sum()))


def test_frechet_distance_commuting_nondiagonal_closed_form():
    rng = np.random.default_rng(1)
    D = 5
    q, _ = np.linalg.qr(rng.normal(size=(D, D)))
    a, b = rng.uniform(0.2, 4.0, size=D), rng.uniform(0.2, 4.0, size=D)
    sigma1, sigma2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert np.abs(sigma1 - np.diag(np.diag(sigma1))).max() > 0.1  # genuinely non-diagonal
    mu1, mu2 = rng.normal(size=D), rng.normal(size=D)
    fd = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert fd == pytest.approx(_closed_form_commuting(mu1, mu2, a, b), rel=1e-7, abs=1e-9)
    # The trace term is symmetric.
    assert frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(fd, rel=1e-7)
    assert frechet_distance(mu1, sigma1, mu2, sigma2, method="eigh") == pytest.approx(fd, rel=1e-9)


def test_frechet_distance_same_features_is_zero_and_singular_is_finite():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8))
    mu, sigma = feature_statistics(feats)
    assert mu.shape == (8,) and sigma.shape == (8, 8)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    # Fewer samples than dimensions: singular covariances must still give a finite, ~non-negative value.
    f1, f2 = rng.normal(size=(5, 20)), rng.normal(size=(6, 20)) + 1.0
    fd = frechet_distance(*feature_statistics(f1), *feature_statistics(f2))
    assert math.isfinite(fd) and fd > 0
    # The fast eigendecomposition path agrees with sqrtm (also for singular covariances).
    assert frechet_distance(mu, sigma, mu, sigma, method="eigh") == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(*feature_statistics(f1), *feature_statistics(f2), method="eigh") == pytest.approx(
        fd, rel=1e-5)
    with pytest.raises(ValueError):
        frechet_distance(mu, sigma, mu, sigma, method="nope")
    # Torch input works too.
    mu_t, sigma_t = feature_statistics(torch.from_numpy(feats))
    np.testing.assert_allclose(mu_t, mu)


# ------------------------------------------------------------------------------------------------
# KID
# ------------------------------------------------------------------------------------------------


def _naive_mmd2_unbiased(x, y):
    m, n, d = len(x), len(y), len(x[0])

    def k(a, b):
        return (sum(a[i] * b[i] for i in range(d)) / d + 1.0) ** 3

    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j)
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n))
    return sxx / (m * (m - 1)) + syy / (n * (n - 1)) - 2.0 * sxy / (m * n)


def test_kid_matches_naive_double_loop():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)) + 0.3
    naive = _naive_mmd2_unbiased(x.tolist(), y.tolist())
    assert polynomial_mmd2_unbiased(x, y) == pytest.approx(naive, rel=1e-10, abs=1e-12)
    # One subset covering all rows (subset_size clipped to min length) = the full-sample estimate.
    mean, std = kernel_inception_distance(x, y, num_subsets=1, subset_size=1000, seed=0)
    assert mean == pytest.approx(naive, rel=1e-10, abs=1e-12) and std == 0.0
    # Unequal sample sizes.
    y7 = rng.normal(size=(7, 3))
    assert polynomial_mmd2_unbiased(x, y7) == pytest.approx(_naive_mmd2_unbiased(x.tolist(), y7.tolist()), rel=1e-10)


def test_kid_unbiased_for_same_distribution_and_positive_for_shift():
    rng = np.random.default_rng(4)
    f1, f2 = rng.normal(size=(5000, 4)), rng.normal(size=(5000, 4))
    num_subsets = 200
    mean, std = kernel_inception_distance(f1, f2, num_subsets=num_subsets, subset_size=50, seed=0)
    se = std / math.sqrt(num_subsets)
    # A biased (V-statistic) estimator would be off by ~ 2 (E k(x,x) - E k(x,y)) / m ~ 0.4 here.
    assert abs(mean) < 4 * se, (mean, se)
    # Single-subset values of the unbiased estimator are negative about half of the time.
    singles = [kernel_inception_distance(f1, f2, num_subsets=1, subset_size=50, seed=s)[0] for s in range(20)]
    assert min(singles) < 0 < max(singles)

    shifted = rng.normal(size=(5000, 4)) + 0.5
    mean_s, std_s = kernel_inception_distance(f1, shifted, num_subsets=num_subsets, subset_size=50, seed=0)
    assert mean_s > 10 * std_s / math.sqrt(num_subsets) and mean_s > 0.5

    # Deterministic for a seed, subset_size clipped to the smaller set.
    assert kernel_inception_distance(f1[:30], f2[:40], seed=1) == kernel_inception_distance(f1[:30], f2[:40], seed=1)


# ------------------------------------------------------------------------------------------------
# Validation triples and loss
# ------------------------------------------------------------------------------------------------


def test_make_eval_triples_deterministic_and_stratified():
    x0 = torch.rand(100, 1, 4, 4) * 2 - 1
    labels = torch.arange(100) % 10
    a = make_eval_triples(x0, 1000, seed=7, repeats=4, class_labels=labels)
    b = make_eval_triples(x0, 1000, seed=7, repeats=4, class_labels=labels)
    c = make_eval_triples(x0, 1000, seed=8, repeats=4, class_labels=labels)
    assert set(a) == {"x0", "noise", "timesteps", "class_labels"}
    for k in a:
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["noise"], c["noise"]) and not torch.equal(a["timesteps"], c["timesteps"])
    assert a["x0"].shape == (400, 1, 4, 4) and a["noise"].shape == (400, 1, 4, 4)
    assert a["timesteps"].dtype == torch.long and a["timesteps"].shape == (400,)
    assert torch.equal(a["x0"][100:200], x0) and torch.equal(a["class_labels"][300:], labels)
    t = a["timesteps"]
    assert int(t.min()) >= 0 and int(t.max()) < 1000
    # One timestep per stratum of width T / N = 2.5 -> every quarter of [0, T) gets exactly N / 4.
    counts = torch.bincount(t // 250, minlength=4)
    assert counts.tolist() == [100, 100, 100, 100]
    # T == N: the strata are the single timesteps, so the timesteps are a permutation of 0..N-1.
    t_perm = make_eval_triples(x0, 400, seed=7, repeats=4)["timesteps"]
    assert torch.equal(torch.sort(t_perm).values, torch.arange(400))
    assert make_eval_triples(x0, 1000, seed=7).keys() == {"x0", "noise", "timesteps"}


class _OracleEps(torch.nn.Module):
    """Returns the true noise of the triples it is fed in order (exact epsilon prediction)."""

    def __init__(self, noise):
        super().__init__()
        self.noise = noise
        self.offset = 0
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t, class_labels=None):
        b = x_t.shape[0]
        out = self.noise[self.offset:self.offset + b].to(x_t)
        self.offset += b
        return out


class _Zeros(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=dtype))
        self.seen_dtypes = set()
        self.seen_labels = []

    def forward(self, x_t, t, class_labels=None):
        self.seen_dtypes.add(x_t.dtype)
        self.seen_labels.append(class_labels)
        return torch.zeros_like(x_t)


def _scheduler(prediction_type="epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)


def test_validation_loss_oracle_is_zero():
    triples = make_eval_triples(torch.rand(10, 1, 4, 4) * 2 - 1, 1000, seed=0)
    model = _OracleEps(triples["noise"])
    out = validation_loss(model, _scheduler(), triples, batch_size=3, bands=4)
    assert model.offset == 10
    assert out["loss"] == 0.0
    assert out["band_edges"] == [0, 250, 500, 750, 1000] and out["num_samples"] == 10


def test_validation_loss_band_edges_are_left_closed():
    # Hand-made triples with timesteps exactly on band edges: band k is e_k <= t < e_{k+1}.
    t = torch.tensor([0, 249, 250, 499, 500, 749, 750, 999])
    noise = torch.arange(1.0, 9.0).view(8, 1, 1, 1).expand(8, 1, 2, 2).contiguous()
    triples = {"x0": torch.zeros(8, 1, 2, 2), "noise": noise, "timesteps": t}
    out = validation_loss(_Zeros(), _scheduler(), triples, batch_size=3, bands=4)
    sq = noise[:, 0, 0, 0] ** 2
    assert out["loss"] == pytest.approx(float(sq.mean()))
    for k in range(4):
        assert out[f"loss_band_{k}"] == pytest.approx(float(sq[2 * k:2 * k + 2].mean())), k
    # Empty band -> NaN; edges for T not divisible by bands.
    out3 = validation_loss(_Zeros(), _scheduler(), {**triples, "timesteps": torch.zeros(8, dtype=torch.long)},
                           bands=3)
    assert out3["band_edges"] == [0, 333, 667, 1000] and math.isnan(out3["loss_band_2"])


def test_validation_loss_zero_model_by_hand():
    torch.manual_seed(0)
    x0 = torch.rand(40, 2, 4, 4) * 2 - 1
    triples = make_eval_triples(x0, 1000, seed=3, repeats=2, class_labels=torch.arange(40))
    model = _Zeros(dtype=torch.float64)
    model.train()
    out = validation_loss(model, _scheduler(), triples, batch_size=16, bands=4)
    assert model.training  # restored
    assert model.seen_dtypes == {torch.float64}  # batches cast to the model dtype
    assert all(lbl is not None for lbl in model.seen_labels)
    per = (triples["noise"].double() ** 2).flatten(1).mean(1)
    assert out["loss"] == pytest.approx(float(per.mean()), rel=1e-9)
    t = triples["timesteps"]
    for k in range(4):
        mask = (t >= 250 * k) & (t < 250 * (k + 1))
        assert int(mask.sum()) == 20
        assert out[f"loss_band_{k}"] == pytest.approx(float(per[mask].mean()), rel=1e-9)
    # Batch size does not matter.
    out2 = validation_loss(_Zeros(), _scheduler(), triples, batch_size=1000, bands=4)
    assert out2["loss"] == pytest.approx(out["loss"], rel=1e-6)

    # v-prediction: zero model -> mean(v^2) with v = sqrt(abar) eps - sqrt(1 - abar) x0.
    sched = _scheduler("v_prediction")
    abar = sched.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    v = abar.sqrt() * triples["noise"].double() - (1 - abar).sqrt() * triples["x0"].double()
    out_v = validation_loss(_Zeros(), sched, triples, bands=2)
    assert out_v["loss"] == pytest.approx(float((v ** 2).mean()), rel=1e-5)
    vper = (v ** 2).flatten(1).mean(1)
    assert out_v["loss_band_1"] == pytest.approx(float(vper[t >= 500].mean()), rel=1e-5)


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_generate_images_deterministic(tiny_pipeline_path, scheduler):
    kw = dict(batch_size=2, num_inference_steps=2, scheduler=scheduler)
    a = generate_images(tiny_pipeline_path, 3, seed=0, **kw)
    b = generate_images(tiny_pipeline_path, 3, seed=0, **kw)
    c = generate_images(tiny_pipeline_path, 3, seed=1, **kw)
    assert a.shape == (3, 1, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert float(a.min()) >= -1.0 and float(a.max()) <= 1.0
    q = generate_images(tiny_pipeline_path, 3, seed=0, quantize=True, **kw)
    np.testing.assert_allclose(((q + 1) / 2 * 255).numpy(), np.round(((q + 1) / 2 * 255).numpy()), atol=1e-3)


def test_generate_images_from_pipeline_object_does_not_mutate(tiny_pipeline_path):
    from diffusers import DDPMPipeline, DDPMScheduler

    pipe = DDPMPipeline.from_pretrained(tiny_pipeline_path)
    a = generate_images(pipe, 2, batch_size=2, num_inference_steps=2, scheduler="ddim", seed=5)
    b = generate_images(tiny_pipeline_path, 2, batch_size=2, num_inference_steps=2, scheduler="ddim", seed=5)
    assert torch.equal(a, b)
    assert isinstance(pipe.scheduler, DDPMScheduler) and len(pipe.scheduler.timesteps) == 1000
    with pytest.raises(ValueError):
        generate_images(pipe, 1, scheduler="euler")


# ------------------------------------------------------------------------------------------------
# Feature extractors
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def efflite():
    return EfficientNetLite0Features()


def test_efficientnet_lite0_features(efflite):
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(2, 1, 28, 28, generator=g) * 2 - 1
    f = efflite(imgs)
    assert f.shape == (2, 1280) and f.dtype == torch.float32
    assert torch.isfinite(f).all()
    assert torch.equal(f, efflite(imgs))  # deterministic
    assert not torch.allclose(f[0], f[1])  # depends on the image
    torch.testing.assert_close(efflite(imgs.repeat(1, 3, 1, 1)), f)  # grey == repeated RGB
    # Preprocessing spelled out: [-1, 1] -> [0, 1] -> 224x224 bilinear -> (x01 * 255 - 127) / 128 -> pooled.
    rgb01 = (imgs.repeat(1, 3, 1, 1) + 1) / 2
    x = torch.nn.functional.interpolate(rgb01, size=(224, 224), mode="bilinear", align_corners=False)
    with torch.no_grad():
        ref = efflite.net.extract_features((x * 255 - 127) / 128).mean((2, 3))
    torch.testing.assert_close(f, ref)
    efflite.train()
    assert not efflite.net.training
    feats = compute_features(efflite, imgs, batch_size=1)
    assert feats.shape == (2, 1280) and feats.dtype == np.float64
    np.testing.assert_allclose(feats, f.double().numpy(), rtol=1e-4, atol=1e-5)


def test_inception_features_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        InceptionFeatures(str(tmp_path / "missing.pth"))
    if importlib.util.find_spec("pytorch_fid") is None:
        weights = tmp_path / "pt_inception.pth"
        weights.write_bytes(b"")
        with pytest.raises(ImportError, match="pip install pytorch-fid"):
            InceptionFeatures(str(weights))


# ------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------


def test_evaluate_pipeline_end_to_end(tiny_pipeline_path):
    from diffusers import DDPMPipeline, DDPMScheduler

    real = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    triples = make_eval_triples(real, 1000, seed=0, repeats=2)
    kw = dict(num_samples=6, num_inference_steps=2, scheduler="ddim", seed=0, triples=triples, batch_size=4,
              device="cpu", fd_method="eigh")
    m = evaluate_pipeline(tiny_pipeline_path, real, **kw)
    for key in ("fd_efflite0", "kid_efflite0_mean", "kid_efflite0_std", "val_loss", "val_loss_band_0",
                "val_loss_band_3"):
        assert math.isfinite(m[key]), key
    assert m["fd_efflite0"] > 0 and m["num_samples"] == 6 and m["num_real"] == 6
    assert "fid_inception" not in m
    pipe = DDPMPipeline.from_pretrained(tiny_pipeline_path)
    ref = validation_loss(pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), triples)
    assert m["val_loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert evaluate_pipeline(tiny_pipeline_path, real, **kw) == m  # deterministic
    # Real-image features cached by the caller give the same numbers (the benchmark extracts them once).
    cache = {}
    assert evaluate_pipeline(tiny_pipeline_path, real, real_features=cache, **kw) == m
    assert cache["efflite0"].shape == (6, 1280)
    cache["efflite0"] = cache["efflite0"] + 1.0  # a shifted cache must change FD: it is really used
    assert evaluate_pipeline(tiny_pipeline_path, real, real_features=cache, **kw)["fd_efflite0"] != m["fd_efflite0"]
    # Loss only.
    only = evaluate_pipeline(tiny_pipeline_path, None, num_samples=0, triples=triples, device="cpu")
    assert set(only) == set(k for k in m if k.startswith("val_"))


def _load_cli():
    spec = importlib.util.spec_from_file_location("evaluate_pipeline_cli", os.path.join(REPO_ROOT,
                                                                                        "evaluate_pipeline.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_data_module(monkeypatch, calls):
    def prepare_datasets(dataset_name=None, dataset_config_name=None, train_data_dir=None, *, resolution,
                         num_channels, center_crop=False, random_flip=False, validation_split=0.1, seed=0, **kw):
        calls.update(resolution=resolution, num_channels=num_channels, validation_split=validation_split)
        g = torch.Generator().manual_seed(0)
        val = [{"pixel_values": torch.rand(num_channels, resolution, resolution, generator=g) * 2 - 1,
                "class_labels": i % 2} for i in range(5)]
        return types.SimpleNamespace(train=None, validation=val)

    fake = types.ModuleType("noise_rater.data")
    fake.prepare_datasets = prepare_datasets
    monkeypatch.setitem(sys.modules, "noise_rater.data", fake)


def test_cli_help_shows_defaults_and_accurate_texts(capsys):
    cli = _load_cli()
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 1000)" in text and "(default: ddim)" in text and "(default: 64)" in text
    assert "no effect" in text and "always centre-cropped" in text  # --center_crop
    assert "ffhq -> merkol/ffhq-256" in text and "digits, fashion_mnist" in text  # --dataset_name
    assert "random-crop" not in text and "loading script" not in text


def test_cli_dinov2_fd(tiny_pipeline_path, tmp_path, monkeypatch):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    dino = tmp_path / "dino"
    Dinov2Model(Dinov2Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=16,
                             patch_size=8)).save_pretrained(str(dino))
    _fake_data_module(monkeypatch, {})
    metrics = _load_cli().main([
        "--pipeline_path", tiny_pipeline_path, "--dataset_name", "fake", "--num_samples", "5",
        "--num_inference_steps", "1", "--device", "cpu", "--no_efflite0", "--no_val_loss",
        "--dinov2_checkpoint", str(dino), "--fd_method", "eigh",
    ])
    assert set(metrics) == {"fd_dinov2", "kid_dinov2_mean", "kid_dinov2_std", "num_samples", "num_real"}
    assert math.isfinite(metrics["fd_dinov2"]) and metrics["fd_dinov2"] > 0


def test_cli_with_fake_data_module(tiny_pipeline_path, tmp_path, monkeypatch, caplog):
    calls = {}

    def prepare_datasets(dataset_name=None, dataset_config_name=None, train_data_dir=None, *, resolution,
                         num_channels, center_crop=False, random_flip=False, validation_split=0.1, seed=0, **kw):
        calls.update(resolution=resolution, num_channels=num_channels, validation_split=validation_split)
        g = torch.Generator().manual_seed(0)
        val = [{"pixel_values": torch.rand(num_channels, resolution, resolution, generator=g) * 2 - 1,
                "class_labels": i % 2} for i in range(5)]
        return types.SimpleNamespace(train=None, validation=val)

    fake = types.ModuleType("noise_rater.data")
    fake.prepare_datasets = prepare_datasets
    monkeypatch.setitem(sys.modules, "noise_rater.data", fake)
    cli = _load_cli()
    out_json = tmp_path / "sub" / "metrics.json"
    metrics = cli.main([
        "--pipeline_path", tiny_pipeline_path, "--dataset_name", "fake", "--num_samples", "4",
        "--num_inference_steps", "2", "--batch_size", "4", "--device", "cpu", "--output_json", str(out_json),
        "--max_real_images", "4", "--fd_method", "eigh",
    ])
    assert calls == {"resolution": 8, "num_channels": 1, "validation_split": 0.1}
    saved = json.loads(out_json.read_text())
    assert saved["metrics"]["num_real"] == 4 and saved["metrics"]["num_samples"] == 4
    assert saved["metrics"]["fd_efflite0"] == pytest.approx(metrics["fd_efflite0"])
    assert "val_loss" in saved["metrics"] and saved["config"]["scheduler"] == "ddim"
    # 4 real images for 1280-dimensional features: the reason and the remedy are logged (not scipy's bare warning).
    logged = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("Only 4 real images for 1280-dimensional FD-EffLite0 features" in m and "more than 1280" in m
               for m in logged), logged
    with pytest.raises(SystemExit):
        cli.parse_args(["--pipeline_path", tiny_pipeline_path])  # no data source


def test_evaluate_reads_the_training_seed_for_the_held_out_split(tmp_path, caplog):
    import json as _json
    import importlib.util as _u
    import os as _os

    spec = _u.spec_from_file_location("evaluate_pipeline_cli", _os.path.join(
        _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "evaluate_pipeline.py"))
    mod = _u.module_from_spec(spec)
    spec.loader.exec_module(mod)
    (tmp_path / "final_metrics.json").write_text(_json.dumps({"args": {"seed": 7}}))
    assert mod._training_seed(str(tmp_path)) == 7
    with caplog.at_level("WARNING"):
        assert mod._training_seed(str(tmp_path / "missing")) == 0
    assert "--split_seed" in caplog.text
