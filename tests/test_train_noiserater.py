"""End-to-end tests of train_noiserater.py on tiny data (digits 8x8, an image folder)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from ddp_launch import launch_two_processes
from PIL import Image
from safetensors.torch import load_file

from noise_rater import NoiseRaterModel, NoiseSelectingSampler
from noise_rater.checkpointing import validate_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_UNET = {"block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
             "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
             "attention_head_dim": 8}


def common(tmp_path, out, steps=4, extra=()):
    cfg = tmp_path / "unet.json"
    cfg.write_text(json.dumps(TINY_UNET))
    return ["--resolution", "8", "--train_batch_size", "4", "--num_candidate_noises", "4", "--max_train_steps", str(steps),
            "--ddpm_num_steps", "50", "--population_size", "2", "--inner_steps", "2", "--compare_every", "2",
            "--num_valuation_groups", "8",
            "--model_config_name_or_path", str(cfg), "--output_dir", str(out), "--report_to", "none", *extra]


def run(args, check=True, **kw):
    p = subprocess.run([sys.executable, "train_noiserater.py", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stderr[-3000:]}")
    return p


@pytest.mark.slow
def test_digits_end_to_end_loads_with_from_pretrained(tmp_path):
    out = tmp_path / "rater"
    run(["--dataset_name", "digits", *common(tmp_path, out, steps=4)])
    rater = NoiseRaterModel.from_pretrained(out)
    assert rater.config.in_channels == 1 and rater.config.sample_size == 8
    for name in ["README.md", "meta_evidence.png", "rater_analysis.png", "meta_summary.json", "meta_metrics.jsonl",
                 "valuation.jsonl", "valuation_accuracy.png"]:
        assert (out / name).exists(), name
    rows = [json.loads(l) for l in (out / "meta_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["outer_loss"]) for r in rows)
    assert "val_loss_uniform" in rows[1]
    card = (out / "README.md").read_text()
    assert "digits" in card and "fraction of the oracle's gain" in card and "candidates" in card
    val = [json.loads(l) for l in (out / "valuation.jsonl").read_text().splitlines()]
    assert [v["step"] for v in val] == [1, 2, 4]  # step 1, every --compare_every, and the end
    for v in val:
        assert v["num_groups"] == 8 and v["num_candidates"] == 4 and len(v["members"]) == 2
        assert -1 <= v["spearman_rho"] <= 1 and v["gain_oracle"] >= v["gain_rater"] >= v["gain_worst"]
    summary = json.loads((out / "meta_summary.json").read_text())
    assert summary["valuation"]["step"] == 4
    sampler = NoiseSelectingSampler.from_pretrained(str(out), num_candidates=4)
    x0 = torch.rand(3, 1, 8, 8) * 2 - 1
    assert sampler(x0, torch.tensor([1, 10, 40])).shape == x0.shape


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["candidates", "batch"])
def test_one_step_forward_mode_meta_training_both_scopes(tmp_path, scope):
    """K = 1 (the default): the forward-mode meta-gradient drives the run, for both weighting scopes."""
    out = tmp_path / scope
    args = common(tmp_path, out, steps=2) + ["--inner_steps", "1", "--weighting_scope", scope]
    run(["--dataset_name", "digits", *args])
    rows = [json.loads(l) for l in (out / "meta_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["grad_norm"]) for r in rows)
    assert f"`{scope}`" in (out / "README.md").read_text()


def test_scope_and_meta_gradient_flag_errors(tmp_path):
    for flags, needle in [(["--weighting_scope", "candidates", "--num_candidate_noises", "1"], "num_candidate_noises >= 2"),
                          (["--meta_gradient", "forward", "--inner_steps", "2"], "--inner_steps 1 only")]:
        p = run(["--dataset_name", "digits", *common(tmp_path, tmp_path / "x"), *flags, "--dry_run"], check=False)
        assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_image_folder_class_conditional(tmp_path):
    data = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for cls in ["a", "b"]:
        (data / cls).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(data / cls / f"{i}.png")
    out = tmp_path / "rater"
    cfg = tmp_path / "unet3.json"
    cfg.write_text(json.dumps({**TINY_UNET, "in_channels": 3, "out_channels": 3}))
    args = common(tmp_path, out, steps=2, extra=["--class_conditional"])
    args[args.index("--model_config_name_or_path") + 1] = str(cfg)
    run(["--train_data_dir", str(data), "--train_batch_size", "8", *args])
    rater = NoiseRaterModel.from_pretrained(out)
    assert rater.config.in_channels == 3 and rater.config.num_class_embeds == 2


def _state(out):
    rater = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    pop = load_file(str(out / "checkpoint-12" / "population.safetensors"))
    return rater, pop


@pytest.mark.slow
def test_exact_resume_after_kill_9(tmp_path):
    ref = tmp_path / "ref"
    run(["--dataset_name", "digits", "--checkpointing_steps", "3", "--inner_model_lifetime", "4",
         *common(tmp_path, ref, steps=12)])
    out = tmp_path / "killed"
    args = ["--dataset_name", "digits", "--checkpointing_steps", "3", "--inner_model_lifetime", "4",
            *common(tmp_path, out, steps=12)]
    p = subprocess.Popen([sys.executable, "train_noiserater.py", *args], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoint-3" / "checkpoint.json").exists():
        assert p.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (out / "diffusion_pytorch_model.safetensors").exists(), "the kill must land before the end"
    run([*args, "--resume_from_checkpoint", "latest"])
    (r1, p1), (r2, p2) = _state(ref), _state(out)
    assert r1.keys() == r2.keys() and p1.keys() == p2.keys()
    for k in r1:
        assert torch.equal(r1[k], r2[k]), k
    for k in p1:
        assert torch.equal(p1[k], p2[k]), k
    h1 = (ref / "meta_metrics.jsonl").read_text().splitlines()
    h2 = (out / "meta_metrics.jsonl").read_text().splitlines()
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if k != "meta_step_time_s"} for r in rows]
    assert strip(h1) == strip(h2)


@pytest.mark.slow
def test_nonfinite_meta_loss_stops_with_error_and_checkpoint_intact(tmp_path):
    out = tmp_path / "nan"
    p = run(["--dataset_name", "digits", "--checkpointing_steps", "1", "--inject_nonfinite_at_step", "2",
             *common(tmp_path, out, steps=4)], check=False)
    assert p.returncode == 3, p.stderr[-2000:]
    assert "non-finite meta-loss" in p.stderr and "step 2" in p.stderr and "Traceback" not in p.stderr
    assert validate_checkpoint(str(out / "checkpoint-2"))["step"] == 2
    assert (out / "latest").read_text().strip() == "checkpoint-2"
    # opt-in skip mode: the step is skipped, counted, and the run completes
    out2 = tmp_path / "skip"
    run(["--dataset_name", "digits", "--inject_nonfinite_at_step", "1", "--nonfinite", "skip",
         *common(tmp_path, out2, steps=3)])
    assert json.loads((out2 / "meta_summary.json").read_text())["skipped_steps"] == 1


@pytest.mark.parametrize("flags,needle", [
    (["--learning_rate", "0"], "--learning_rate must be > 0"),
    (["--train_batch_size", "-4"], "--train_batch_size must be > 0"),
    (["--inner_steps", "0"], "--inner_steps must be > 0"),
    (["--validation_split", "1.5"], "--validation_split"),
])
def test_bad_flags_clear_error_no_traceback(tmp_path, flags, needle):
    p = run(["--dataset_name", "digits", "--output_dir", str(tmp_path / "o"), *flags], check=False)
    assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_bad_data_folder_lists_every_bad_file(tmp_path):
    data = tmp_path / "imgs"
    data.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(data / "ok.png")
    (data / "empty.png").write_bytes(b"")
    (data / "text.png").write_text("not an image")
    p = run(["--train_data_dir", str(data), "--output_dir", str(tmp_path / "o")], check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "empty.png" in p.stderr and "text.png" in p.stderr


@pytest.mark.slow
def test_two_processes_keep_rater_identical(tmp_path):
    out = tmp_path / "ddp"
    launch_two_processes(["train_noiserater.py", "--dataset_name", "digits", *common(tmp_path, out, steps=3)],
                         cwd=ROOT, prepare=lambda: shutil.rmtree(out, ignore_errors=True))
    summary = json.loads((out / "meta_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_consistent"] is True
    assert validate_checkpoint(str(out / "checkpoint-3"))
    assert (out / "checkpoint-3" / "rank1.pt").exists()


@pytest.mark.slow
def test_corrupted_checkpoint_explicit_fails_latest_falls_back(tmp_path):
    out = tmp_path / "run"
    args = ["--dataset_name", "digits", "--checkpointing_steps", "2", *common(tmp_path, out, steps=4)]
    run(args)
    # corrupt the newest checkpoint's rater weights (same size, flipped bytes)
    f = out / "checkpoint-4" / "rater.safetensors"
    data = bytearray(f.read_bytes())
    data[-10:] = bytes(255 - b for b in data[-10:])
    f.write_bytes(bytes(data))
    p = run([*args, "--resume_from_checkpoint", str(out / "checkpoint-4")], check=False)
    assert p.returncode == 2 and "rater.safetensors" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    p = run([*args, "--max_train_steps", "5", "--resume_from_checkpoint", "latest"])
    assert "checkpoint-2" in p.stderr and "rater.safetensors" in p.stderr  # the fallback is announced
    rows = [json.loads(l) for l in (out / "meta_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]


def test_builtin_dataset_not_installed(tmp_path):
    env = {**os.environ, "NOISE_RATER_FASHION_MNIST_DIR": str(tmp_path / "nowhere")}
    p = run(["--dataset_name", "fashion_mnist", "--output_dir", str(tmp_path / "o")], check=False, env=env)
    assert p.returncode == 2 and "apt-get install dataset-fashion-mnist" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_two_processes_fault_on_one_rank_stops_all_without_hanging(tmp_path):
    out = tmp_path / "ddp_nan"
    p = launch_two_processes(["train_noiserater.py", "--dataset_name", "digits", "--checkpointing_steps", "1",
                              "--inject_nonfinite_at_step", "1", *common(tmp_path, out, steps=3)],
                             cwd=ROOT, attempts=1, check=False)  # a hang fails here, with the stacks
    assert p.returncode != 0
    assert "non-finite meta-loss" in p.stderr and "step 1" in p.stderr
    assert validate_checkpoint(str(out / "checkpoint-1"))["step"] == 1


def test_mixed_channel_folder_is_refused_before_training(tmp_path):
    data = tmp_path / "mixed"
    data.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(data / "grey.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8), "RGB").save(data / "colour.png")
    p = run(["--train_data_dir", str(data), "--output_dir", str(tmp_path / "o")], check=False)
    assert p.returncode == 2 and "mixes channel counts" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()  # nothing was built or written
