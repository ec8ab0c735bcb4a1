"""The drop-in examples (pixels and VAE latents) run offline on tiny shapes; the rater, the selectors and stage 1's
meta-objective work on latents of any channel count."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel

from noise_rater import KNNNoiseSampler, NoiseRaterModel, NoiseSelectingSampler
from noise_rater.bilevel import meta_objective
from noise_rater.training import NoiseGenerators, training_step

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO_ROOT, "examples")


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_rater(channels, seed=0, **kwargs):
    torch.manual_seed(seed)
    rater = NoiseRaterModel(sample_size=8, in_channels=channels, block_out_channels=(8, 16),
                            downsample=(True, False), time_embedding_dim=16, norm_num_groups=4, **kwargs)
    with torch.no_grad():
        for p in rater.parameters():
            p.add_(0.3 * torch.randn_like(p))  # scores that depend on the noise
    return rater


# ----------------------------------------------------------------------------------------------------------------
# the examples run
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("selection", ["randn", "knn", "rater"])
def test_pixel_dropin_example(selection, tmp_path, fresh_accelerate_state):
    from diffusers import DDPMPipeline

    example = load_example("dropin_train_unconditional")
    argv = ["--noise_selection", selection, "--max_train_steps", "3", "--num_candidate_noises", "4",
            "--train_batch_size", "8", "--gradient_accumulation_steps", "1"]
    if selection == "rater":
        tiny_rater(1, num_train_timesteps=100).save_pretrained(str(tmp_path / "rater"))
        argv += ["--rater_model_name_or_path", str(tmp_path / "rater"), "--output_dir", str(tmp_path / "pipe")]
    losses = example.main(argv)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    if selection == "rater":
        pipe = DDPMPipeline.from_pretrained(str(tmp_path / "pipe"))
        assert pipe.unet.config.in_channels == 1


def test_pixel_dropin_example_as_a_script(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=REPO_ROOT)
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, "dropin_train_unconditional.py"),
                           "--noise_selection", "knn", "--max_train_steps", "2", "--train_batch_size", "4"],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "knn: 2 steps" in proc.stdout


@pytest.mark.parametrize("selection", ["knn", "rater"])
def test_latent_dropin_example(selection, tmp_path):
    example = load_example("dropin_latent_diffusion")
    argv = ["--noise_selection", selection, "--max_train_steps", "2", "--num_candidate_noises", "3",
            "--train_batch_size", "4"]
    if selection == "rater":
        tiny_rater(4, num_train_timesteps=100).save_pretrained(str(tmp_path / "rater4"))
        argv += ["--rater_model_name_or_path", str(tmp_path / "rater4")]
    result = example.main(argv)
    assert result["latent_shape"] == (4, 4, 8, 8)
    assert len(result["losses"]) == 2 and all(torch.isfinite(torch.tensor(result["losses"])))


def test_latent_example_refuses_a_pixel_rater(tmp_path):
    tiny_rater(1).save_pretrained(str(tmp_path / "rater1"))
    with pytest.raises(ValueError, match="in_channels=1; latents have 4"):
        load_example("dropin_latent_diffusion").main(
            ["--noise_selection", "rater", "--rater_model_name_or_path", str(tmp_path / "rater1"),
             "--max_train_steps", "1", "--train_batch_size", "2"])


# ----------------------------------------------------------------------------------------------------------------
# latents of any channel count: the rater, the selectors, stage 1
# ----------------------------------------------------------------------------------------------------------------


def vae_latents(batch_size=4, seed=0, dtype=torch.float32):
    """4-channel latents `(B, 4, 8, 8)` of random 16 px images through a tiny random AutoencoderKL."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    images = torch.rand(batch_size, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.sample(generator=torch.Generator().manual_seed(seed))
    return (latents * vae.config.scaling_factor).to(dtype)


@pytest.mark.parametrize("channels", [3, 4, 16])
def test_rater_selection_on_latents_of_any_channel_count(channels):
    b, n = 3, 5
    x0 = vae_latents(b) if channels == 4 else torch.randn(b, channels, 8, 8)
    rater = tiny_rater(channels)
    pool = torch.randn(b, n, channels, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 500, 900])
    noise = NoiseSelectingSampler(rater, num_candidates=n).select(x0, t, pool)
    with torch.no_grad():  # argmax of the per-candidate scores, rated one candidate at a time
        scores = torch.stack([rater(x0, pool[:, k], t).scores for k in range(n)], dim=1)
    assert torch.equal(noise, pool[torch.arange(b), scores.argmax(1)])
    knn = KNNNoiseSampler(n).select(x0, t, pool)
    dists = torch.stack([((pool[:, k] - x0) ** 2).sum(dim=(1, 2, 3)) for k in range(n)], dim=1)
    assert torch.equal(knn, pool[torch.arange(b), dists.argmin(1)])


def test_training_step_on_vae_latents_with_a_latent_rater():
    latents = vae_latents(4)
    assert latents.shape == (4, 4, 8, 8)
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    rater = tiny_rater(4, num_train_timesteps=50)
    out = training_step(unet, DDPMScheduler(num_train_timesteps=50), latents,
                        NoiseSelectingSampler(rater, num_candidates=4, selection="importance"),
                        generators=NoiseGenerators.from_seed(0), num_candidates=4)
    out.loss.backward()
    assert out.noise.shape == latents.shape and torch.isfinite(out.loss)
    assert all(p.grad is not None for p in unet.parameters())


def test_stage1_meta_gradient_on_latents_matches_finite_differences():
    """dJ/dphi for a 4-channel rater and a 4-channel UNet2DModel on VAE latents; checked along a random
    direction against a central finite difference (float64)."""
    dtype = torch.float64
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2).to(dtype)
    rater = tiny_rater(4, num_train_timesteps=50).to(dtype)
    scheduler = DDPMScheduler(num_train_timesteps=50)
    gen = torch.Generator().manual_seed(3)

    def batch(seed):
        x0 = vae_latents(4, seed=seed, dtype=dtype)
        return {"x0": x0, "noise": torch.randn(x0.shape, generator=gen, dtype=dtype),
                "timesteps": torch.randint(0, 50, (4,), generator=gen)}

    train, val = [batch(1), batch(2)], batch(3)
    kw = dict(inner_lr=0.5, inner_optimizer="sgd", temperature=1.0)
    J = meta_objective(rater, unet, scheduler, train, val, **kw)
    params = list(rater.parameters())
    grads = torch.autograd.grad(J, params)
    assert all(torch.isfinite(g).all() for g in grads)
    direction = [torch.randn(p.shape, generator=gen, dtype=dtype) for p in params]
    analytic = sum((g * d).sum() for g, d in zip(grads, direction))
    assert abs(float(analytic)) > 1e-10  # the rater's weights reach the validation loss

    def J_at(h):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(h * d)
        try:
            return float(meta_objective(rater, unet, scheduler, train, val, **kw).detach())
        finally:
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p.sub_(h * d)

    h = 1e-5
    numeric = (J_at(h) - J_at(-h)) / (2 * h)
    assert numeric == pytest.approx(float(analytic), rel=1e-4, abs=1e-9)
