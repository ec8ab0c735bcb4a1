"""examples/run_pipeline.py (the demo): progress display, verdict logic, report; and the scripts' --help.

The pure pieces (tqdm parsing, the progress display, the t-interval and the verdict sentences) are tested
in-process against real tqdm output and scipy; one slow test runs the whole demo on a tiny budget.
"""

import argparse
import importlib.util
import io
import json
import math
import os
import re
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO_ROOT, "examples", "run_pipeline.py")

TINY_UNET = {
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": 8,
}


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo():
    return _load(DEMO, "run_pipeline_under_test")


def _tqdm_output(total=5, desc="Steps", postfix=None, ncols=None, unit_scale_slow=False):
    """The raw text a real tqdm bar writes to a non-terminal stream (carriage-return updates)."""
    from tqdm import tqdm

    buf = io.StringIO()
    bar = tqdm(total=total, desc=desc, file=buf, mininterval=0, miniters=1, ncols=ncols)
    for i in range(total):
        bar.update(1)
        if postfix:
            bar.set_postfix(**{k: f"{v + i:.4f}" for k, v in postfix.items()})
    bar.close()
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------------
# tqdm parsing and the progress display
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("desc,postfix,ncols", [
    ("meta-steps", {"outer": 0.5}, None),       # stage 1's bar
    ("Steps", {"loss": 0.1, "lr": 0.001}, None),  # stage 2's bar (postfix with several fields)
    ("", None, 60),                              # no description, no postfix, narrow
])
def test_parse_progress_reads_real_tqdm_output(demo, desc, postfix, ncols):
    raw = _tqdm_output(total=5, desc=desc, postfix=postfix, ncols=ncols)
    parsed = [demo.parse_progress(s) for s in re.split(r"[\r\n]", raw) if s.strip()]
    assert parsed and all(p is not None for p in parsed)
    assert [p["n"] for p in parsed][0] == 0 and parsed[-1]["n"] == 5
    assert {p["total"] for p in parsed} == {5}
    assert {p["desc"] for p in parsed} == {desc}
    assert parsed[-1]["eta"] == "00:00" and re.fullmatch(r"\d\d:\d\d", parsed[-1]["elapsed"])
    if postfix:
        assert all(f"{k}=" in parsed[-1]["extra"] for k in postfix)


def test_parse_progress_ignores_log_lines(demo):
    for line in ["11/29/2026 19:41:33 - INFO - train_diffusion_hard - [RANK 0] step 3: validation loss 0.7",
                 "Traceback (most recent call last):", "error: --resolution must be positive", ""]:
        assert demo.parse_progress(line) is None


def test_display_non_tty_prints_stage_lines_throttled_and_validation(demo):
    raw = _tqdm_output(total=30, desc="Steps", postfix={"loss": 0.1})
    log_line = "11/29/2026 19:41:33 - INFO - train_diffusion_hard - [RANK 0] step 30: validation loss 0.12345\n"
    stream, now = io.StringIO(), [0.0]
    display = demo.StageDisplay("stage 2: uniform", stream=stream, tty=False, min_interval=10.0, clock=lambda: now[0])
    # one byte at a time: segments arrive split anywhere; the clock advances 1 s per tqdm update
    for ch in raw + log_line:
        now[0] += 1.0 if ch == "\r" else 0.0
        display.feed(ch)
    display.close()
    lines = stream.getvalue().splitlines()
    bars = [ln for ln in lines if "/30 " in ln]
    assert all(ln.startswith("[stage 2: uniform] Steps ") and "ETA " in ln for ln in bars)
    assert bars[0].split()[4] == "0/30" and "30/30 100%" in bars[-1]
    # the first, then one per 10 s of the fake clock, and the last: throttled, not one line per update
    assert 3 <= len(bars) <= raw.count("\r") // 10 + 2 < 30
    assert lines[-1] == "[stage 2: uniform] step 30: validation loss 0.12345"
    assert "\r" not in stream.getvalue()


def test_display_splits_a_log_line_glued_to_a_bar(demo):
    stream = io.StringIO()
    display = demo.StageDisplay("stage 1: meta-train rater", stream=stream, tty=False)
    display.feed("\rmeta-steps:  50%|#####     | 3/6 [00:03<00:03,  1.04s/it, outer=0.5202]"
                 "2026-11-29 19:41:17,236 WARNING train_noiserater: skipped meta-step 3: non-finite loss\n")
    display.close()
    out = stream.getvalue().splitlines()
    assert out == ["[stage 1: meta-train rater] meta-steps 3/6  50% | elapsed 00:03, ETA 00:03 | 1.04s/it, outer=0.5202",
                   "[stage 1: meta-train rater] skipped meta-step 3: non-finite loss"]


def test_display_tty_redraws_in_place(demo):
    raw = _tqdm_output(total=4, desc="Steps")
    stream = io.StringIO()
    display = demo.StageDisplay("stage 2: noiserater_hard", stream=stream, tty=True)
    display.feed(raw[: len(raw) // 2])
    display.feed("\n11/29/2026 19:41:33 - INFO - x - [RANK 0] step 2: validation loss 0.5\n")
    display.feed(raw[len(raw) // 2:])
    display.close()
    text = stream.getvalue()
    assert text.count("\n") == 2  # the validation line and the final newline after the bar
    assert "[stage 2: noiserater_hard] step 2: validation loss 0.5\n" in text
    final = text.rstrip("\n").split("\r")[-1].rstrip()
    assert final.startswith("[stage 2: noiserater_hard] Steps 4/4 100%")


# ------------------------------------------------------------------------------------------------------------
# Verdict logic
# ------------------------------------------------------------------------------------------------------------


def test_mean_t_interval_matches_scipy(demo):
    import numpy as np
    from scipy import stats

    rng = np.random.default_rng(0)
    for n in (2, 3, 7, 40):
        x = rng.normal(0.3, 2.0, size=n)
        mean, half, count = demo.mean_t_interval(list(x))
        lo, hi = stats.t.interval(0.95, n - 1, loc=x.mean(), scale=stats.sem(x))
        assert count == n
        assert mean == pytest.approx(x.mean(), rel=1e-12)
        assert mean - half == pytest.approx(lo, rel=1e-10) and mean + half == pytest.approx(hi, rel=1e-10)
    lo, hi = stats.t.interval(0.9, 3, loc=np.mean([1, 2, 4, 8]), scale=stats.sem([1, 2, 4, 8]))
    mean, half, _ = demo.mean_t_interval([1, 2, 4, 8], confidence=0.9)
    assert half == pytest.approx((hi - lo) / 2, rel=1e-10)


def test_mean_t_interval_edge_cases(demo):
    mean, half, n = demo.mean_t_interval([2.5])
    assert (mean, n) == (2.5, 1) and math.isnan(half)
    mean, half, n = demo.mean_t_interval([])
    assert n == 0 and math.isnan(mean) and math.isnan(half)
    assert demo.mean_t_interval([1.0, float("nan"), 3.0, None]) == demo.mean_t_interval([1.0, 3.0])


@pytest.mark.parametrize("mean,half,n,expect", [
    (0.5, 1.0, 5, "within noise"),
    (-0.5, 1.0, 5, "within noise"),
    (2.0, 1.0, 5, "POS by 2 ± 1 %"),
    (-2.0, 1.0, 5, "NEG by 2 ± 1 %"),
    (2.0, float("nan"), 1, "single value"),
    (float("nan"), float("nan"), 0, "no comparison"),
])
def test_interval_verdict_sentences(demo, mean, half, n, expect):
    s = demo.interval_verdict(mean, half, n, positive="POS", negative="NEG", unit=" %")
    assert expect in s
    assert s.startswith("At this budget, one seed, ") and s.endswith(".")
    others = {"within noise", "POS", "NEG", "single value", "no comparison"} - {expect.split(" by")[0]}
    assert not any(o in s for o in others)


def test_interval_verdict_boundary_is_within_noise(demo):
    # an interval that just touches 0 does not exclude it
    assert "within noise" in demo.interval_verdict(1.0, 1.0, 3, positive="POS", negative="NEG")


def test_stage1_gains_and_band_differences(demo):
    history = [{"step": 1, "outer_loss": 0.5, "val_loss_uniform": 0.75}, {"step": 2, "outer_loss": 0.4},
               {"step": 3, "outer_loss": float("nan"), "val_loss_uniform": 0.5},
               {"step": 4, "outer_loss": 0.5, "val_loss_uniform": 0.25}]
    assert demo.stage1_gains(history) == [0.25, -0.25]
    base = {"final_val_loss_band_0": 2.0, "final_val_loss_band_1": 0.5, "final_val_loss_band_2": float("nan")}
    hard = {"final_val_loss_band_0": 1.5, "final_val_loss_band_1": 0.6, "final_val_loss_band_2": 1.0}
    got = demo.band_relative_differences(base, hard)
    assert [(k, d) for k, _, _, d in got] == [(0, pytest.approx(25.0)), (1, pytest.approx(-20.0))]


# ------------------------------------------------------------------------------------------------------------
# --help shows defaults
# ------------------------------------------------------------------------------------------------------------


def test_help_formatter_shows_every_default_and_keeps_description():
    from noise_rater.training_utils import HelpFormatter

    parser = argparse.ArgumentParser(prog="x", description="line one\n    kept indented", formatter_class=HelpFormatter)
    parser.add_argument("--no_help", type=int, default=7)
    parser.add_argument("--with_help", type=float, default=0.5, help="A value.")
    parser.add_argument("--flag", action="store_true")
    parser.add_argument("--no_default", type=str)
    text = parser.format_help()
    flat = " ".join(text.split())
    assert "line one\n    kept indented" in text
    assert "--no_help NO_HELP default: 7" in flat
    assert "--with_help WITH_HELP A value. (default: 0.5)" in flat
    assert "--flag default: False" in flat


@pytest.mark.parametrize("script,flag,default", [
    ("train_noiserater.py", "--max_train_steps", "500"),   # a default set by set_defaults
    ("train_noiserater.py", "--inner_lr", "0.001"),         # an option without help text
    ("train_diffusion_hard.py", "--validation_steps", "250"),
    ("train_diffusion_hard.py", "--eval_batch_size", "64"),
])
def test_scripts_help_shows_defaults(script, flag, default, capsys):
    module = _load(os.path.join(REPO_ROOT, script), script[:-3] + "_help_under_test")
    with pytest.raises(SystemExit) as e:
        module.parse_args(["--help"])
    assert e.value.code == 0
    flat = " ".join(capsys.readouterr().out.split())
    m = re.search(re.escape(flag) + r" [A-Z_]+ (.*?)(?= --|$)", flat)
    assert m and re.search(r"default: " + re.escape(default) + r"\b", m.group(1)), m and m.group(1)


def test_checkpoint_limit_flag_exists_in_both_scripts():
    for script in ("train_noiserater.py", "train_diffusion_hard.py"):
        module = _load(os.path.join(REPO_ROOT, script), script[:-3] + "_flags_under_test")
        args = module.parse_args(["--output_dir", "o", "--dataset_name", "digits", "--checkpoints_total_limit", "2"])
        assert args.checkpoints_total_limit == 2


@pytest.mark.parametrize("argv,message", [
    (["--train_steps", "0"], "--train_steps must be positive, got 0"),
    (["--num_threads", "-1"], "--num_threads must be positive, got -1"),
])
def test_demo_rejects_bad_budgets(demo, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        demo.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_demo_threads_default(demo, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert demo.parse_args([]).num_threads == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert demo.parse_args([]).num_threads == 3
    assert demo.parse_args(["--num_threads", "2"]).num_threads == 2


# ------------------------------------------------------------------------------------------------------------
# The demo end to end, on a tiny budget
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path):
    config = tmp_path / "unet.json"
    config.write_text(json.dumps(TINY_UNET))
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": REPO_ROOT}
    env.pop("OMP_NUM_THREADS", None)  # the demo then runs its stages with one thread
    proc = subprocess.run(
        [sys.executable, DEMO, "--output_dir", str(out), "--model_config_name_or_path", str(config),
         "--meta_steps", "3", "--meta_batch_size", "8", "--compare_every", "1", "--train_steps", "4",
         "--train_batch_size", "8", "--validation_steps", "2", "--num_validation_triples", "32",
         "--num_inference_steps", "2"],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "1 CPU thread(s) per stage" in proc.stdout

    # progress: per-stage bars with the stage name and an ETA, validation lines, all in job.log too
    err = proc.stderr
    for stage, bar in [("stage 1: meta-train rater", "meta-steps 3/3 100%"), ("stage 2: uniform", "Steps 4/4 100%"),
                       ("stage 2: noiserater_hard", "Steps 4/4 100%")]:
        assert re.search(rf"^\[{stage}\] {bar} \| elapsed \d\d:\d\d, ETA 00:00", err, re.M), err[-3000:]
        assert f"[{stage}] " in err
    assert re.search(r"^\[stage 2: uniform\] step 2: validation loss \d", err, re.M)
    log = (out / "job.log").read_text()
    assert "== stage 1: meta-train rater ==" in log and log.count("| 4/4 [") >= 2 and "validation loss" in log

    # the report: a verdict sentence per result, an interval where there are several values, the figures
    report = (out / "report.md").read_text()
    verdicts = re.findall(r"\*\*Verdict \(stage (\d)\)\.\*\* (At this budget, one seed, [^\n]+)", report)
    assert [v[0] for v in verdicts] == ["1", "2"], report
    for _, sentence in verdicts:
        assert re.search(r"within noise|better|lower validation loss", sentence)
    assert "over 3 comparisons" in report and "(mean ± 95 % t-interval)" in report  # 3 paired stage-1 gains
    assert re.search(r"n = 4\)", verdicts[1][1])  # the 4 timestep bands
    for figure in ["rater/meta_evidence.png", "rater/rater_analysis.png", "learning_curves.png",
                   "uniform/samples_final.png", "noiserater_hard/samples_final.png"]:
        assert f"]({figure})" in report and (out / figure).is_file(), figure
    assert "valuation_accuracy.png" not in report or (out / "rater" / "valuation_accuracy.png").is_file()
    # the verdicts are also printed at the end of the job
    assert "Stage 1: At this budget" in proc.stdout and "Stage 2: At this budget" in proc.stdout

    # at most two checkpoints per stage
    for stage_dir in ["rater", "uniform", "noiserater_hard"]:
        ckpts = [d for d in os.listdir(out / stage_dir) if d.startswith("checkpoint-")]
        assert 1 <= len(ckpts) <= 2, (stage_dir, ckpts)
