"""End-to-end tests of train_diffusion_hard.py (stage 2: diffusion training with hard noise selection).

Every run is tiny (digits at 8x8, a ~0.18M-parameter UNet, 4-6 steps); most of the wall time of a run is
importing torch / diffusers in the subprocess.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from ddp_launch import launch_two_processes
from safetensors.torch import load_file

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "train_diffusion_hard.py")

TINY_UNET = {
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": 8,
}


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return env


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "unet.json"
    path.write_text(json.dumps(TINY_UNET))
    return str(path)


@pytest.fixture(scope="module")
def rater_path(tmp_path_factory):
    from noise_rater import NoiseRaterModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("rater") / "rater"
    NoiseRaterModel(sample_size=8, in_channels=1, block_out_channels=(8, 16), downsample=(True, False),
                    time_embedding_dim=16, num_train_timesteps=50).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def cond_rater_path(tmp_path_factory):
    from noise_rater import NoiseRaterModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("rater_cond") / "rater"
    NoiseRaterModel(sample_size=8, in_channels=1, block_out_channels=(8, 16), downsample=(True, False),
                    time_embedding_dim=16, num_train_timesteps=50, num_class_embeds=10).save_pretrained(str(path))
    return str(path)


def base_args(output_dir, config, steps=4):
    return ["--dataset_name", "digits", "--resolution", "8", "--train_batch_size", "16",
            "--max_train_steps", str(steps), "--ddpm_num_steps", "50", "--num_validation_triples", "64",
            "--num_inference_steps", "2", "--eval_batch_size", "16", "--model_config_name_or_path", config,
            "--output_dir", str(output_dir), "--lr_warmup_steps", "1", "--seed", "0"]


def run(args, check=True):
    proc = subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}")
    return proc


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_outputs(out, steps, generate=True):
    for name in ("model_index.json", "samples_final.png", "final_metrics.json", "plot_loss.png",
                 "metrics.jsonl", "validation.jsonl", os.path.join("unet", "config.json"),
                 os.path.join("scheduler", "scheduler_config.json")):
        assert os.path.isfile(os.path.join(out, name)), name
    final = json.load(open(os.path.join(out, "final_metrics.json")))
    assert final["steps"] == steps and final["skipped_steps"] == 0
    assert final["final_val_loss"] > 0 and all(f"final_val_loss_band_{k}" in final for k in range(4))
    assert final["select_time_s"] >= 0 and final["train_time_s"] > 0
    records = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert all(r["loss"] > 0 and r["lr"] >= 0 and "select_time_s" in r and "train_time_s" in r for r in records)
    val = read_jsonl(os.path.join(out, "validation.jsonl"))
    assert val[-1]["step"] == steps and val[-1]["band_edges"] == [0, 12, 25, 38, 50]

    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    if generate:
        image = pipe(batch_size=1, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
        assert image.shape == (1, 8, 8, 1) and bool(torch.isfinite(torch.from_numpy(image)).all())
    return pipe, final


# ----------------------------------------------------------------------------------------------------------------
# 1. every noise selection / loss weighting trains and saves a usable DDPMPipeline
# ----------------------------------------------------------------------------------------------------------------

CASES = {
    "uniform": ["--noise_selection", "uniform", "--report_to", "tensorboard"],
    "knn": ["--noise_selection", "knn", "--num_candidate_noises", "4"],
    "assignment": ["--noise_selection", "assignment"],
    "rater_argmax": ["--noise_selection", "rater", "--selection_rule", "argmax", "--num_candidate_noises", "4"],
    "rater_importance_min_snr": ["--noise_selection", "rater", "--selection_rule", "importance",
                                 "--loss_weighting", "min_snr", "--use_ema"],
    "rater_soft": ["--noise_selection", "uniform", "--loss_weighting", "rater_soft", "--rater_temperature", "0.5"],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_trains_and_saves_pipeline(case, tmp_path, tiny_config, rater_path):
    out = tmp_path / "out"
    extra = list(CASES[case])
    if case.startswith("rater"):
        extra += ["--rater_model_name_or_path", rater_path]
    if case != "uniform":
        extra += ["--report_to", "none"]
    run(base_args(out, tiny_config) + extra)
    _, final = check_outputs(str(out), 4)
    assert final["args"]["noise_selection"] == CASES[case][1]
    if case == "uniform":
        assert os.path.isdir(out / "logs")  # tensorboard
    if case == "rater_importance_min_snr":
        assert final["weights"] == "ema" and "final_val_loss_raw" in final


@pytest.mark.slow
def test_class_conditional_with_conditional_rater(tmp_path, tiny_config, cond_rater_path):
    out = tmp_path / "out"
    run(base_args(out, tiny_config) + ["--class_conditional", "--noise_selection", "rater",
                                       "--rater_model_name_or_path", cond_rater_path, "--report_to", "none",
                                       "--save_images_steps", "2"])
    pipe, _ = check_outputs(str(out), 4, generate=False)  # DDPMPipeline itself cannot pass class labels
    assert pipe.unet.config.num_class_embeds == 10
    with torch.no_grad():
        y = pipe.unet(torch.randn(2, 1, 8, 8), torch.tensor([3, 40]), class_labels=torch.tensor([1, 7])).sample
    assert y.shape == (2, 1, 8, 8) and bool(torch.isfinite(y).all())
    assert os.path.isfile(out / "samples" / "samples_step000002.png")


@pytest.mark.slow
def test_image_folder(tmp_path, tiny_config):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8), mode="RGB").save(folder / f"{i:02d}.png")
    out = tmp_path / "out"
    args = base_args(out, tiny_config)
    i = args.index("--dataset_name")
    args[i:i + 2] = ["--train_data_dir", str(folder), "--cache_dir", str(tmp_path / "hf_cache")]
    args[args.index("--train_batch_size") + 1] = "8"
    run(args + ["--report_to", "none", "--random_flip"])
    pipe, final = check_outputs(str(out), 4, generate=False)
    assert pipe.unet.config.in_channels == 3  # image folders default to RGB
    image = pipe(batch_size=1, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    assert image.shape == (1, 8, 8, 3)


# ----------------------------------------------------------------------------------------------------------------
# 2. exact resume after a hard kill
# ----------------------------------------------------------------------------------------------------------------


def _assert_same_tensors(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


@pytest.mark.slow
def test_resume_after_kill_is_bit_identical(tmp_path, tiny_config, rater_path):
    flags = ["--checkpointing_steps", "3", "--use_ema", "--random_flip", "--report_to", "none",
             "--noise_selection", "rater", "--rater_model_name_or_path", rater_path,
             "--selection_rule", "importance", "--lr_warmup_steps", "2"]
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    # B: the same run, killed (SIGKILL) as soon as checkpoint-3 is complete ...
    proc = subprocess.Popen([sys.executable, SCRIPT, *base_args(out_b, tiny_config, steps=6), *flags], cwd=REPO_ROOT,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marker = out_b / "checkpoint-3" / "checkpoint.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"run B was not killed mid-run (exit {proc.returncode}):\n{err[-3000:]}"
    assert marker.exists()
    assert not (out_b / "model_index.json").exists() and not (out_b / "checkpoint-6").exists()
    # A: uninterrupted
    run(base_args(out_a, tiny_config, steps=6) + flags)
    # ... then resumed from the latest checkpoint.
    resumed = run(base_args(out_b, tiny_config, steps=6) + flags + ["--resume_from_checkpoint", "latest"])
    assert "Resumed from" in resumed.stderr and "checkpoint-3" in resumed.stderr

    # final pipeline unet (EMA weights), last checkpoint's raw weights, EMA, optimizer: all bit-identical
    name = os.path.join("unet", "diffusion_pytorch_model.safetensors")
    _assert_same_tensors(load_file(str(out_a / name)), load_file(str(out_b / name)), "pipeline unet (EMA)")
    _assert_same_tensors(load_file(str(out_a / "checkpoint-6" / "unet.safetensors")),
                         load_file(str(out_b / "checkpoint-6" / "unet.safetensors")), "raw unet")
    ema_a = torch.load(out_a / "checkpoint-6" / "ema.pt", weights_only=True)
    ema_b = torch.load(out_b / "checkpoint-6" / "ema.pt", weights_only=True)
    assert ema_a["optimization_step"] == ema_b["optimization_step"] == 6
    assert all(torch.equal(x, y) for x, y in zip(ema_a["shadow_params"], ema_b["shadow_params"]))
    opt_a = torch.load(out_a / "checkpoint-6" / "optimizer.pt", weights_only=True)
    opt_b = torch.load(out_b / "checkpoint-6" / "optimizer.pt", weights_only=True)
    for k in opt_a["state"]:
        assert torch.equal(opt_a["state"][k]["exp_avg"], opt_b["state"][k]["exp_avg"])
    # the per-step log of the resumed run is continuous and has the same losses
    rec_a, rec_b = read_jsonl(out_a / "metrics.jsonl"), read_jsonl(out_b / "metrics.jsonl")
    assert [r["step"] for r in rec_b] == list(range(1, 7))
    assert [r["loss"] for r in rec_a] == [r["loss"] for r in rec_b]
    assert json.load(open(out_a / "final_metrics.json"))["final_val_loss"] == \
        json.load(open(out_b / "final_metrics.json"))["final_val_loss"]


@pytest.mark.slow
def test_oracle_selection_trains_and_resumes_bit_identically(tmp_path, tiny_config):
    """--noise_selection oracle (exact one-step influence on a fresh validation minibatch each step) trains,
    saves a pipeline, reports its selection time, and resumes exactly (its minibatches depend on seed and step)."""
    flags = ["--noise_selection", "oracle", "--num_candidate_noises", "4", "--oracle_val_batch_size", "8",
             "--checkpointing_steps", "2", "--report_to", "none", "--lr_scheduler", "constant"]
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    run(base_args(out_a, tiny_config, steps=4) + flags)
    _, final = check_outputs(str(out_a), 4, generate=False)
    assert final["select_time_s"] > 0
    proc = subprocess.Popen([sys.executable, SCRIPT, *base_args(out_b, tiny_config, steps=4), *flags], cwd=REPO_ROOT,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marker = out_b / "checkpoint-2" / "checkpoint.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert marker.exists()
    run(base_args(out_b, tiny_config, steps=4) + flags + ["--resume_from_checkpoint", "latest"])
    name = os.path.join("unet", "diffusion_pytorch_model.safetensors")
    _assert_same_tensors(load_file(str(out_a / name)), load_file(str(out_b / name)), "oracle-selected unet")


# ----------------------------------------------------------------------------------------------------------------
# 3. non-finite loss: stop with exit 3 (last checkpoint intact) or skip the step
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_nonfinite_loss_raises_and_keeps_last_checkpoint(tmp_path, tiny_config):
    from noise_rater.checkpointing import resolve_checkpoint, validate_checkpoint

    out = tmp_path / "out"
    proc = run(base_args(out, tiny_config) + ["--inject_nonfinite_at_step", "2", "--checkpointing_steps", "1",
                                              "--report_to", "none"], check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "loss" in proc.stderr and "step 2" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: non-finite loss at step 2"
    manifest = validate_checkpoint(str(out / "checkpoint-1"))
    assert manifest["step"] == 1
    assert not (out / "checkpoint-2").exists()
    assert resolve_checkpoint(str(out), "latest") == str(out / "checkpoint-1")


@pytest.mark.slow
def test_nonfinite_loss_skip(tmp_path, tiny_config):
    out = tmp_path / "out"
    run(base_args(out, tiny_config) + ["--inject_nonfinite_at_step", "2", "--nonfinite", "skip",
                                       "--max_consecutive_skips", "3", "--report_to", "none"])
    final = json.load(open(out / "final_metrics.json"))
    assert final["skipped_steps"] == 1 and final["steps"] == 4
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["skipped"] for r in records] == [False, True, False, False]
    assert records[1]["loss"] is None


# ----------------------------------------------------------------------------------------------------------------
# 4. bad flags: a clear message, no traceback;  5. --dry_run
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def script_module():
    spec = importlib.util.spec_from_file_location("train_diffusion_hard", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("bad, message", [
    (["--learning_rate", "0"], "--learning_rate must be > 0"),
    (["--train_batch_size", "-1"], "--train_batch_size must be > 0"),
    (["--noise_selection", "rater"], "needs --rater_model_name_or_path"),
    (["--loss_weighting", "rater_soft"], "needs --rater_model_name_or_path"),
    (["--noise_selection", "magic"], "invalid choice"),
    (["--selection_rule", "best"], "invalid choice"),
    (["--num_candidate_noises", "0"], "--num_candidate_noises must be > 0"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be > 0"),
    (["--model_config_name_or_path", "/nonexistent/unet.json"], "not found"),
])
def test_bad_flags_in_process(bad, message, tmp_path, tiny_config, script_module, capsys):
    out = tmp_path / "out"
    args = base_args(out, tiny_config)
    if bad[0] == "--model_config_name_or_path":
        args[args.index("--model_config_name_or_path") + 1] = bad[1]
        bad = []
    with pytest.raises(SystemExit) as exc:
        script_module.cli(args + bad)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow
def test_bad_flag_subprocess_has_no_traceback(tmp_path, tiny_config):
    proc = run(base_args(tmp_path / "out", tiny_config) + ["--noise_selection", "rater"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --noise_selection rater needs")
    assert "Traceback" not in proc.stderr


def test_missing_data_folder_is_usage_error(tmp_path, tiny_config, script_module, capsys):
    args = base_args(tmp_path / "out", tiny_config)
    i = args.index("--dataset_name")
    args[i:i + 2] = ["--train_data_dir", str(tmp_path / "nope")]
    with pytest.raises(SystemExit) as exc:
        script_module.cli(args)
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_dry_run_prints_json_and_writes_nothing(tmp_path, tiny_config, script_module, capsys):
    out = tmp_path / "out"
    script_module.cli(base_args(out, tiny_config) + ["--dry_run", "--class_conditional", "--loss_weighting", "min_snr"])
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["args"]["loss_weighting"] == "min_snr"
    assert cfg["resolved"]["num_channels"] == 1 and cfg["resolved"]["resolution"] == 8
    assert cfg["resolved"]["unet_config"]["block_out_channels"] == [16, 32]
    assert cfg["resolved"]["max_train_steps"] == 4
    assert not out.exists() and os.listdir(tmp_path) == []


def test_dry_run_checks_data_and_rater_like_a_real_run(tmp_path, tiny_config, script_module, capsys):
    """--dry_run runs the data preflight and loads the rater: bad input fails there too, with one error line."""
    out = tmp_path / "out"
    script_module.cli(base_args(out, tiny_config) + ["--dry_run"])
    assert "digits" in json.loads(capsys.readouterr().out)["data"]
    empty = tmp_path / "empty"
    empty.mkdir()
    args = base_args(out, tiny_config)
    args[args.index("--dataset_name"):args.index("--dataset_name") + 2] = ["--train_data_dir", str(empty)]
    for bad, needle in [(args + ["--dry_run"], "No image files found"),
                        (base_args(out, tiny_config) + ["--dry_run", "--noise_selection", "rater",
                                                        "--rater_model_name_or_path", str(tmp_path / "nope")],
                         "no such folder")]:
        with pytest.raises(SystemExit) as e:
            script_module.cli(bad)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and needle in err[0]
    assert not out.exists()


@pytest.mark.slow
def test_dry_run_subprocess(tmp_path, tiny_config):
    out = tmp_path / "out"
    proc = run(base_args(out, tiny_config) + ["--dry_run"])
    assert json.loads(proc.stdout)["resolved"]["scheduler"]["num_train_timesteps"] == 50
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# multi-process data parallel (2 CPU processes, gloo) and its exact resume
# ----------------------------------------------------------------------------------------------------------------


def launch_2proc(args, prepare=lambda: None):
    return launch_two_processes([SCRIPT, *args], cwd=REPO_ROOT, env=_env(), prepare=prepare)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or torch.cuda.is_available(),
                    reason="needs torch.distributed (gloo) on a CPU-only machine")
def test_two_processes_and_exact_resume(tmp_path, tiny_config):
    import shutil

    flags = ["--checkpointing_steps", "2", "--use_ema", "--report_to", "none", "--noise_selection", "knn",
             "--num_candidate_noises", "4", "--random_flip"]
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    proc = launch_2proc(base_args(out_a, tiny_config) + flags, prepare=lambda: shutil.rmtree(out_a, ignore_errors=True))
    assert "MULTI_CPU" in proc.stderr
    final = json.load(open(out_a / "final_metrics.json"))
    assert final["num_processes"] == 2 and final["ranks_in_sync"] is True and final["steps"] == 4
    ckpt = out_a / "checkpoint-2"
    assert (ckpt / "rng_rank0.pt").is_file() and (ckpt / "rng_rank1.pt").is_file()
    state = json.load(open(ckpt / "training_state.json"))
    assert [d["shard"] for d in state["data"]] == [0, 1]
    # resume a copy of checkpoint-2 (written mid-run by A) and finish: the same weights as A

    def fresh_b():
        shutil.rmtree(out_b, ignore_errors=True)
        shutil.copytree(ckpt, out_b / "checkpoint-2")

    launch_2proc(base_args(out_b, tiny_config) + flags + ["--resume_from_checkpoint", "latest"], prepare=fresh_b)
    name = os.path.join("unet", "diffusion_pytorch_model.safetensors")
    _assert_same_tensors(load_file(str(out_a / name)), load_file(str(out_b / name)), "2-process pipeline unet")


# ----------------------------------------------------------------------------------------------------------------
# fine-tuning a saved DDPMPipeline / UNet folder
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pretrained") / "pipe"
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, **TINY_UNET)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(str(path))
    return str(path)


def test_pretrained_unet_location(tiny_pipeline, script_module, tmp_path):
    assert script_module._pretrained_unet_location(tiny_pipeline) == (tiny_pipeline, "unet")
    unet_dir = os.path.join(tiny_pipeline, "unet")
    assert script_module._pretrained_unet_location(unet_dir) == (unet_dir, None)
    with pytest.raises(script_module.UsageError, match="neither unet/config.json nor config.json"):
        script_module._pretrained_unet_location(str(tmp_path))


@pytest.mark.slow
def test_finetune_pretrained_pipeline(tmp_path, tiny_config, tiny_pipeline):
    out = tmp_path / "out"
    args = base_args(out, tiny_config, steps=2)
    i = args.index("--model_config_name_or_path")
    args[i:i + 2] = ["--pretrained_model_name_or_path", tiny_pipeline]
    i = args.index("--resolution")
    del args[i:i + 2]  # from the pretrained UNet's sample_size
    run(args + ["--report_to", "none"])
    check_outputs(str(out), 2)
    name = os.path.join("unet", "diffusion_pytorch_model.safetensors")
    before, after = load_file(os.path.join(tiny_pipeline, name)), load_file(str(out / name))
    assert before.keys() == after.keys() and not all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------------------------------------------
# 7. common random numbers across methods; scale flags (accumulation, checkpointing, tf32, mixed precision)
# ----------------------------------------------------------------------------------------------------------------


def _unet_weights(out, step):
    return load_file(str(out / f"checkpoint-{step}" / "unet.safetensors"))


@pytest.mark.slow
def test_methods_that_pick_the_same_candidates_train_bit_identically(tmp_path, tiny_config):
    """uniform trains on candidate 0 of the pool; a rater whose scores are all 0 makes argmax pick candidate 0
    (torch.argmax returns the first maximum). With the same seed, both runs see the same data order, flips,
    timesteps and pools, so they must end bit-identical."""
    from noise_rater import NoiseRaterModel

    rater = NoiseRaterModel(sample_size=8, in_channels=1, block_out_channels=(8, 16), downsample=(True, False),
                            time_embedding_dim=16, num_train_timesteps=50)
    with torch.no_grad():
        rater.head[-1].weight.zero_()
        rater.head[-1].bias.zero_()
    rater.save_pretrained(str(tmp_path / "flat_rater"))
    flags = ["--random_flip", "--report_to", "none", "--num_candidate_noises", "4", "--checkpointing_steps", "3"]
    run(base_args(tmp_path / "uniform", tiny_config, steps=3) + flags + ["--noise_selection", "uniform"])
    run(base_args(tmp_path / "rater", tiny_config, steps=3) + flags + [
        "--noise_selection", "rater", "--rater_model_name_or_path", str(tmp_path / "flat_rater"),
        "--selection_rule", "argmax"])
    _assert_same_tensors(_unet_weights(tmp_path / "uniform", 3), _unet_weights(tmp_path / "rater", 3), "unet")
    losses = [[r["loss"] for r in read_jsonl(tmp_path / m / "metrics.jsonl")] for m in ("uniform", "rater")]
    assert losses[0] == losses[1]


@pytest.mark.slow
def test_gradient_accumulation_matches_the_large_batch(tmp_path, tiny_config):
    """2 micro-batches of 8 == 1 batch of 16: the same items (consecutive in the epoch order), flips, timesteps and
    candidate pools (the CPU streams draw the same numbers in two halves), knn is per-sample; so the same gradient
    up to float summation order. Adam with a large epsilon (an SGD-like update, lr * g) keeps those rounding
    differences from being amplified where a gradient entry is ~0. Gradient checkpointing and TF32 (a no-op on
    CPU) must not change the result."""
    flags = ["--noise_selection", "knn", "--num_candidate_noises", "4", "--report_to", "none",
             "--checkpointing_steps", "1", "--random_flip", "--lr_warmup_steps", "0", "--lr_scheduler", "constant",
             "--learning_rate", "1", "--adam_epsilon", "1"]
    run(base_args(tmp_path / "big", tiny_config, steps=2) + flags)
    run(base_args(tmp_path / "accum", tiny_config, steps=2) + flags + [
        "--train_batch_size", "8", "--gradient_accumulation_steps", "2", "--gradient_checkpointing", "--allow_tf32"])
    for step in (1, 2):
        big, accum = _unet_weights(tmp_path / "big", step), _unet_weights(tmp_path / "accum", step)
        for k in big:
            torch.testing.assert_close(accum[k], big[k], rtol=1e-5, atol=1e-7)
    first, second = _unet_weights(tmp_path / "big", 1), _unet_weights(tmp_path / "big", 2)
    assert max(float((second[k] - first[k]).abs().max()) for k in first) > 1e-3  # the step moved the weights
    rec_big, rec_acc = read_jsonl(tmp_path / "big" / "metrics.jsonl"), read_jsonl(tmp_path / "accum" / "metrics.jsonl")
    assert [r["step"] for r in rec_acc] == [1, 2]
    assert [r["loss"] for r in rec_acc] == pytest.approx([r["loss"] for r in rec_big], rel=1e-5)
    data = lambda m: json.load(open(tmp_path / m / "checkpoint-2" / "training_state.json"))["data"][0]  # noqa: E731
    # both consumed 2 optimizer steps x 16 samples (accum: 4 micro-batches of 8), counted in samples
    assert (data("big")["position"], data("accum")["position"]) == (32, 32)
    assert (data("big")["batch_size"], data("accum")["batch_size"]) == (16, 8)


@pytest.mark.slow
def test_mixed_precision_on_cpu(tmp_path, tiny_config):
    """bf16: CPU autocast runs (close to, not equal to float32). fp16: accelerate has no CPU autocast; the script
    says so and trains in float32 (bit-identical to --mixed_precision no)."""
    flags = ["--report_to", "none", "--checkpointing_steps", "2"]
    outs = {}
    for precision in ("no", "bf16", "fp16"):
        proc = run(base_args(tmp_path / precision, tiny_config, steps=2) + flags + ["--mixed_precision", precision])
        outs[precision] = (_unet_weights(tmp_path / precision, 2), proc.stderr)
        assert all(r["loss"] is not None for r in read_jsonl(tmp_path / precision / "metrics.jsonl"))
    _assert_same_tensors(outs["fp16"][0], outs["no"][0], "fp16 on CPU vs float32")
    assert "--mixed_precision fp16: no autocast on cpu" in outs["fp16"][1]
    assert "no autocast" not in outs["bf16"][1]
    assert any(not torch.equal(outs["bf16"][0][k], outs["no"][0][k]) for k in outs["no"][0])
    for k, v in outs["no"][0].items():
        assert outs["bf16"][0][k].dtype == torch.float32
        torch.testing.assert_close(outs["bf16"][0][k], v, rtol=0, atol=5e-3)


@pytest.mark.slow
def test_dataloader_workers_train_and_resume_exactly(tmp_path, tiny_config):
    """--dataloader_num_workers 2: a run stopped at step 2 and resumed ends bit-identical to an uninterrupted one."""
    flags = ["--dataloader_num_workers", "2", "--random_flip", "--report_to", "none", "--checkpointing_steps", "2",
             "--lr_scheduler", "constant", "--noise_selection", "knn", "--num_candidate_noises", "2"]
    run(base_args(tmp_path / "a", tiny_config, steps=4) + flags)
    run(base_args(tmp_path / "b", tiny_config, steps=2) + flags)
    resumed = run(base_args(tmp_path / "b", tiny_config, steps=4) + flags + ["--resume_from_checkpoint", "latest"])
    assert "Resumed from" in resumed.stderr
    _assert_same_tensors(_unet_weights(tmp_path / "a", 4), _unet_weights(tmp_path / "b", 4), "unet")
    assert [r["loss"] for r in read_jsonl(tmp_path / "a" / "metrics.jsonl")] == \
        [r["loss"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")]
