"""Tests of the benchmark machinery (benchmarks/): runner logic with a fake command runner, the power-budget
statistics against scipy / closed forms / simulation, and report generation from synthetic result folders.

Nothing here trains a model: the fake command runner writes the files the two training scripts would write.
"""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from scipy import stats

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))

import power  # noqa: E402
import protocols  # noqa: E402
import report  # noqa: E402
import run_benchmark as rb  # noqa: E402


# ---- a fake command runner ---------------------------------------------------------------------------------


def _flag(cmd, name):
    return cmd[cmd.index(name) + 1]


class FakeRunner:
    """Stands in for ``run_command``: records each command and writes what the script would have written."""

    def __init__(self, val_loss=lambda method, seed: 0.05, weights=b"rater weights"):
        self.commands = []
        self.val_loss = val_loss
        self.weights = weights  # the bytes stage 1 writes as the rater's weights file

    def stage1(self):
        return [c for c in self.commands if "train_noiserater.py" in c]

    def stage2(self):
        return [c for c in self.commands if "train_diffusion_hard.py" in c]

    def __call__(self, cmd, log_path, timeout_s=None, env=None):
        self.commands.append(list(cmd))
        self.envs = getattr(self, "envs", []) + [env]
        out = _flag(cmd, "--output_dir")
        os.makedirs(out, exist_ok=True)
        if "train_noiserater.py" in cmd:
            with open(os.path.join(out, "meta_summary.json"), "w") as f:
                json.dump({"wall_time_s": 100.0, "step": int(_flag(cmd, "--max_train_steps"))}, f)
            with open(os.path.join(out, "rater_analysis.png"), "wb") as f:
                f.write(b"png")
            with open(os.path.join(out, "diffusion_pytorch_model.safetensors"), "wb") as f:
                f.write(self.weights)
            return 0
        steps, every = int(_flag(cmd, "--max_train_steps")), int(_flag(cmd, "--validation_steps"))
        seed = int(_flag(cmd, "--seed"))
        sel = _flag(cmd, "--noise_selection")
        v = self.val_loss(sel, seed)
        with open(os.path.join(out, "validation.jsonl"), "w") as f:
            for s in range(every, steps + 1, every):
                f.write(json.dumps({"step": s, "val_loss": v * (1 + (steps - s) / steps)}) + "\n")
        with open(os.path.join(out, "final_metrics.json"), "w") as f:
            json.dump({"final_val_loss": v, "final_val_loss_band_0": 2 * v, "steps": steps, "s_per_step": 0.1,
                       "select_time_s": 0.0, "train_time_s": 0.1 * steps, "wall_time_s": 0.2 * steps}, f)
        return 0


def _bench(tmp_path, name="digits8", runner=None, **overrides):
    o = {"steps": 20, "validation_steps": 10, "checkpointing_steps": 10, "seeds": [0], **overrides}
    p = protocols.get_protocol(name, o)
    b = rb.Benchmark(p, str(tmp_path / "results" / name), str(tmp_path / "runs" / name), str(tmp_path / "raters"),
                     run_command=runner or FakeRunner(), command_line=f"test {name}", log=lambda *a: None)
    return b


# ---- runner ------------------------------------------------------------------------------------------------


def test_uniform_only_never_runs_stage1(tmp_path):
    runner = FakeRunner()
    b = _bench(tmp_path, runner=runner, methods=["uniform", "min_snr", "knn", "assignment"], seeds=[0, 1])
    assert b.run() == []
    assert runner.stage1() == []
    assert len(runner.stage2()) == 8
    assert os.listdir(tmp_path / "raters") == []
    assert not [f for f in os.listdir(b.results_dir) if f.startswith("rater_")]
    r = json.load(open(b.result_path("uniform", 1)))
    assert r["final"]["val_loss"] == 0.05 and r["val_curve"][-1] == [20, 0.05] and r["seed"] == 1


def test_finished_runs_are_skipped_and_resume_needs_no_retraining(tmp_path):
    runner = FakeRunner()
    b = _bench(tmp_path, runner=runner, methods=["uniform", "knn"])
    b.run()
    assert len(runner.stage2()) == 2
    runner2 = FakeRunner()
    b2 = _bench(tmp_path, runner=runner2, methods=["uniform", "knn"])
    assert b2.run() == [] and runner2.commands == []
    # training finished but the result file was lost (e.g. killed during FD): collected again, not retrained
    os.remove(b.result_path("knn", 0))
    b3 = _bench(tmp_path, runner=runner2, methods=["uniform", "knn"])
    assert b3.run() == [] and runner2.commands == []
    assert os.path.exists(b.result_path("knn", 0))


def test_same_seed_and_pool_for_all_methods_and_rater_cached(tmp_path):
    runner = FakeRunner()
    b = _bench(tmp_path, runner=runner, methods=list(protocols.METHODS), seeds=[0, 1, 2],
               method_seeds={"oracle": [0, 2]})
    assert b.run() == []
    s2 = runner.stage2()
    assert len(s2) == 7 * 3 + 2
    for seed in (0, 1, 2):
        cmds = [c for c in s2 if _flag(c, "--seed") == str(seed)]
        assert {_flag(c, "--num_candidate_noises") for c in cmds} == {"8"}
        assert len({_flag(c, "--output_dir") for c in cmds}) == len(cmds)
        assert len(cmds) == (8 if seed in (0, 2) else 7)
    assert {_flag(c, "--noise_selection") for c in s2} == {"uniform", "knn", "assignment", "rater", "oracle"}
    # one stage-1 run per scope, reused by every seed and method
    scopes = sorted(_flag(c, "--weighting_scope") for c in runner.stage1())
    assert scopes == ["batch", "candidates"]
    for c in runner.stage1():
        assert _flag(c, "--num_candidate_noises") == "8"
    rater_dirs = {_flag(c, "--rater_model_name_or_path") for c in s2 if "--rater_model_name_or_path" in c}
    assert rater_dirs == {b.rater_dir("batch"), b.rater_dir("candidates")}
    for scope in ("batch", "candidates"):
        r = json.load(open(os.path.join(b.results_dir, f"rater_{scope}.json")))
        assert r["cost_s"] >= 100.0 and r["scope"] == scope
        assert os.path.exists(os.path.join(b.results_dir, f"rater_{scope}_rater_analysis.png"))
    # the transfer protocol's stage 1 has the same inner UNet and settings: the cached raters are reused
    runner2 = FakeRunner()
    t = _bench(tmp_path, name="transfer", runner=runner2, methods=["uniform", "rater_cand"])
    assert t.run() == []
    assert runner2.stage1() == [] and len(runner2.stage2()) == 2
    assert _flag(runner2.stage2()[1], "--rater_model_name_or_path") == b.rater_dir("candidates")


def test_runs_record_the_rater_weights_and_a_recomputed_rater_keeps_the_earlier_record(tmp_path):
    b = _bench(tmp_path, methods=["uniform", "rater_cand"], seeds=[0])
    assert b.run() == []
    sha = hashlib.sha256(b"rater weights").hexdigest()
    rec = json.load(open(os.path.join(b.results_dir, "rater_candidates.json")))
    assert rec["weights_sha256"] == sha and "earlier_computations" not in rec
    run = json.load(open(b.result_path("rater_cand", 0)))
    assert run["rater"]["weights_sha256"] == sha
    # each run says where and when it was timed (s/step compares only within one CPU model)
    assert rb.cpu_model() in run["machine"] and run["date"] == time.strftime("%Y-%m-%d")
    # the cache is lost and stage 1 gives other weights (another machine): the new record keeps the old one
    shutil.rmtree(b.rater_dir("candidates"))
    b2 = _bench(tmp_path, runner=FakeRunner(weights=b"other weights"), methods=["rater_cand"], seeds=[1])
    assert b2.run() == []
    rec2 = json.load(open(os.path.join(b.results_dir, "rater_candidates.json")))
    sha2 = hashlib.sha256(b"other weights").hexdigest()
    assert rec2["weights_sha256"] == sha2
    assert [e["weights_sha256"] for e in rec2["earlier_computations"]] == [sha]
    assert json.load(open(b.result_path("rater_cand", 1)))["rater"]["weights_sha256"] == sha2
    assert json.load(open(b.result_path("rater_cand", 0)))["rater"]["weights_sha256"] == sha  # untouched


def test_rater_record_same_or_recomputed_weights():
    old = {"key": "k", "weights_sha256": "a", "date": "2026-01-01", "machine": "m1", "cost_s": 5.0,
           "meta_summary": {"mean_gain": 1.0, "wall_time_s": 5.0}}
    same = rb.rater_record(dict(old, date="2026-02-02", machine="m2", cost_s=7.0), old)
    assert (same["date"], same["machine"], same["cost_s"]) == ("2026-01-01", "m1", 7.0)
    assert "earlier_computations" not in same
    other = rb.rater_record(dict(old, weights_sha256="b", date="2026-02-02"), old)
    assert other["date"] == "2026-02-02" and other["earlier_computations"][0]["weights_sha256"] == "a"
    # the earlier record travels on through later writes of the same weights
    again = rb.rater_record(dict(old, weights_sha256="b", date="2026-03-03"), other)
    assert again["date"] == "2026-02-02" and len(again["earlier_computations"]) == 1
    # a record written before hashes were kept: same weights iff the summaries agree apart from wall time
    legacy = {k: v for k, v in old.items() if k != "weights_sha256"}
    new = dict(old, weights_sha256="c", meta_summary={"mean_gain": 1.0, "wall_time_s": 9.0})
    assert "earlier_computations" not in rb.rater_record(new, legacy)
    moved = rb.rater_record(dict(new, meta_summary={"mean_gain": 2.0}), legacy)
    assert moved["earlier_computations"][0]["meta_summary"]["mean_gain"] == 1.0
    assert moved["earlier_computations"][0]["weights_sha256"] is None
    assert rb.rater_record(new, dict(old, key="other")) == new and rb.rater_record(new, None) == new


def test_stage1_flags_and_seed_plan():
    p = protocols.get_protocol("digits8")
    cmd = rb.stage1_command(p, "batch", "/r", "/u.json")
    assert _flag(cmd, "--weighting_scope") == "batch" and _flag(cmd, "--seed") == str(p["stage1"]["seed"])
    assert p["stage1"]["seed"] not in p["seeds"]
    assert protocols.seeds_for(p, "oracle") == [0, 1, 2] and protocols.seeds_for(p, "uniform") == list(range(10))
    q = protocols.get_protocol("digits8", {"seeds": [1, 5]})
    assert protocols.seeds_for(q, "oracle") == [1]
    assert rb.plan(q)[:3] == [(1, "uniform"), (1, "min_snr"), (1, "knn")]
    with pytest.raises(ValueError):
        rb.stage2_command(p, "rater_cand", 0, "/o", "/u.json", None)
    assert protocols.stage1_key(p, "batch") != protocols.stage1_key(p, "candidates")
    assert protocols.stage1_key(p, "batch") == protocols.stage1_key(protocols.get_protocol("transfer"), "batch")


def test_protocol_checks():
    with pytest.raises(protocols.ProtocolError, match="validation_steps"):
        protocols.get_protocol("digits8", {"steps": 2005})
    with pytest.raises(protocols.ProtocolError, match="unknown method"):
        protocols.get_protocol("digits8", {"methods": ["nope"]})
    with pytest.raises(protocols.ProtocolError, match="checkpointing_steps"):
        protocols.get_protocol("fmnist16", {"checkpointing_steps": 1000})  # FD at step 1500
    assert protocols.fd_off_protocol(protocols.get_protocol("fmnist16")) is None
    small = protocols.get_protocol("fmnist16", {"fd": {**protocols.PROTOCOLS["fmnist16"]["fd"], "num_generated": 64}})
    assert "64 generated" in protocols.fd_off_protocol(small)
    fd = protocols.PROTOCOLS["fmnist16"]["fd"]
    for overrides, key, value in [({"num_candidate_noises": 0}, "num_candidate_noises", 0),
                                  ({"batch_size": 2.5}, "batch_size", 2.5),
                                  ({"stage1": {**protocols.STAGE1_DEFAULT, "meta_steps": 0}}, "stage1.meta_steps", 0),
                                  ({"fd": {**fd, "num_real": -1}}, "fd.num_real", -1)]:
        with pytest.raises(protocols.ProtocolError, match=f"{key} must be a positive int") as e:
            protocols.get_protocol("fmnist16", overrides)
        assert (e.value.key, e.value.value) == (key, value)
    assert fd["num_generated"] >= 2000 and fd["num_real"] >= 5000


def test_lr_scheduler_of_a_protocol_reaches_stage2_and_is_checked():
    assert _flag(rb.stage2_command(protocols.get_protocol("digits8"), "uniform", 0, "/o", "/u.json"),
                 "--lr_scheduler") == "constant_with_warmup"  # protocols without the key keep their schedule
    long = protocols.get_protocol("digits8_long")
    assert _flag(rb.stage2_command(long, "uniform", 0, "/o", "/u.json"), "--lr_scheduler") == "cosine"
    assert protocols.stage1_key(long, "candidates") == protocols.stage1_key(protocols.get_protocol("digits8"),
                                                                            "candidates")  # same stage-1 rater
    with pytest.raises(protocols.ProtocolError, match="lr_scheduler must be one of") as e:
        protocols.get_protocol("digits8_long", {"lr_scheduler": "cosine_annealing"})
    assert (e.value.key, e.value.value) == ("lr_scheduler", "cosine_annealing")
    import train_diffusion_hard

    assert set(protocols.LR_SCHEDULERS) <= set(train_diffusion_hard.LR_SCHEDULERS)


def test_fmnist16_cosine_differs_from_fmnist16_only_in_the_schedule():
    """The cosine variant must change nothing but the stage-2 schedule (and its text), so that its stage-1
    raters, FD reference and candidate pools are fmnist16's and the two protocols' differences are the schedule."""
    base, cos = protocols.get_protocol("fmnist16"), protocols.get_protocol("fmnist16_cosine")
    differing = {k for k in set(base) | set(cos) if base.get(k) != cos.get(k)}
    assert differing == {"name", "description", "lr_scheduler"}
    assert _flag(rb.stage2_command(cos, "uniform", 0, "/o", "/u.json"), "--lr_scheduler") == "cosine"
    for scope in ("batch", "candidates"):
        assert protocols.stage1_key(cos, scope) == protocols.stage1_key(base, scope)


def test_transfer_stage2_unet_is_at_least_4x_the_inner_unet():
    p = protocols.PROTOCOLS["transfer"]
    big = protocols.unet_num_parameters(p["unet"], p["resolution"], p["num_channels"])
    small = protocols.unet_num_parameters(p["stage1_unet"], p["resolution"], p["num_channels"])
    assert big >= 4 * small


def test_results_of_another_protocol_are_refused(tmp_path):
    b = _bench(tmp_path, methods=["uniform"])
    b.run()
    b2 = _bench(tmp_path, methods=["uniform"], steps=30)
    with pytest.raises(rb.UsageError, match="steps"):
        b2.run()
    # selecting other seeds / methods is the same protocol
    assert _bench(tmp_path, methods=["uniform", "knn"], seeds=[0, 1]).run() == []


def test_cli_dry_run_and_usage_errors(tmp_path, capsys):
    rd = str(tmp_path / "res")
    assert rb.main(["--protocol", "digits8", "--methods", "uniform", "--seeds", "0", "--results_dir", rd,
                    "--dry_run"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stage1_to_train"] == [] and out["pending"] == [[0, "uniform"]] and out["num_pending"] == 1
    assert out["runs_dir"] == rd + ".runs"  # a results folder elsewhere never reuses benchmarks/runs/<protocol>
    assert not os.path.exists(rd)  # a dry run writes nothing
    assert rb.main(["--protocol", "digits8", "--steps", "2005", "--dry_run", "--results_dir", rd]) == 2
    assert "error: protocol 'digits8'" in capsys.readouterr().err
    assert rb.main(["--protocol", "digits8", "--method_seeds", "oracle", "--dry_run", "--results_dir", rd]) == 2
    # a cached rater is reported as such
    raters = tmp_path / "raters"
    p = protocols.get_protocol("digits8")
    (raters / protocols.stage1_key(p, "candidates")).mkdir(parents=True)
    (raters / protocols.stage1_key(p, "candidates") / "meta_summary.json").write_text("{}")
    assert rb.main(["--protocol", "digits8", "--methods", "rater_cand", "rater_batch", "--seeds", "0",
                    "--results_dir", rd, "--raters_dir", str(raters), "--dry_run"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stage1_to_train"] == ["batch"] and list(out["stage1_cached"]) == ["candidates"]


@pytest.mark.parametrize("argv, message", [
    (["--checkpointing_steps", "0"], "--checkpointing_steps must be >= 1, got 0"),
    (["--batch_size", "-3"], "--batch_size must be >= 1, got -3"),
    (["--meta_steps", "0"], "--meta_steps must be >= 1, got 0"),
    (["--seeds", "-1"], "--seeds must be >= 0"),
    (["--methods", "uniform", "uniform"], "--methods lists uniform more than once"),
    (["--seeds", "1", "1"], "--seeds lists 1 more than once"),
    (["--fd_generated", "100"], "--fd_generated: protocol 'digits8' computes no FD"),
    (["--methods", "uniform", "oracle", "--seeds", "5", "6"], "method 'oracle' runs at no seed"),
    (["--methods", "knn", "--method_seeds", "knn=10,11"], "seed(s) 10, 11 not among the seeds"),
    (["--jobs", "0"], "--jobs must be >= 1"),
])
def test_cli_rejects_bad_overrides_naming_the_flag(tmp_path, capsys, argv, message):
    assert rb.main(["--protocol", "digits8", "--results_dir", str(tmp_path / "r"), "--dry_run", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--fd_generated", "0"], "--fd_generated must be >= 1, got 0"),
    (["--fd_inference_steps", "-2"], "--fd_inference_steps must be >= 1, got -2"),
])
def test_cli_rejects_bad_fd_overrides_naming_the_flag(tmp_path, capsys, argv, message):
    assert rb.main(["--protocol", "fmnist16", "--results_dir", str(tmp_path / "r"), "--dry_run", *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_notes_a_method_its_protocol_seeds_leave_out(tmp_path, capsys):
    assert rb.main(["--protocol", "digits8", "--seeds", "5", "--results_dir", str(tmp_path / "r"), "--dry_run"]) == 0
    cap = capsys.readouterr()
    assert "note: method 'oracle' runs at no seed" in cap.err
    assert [m for _, m in json.loads(cap.out)["pending"]] == [m for m in protocols.METHOD_ORDER if m != "oracle"]


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_budget_stops_before_a_job_that_does_not_fit(tmp_path):
    clock = Clock()

    class TimedRunner(FakeRunner):
        def __call__(self, cmd, log_path, timeout_s=None):
            clock.t += 1000.0  # every run takes 1000 s
            return super().__call__(cmd, log_path, timeout_s)

    runner = TimedRunner()
    p = protocols.get_protocol("digits8", {"steps": 20, "validation_steps": 10, "checkpointing_steps": 10,
                                           "seeds": [0, 1], "methods": ["uniform", "knn"]})
    b = rb.Benchmark(p, str(tmp_path / "res"), str(tmp_path / "runs"), str(tmp_path / "raters"), run_command=runner,
                     deadline=2500.0, clock=clock, log=lambda *a: None)
    left = b.run()
    # two runs (2000 s) done; the third is estimated at 1000 s with < 1000 s left: not started
    assert len(runner.stage2()) == 2 and left == [(1, "uniform"), (1, "knn")]
    assert clock.t == 2000.0


def test_budget_deadline_stops_a_running_job(tmp_path):
    class SlowRunner(FakeRunner):
        def __call__(self, cmd, log_path, timeout_s=None):
            self.commands.append(cmd)
            self.timeouts = getattr(self, "timeouts", []) + [timeout_s]
            raise subprocess.TimeoutExpired(cmd, timeout_s)

    runner = SlowRunner()
    clock = Clock()
    p = protocols.get_protocol("digits8", {"steps": 20, "validation_steps": 10, "checkpointing_steps": 10,
                                           "seeds": [0], "methods": ["uniform"]})
    b = rb.Benchmark(p, str(tmp_path / "res"), str(tmp_path / "runs"), str(tmp_path / "raters"), run_command=runner,
                     deadline=600.0, clock=clock, log=lambda *a: None)
    assert b.run() == [(0, "uniform")]
    assert runner.timeouts == [600.0 - rb.BUDGET_MARGIN_S]


def test_parallel_jobs_give_the_same_results_as_serial(tmp_path):
    val = lambda method, seed: 0.05 + 0.01 * seed + {"uniform": 0.0, "knn": 0.001, "rater": 0.002}[method]  # noqa: E731
    o = {"seeds": [0, 1, 2], "methods": ["uniform", "knn", "rater_cand", "rater_batch"]}
    serial, par = FakeRunner(val), FakeRunner(val)
    b1 = _bench(tmp_path / "serial", runner=serial, **o)
    b2 = _bench(tmp_path / "parallel", runner=par, **o)
    b2.jobs, b2.threads_per_job = 2, 1
    assert b1.run() == [] and b2.run() == []
    assert sorted(b1.stage1_runs) == sorted(b2.stage1_runs) == ["batch", "candidates"]
    # stage 1 (both scopes) strictly before any stage-2 run; every run exactly once
    kinds = ["s1" if "train_noiserater.py" in c else "s2" for c in par.commands]
    assert kinds == ["s1", "s1"] + ["s2"] * 12
    for s, m in rb.plan(b1.p):
        r1, r2 = (json.load(open(b.result_path(m, s))) for b in (b1, b2))
        assert r1["final"] == r2["final"] and r1["val_curve"] == r2["val_curve"]
    # each training run got one thread; the serial runner left the environment alone
    assert par.envs == [{"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}] * 14 and set(serial.envs) == {None}
    secs = json.load(open(b2.times_path))
    assert sorted(secs) == sorted(f"{m}_seed{s}" for s, m in rb.plan(b2.p))


def test_parallel_runs_of_one_rater_scope_starting_together(tmp_path, monkeypatch):
    """Two runs needing the same cached rater start at once (--jobs 2): both used to write the rater's result
    file through one temporary name, and the second move failed (FileNotFoundError), losing that run."""
    real_dump = json.dump

    def slow_dump(*a, **k):  # widen the window between writing the temporary file and moving it
        time.sleep(0.2)
        return real_dump(*a, **k)

    monkeypatch.setattr(json, "dump", slow_dump)
    runner = FakeRunner()
    b = _bench(tmp_path, runner=runner, methods=["rater_cand", "rater_cand_importance"])
    b.jobs = 2
    assert b.run() == []
    assert len(runner.stage1()) == 1 and len(runner.stage2()) == 2
    assert json.load(open(os.path.join(b.results_dir, "rater_candidates.json")))["scope"] == "candidates"
    assert not [f for f in os.listdir(b.results_dir) if f.endswith(".tmp")]


def test_parallel_failure_stops_new_jobs_and_is_raised(tmp_path):
    class FailsOnSeed1(FakeRunner):
        def __call__(self, cmd, log_path, timeout_s=None, env=None):
            if "train_diffusion_hard.py" in cmd and _flag(cmd, "--seed") == "1":
                self.commands.append(list(cmd))
                return 7
            time.sleep(0.5)  # seed 1 fails while seed 0 is still running
            return super().__call__(cmd, log_path, timeout_s, env)

    runner = FailsOnSeed1()
    b = _bench(tmp_path, runner=runner, seeds=[0, 1, 2, 3, 4, 5], methods=["uniform"])
    b.jobs = 2
    with pytest.raises(RuntimeError, match=r"uniform seed 1 failed \(exit 7\); see .*logs/uniform_seed1\.log"):
        b.run()
    assert not os.path.exists(b.result_path("uniform", 1)) and os.path.exists(b.result_path("uniform", 0))
    assert len(runner.stage2()) == 2  # seeds 0 and 1 started together; nothing new after the failure


def test_a_run_finished_by_another_invocation_is_not_redone(tmp_path):
    runner = FakeRunner()
    b = _bench(tmp_path, runner=runner, methods=["uniform"])
    os.makedirs(b.results_dir)
    with open(b.result_path("uniform", 0), "w") as f:
        json.dump({"method": "uniform", "seed": 0}, f)
    assert b.run_one("uniform", 0) == {"method": "uniform", "seed": 0} and runner.commands == []


def test_fd_reference_time_is_not_charged_to_the_run_that_computes_it(tmp_path):
    clock = Clock()
    p = protocols.get_protocol("fmnist16", {"steps": 20, "validation_steps": 10, "checkpointing_steps": 10,
                                            "seeds": [0, 1], "methods": ["uniform"]})
    b = rb.Benchmark(p, str(tmp_path / "res"), str(tmp_path / "runs"), str(tmp_path / "raters"),
                     run_command=FakeRunner(), clock=clock, log=lambda *a: None)

    def reference():  # the real one reads 10,000 images and extracts their features once
        clock.t += 500.0
        return {"images": None, "features": None}, {}

    def evaluate_fd(method, seed, out):
        b.fd_reference()
        clock.t += 30.0  # sampling + features of the generated images: this run's own cost
        return {"20": {"fd_efflite0": 1.0}}

    b._fd_reference, b.evaluate_fd = reference, evaluate_fd
    assert b.run() == []
    assert [json.load(open(b.result_path("uniform", s)))["eval_s"] for s in (0, 1)] == [30.0, 30.0]
    assert clock.t == 560.0  # the reference was computed once


def test_jobs_must_be_positive(tmp_path):
    with pytest.raises(rb.UsageError, match="--jobs must be >= 1"):
        rb.Benchmark(protocols.get_protocol("digits8"), str(tmp_path), str(tmp_path), str(tmp_path), jobs=0)


def test_run_command_kills_the_process_group_on_timeout(tmp_path):
    log = str(tmp_path / "log.txt")
    with pytest.raises(subprocess.TimeoutExpired):
        rb.run_command([sys.executable, "-c", "import time; print('hi', flush=True); time.sleep(60)"], log, 1.0)
    assert rb.run_command([sys.executable, "-c", "raise SystemExit(3)"], log) == 3
    assert rb.run_command([sys.executable, "-c", "import os; print('threads', os.environ['OMP_NUM_THREADS'])"], log,
                          env={"OMP_NUM_THREADS": "1"}) == 0
    assert "threads 1" in open(log).read()
    assert "hi" in open(log).read()


# ---- power budget ------------------------------------------------------------------------------------------


def test_t_quantile_closed_forms():
    for p in (0.8, 0.975):
        assert power.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
        assert power.t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)


def test_mean_ci_matches_scipy_ttest_interval():
    x = [1.3, -0.2, 0.7, 2.1, 0.4, -1.0]
    m, hw, n = power.mean_ci(x)
    ci = stats.ttest_1samp(x, 0.0).confidence_interval(0.95)
    assert n == 6 and m == pytest.approx(np.mean(x))
    assert (m - hw, m + hw) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert math.isnan(power.mean_ci([1.0])[1]) and power.mean_ci([None, float("nan")])[2] == 0


def test_paired_relative_differences_by_hand():
    d = power.paired_relative_differences({0: 0.98, 1: 1.05, 2: 0.5, 3: None}, {0: 1.0, 1: 1.0, 3: 1.0, 4: 2.0})
    assert d == pytest.approx({0: -2.0, 1: 5.0})


def test_seeds_needed_is_the_smallest_n_meeting_the_budget():
    for sd, budget in ((3.0, 2.0), (1.0, 2.0), (10.0, 5.0), (0.5, 0.1)):
        n = power.seeds_needed(sd, budget)
        hw = lambda k: stats.t.interval(0.95, k - 1)[1] * sd / math.sqrt(k)  # noqa: E731
        assert hw(n) <= budget and (n == 2 or hw(n - 1) > budget)
    assert power.seeds_needed(1.0, 1e-6, n_max=100) is None and power.seeds_needed(float("nan"), 2) is None


def test_minimal_detectable_effect_closed_form_and_simulated_power():
    # large n: (z_0.975 + z_0.80) * SE = 2.80 * SE
    n, sd = 10 ** 6, 3.0
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    assert power.minimal_detectable_effect(sd, n) / (sd / math.sqrt(n)) == pytest.approx(z, rel=1e-4)
    assert z == pytest.approx(2.8016, abs=1e-4)
    # the exact power at the MDE (noncentral t) is close to 80 %, and a simulation of paired t-tests agrees
    rng = np.random.default_rng(0)
    for n in (3, 5, 8):
        mde = power.minimal_detectable_effect(1.0, n)
        exact = power.paired_t_power(mde, 1.0, n)
        assert 0.76 < exact < 0.81
        x = rng.normal(mde, 1.0, (20000, n))
        t = x.mean(1) / (x.std(1, ddof=1) / math.sqrt(n))
        simulated = np.mean(np.abs(t) > stats.t.ppf(0.975, n - 1))
        assert simulated == pytest.approx(exact, abs=0.01)


def test_power_rows_from_records():
    def rec(v, fd=None):
        return {"final": {"val_loss": v}, "steps": 10, "fd": {"10": {"fd_efflite0": fd}} if fd else None}

    runs = {"uniform": {0: rec(1.0, 10.0), 1: rec(2.0, 20.0), 2: rec(1.0, 10.0)},
            "knn": {0: rec(0.99, 9.0), 1: rec(2.0, 19.0), 2: rec(0.98, 10.0)}}
    (row,) = power.power_rows(runs, "val_loss")
    d = [-1.0, 0.0, -2.0]
    assert row["n"] == 3 and row["mean_pct"] == pytest.approx(-1.0) and row["sd_pct"] == pytest.approx(np.std(d, ddof=1))
    assert row["halfwidth_pct"] == pytest.approx(stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3))
    assert row["meets_budget"] is False and row["budget_pct"] == 2.0
    (frow,) = power.power_rows(runs, "fd")
    assert frow["mean_pct"] == pytest.approx((-10.0 - 5.0 + 0.0) / 3)


# ---- report ------------------------------------------------------------------------------------------------


def test_first_crossing_and_flatness():
    curve = [(100, 1.0), (200, 0.8), (300, 0.6)]
    assert report.first_crossing(curve, 0.7) == pytest.approx(250.0)
    assert report.first_crossing(curve, 1.0) == 100.0 and report.first_crossing(curve, 0.5) is None
    assert report.flatness([(700, 0.5), (800, 0.52), (900, 0.51), (1000, 0.507)], 1000) == pytest.approx(-2.5)
    assert report.flatness([(1000, 0.5)], 1000) is None


def _write_synthetic(root, name, rel_by_method, seeds, base=0.05, spread=None, steps=1000, oracle_seeds=None):
    """A protocol folder with uniform's final loss ``base * (1 + 0.01 seed)`` and each method at
    ``uniform * (1 + rel / 100 + spread[seed])``."""
    d = os.path.join(root, name)
    os.makedirs(d, exist_ok=True)
    p = protocols.get_protocol(name, {"steps": steps, "validation_steps": 100, "checkpointing_steps": 500,
                                      "seeds": seeds})
    with open(os.path.join(d, "protocol.json"), "w") as f:
        json.dump({"resolved": p, "commands": [f"python benchmarks/run_benchmark.py --protocol {name}"],
                   "unet_params": 651041, "stage1_unet_params": 651041}, f)
    for m, rel in {"uniform": 0.0, **rel_by_method}.items():
        for s in (oracle_seeds if m == "oracle" and oracle_seeds else seeds):
            u = base * (1 + 0.01 * s)
            v = u * (1 + rel / 100 + (spread[s] if spread and m != "uniform" else 0.0))
            curve = [[k, v * (1 + 0.5 * (steps - k) / steps)] for k in range(100, steps + 1, 100)]
            r = {"protocol": name, "method": m, "seed": s, "steps": steps, "val_curve": curve,
                 "final": {"val_loss": v}, "s_per_step": 0.1, "fd": None}
            if protocols.METHODS[m]["rater_scope"]:
                r["rater"] = {"scope": protocols.METHODS[m]["rater_scope"], "key": "k-" + m}
            with open(os.path.join(d, f"run_{m}_seed{s}.json"), "w") as f:
                json.dump(r, f)
    return d


def test_report_verdict_yes_with_oracle_fraction(tmp_path):
    root = str(tmp_path)
    seeds = list(range(6))
    jitter = {s: 0.001 * ((-1) ** s) for s in seeds}
    _write_synthetic(root, "digits8", {"rater_cand": -3.0, "knn": +1.0, "oracle": -6.0}, seeds, spread=jitter,
                     oracle_seeds=[0, 1, 2, 3])
    with open(os.path.join(root, "digits8", "rater_candidates.json"), "w") as f:
        json.dump({"scope": "candidates", "key": "k-rater_cand", "cost_s": 600.0, "stage1": {"meta_steps": 300},
                   "meta_summary": {"mean_gain": 1e-4}}, f)
    text = report.build_report(root, doc_dir=root)
    assert "**Yes: 1 NoiseRater comparison(s) beat uniform" in text
    # stage 1: 600 s shared by the 6 rater_cand runs -> 100 s each; reach: 938 steps x 0.1 s = 94 s (+100, +600)
    assert "| candidates | `k-rater_cand` | 300 | 600 | 6 | 100 | 1.00e-04 |" in text
    assert ("| NoiseRater, candidate-scope rater, argmax | 0,1,2,3,4,5 | 0.05125 | 938 | 0.94x | 94 | 194 | 694 |"
            in text)
    # the oracle (seeds 0-3) is measured against uniform's mean over seeds 0-3 (0.05075), not over all six seeds:
    # 0.94 x 0.05075 (1 + 0.5 (1000 - k) / 1000) = 0.05075 at k = 872 (an unpaired target 0.05125 would give 851)
    assert "| oracle (one-step influence, the ceiling) | 0,1,2,3 | 0.05075 | 872 | 0.87x |" in text
    assert "beats uniform by 3.00 %" in text
    # fraction over the oracle's seeds 0..3: jitter cancels in pairs -> -3 / -6
    assert "captures 0.50 of the oracle's gain" in text
    assert "wider than" not in text
    assert os.path.exists(os.path.join(root, "digits8", "learning_curves.png"))
    # uniform's curve falls 9 % over the last 20 % of steps in the synthetic data: flagged
    assert "over the last 20 % of steps. It is still falling" in text


def test_report_verdict_no_and_over_budget(tmp_path):
    root = str(tmp_path)
    seeds = [0, 1, 2]
    big = {0: -0.05, 1: 0.05, 2: 0.0}  # +-5 % seed-to-seed: interval far wider than +-2 %
    _write_synthetic(root, "digits8", {"rater_batch": 0.5, "rater_cand": -0.5}, seeds, spread=big)
    text = report.build_report(root, doc_dir=root)
    assert "**No: no NoiseRater variant beats uniform" in text
    assert "is wider than the ±2 % budget" in text and "the budget needs" in text
    assert "Intervals wider than the power budget: `digits8` rater_batch (val_loss), `digits8` rater_cand (val_loss)" in text
    assert "## Oracle ceiling" not in text


def test_report_worse_and_transfer_table(tmp_path):
    root = str(tmp_path)
    seeds = [0, 1, 2, 3]
    tiny = {s: 0.0005 * ((-1) ** s) for s in seeds}
    _write_synthetic(root, "digits8", {"rater_cand": 1.0}, seeds, spread=tiny)
    _write_synthetic(root, "transfer", {"rater_cand": -1.5}, seeds, spread=tiny)
    text = report.build_report(root, doc_dir=root)
    assert "is worse than uniform by 1.00 %" in text
    assert "## Rater transfer" in text
    row = [line for line in text.splitlines() if line.startswith("| NoiseRater, candidate-scope rater, argmax | 4 | -1.50")]
    assert row and "+1.00" in row[0]


def test_report_cli_writes_file(tmp_path):
    root = str(tmp_path / "results")
    _write_synthetic(root, "digits8", {"knn": 1.0}, [0, 1])
    out = str(tmp_path / "B.md")
    assert report.main(["--results_root", root, "--output", out]) == 0
    text = open(out).read()
    assert "No protocol has both uniform and NoiseRater results yet" in text
    # the reproduce line reruns what the tables report; figures go next to --output, not into the results
    assert ("`python benchmarks/run_benchmark.py --protocol digits8 --methods uniform knn --seeds 0 1 --jobs 2`"
            in text)
    assert os.path.exists(str(tmp_path / "digits8_learning_curves.png"))
    assert not os.path.exists(os.path.join(root, "digits8", "learning_curves.png"))
    # different seed sets: one command per group; a method with protocol seeds of its own gets --method_seeds
    _write_synthetic(root, "digits8", {"knn": 1.0, "oracle": -1.0, "rater_cand": 0.5}, [0, 1, 2], oracle_seeds=[0, 1])
    os.remove(os.path.join(root, "digits8", "run_rater_cand_seed2.json"))
    cmds = report.reproduce_commands("digits8", protocols.get_protocol("digits8"), report.load_runs(
        os.path.join(root, "digits8")))
    assert cmds == ["python benchmarks/run_benchmark.py --protocol digits8 --methods uniform knn --seeds 0 1 2 --jobs 2",
                    "python benchmarks/run_benchmark.py --protocol digits8 --methods rater_cand oracle --seeds 0 1 "
                    "--method_seeds oracle=0,1 --jobs 2"]


def test_report_names_unmeasured_methods_with_estimated_cost(tmp_path):
    root = str(tmp_path / "results")
    _write_synthetic(root, "digits8", {"knn": 1.0, "oracle": 0.5, "rater_cand": 0.0}, [0, 1])
    for s in (0, 1):  # the oracle's step costs 10x uniform's (0.1 s) on digits8
        path = os.path.join(root, "digits8", f"run_oracle_seed{s}.json")
        r = json.load(open(path))
        r["s_per_step"] = 1.0
        json.dump(r, open(path, "w"))
    _write_synthetic(root, "fmnist16", {"rater_cand": 0.0}, [0, 1], steps=4000)
    assert report.step_cost_ratios(root) == {"knn": pytest.approx(1.0), "oracle": pytest.approx(10.0),
                                             "rater_cand": pytest.approx(1.0)}
    text = report.build_report(root, doc_dir=root, figures_dir=str(tmp_path))
    fm = text[text.index("## Protocol `fmnist16`"):]
    line = next(x for x in fm.splitlines() if x.startswith("- Not measured on this protocol yet"))
    # 0.1 s/step x 4000 steps = 7 min for knn; x 10 for the oracle = 1.1 h; min_snr has no measured ratio
    assert "(`knn`, about 7 min of training per run on one core)" in line
    assert "(`oracle`, about 1.1 h of training per run on one core)" in line
    assert "(`min_snr`)" in line and "`uniform`" not in line and "`rater_cand`" not in line
    assert ("`python benchmarks/run_benchmark.py --protocol fmnist16 --methods min_snr knn assignment rater_batch "
            "rater_cand_importance oracle --seeds 0 1 2 3 4 --jobs 2` (oracle at the protocol's own seeds)") in line
    verdict = text[:text.index("## Protocol")]
    assert "- Not measured here yet: `min_snr`, `knn`, `assignment`, `rater_batch`, `rater_cand_importance`, " \
           "`oracle`" in verdict[verdict.index("**`fmnist16`**"):]


def test_report_says_which_computation_of_a_recomputed_rater_each_run_used(tmp_path):
    root = str(tmp_path / "results")
    d = _write_synthetic(root, "digits8", {"rater_cand": 0.0, "rater_cand_importance": 0.0}, [0, 1, 2])
    sha = {"rater_cand": {0: None, 1: None, 2: "a" * 64}, "rater_cand_importance": {0: "b" * 64, 1: "b" * 64,
                                                                                      2: "c" * 64}}
    for m, by_seed in sha.items():
        for s, h in by_seed.items():
            path = os.path.join(d, f"run_{m}_seed{s}.json")
            r = json.load(open(path))
            r["rater"]["weights_sha256"] = h
            json.dump(r, open(path, "w"))
    rec = {"scope": "candidates", "key": "k", "cost_s": 1.0, "stage1": {"meta_steps": 3}, "date": "2026-02-02",
           "machine": "m2", "weights_sha256": "b" * 64, "meta_summary": {"valuation": {"fraction_of_oracle": 0.2}},
           "earlier_computations": [{"weights_sha256": None, "date": None, "machine": None,
                                     "meta_summary": {"valuation": {"fraction_of_oracle": -0.1}}},
                                    {"weights_sha256": "a" * 64, "date": "2026-01-01", "machine": "m1",
                                     "meta_summary": {"valuation": {"fraction_of_oracle": 0.0}}}]}
    json.dump(rec, open(os.path.join(d, "rater_candidates.json"), "w"))
    text = report.build_report(root, doc_dir=root, figures_dir=str(tmp_path))
    assert ("- The candidates-scope rater was meta-trained again on 2026-02-02 (m2) from the same cache key" in text)
    assert "the computation of an earlier date (not recorded) (fraction of the oracle's one-step gain -0.100" in text
    assert "the computation of 2026-01-01 (m1) (fraction of the oracle's one-step gain +0.000" in text
    assert "  - rater_cand seeds 0,1: not recorded (made before weight hashes were kept)." in text
    assert "  - rater_cand seeds 2: the computation of 2026-01-01 (weights sha256 aaaaaaaaaaaa)." in text
    assert "  - rater_cand_importance seeds 0,1: the computation of 2026-02-02 (weights sha256 bbbbbbbbbbbb)." in text
    assert "  - rater_cand_importance seeds 2: weights sha256 cccccccccccc, which matches no recorded" in text
    # one computation only: nothing said
    del rec["earlier_computations"]
    json.dump(rec, open(os.path.join(d, "rater_candidates.json"), "w"))
    assert "meta-trained again" not in report.build_report(root, doc_dir=root, figures_dir=str(tmp_path))


def test_report_flags_runs_timed_on_different_machines(tmp_path):
    root = str(tmp_path / "results")
    d = _write_synthetic(root, "digits8", {"knn": 1.0}, [0, 1])
    assert "timed on different machines" not in report.build_report(root, doc_dir=root, figures_dir=str(tmp_path))
    for m, s, machine in (("knn", 1, "cpu B"), ("uniform", 1, "cpu B")):
        path = os.path.join(d, f"run_{m}_seed{s}.json")
        r = json.load(open(path))
        r["machine"], r["date"] = machine, "2026-02-02"
        json.dump(r, open(path, "w"))
    text = report.build_report(root, doc_dir=root, figures_dir=str(tmp_path))
    assert ("- **Runs were timed on different machines**, so seconds per step and wall-clock compare only within one "
            "machine: machine not recorded: uniform 0, knn 0; cpu B, 2026-02-02: uniform 1, knn 1.") in text


def test_report_verdict_undetermined_with_one_rater_seed(tmp_path):
    root = str(tmp_path / "results")
    _write_synthetic(root, "digits8", {"knn": 1.0, "rater_cand": -5.0}, [0])
    text = report.build_report(root, str(tmp_path), figures_dir=str(tmp_path))
    assert "**Undetermined: no NoiseRater method has been paired with uniform at 2 or more seeds" in text
    assert "**No:" not in text and "**Yes:" not in text


def test_flatness_phrase_needs_an_interval_excluding_zero():
    assert report.flatness_phrase((-0.5, 2.0, 3)).startswith("It is flat to within 1 %")
    assert report.flatness_phrase((-1.5, 1.0, 3)).startswith("It is still falling")
    assert "not shown to be flat" in report.flatness_phrase((-1.03, 2.40, 3))


def test_fd_reference_reads_the_fashion_mnist_test_split(tmp_path, monkeypatch):
    import gzip

    import torch

    from noise_rater.data import _resize_center_crop_uint8

    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    raw[0] = 77
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write((0x803).to_bytes(4, "big") + (6).to_bytes(4, "big") + (28).to_bytes(4, "big")
                + (28).to_bytes(4, "big") + raw.tobytes())
    monkeypatch.setenv("NOISE_RATER_FASHION_MNIST_DIR", str(tmp_path))
    x, source = rb.real_images_for_fd(protocols.get_protocol("fmnist16"))
    assert x.shape == (6, 1, 16, 16) and "test split" in source
    # the same resize as the training data's preprocessing, then [-1, 1]
    ref = _resize_center_crop_uint8(torch.from_numpy(raw)[:, None], 16).float() / 127.5 - 1.0
    assert torch.equal(x, ref)
    assert torch.allclose(x[0], torch.full((1, 16, 16), 77 / 127.5 - 1.0))
    with pytest.raises(RuntimeError, match="only fashion_mnist"):
        rb.real_images_for_fd(protocols.get_protocol("digits8"))


def test_report_fd_columns_floor_and_budget(tmp_path):
    root = str(tmp_path)
    d = _write_synthetic(root, "fmnist16", {"rater_cand": -1.0}, [0, 1, 2], steps=1000)
    fds = {("uniform", 0): 50.0, ("uniform", 1): 60.0, ("uniform", 2): 55.0,
           ("rater_cand", 0): 45.0, ("rater_cand", 1): 57.0, ("rater_cand", 2): 55.0}
    for (m, s), v in fds.items():
        path = os.path.join(d, f"run_{m}_seed{s}.json")
        r = json.load(open(path))
        r["fd"] = {"500": {"fd_efflite0": 2 * v}, "1000": {"fd_efflite0": v}}
        json.dump(r, open(path, "w"))
    json.dump({"source": "fashion_mnist test split", "num_real_reference": 5000, "num_generated": 2000,
               "fd_real_vs_real_halves": 1.25, "fd_real_vs_real_at_generated_count": 2.5},
              open(os.path.join(d, "fd_floor.json"), "w"))
    text = report.build_report(root, doc_dir=root)
    rel = [-10.0, -5.0, 0.0]
    hw = stats.t.ppf(0.975, 2) * np.std(rel, ddof=1) / math.sqrt(3)
    assert f"-5.00 ± {hw:.2f} %" in text
    assert "FD floor (real vs real" in text and "1.25 at 5000 vs 5000" in text and "2.50 at 2000 vs 5000" in text
    assert "NoiseRater, candidate-scope rater, argmax, final FD (3 seeds)" in text
    assert "wider than the ±5 % budget" in text


def test_a_failing_run_is_an_error_and_writes_no_result(tmp_path):
    class Failing(FakeRunner):
        def __call__(self, cmd, log_path, timeout_s=None):
            self.commands.append(cmd)
            return 1

    b = _bench(tmp_path, runner=Failing(), methods=["uniform"])
    with pytest.raises(RuntimeError, match=r"uniform seed 0 failed \(exit 1\)"):
        b.run()
    assert not os.path.exists(b.result_path("uniform", 0))


def test_power_cli(tmp_path, capsys):
    root = str(tmp_path)
    d = _write_synthetic(root, "digits8", {"knn": 1.0}, [0, 1, 2], spread={0: 0.01, 1: -0.01, 2: 0.0})
    assert power.main([d]) == 0
    out = capsys.readouterr().out
    hw = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)  # differences 2, 0, 1 %: sd 1
    assert f"| knn | val_loss | 3 | 1.00 | 1.00 | {hw:.2f} | 2 | **no** |" in out
    assert power.main([str(tmp_path / "missing")]) == 2
    os.remove(os.path.join(d, "run_uniform_seed0.json"))
    for s in (1, 2):
        os.remove(os.path.join(d, f"run_uniform_seed{s}.json"))
    assert power.main([d]) == 2


def test_fd_pipeline_loading_never_patches_register_parameter(tiny_pipeline_path, monkeypatch):
    """accelerate's init_empty_weights patches nn.Module.register_parameter process-wide and, entered and left
    interleaved by two threads, leaves it patched (every later model on the meta device). The FD evaluation loads
    pipelines from several threads, so its loader must not enter it; diffusers' default does (control)."""
    import accelerate
    from diffusers import DDPMPipeline
    from safetensors.torch import load_file

    path = tiny_pipeline_path
    weights = load_file(os.path.join(path, "unet", "diffusion_pytorch_model.safetensors"))
    calls = []
    real = accelerate.init_empty_weights

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(accelerate, "init_empty_weights", spy)
    DDPMPipeline.from_pretrained(path)
    assert calls, "control: diffusers' default loading no longer enters init_empty_weights; revisit this test"
    calls.clear()
    pipe = rb.load_pipeline_threadsafe(DDPMPipeline, path)
    assert calls == []
    loaded = pipe.unet.state_dict()
    assert not any(v.is_meta for v in loaded.values())
    assert all(bool((loaded[k] == v).all()) for k, v in weights.items())


def test_fd_model_construction_is_serialised_across_threads(monkeypatch):
    """Several runs' FD evaluations (--jobs) never build models at the same time."""
    state = {"inside": 0, "max": 0}
    lock = threading.Lock()

    class FakePipeline:
        @classmethod
        def from_pretrained(cls, path, **kwargs):
            with lock:
                state["inside"] += 1
                state["max"] = max(state["max"], state["inside"])
            time.sleep(0.05)
            with lock:
                state["inside"] -= 1
            return kwargs

    with ThreadPoolExecutor(max_workers=4) as pool:
        out = list(pool.map(lambda i: rb.load_pipeline_threadsafe(FakePipeline, f"p{i}"), range(4)))
    assert state["max"] == 1
    assert out == [{"low_cpu_mem_usage": False}] * 4
