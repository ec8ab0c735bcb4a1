#!/usr/bin/env python
"""The main job, end to end: stage 1 meta-trains a rater, stage 2 trains the same diffusion model with
hard noise selection and with uniform noise (same seed, data order and steps), then a short report.

    python examples/run_pipeline.py --output_dir demo_output          # built-in digits data, ~10 min on 2 cores

Each stage is launched with ``accelerate launch`` exactly as a user would run it; every stage
resumes from its last checkpoint if the job is interrupted and started again. Outputs:
``<output_dir>/report.md`` with plots (``learning_curves.png``) and sample grids side by side.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from noise_rater.training_utils import read_jsonl  # noqa: E402


def launch(script, args, log_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(ROOT, script), *args]
    print("$ accelerate launch " + " ".join([script, *args]), flush=True)
    t0 = time.time()
    with open(log_path, "a") as log:
        # progress bars go to the terminal (stderr); everything is also kept in the log
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in p.stdout:
            log.write(line)
            if "it/s]" in line or "s/it]" in line or line.startswith("error"):
                sys.stderr.write("\r" + line.rstrip()[-150:])
            elif "Traceback" in line or "Error" in line:
                sys.stderr.write(line)
        p.wait()
    sys.stderr.write("\n")
    if p.returncode != 0:
        sys.exit(f"{script} failed (exit {p.returncode}); see {log_path}")
    return time.time() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output_dir", default="demo_output")
    ap.add_argument("--dataset_name", default="digits")
    ap.add_argument("--resolution", type=int, default=8)
    ap.add_argument("--meta_steps", type=int, default=100)
    ap.add_argument("--train_steps", type=int, default=800)
    ap.add_argument("--train_batch_size", type=int, default=64)
    ap.add_argument("--num_candidate_noises", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = os.path.abspath(a.output_dir)
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "job.log")
    data = ["--dataset_name", a.dataset_name, "--resolution", str(a.resolution), "--seed", str(a.seed),
            "--report_to", "tensorboard", "--resume_from_checkpoint", "latest"]
    timings_path = os.path.join(out, "timings.json")
    timings = json.load(open(timings_path)) if os.path.exists(timings_path) else {}

    def stage(key, done_file, script, args):
        """Run a stage unless it already finished (then its recorded wall time is kept)."""
        if key in timings and os.path.exists(done_file):
            print(f"== {key}: already done ({timings[key]:.0f} s), skipped ==", flush=True)
            return
        timings[key] = launch(script, args, log)
        with open(timings_path, "w") as f:
            json.dump(timings, f, indent=2)

    rater_dir = os.path.join(out, "rater")
    print("== stage 1: meta-training the rater ==", flush=True)
    stage("stage1_s", os.path.join(rater_dir, "meta_summary.json"), "train_noiserater.py", [
        *data, "--output_dir", rater_dir, "--max_train_steps", str(a.meta_steps), "--train_batch_size", "64",
        "--population_size", "2", "--inner_steps", "2", "--compare_every", "5", "--checkpointing_steps", "25",
        "--inner_model_lifetime", "50"])

    runs = {"uniform": ["--noise_selection", "uniform"],
            "noiserater_hard": ["--noise_selection", "rater", "--rater_model_name_or_path", rater_dir,
                                "--num_candidate_noises", str(a.num_candidate_noises), "--selection_rule", "argmax"]}
    for name, flags in runs.items():
        print(f"== stage 2: {name} ==", flush=True)
        stage(f"stage2_{name}_s", os.path.join(out, name, "final_metrics.json"), "train_diffusion_hard.py", [
            *data, "--output_dir", os.path.join(out, name), "--max_train_steps", str(a.train_steps),
            "--train_batch_size", str(a.train_batch_size), "--learning_rate", "1e-3", "--lr_warmup_steps", "50",
            "--validation_steps", "100", "--checkpointing_steps", "200", "--checkpoints_total_limit", "2",
            "--num_inference_steps", "50", *flags])
    write_report(out, runs, timings, a)
    print(f"report: {os.path.join(out, 'report.md')}")


def write_report(out, runs, timings, a):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = json.load(open(os.path.join(out, "rater", "meta_summary.json")))
    finals, curves = {}, {}
    for name in runs:
        finals[name] = json.load(open(os.path.join(out, name, "final_metrics.json")))
        curves[name] = read_jsonl(os.path.join(out, name, "validation.jsonl"))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, rows in curves.items():
        ax.plot([r["step"] for r in rows], [r["val_loss"] for r in rows], marker="o", label=name)
    ax.set_xlabel("training step"); ax.set_ylabel("validation loss (Gaussian noise)"); ax.set_yscale("log"); ax.legend()
    fig.tight_layout(); fig.savefig(os.path.join(out, "learning_curves.png"), dpi=110); plt.close(fig)

    L = ["# NoiseRater demo report", "",
         f"Data: `{a.dataset_name}` at {a.resolution}x{a.resolution}; seed {a.seed}; {a.train_steps} stage-2 steps, "
         f"batch {a.train_batch_size}. One seed only: a demonstration of the pipeline, not a benchmark "
         "(see BENCHMARKS.md for the multi-seed comparison).", "",
         "## Stage 1", "",
         f"- {meta['step']} meta-steps in {timings['stage1_s']:.0f} s; last outer loss {meta['outer_loss']:.4f}.",
         f"- Mean (uniform - rater-weighted) validation loss after the inner steps, same batches: "
         f"{meta['mean_gain']:.5f} over {meta['num_comparisons']} comparisons (> 0 means the weighting helped).",
         "- ![meta evidence](rater/meta_evidence.png) ![rater analysis](rater/rater_analysis.png)", "",
         "## Stage 2", "",
         "| run | final validation loss (Gaussian noise) | wall time s | selection time s |", "|---|---|---|---|"]
    for name in runs:
        f = finals[name]
        L.append(f"| {name} | {f['final_val_loss']:.4f} | {timings[f'stage2_{name}_s']:.0f} | "
                 f"{f.get('select_time_s', float('nan')):.1f} |")
    L += ["", "![learning curves](learning_curves.png)", "", "Samples (final model, same sampler seed):", ""]
    for name in runs:
        L.append(f"**{name}**: ![{name}]({name}/samples_final.png)")
    L += ["", "Reproduce: `make demo` (or `python examples/run_pipeline.py --output_dir demo_output`)."]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(L) + "\n")


if __name__ == "__main__":
    main()
