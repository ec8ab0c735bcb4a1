#!/usr/bin/env python
"""Side-by-side benchmark on Fashion-MNIST (built-in): does learned noise valuation beat uniform noise
and the known baselines?

    python benchmarks/run_benchmark.py                 # everything (resumable: run it again to continue)
    python benchmarks/run_benchmark.py --seeds 0 --methods uniform nr_hard   # a subset
    python benchmarks/report.py                        # BENCHMARKS.md from the JSON results

1. Stage 1: ``train_noiserater.py`` meta-trains a rater on the *training split only*.
2. Stage 2: for each seed, each method runs ``train_diffusion_hard.py`` with identical data order, model
   initialisation, optimiser, steps and seed; only noise selection / loss weighting differs:
   uniform; min_snr (gamma 5); knn (N=8); assignment; nr_hard (argmax of 8); nr_importance (unbiased
   importance rule, 8); nr_soft (rater_soft weighting).
3. Evaluation: validation loss under standard Gaussian noise on fixed triples (logged by the script), and
   FD-EffLite0 / KID of generated vs held-out images at the middle and the end of training.

Each finished run writes ``benchmarks/results/run_<method>_seed<seed>.json``; an interrupted training run
resumes from its last checkpoint in ``benchmarks/runs/``. Runs are ordered seed-major, so a partial
benchmark has every method at the seeds done so far.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from noise_rater.training_utils import read_jsonl  # noqa: E402

METHODS = {
    "uniform": ["--noise_selection", "uniform"],
    "min_snr": ["--noise_selection", "uniform", "--loss_weighting", "min_snr", "--snr_gamma", "5"],
    "knn": ["--noise_selection", "knn", "--num_candidate_noises", "8"],
    "assignment": ["--noise_selection", "assignment"],
    "nr_hard": ["--noise_selection", "rater", "--num_candidate_noises", "8", "--selection_rule", "argmax"],
    "nr_importance": ["--noise_selection", "rater", "--num_candidate_noises", "8", "--selection_rule", "importance"],
    "nr_soft": ["--noise_selection", "uniform", "--loss_weighting", "rater_soft"],
}
UNET_CONFIG = {
    "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
    "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"],
}


def sh(cmd, log):
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        p = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        raise SystemExit(f"command failed (exit {p.returncode}), see {log}:\n{' '.join(cmd)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--resolution", type=int, default=16)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--learning_rate", type=float, default=1e-3)
    ap.add_argument("--validation_steps", type=int, default=100)
    ap.add_argument("--num_validation_triples", type=int, default=1024)
    ap.add_argument("--meta_steps", type=int, default=150)
    ap.add_argument("--fd_samples", type=int, default=300)
    ap.add_argument("--fd_real", type=int, default=1000)
    ap.add_argument("--fd_inference_steps", type=int, default=25)
    ap.add_argument("--stage1_only", action="store_true", help="Only meta-train the rater.")
    ap.add_argument("--runs_dir", default=os.path.join(HERE, "runs"))
    ap.add_argument("--results_dir", default=os.path.join(HERE, "results"))
    a = ap.parse_args()
    os.makedirs(a.runs_dir, exist_ok=True)
    os.makedirs(a.results_dir, exist_ok=True)
    log = os.path.join(a.runs_dir, "benchmark.log")
    unet_cfg_path = os.path.join(a.runs_dir, "unet_config.json")
    with open(unet_cfg_path, "w") as f:
        json.dump(UNET_CONFIG, f)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
    data = ["--dataset_name", "fashion_mnist", "--resolution", str(a.resolution), "--report_to", "none",
            "--model_config_name_or_path", unet_cfg_path, "--train_batch_size", str(a.batch_size)]

    import torch
    from diffusers import UNet2DModel

    cfg = {"data": f"fashion_mnist (training split minus 10% held out), {a.resolution}x{a.resolution}, 1 channel",
           "unet_config": json.dumps(UNET_CONFIG),
           "unet_params": sum(p.numel() for p in UNet2DModel(sample_size=a.resolution, in_channels=1, out_channels=1,
                                                              **UNET_CONFIG).parameters()),
           "steps": a.steps, "batch_size": a.batch_size, "learning_rate": a.learning_rate, "ddpm_num_steps": 1000,
           "seeds": a.seeds, "methods": a.methods, "validation_steps": a.validation_steps,
           "num_validation_triples": a.num_validation_triples, "fd_samples": a.fd_samples, "fd_real": a.fd_real,
           "fd_inference_steps": a.fd_inference_steps, "meta_steps": a.meta_steps,
           "command": "python benchmarks/run_benchmark.py " + " ".join(sys.argv[1:]),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
                      f"torch {torch.__version__}, {torch.get_num_threads()} threads",
           "date": time.strftime("%Y-%m-%d")}
    with open(os.path.join(a.results_dir, "benchmark_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)

    # ---- stage 1 --------------------------------------------------------------------------------
    rater_dir = os.path.join(a.runs_dir, "rater")
    rater_json = os.path.join(a.results_dir, "rater.json")
    if not os.path.exists(rater_json):
        print(f"[stage 1] meta-training the rater ({a.meta_steps} meta-steps)", flush=True)
        t0 = time.time()
        sh([*launch, "train_noiserater.py", *data, "--output_dir", rater_dir, "--max_train_steps", str(a.meta_steps),
            "--population_size", "2", "--inner_steps", "2", "--inner_lr", "1e-3", "--inner_model_lifetime", "100",
            "--compare_every", "5", "--checkpointing_steps", "25", "--seed", "0",
            "--resume_from_checkpoint", "latest"], log)
        info = json.load(open(os.path.join(rater_dir, "meta_summary.json")))
        info["launcher_wall_time_s"] = time.time() - t0
        with open(rater_json, "w") as f:
            json.dump(info, f, indent=2)

    if a.stage1_only:
        return
    # ---- stage 2 ---------------------------------------------------------------------------------
    real, real_feats = None, {}
    for seed in a.seeds:
        for method in a.methods:
            res_path = os.path.join(a.results_dir, f"run_{method}_seed{seed}.json")
            if os.path.exists(res_path):
                continue
            out = os.path.join(a.runs_dir, f"{method}_seed{seed}")
            flags = list(METHODS[method])
            if method.startswith("nr_"):
                flags += ["--rater_model_name_or_path", rater_dir]
            print(f"[stage 2] {method} seed {seed}", flush=True)
            t0 = time.time()
            sh([*launch, "train_diffusion_hard.py", *data, "--output_dir", out, "--seed", str(seed),
                "--max_train_steps", str(a.steps), "--learning_rate", str(a.learning_rate), "--lr_scheduler",
                "constant_with_warmup", "--lr_warmup_steps", "50", "--validation_steps", str(a.validation_steps),
                "--num_validation_triples", str(a.num_validation_triples), "--checkpointing_steps", str(a.steps // 2),
                "--num_inference_steps", "10", "--resume_from_checkpoint", "latest", *flags], log)
            launcher_s = time.time() - t0
            if real is None:
                real = real_images(a)
            result = collect(out, method, seed, a, real, real_feats)
            result["launcher_wall_time_s"] = launcher_s
            with open(res_path + ".tmp", "w") as f:
                json.dump(result, f, indent=2)
            os.replace(res_path + ".tmp", res_path)
            print(f"    final val loss {result['final']['val_loss']:.4f}, FD {result['fd']}", flush=True)
    # what the rater prefers (uses the seed-0 uniform model for the per-sample loss when it exists)
    analyze_rater(rater_dir, a, os.path.join(a.results_dir, "rater_analysis"))


def real_images(a):
    import torch

    from noise_rater.data import prepare_datasets

    val = prepare_datasets("fashion_mnist", resolution=a.resolution, num_channels=1, seed=0).validation
    n = min(a.fd_real, len(val))
    return torch.stack([val[i]["pixel_values"] for i in range(n)])


def collect(out, method, seed, a, real, real_feats):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from noise_rater.checkpointing import load_module_state
    from noise_rater.evaluation import evaluate_pipeline

    final = json.load(open(os.path.join(out, "final_metrics.json")))
    val = read_jsonl(os.path.join(out, "validation.jsonl"))
    curve = sorted(dict((r["step"], r["val_loss"]) for r in val).items())  # a resumed run may repeat a step
    fd = {}
    pipe = DDPMPipeline.from_pretrained(out)
    mid = os.path.join(out, f"checkpoint-{a.steps // 2}")
    points = []
    if os.path.isdir(mid):
        unet = UNet2DModel.from_config(pipe.unet.config)
        load_module_state(unet, os.path.join(mid, "unet.safetensors"))
        points.append((a.steps // 2, DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(pipe.scheduler.config))))
    points.append((a.steps, pipe))
    for step, p in points:
        m = evaluate_pipeline(p, real, num_samples=a.fd_samples, num_inference_steps=a.fd_inference_steps,
                              scheduler="ddim", seed=1234, fd_method="eigh", kid_subset_size=min(300, a.fd_samples),
                              real_features=real_feats)
        fd[str(step)] = {k: v for k, v in m.items() if isinstance(v, (int, float))}
    return {"method": method, "seed": seed, "steps": a.steps, "val_curve": curve,
            "final": {k[len("final_"):]: v for k, v in final.items() if k.startswith("final_val_loss")},
            # selection + training compute over all steps (cumulative across resumes; excludes validation)
            "fd": fd, "wall_time_train_s": final["select_time_s"] + final["train_time_s"],
            "select_time_s": final.get("select_time_s"),
            "train_time_s": final.get("train_time_s"), "skipped_steps": final.get("skipped_steps")}


def analyze_rater(rater_dir, a, prefix):
    """Score vs timestep, noise norm, distance to x0 and the per-sample loss of a fresh-ish model."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch
    from diffusers import DDPMScheduler
    from scipy.stats import spearmanr

    from noise_rater import NoiseRaterModel
    from noise_rater.data import prepare_datasets

    rater = NoiseRaterModel.from_pretrained(rater_dir).eval()
    val = prepare_datasets("fashion_mnist", resolution=a.resolution, num_channels=1, seed=0).validation
    n = 2000
    g = torch.Generator().manual_seed(0)
    x0 = torch.stack([val[i]["pixel_values"] for i in range(n)])
    eps = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    with torch.no_grad():
        s = rater(x0, eps, t).scores
    d = x0[0].numel()
    quantities = {
        "timestep t": t.float(),
        "||eps|| / sqrt(d)": eps.flatten(1).norm(dim=1) / math.sqrt(d),
        "||eps - x0|| / sqrt(d)": (eps - x0).flatten(1).norm(dim=1) / math.sqrt(d),
        "cos(eps, x0)": torch.nn.functional.cosine_similarity(eps.flatten(1), x0.flatten(1)),
    }
    uni = os.path.join(a.runs_dir, "uniform_seed0")
    if os.path.exists(os.path.join(uni, "model_index.json")):
        from diffusers import UNet2DModel

        unet = UNet2DModel.from_pretrained(uni, subfolder="unet").eval()
        sched = DDPMScheduler.from_pretrained(uni, subfolder="scheduler")
        from noise_rater.diffusion import per_sample_diffusion_loss

        with torch.no_grad():
            quantities["per-sample loss (uniform model)"] = torch.cat([
                per_sample_diffusion_loss(unet, sched, x0[i:i + 500], eps[i:i + 500], t[i:i + 500])
                for i in range(0, n, 500)])
    fig, axes = plt.subplots(1, len(quantities), figsize=(4 * len(quantities), 3.4))
    rho = {}
    for ax, (name, q) in zip(np.atleast_1d(axes), quantities.items()):
        ax.scatter(q.numpy(), s.numpy(), s=3, alpha=0.4)
        ax.set_xlabel(name); ax.set_ylabel("rater score")
        rho[name] = float(spearmanr(q.numpy(), s.numpy()).correlation)
    fig.tight_layout(); fig.savefig(prefix + ".png", dpi=100); plt.close(fig)
    with open(prefix + ".json", "w") as f:
        json.dump({"n": n, "spearman": rho}, f, indent=2)


if __name__ == "__main__":
    main()
