"""Tests for the FD / KID ``evaluate`` metric (noise_rater/evaluation/fd_metric) and the DINOv2 features.

Reference values are computed independently of the library: closed forms for designed feature sets, and scipy /
a double loop on features computed directly in the test.
"""

import math
import os
import warnings

import numpy as np
import pytest
import torch

from noise_rater.evaluation import (
    FD_METRIC_PATH,
    Dinov2Features,
    EfficientNetLite0Features,
    RankDeficientCovarianceWarning,
    covariance_rank_warning,
)

evaluate = pytest.importorskip("evaluate")


class _Pixels(torch.nn.Module):
    """Features = the flattened pixels (the metric hands images over in [-1, 1])."""

    feature_name = "pixels"

    def forward(self, images):
        return images.flatten(1).float()


def _load(**kw):
    return evaluate.load(FD_METRIC_PATH, keep_in_memory=True, **kw)


def _scipy_fd(f1, f2):
    from scipy import linalg

    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # singular products in the small-n tests
        covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _naive_mmd2(x, y):
    m, n, d = len(x), len(y), x.shape[1]
    k = lambda a, b: (float(a @ b) / d + 1.0) ** 3  # noqa: E731
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j)
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n))
    return sxx / (m * (m - 1)) + syy / (n * (n - 1)) - 2.0 * sxy / (m * n)


def _design(mu, c):
    """Features mu +- c_i e_i (2D rows): sample mean mu, unbiased covariance diag(2 c_i^2 / (2D - 1))."""
    d = len(mu)
    rows = [mu + s * c[i] * np.eye(d)[i] for i in range(d) for s in (1.0, -1.0)]
    return np.stack(rows), 2.0 * c ** 2 / (2 * d - 1)


def test_evaluate_load_returns_the_metric_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = evaluate.load(FD_METRIC_PATH, keep_in_memory=True)
    assert isinstance(metric, evaluate.Metric)
    assert type(metric).__name__ == "FdMetric" and metric.extractor_name == "efflite0"
    assert os.path.isfile(os.path.join(FD_METRIC_PATH, "README.md"))
    # The script path works as well; a bad config name fails at load time.
    assert type(evaluate.load(os.path.join(FD_METRIC_PATH, "fd_metric.py"), "inception", weights_path="w.pth",
                              keep_in_memory=True)).__name__ == "FdMetric"
    with pytest.raises(ValueError, match="config_name"):
        _load(config_name="clip")
    with pytest.raises(ValueError, match="weights_path"):
        _load(config_name="dinov2")


def test_fd_and_kid_equal_closed_form_on_designed_features():
    # 1-channel 2x2 images -> D = 4 pixel features in [-1, 1]; both sets built so that their sample mean and
    # covariance are known exactly.
    mu_r, c_r = np.array([0.1, -0.2, 0.3, 0.0]), np.array([0.5, 0.2, 0.4, 0.3])
    mu_g, c_g = np.array([-0.1, 0.2, 0.25, 0.05]), np.array([0.3, 0.6, 0.1, 0.2])
    f_r, var_r = _design(mu_r, c_r)
    f_g, var_g = _design(mu_g, c_g)
    to_img = lambda f: torch.from_numpy((f + 1.0) / 2.0).float().view(-1, 1, 2, 2)  # noqa: E731
    metric = _load(feature_extractor=_Pixels(), device="cpu")
    # Split over several calls, of different sizes and with one side missing.
    metric.add_batch(predictions=to_img(f_g[:3]), references=to_img(f_r[:5]))
    metric.add_batch(predictions=to_img(f_g[3:]))
    metric.add_batch(references=to_img(f_r[5:]))
    out = metric.compute(kid_subset_size=100, kid_num_subsets=1)
    closed = float(((mu_r - mu_g) ** 2).sum() + (var_r + var_g - 2 * np.sqrt(var_r * var_g)).sum())
    # float32 images -> features carry ~1e-7 relative error.
    assert out["fd"] == pytest.approx(closed, rel=1e-5, abs=1e-6)
    f_r32, f_g32 = to_img(f_r).flatten(1).double().numpy() * 2 - 1, to_img(f_g).flatten(1).double().numpy() * 2 - 1
    assert out["kid_mean"] == pytest.approx(_naive_mmd2(f_r32, f_g32), rel=1e-9, abs=1e-12)
    assert out["kid_std"] == 0.0
    assert out["num_generated"] == 8 and out["num_real"] == 8 and out["feature_dim"] == 4
    assert out["feature_name"] == "pixels"
    # compute() empties the store: a second round with the real set twice gives FD 0.
    metric.add_batch(predictions=to_img(f_r), references=to_img(f_r))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankDeficientCovarianceWarning)
        assert metric.compute(fd_method="eigh", kid_subset_size=8)["fd"] == pytest.approx(0.0, abs=1e-9)


def test_fd_with_efficientnet_equals_scipy_on_directly_computed_features():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(5, 3, 12, 12, generator=g)
    fake = torch.rand(4, 1, 16, 10, generator=g) ** 2  # grey, another size, another distribution
    metric = _load(device="cpu", batch_size=3)  # the default: EfficientNet-Lite0 from the wheel
    with pytest.warns(RankDeficientCovarianceWarning) as record:
        metric.add_batch(predictions=fake, references=real)
        out = metric.compute(kid_subset_size=4, kid_num_subsets=3, kid_seed=1)
    # 5 and 4 images for 1280 dimensions: our warning with the reason, for both sides, and not scipy's bare one.
    messages = [str(w.message) for w in record]
    assert any("Only 5 real images" in m for m in messages) and any("Only 4 generated images" in m for m in messages)
    assert all(w.category is RankDeficientCovarianceWarning for w in record), messages
    # Independent path: the network called directly with its documented preprocessing.
    net = EfficientNetLite0Features().net

    def feats(x01):
        x = torch.nn.functional.interpolate(x01.expand(-1, 3, -1, -1), size=(224, 224), mode="bilinear",
                                            align_corners=False)
        with torch.no_grad():
            return net.extract_features((x * 255 - 127) / 128).mean((2, 3)).double().numpy()

    f_real, f_fake = feats(real), feats(fake)
    assert out["fd"] == pytest.approx(_scipy_fd(f_real, f_fake), rel=1e-3)
    assert out["feature_name"] == "FD-EffLite0" and out["feature_dim"] == 1280
    assert out["num_real"] == 5 and out["num_generated"] == 4
    assert math.isfinite(out["kid_mean"]) and out["kid_std"] >= 0


def test_metric_rejects_images_outside_the_documented_format():
    metric = _load(feature_extractor=_Pixels(), device="cpu")
    with pytest.raises(ValueError, match=r"\[0, 1\].*\(x \+ 1\) / 2"):
        metric.add_batch(predictions=torch.rand(2, 1, 4, 4) * 2 - 1)
    with pytest.raises(ValueError, match=r"\(B, 1 or 3, H, W\)"):
        metric.add_batch(references=torch.rand(2, 2, 4, 4))
    with pytest.raises(ValueError, match="uint8"):
        metric.add_batch(references=torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="NaN"):
        metric.add_batch(references=torch.full((2, 1, 4, 4), float("nan")))
    metric.add_batch(predictions=torch.rand(1, 1, 4, 4), references=torch.rand(3, 1, 4, 4))
    with pytest.raises(ValueError, match="at least 2 generated and 2 real"):
        metric.compute()


def test_rank_warning_names_the_numbers_and_the_remedy():
    assert covariance_rank_warning(1281, 1280) is None
    msg = covariance_rank_warning(300, 1280, "real images", "FD-EffLite0")
    assert "300 real images" in msg and "1280-dimensional FD-EffLite0" in msg and "rank at most" in msg
    assert "more than 1280 real images" in msg and "fewer dimensions" in msg
    # The metric warns for the side that is too small, and only then.
    g = torch.Generator().manual_seed(1)
    metric = _load(feature_extractor=_Pixels(), device="cpu")
    metric.add_batch(predictions=torch.rand(20, 1, 2, 2, generator=g), references=torch.rand(4, 1, 2, 2, generator=g))
    with pytest.warns(RankDeficientCovarianceWarning, match="Only 4 real images for 4-dimensional") as record:
        metric.compute(kid_subset_size=4)
    assert not any("generated images" in str(w.message) for w in record)
    metric.add_batch(predictions=torch.rand(20, 1, 2, 2, generator=g), references=torch.rand(9, 1, 2, 2, generator=g))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither ours nor scipy's
        metric.compute(kid_subset_size=4)


# ------------------------------------------------------------------------------------------------
# DINOv2 through transformers, with a tiny randomly initialised checkpoint
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=32,
                          patch_size=8)
    path = tmp_path_factory.mktemp("tiny_dinov2")
    Dinov2Model(config).save_pretrained(str(path))
    return str(path)


def test_dinov2_features_cls_after_final_norm(tiny_dinov2, monkeypatch):
    from transformers import Dinov2Model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    extractor = Dinov2Features(tiny_dinov2, image_size=32)
    assert extractor.feature_dim == 16 and extractor.feature_name == "FD_DINOv2"
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 1, 20, 24, generator=g) * 2 - 1
    f = extractor(images)
    assert f.shape == (3, 16) and f.dtype == torch.float32
    # By hand: [0, 1] RGB -> bicubic antialiased 32x32 -> ImageNet normalisation -> CLS token of the final
    # layer-normed hidden states, with the model loaded separately.
    x = ((images + 1) / 2).repeat(1, 3, 1, 1)
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic", antialias=True)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    model = Dinov2Model.from_pretrained(tiny_dinov2).eval()
    with torch.no_grad():
        hidden = model(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        ref = model.layernorm(hidden)[:, 0]
    torch.testing.assert_close(f, ref)
    assert not torch.allclose(f[0], f[1])


def test_dinov2_metric_equals_scipy_and_rejects_other_models(tiny_dinov2, tmp_path):
    g = torch.Generator().manual_seed(3)
    real, fake = torch.rand(20, 3, 16, 16, generator=g), torch.rand(20, 3, 16, 16, generator=g) ** 3
    metric = _load(config_name="dinov2", weights_path=tiny_dinov2, device="cpu", batch_size=8)
    metric.add_batch(predictions=fake, references=real)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 20 > 16 dimensions: no rank warning
        out = metric.compute(kid_subset_size=10)
    direct = Dinov2Features(tiny_dinov2)  # the metric's default input size, 224
    f_real, f_fake = direct(real * 2 - 1).double().numpy(), direct(fake * 2 - 1).double().numpy()
    assert out["fd"] == pytest.approx(_scipy_fd(f_real, f_fake), rel=1e-4)
    assert out["feature_name"] == "FD_DINOv2" and out["feature_dim"] == 16

    from transformers import ViTConfig, ViTModel

    vit = tmp_path / "vit"
    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=16, patch_size=8)).save_pretrained(str(vit))
    with pytest.raises(ValueError, match="DINOv2 checkpoint.*'vit'"):
        Dinov2Features(str(vit))
    with pytest.raises(OSError):
        Dinov2Features(str(tmp_path / "missing"), local_files_only=True)
