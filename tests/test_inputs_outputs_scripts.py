"""The training scripts on inputs that must never silently go wrong: indivisible resolutions, fp16-only pipelines,
push to the Hub without Hub access, class-conditional output, elastic resume, and clean errors under
``accelerate launch``. Everything offline, on 8x8 digits and a 2-level UNet."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from ddp_launch import launch_two_processes

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE2 = os.path.join(REPO_ROOT, "train_diffusion_hard.py")
STAGE1 = os.path.join(REPO_ROOT, "train_noiserater.py")
EVALUATE = os.path.join(REPO_ROOT, "evaluate_pipeline.py")

TINY_UNET = {"block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
             "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"]}
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]


def _env(**extra):
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=REPO_ROOT, **extra)
    return env


def load_script(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def stage2():
    return load_script(STAGE2, "train_diffusion_hard_io")


@pytest.fixture(scope="module")
def stage1():
    return load_script(STAGE1, "train_noiserater_io")


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "unet.json"
    path.write_text(json.dumps(TINY_UNET))
    return str(path)


def stage2_args(out, config=None, steps=4, batch=16):
    args = ["--dataset_name", "digits", "--resolution", "8", "--train_batch_size", str(batch),
            "--max_train_steps", str(steps), "--ddpm_num_steps", "50", "--num_validation_triples", "32",
            "--num_inference_steps", "2", "--eval_batch_size", "16", "--output_dir", str(out),
            "--lr_warmup_steps", "1", "--seed", "0", "--report_to", "none"]
    return args + (["--model_config_name_or_path", config] if config else [])


def exit_code(fn, *args):
    with pytest.raises(SystemExit) as info:
        fn(*args)
    return info.value.code


# ------------------------------------------------------------------------------------------------
# Resolution the UNet cannot divide: refused before any model, also with --dry_run
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("resolution,config,multiple", [(18, None, 4), (15, "tiny", 2), (12, "default4", 8)])
def test_stage2_refuses_indivisible_resolution(stage2, tmp_path, tiny_config, capsys, resolution, config, multiple):
    if config == "tiny":
        config = tiny_config
    elif config == "default4":  # a config without down_block_types: diffusers' default UNet (4 blocks)
        config = str(tmp_path / "c.json")
        open(config, "w").write(json.dumps({"block_out_channels": [8, 8, 8, 8], "norm_num_groups": 4}))
    args = stage2_args(tmp_path / "out", config)
    args[args.index("--resolution") + 1] = str(resolution)
    for extra in (["--dry_run"], []):
        assert exit_code(stage2.cli, args + extra) == 2
        err = capsys.readouterr().err
        assert f"--resolution {resolution} is not a multiple of {multiple}" in err
    assert not (tmp_path / "out").exists()  # nothing built, nothing written


def test_stage2_accepts_divisible_resolution_in_dry_run(stage2, tmp_path, tiny_config, capsys):
    args = stage2_args(tmp_path / "out", tiny_config)
    args[args.index("--resolution") + 1] = "14"
    stage2.cli(args + ["--dry_run"])
    assert json.loads(capsys.readouterr().out)["resolved"]["resolution"] == 14


def test_stage1_refuses_indivisible_resolution(stage1, tmp_path, capsys):
    args = ["--dataset_name", "digits", "--resolution", "18", "--output_dir", str(tmp_path / "r"), "--dry_run"]
    assert stage1.cli(args) == 2
    assert "--resolution 18 is not a multiple of 4" in capsys.readouterr().err


def test_rater_sample_size_mismatch_warns(tmp_path, caplog):
    from noise_rater import NoiseRaterModel
    from noise_rater.training import build_selector_and_rater

    NoiseRaterModel(sample_size=28, in_channels=1, block_out_channels=(8,), downsample=(True,),
                    time_embedding_dim=8).save_pretrained(str(tmp_path / "rater"))
    with caplog.at_level("WARNING"):
        build_selector_and_rater("rater", rater_model_name_or_path=str(tmp_path / "rater"), in_channels=1,
                                 resolution=8)
    assert "sample_size=28" in caplog.text and "8x8" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        build_selector_and_rater("rater", rater_model_name_or_path=str(tmp_path / "rater"), in_channels=1,
                                 resolution=28)
    assert "sample_size" not in caplog.text


# ------------------------------------------------------------------------------------------------
# A pretrained pipeline holding only fp16 variant weights
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fp16_pipeline(tmp_path_factory):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fp16") / "pipe"
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, **TINY_UNET).to(torch.float16)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(str(path), variant="fp16")
    assert sorted(os.listdir(path / "unet")) == ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
    return str(path)


def test_fp16_only_pipeline_needs_variant(stage2, tmp_path, fp16_pipeline, capsys):
    args = stage2_args(tmp_path / "out") + ["--pretrained_model_name_or_path", fp16_pipeline, "--dry_run"]
    assert exit_code(stage2.cli, args) == 2
    assert "pass --variant fp16" in capsys.readouterr().err
    stage2.cli(args + ["--variant", "fp16"])
    assert json.loads(capsys.readouterr().out)["resolved"]["num_channels"] == 1
    assert exit_code(stage2.cli, args + ["--variant", "bf16"]) == 2
    assert "no diffusion_pytorch_model.bf16" in capsys.readouterr().err


@pytest.mark.slow
def test_fp16_only_pipeline_trains_with_variant(stage2, tmp_path, fp16_pipeline):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    stage2.cli(stage2_args(out, steps=2) + ["--pretrained_model_name_or_path", fp16_pipeline, "--variant", "fp16"])
    weights = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())  # trained (and saved) in float32


# ------------------------------------------------------------------------------------------------
# --push_to_hub without Hub access fails before training
# ------------------------------------------------------------------------------------------------

def test_push_to_hub_offline_fails_before_training(stage2, stage1, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    assert exit_code(stage2.cli, stage2_args(out) + ["--push_to_hub"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    assert stage1.cli(["--dataset_name", "digits", "--resolution", "8", "--output_dir", str(out), "--push_to_hub"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    assert not out.exists()


def test_push_to_hub_without_token_or_network(stage2, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert exit_code(stage2.cli, stage2_args(tmp_path / "out") + ["--push_to_hub"]) == 2
    assert "needs a Hugging Face token" in capsys.readouterr().err

    def unreachable(token=None):
        raise OSError("Connection refused")

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_dummy")
    monkeypatch.setattr(huggingface_hub, "whoami", unreachable)
    assert exit_code(stage2.cli, stage2_args(tmp_path / "out") + ["--push_to_hub"]) == 2
    assert "cannot be reached" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_push_to_hub_offline_subprocess_is_fast(tmp_path):
    proc = subprocess.run([sys.executable, STAGE2, *stage2_args(tmp_path / "out"), "--push_to_hub"], cwd=REPO_ROOT,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --push_to_hub")


# ------------------------------------------------------------------------------------------------
# Class-conditional output generates, by class name
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_class_conditional_run_saves_a_generating_pipeline(stage2, tmp_path, tiny_config):
    from diffusers import DiffusionPipeline
    from PIL import Image

    out = tmp_path / "out"
    stage2.cli(stage2_args(out, tiny_config, steps=2) + ["--class_conditional"])
    index = json.load(open(out / "model_index.json"))
    assert index["_class_name"] == "ClassConditionalDDPMPipeline"
    assert index["class_names"] == [str(d) for d in range(10)]
    pipe = DiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["3", 7], num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    grid = np.asarray(Image.open(out / "samples_final.png").convert("L"))
    scale = -(-256 // (2 * (8 + 2) + 2))  # 2 columns of 8 px with 2 px padding, enlarged to >= 256 px
    assert grid.shape[0] == (10 * (8 + 2) + 2) * scale  # one row per class
    margin = grid.shape[1] - (2 * (8 + 2) + 2) * scale
    assert margin > 0 and (grid[:, :margin] < 128).any()  # a margin holding the row labels (dark text on white)


# ------------------------------------------------------------------------------------------------
# Elastic resume: another batch size (in process) and another number of processes (accelerate launch)
# ------------------------------------------------------------------------------------------------

def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_resume_with_another_batch_size(stage2, tmp_path, tiny_config, caplog):
    out = tmp_path / "out"
    base = stage2_args(out, tiny_config, steps=4, batch=8) + ["--checkpointing_steps", "2", "--use_ema"]
    stage2.cli(base[:base.index("--max_train_steps") + 1] + ["2"] + base[base.index("--max_train_steps") + 2:])
    state = json.load(open(out / "checkpoint-2" / "training_state.json"))
    assert state["data"][0]["position"] == 16 and state["data"][0]["batch_size"] == 8
    resumed = list(base)
    resumed[resumed.index("--train_batch_size") + 1] = "16"
    with caplog.at_level("WARNING"):
        stage2.cli(resumed + ["--resume_from_checkpoint", "latest"])
    assert "no longer bit-identical" in caplog.text
    state = json.load(open(out / "checkpoint-4" / "training_state.json"))
    assert state["data"][0]["position"] == 16 + 2 * 16  # samples, whatever the batch size
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or torch.cuda.is_available(),
                    reason="needs torch.distributed (gloo) on a CPU-only machine")
def test_resume_two_processes_on_one(tmp_path, tiny_config):
    out = tmp_path / "out"
    flags = ["--checkpointing_steps", "2", "--use_ema", "--lr_scheduler", "linear"]
    launch_two_processes([STAGE2, *stage2_args(out, tiny_config, steps=2, batch=8), *flags], cwd=REPO_ROOT,
                         env=_env(), prepare=lambda: shutil.rmtree(out, ignore_errors=True))
    assert json.load(open(out / "checkpoint-2" / "training_state.json"))["num_processes"] == 2
    one = [*LAUNCH, STAGE2, *stage2_args(out, tiny_config, steps=4, batch=8), *flags,
           "--resume_from_checkpoint", "latest"]
    proc = subprocess.run(one, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Elastic resume" in proc.stderr and "no longer bit-identical" in proc.stderr
    final = json.load(open(out / "final_metrics.json"))
    assert final["steps"] == 4 and final["num_processes"] == 1
    state = json.load(open(out / "checkpoint-4" / "training_state.json"))
    assert state["data"][0]["position"] == 2 * 16 + 2 * 8  # 2 steps x 2 processes x 8, then 2 steps x 8
    # the learning-rate schedule continues at step 2 of the resumed run's 4 (linear decay after 1 warm-up step:
    # lr after step s = 1e-3 (4 - s) / 3). Without converting accelerate's per-process scheduler counter
    # (2 steps x 2 processes = 4 ticks) the schedule would already be over (lr 0 after step 3).
    lrs = {r["step"]: r["lr"] for r in read_jsonl(out / "metrics.jsonl")}
    assert lrs[3] == pytest.approx(1e-3 / 3, rel=1e-9), lrs
    assert lrs[4] == 0.0


# ------------------------------------------------------------------------------------------------
# Clean errors under the documented launch commands
# ------------------------------------------------------------------------------------------------

def test_user_error_through_accelerate_launch_quiet(tmp_path):
    args = [STAGE2, *stage2_args(tmp_path / "out"), "--resolution", "18", "--dry_run"]
    direct = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
                            timeout=300)
    assert direct.returncode == 2 and "Traceback" not in direct.stderr
    quiet = subprocess.run([*LAUNCH, "--quiet", *args], cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
                           timeout=300)
    # accelerate's launcher turns any failing exit status into 1; with --quiet it adds nothing after our line
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr
    assert quiet.stderr.strip().splitlines()[-1].startswith("error: --resolution 18 is not a multiple of 4")
    loud = subprocess.run([*LAUNCH, *args], cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert loud.returncode == 1 and "CalledProcessError" in loud.stderr  # why the README says --quiet


def test_evaluate_pipeline_missing_path(tmp_path):
    proc = subprocess.run([sys.executable, EVALUATE, "--pipeline_path", str(tmp_path / "missing"),
                           "--dataset_name", "digits"], cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --pipeline_path")


def test_bad_background_color_is_a_usage_error(stage2, stage1, tmp_path, capsys):
    assert exit_code(stage2.cli, stage2_args(tmp_path / "o") + ["--background_color", "3,4", "--dry_run"]) == 2
    assert "--background_color" in capsys.readouterr().err
    assert stage1.cli(["--dataset_name", "digits", "--output_dir", str(tmp_path / "r"), "--background_color",
                       "nocolour", "--dry_run"]) == 2
    assert "not a colour" in capsys.readouterr().err


def test_variant_without_pretrained_model(stage2, tmp_path, capsys):
    assert exit_code(stage2.cli, stage2_args(tmp_path / "o") + ["--variant", "fp16", "--dry_run"]) == 2
    assert "--pretrained_model_name_or_path" in capsys.readouterr().err
