#!/usr/bin/env python
"""Evidence for noise valuation where stage 2 uses it.

    python benchmarks/valuation_evidence.py                    # both parts (resumable: run again to continue)
    python benchmarks/valuation_evidence.py --part valuation   # only part A
    python benchmarks/valuation_evidence.py --part stage2 --seeds 0 1 2 3 4

A. Valuation accuracy at equal meta-budget: ``train_noiserater.py`` with ``--weighting_scope candidates``
   and with ``--weighting_scope batch`` (identical flags, seed, data, meta-steps otherwise), on digits 8x8 and
   Fashion-MNIST 16x16. Each run measures, on fixed held-out (x0, t) groups of N candidates and at each
   inner model's age, the within-group Spearman rho between score and exact one-step influence and the
   one-step gain of the rater's / a random / the oracle's pick (``valuation.jsonl``).
B. A short paired stage-2 check on digits 8x8: uniform, oracle (exact influence) and the candidate-scope rater
   of part A (argmax of N), same seeds, data order, timesteps and candidate pools (common random numbers
   of ``train_diffusion_hard.py``), final validation loss under Gaussian noise paired by seed.

Writes ``benchmarks/results/valuation_evidence.json`` and ``valuation_evidence.md`` (included in
BENCHMARKS.md). Runs live in ``benchmarks/runs/valuation/``; finished runs are skipped, unfinished ones resume.
"""

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from noise_rater.training_utils import read_jsonl  # noqa: E402

STAGE1 = {  # dataset -> (resolution, meta-steps, inner UNet config)
    "digits": (8, 200, {"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
                        "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"]}),
    "fashion_mnist": (16, 150, {"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
                                "down_block_types": ["DownBlock2D", "DownBlock2D"],
                                "up_block_types": ["UpBlock2D", "UpBlock2D"]}),
}
STAGE2_METHODS = {
    "uniform": ["--noise_selection", "uniform"],
    "oracle": ["--noise_selection", "oracle", "--oracle_val_batch_size", "64"],
    "rater_cand": ["--noise_selection", "rater", "--selection_rule", "argmax"],
}


def sh(cmd, log):
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        p = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        raise SystemExit(f"command failed (exit {p.returncode}), see {log}:\n{' '.join(cmd)}")


def t_interval(xs):
    """mean and half-width of the 95 % Student-t interval (nan half-width for n < 2)."""
    from scipy import stats

    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, float("nan")
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n))


def part_a(a, runs, log):
    out = {}
    for ds in a.datasets:
        res, steps, unet = STAGE1[ds]
        steps = a.meta_steps or steps
        cfg = os.path.join(runs, f"unet_{ds}.json")
        with open(cfg, "w") as f:
            json.dump(unet, f)
        for scope in ("candidates", "batch"):
            d = os.path.join(runs, f"rater_{ds}_{scope}")
            if not os.path.exists(os.path.join(d, "meta_summary.json")):
                print(f"[A] {ds} {scope}: {steps} meta-steps", flush=True)
                sh([sys.executable, "train_noiserater.py", "--dataset_name", ds, "--resolution", str(res),
                    "--model_config_name_or_path", cfg, "--output_dir", d, "--max_train_steps", str(steps),
                    "--weighting_scope", scope, "--num_candidate_noises", str(a.num_candidates),
                    "--train_batch_size", "8", "--inner_steps", "1", "--inner_optimizer", "adam", "--inner_lr", "1e-3",
                    "--population_size", "2", "--inner_model_lifetime", "100", "--compare_every", "10",
                    "--num_valuation_groups", "64", "--checkpointing_steps", "50", "--checkpoints_total_limit", "1",
                    "--seed", "0", "--report_to", "none", "--resume_from_checkpoint", "latest"], log)
            curve = read_jsonl(os.path.join(d, "valuation.jsonl"))
            figs = os.path.join(a.results_dir, "valuation")
            os.makedirs(figs, exist_ok=True)
            shutil.copyfile(os.path.join(d, "valuation_accuracy.png"),
                            os.path.join(figs, f"valuation_accuracy_{ds}_{scope}.png"))
            shutil.copyfile(os.path.join(d, "valuation.jsonl"), os.path.join(figs, f"valuation_{ds}_{scope}.jsonl"))
            summary = json.load(open(os.path.join(d, "meta_summary.json")))
            last = curve[-1]
            # the last few measurements (several member ages each), pooled, for an interval
            tail = curve[-5:]
            per_member = [m for r in tail for m in r["members"]]
            rho = t_interval([m["spearman_rho"] for m in per_member])
            frac = t_interval([m["fraction_of_oracle"] for m in per_member])
            out[f"{ds}/{scope}"] = {
                "dataset": ds, "scope": scope, "resolution": res, "meta_steps": steps, "final": last,
                "tail_rho": rho, "tail_fraction_of_oracle": frac, "tail_points": len(per_member),
                "curve": [{"step": r["step"], "spearman_rho": r["spearman_rho"],
                           "fraction_of_oracle": r["fraction_of_oracle"]} for r in curve],
                "wall_time_s": summary.get("wall_time_s"),
            }
    return out


def part_b(a, runs, log):
    res, _, unet = STAGE1["digits"]
    cfg = os.path.join(runs, "unet_digits.json")
    with open(cfg, "w") as f:
        json.dump(unet, f)
    rater = os.path.join(runs, "rater_digits_candidates")
    out = {}
    for seed in a.seeds:
        for method, flags in STAGE2_METHODS.items():
            d = os.path.join(runs, f"stage2_{method}_seed{seed}")
            if not os.path.exists(os.path.join(d, "final_metrics.json")):
                print(f"[B] {method} seed {seed}", flush=True)
                extra = ["--rater_model_name_or_path", rater] if method.startswith("rater") else []
                sh([sys.executable, "train_diffusion_hard.py", "--dataset_name", "digits", "--resolution", str(res),
                    "--model_config_name_or_path", cfg, "--output_dir", d, "--seed", str(seed),
                    "--max_train_steps", str(a.stage2_steps), "--train_batch_size", "64", "--learning_rate", "1e-3",
                    "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "50",
                    "--num_candidate_noises", str(a.num_candidates), "--validation_steps", str(a.stage2_steps // 5),
                    "--num_validation_triples", "2048", "--checkpointing_steps", str(a.stage2_steps // 2),
                    "--checkpoints_total_limit", "1", "--num_inference_steps", "5", "--report_to", "none",
                    "--resume_from_checkpoint", "latest", *flags, *extra], log)
            final = json.load(open(os.path.join(d, "final_metrics.json")))
            curve = sorted(dict((r["step"], r["val_loss"]) for r in read_jsonl(os.path.join(d, "validation.jsonl"))).items())
            out[f"{method}/{seed}"] = {"method": method, "seed": seed, "final_val_loss": final["final_val_loss"],
                                       "curve": curve, "s_per_step": final["s_per_step"],
                                       "select_time_fraction": final["select_time_fraction"]}
    return out


def paired(stage2, seeds):
    rows = {}
    for method in STAGE2_METHODS:
        if method == "uniform":
            continue
        rel = [100 * (stage2[f"{method}/{s}"]["final_val_loss"] - stage2[f"uniform/{s}"]["final_val_loss"])
               / stage2[f"uniform/{s}"]["final_val_loss"] for s in seeds
               if f"{method}/{s}" in stage2 and f"uniform/{s}" in stage2]
        if rel:
            rows[method] = {"rel_diff_pct": t_interval(rel), "n": len(rel), "per_seed": rel}
    return rows


def verdict_sentence(name, mean, hw, unit="%", lower_is_better=True):
    if not math.isfinite(hw):
        return f"{name}: {mean:+.2f} {unit} (one seed: no interval)."
    if mean - hw <= 0 <= mean + hw:
        return f"{name}: {mean:+.2f} ± {hw:.2f} {unit}; the interval contains 0, so the difference is within noise."
    better = (mean < 0) == lower_is_better
    return f"{name}: {mean:+.2f} ± {hw:.2f} {unit}; {'better' if better else 'worse'} than uniform at this budget."


def write_markdown(res, path):
    L = ["## Noise valuation where stage 2 uses it (`benchmarks/valuation_evidence.py`)", "",
         f"Command: `{res['command']}`; machine: {res['machine']}; {res['date']}.", ""]
    A = res.get("valuation", {})
    if A:
        L += ["### A. Valuation accuracy: candidate-scope vs batch-scope rater at equal meta-budget", "",
              "Held-out groups: 64 (x0, t) groups of N candidates, fixed per run; exact one-step influence "
              "c = <grad l(x0, eps, t), grad L_val> at each inner model's parameters. Interval: 95 % t over the "
              "last 5 measurements x inner models (not independent draws: read it as a spread).", "",
              "| data | scope | meta-steps | final rho | rho (last 5) | fraction of oracle's gain (last 5) | "
              "final gain rater / random / oracle |", "|---|---|---|---|---|---|---|"]
        for key, r in A.items():
            f = r["final"]
            L.append(f"| {r['dataset']} {r['resolution']}x{r['resolution']} | {r['scope']} | {r['meta_steps']} | "
                     f"{f['spearman_rho']:+.3f} | {r['tail_rho'][0]:+.3f} ± {r['tail_rho'][1]:.3f} | "
                     f"{r['tail_fraction_of_oracle'][0]:+.3f} ± {r['tail_fraction_of_oracle'][1]:.3f} | "
                     f"{f['gain_rater']:.2e} / {f['gain_random']:.2e} / {f['gain_oracle']:.2e} |")
        L.append("")
        for ds in sorted({r["dataset"] for r in A.values()}):
            c, b = A.get(f"{ds}/candidates"), A.get(f"{ds}/batch")
            if c and b:
                dc, db = c["tail_fraction_of_oracle"], b["tail_fraction_of_oracle"]
                def says(m, h):
                    if not math.isfinite(h) or m - h <= 0 <= m + h:
                        return "indistinguishable from a random pick"
                    return "better than a random pick" if m > 0 else "worse than a random pick"
                L.append(f"- {ds}: the candidate-scope rater captures {dc[0]:+.1%} of the oracle's one-step gain over "
                         f"a random pick (± {dc[1]:.1%}: {says(*dc)}), the batch-scope rater {db[0]:+.1%} "
                         f"(± {db[1]:.1%}: {says(*db)}).")
        L.append("")
        for key, r in A.items():
            fig = f"benchmarks/results/valuation/valuation_accuracy_{r['dataset']}_{r['scope']}.png"
            if os.path.exists(os.path.join(ROOT, fig)):
                L.append(f"![{r['dataset']} {r['scope']}-scope valuation accuracy]({fig})")
        L.append("")
    B = res.get("stage2_paired", {})
    if B:
        s2 = res["stage2"]
        L += ["### B. Paired stage-2 check on digits 8x8 (uniform, oracle, candidate-scope rater)", "",
              f"{res['stage2_steps']} steps, batch 64, N = {res['num_candidates']} candidates, seeds {res['seeds']}; "
              "common random numbers (same data order, timesteps and candidate pools per seed). Final validation "
              "loss under Gaussian noise on 2048 fixed triples; difference to uniform in % paired by seed, 95 % t "
              "interval.", "", "| method | seeds | final val loss (mean) | vs uniform | s/step | selection share |",
              "|---|---|---|---|---|---|"]
        for method in STAGE2_METHODS:
            vals = [v for v in s2.values() if v["method"] == method]
            if not vals:
                continue
            m = sum(v["final_val_loss"] for v in vals) / len(vals)
            sps = sum(v["s_per_step"] for v in vals) / len(vals)
            share = sum(v["select_time_fraction"] for v in vals) / len(vals)
            diff = "—" if method == "uniform" else f"{B[method]['rel_diff_pct'][0]:+.2f} ± {B[method]['rel_diff_pct'][1]:.2f} %"
            L.append(f"| {method} | {len(vals)} | {m:.5f} | {diff} | {sps:.3f} | {share:.0%} |")
        L.append("")
        for method, r in B.items():
            L.append("- " + verdict_sentence(method, *r["rel_diff_pct"]))
        L.append("")
    with open(path, "w") as f:
        f.write("\n".join(L))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["all", "valuation", "stage2"], default="all")
    ap.add_argument("--datasets", nargs="+", default=["digits", "fashion_mnist"], choices=list(STAGE1))
    ap.add_argument("--meta_steps", type=int, default=None, help="Override the per-dataset meta-steps.")
    ap.add_argument("--num_candidates", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--stage2_steps", type=int, default=500)
    ap.add_argument("--runs_dir", default=os.path.join(HERE, "runs", "valuation"))
    ap.add_argument("--results_dir", default=os.path.join(HERE, "results"))
    a = ap.parse_args()
    os.makedirs(a.runs_dir, exist_ok=True)
    os.makedirs(a.results_dir, exist_ok=True)
    log = os.path.join(a.runs_dir, "evidence.log")
    res_path = os.path.join(a.results_dir, "valuation_evidence.json")
    res = json.load(open(res_path)) if os.path.exists(res_path) else {}
    import torch

    res.update(command="python benchmarks/valuation_evidence.py " + " ".join(sys.argv[1:]),
               machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
               date=time.strftime("%Y-%m-%d"), num_candidates=a.num_candidates)
    if a.part in ("all", "valuation"):
        res["valuation"] = {**res.get("valuation", {}), **part_a(a, a.runs_dir, log)}
    if a.part in ("all", "stage2"):
        if not os.path.exists(os.path.join(a.runs_dir, "rater_digits_candidates", "meta_summary.json")):
            a.datasets = ["digits"]
            res["valuation"] = {**res.get("valuation", {}), **part_a(a, a.runs_dir, log)}
        res["stage2"] = {**res.get("stage2", {}), **part_b(a, a.runs_dir, log)}
        res["seeds"] = sorted({v["seed"] for v in res["stage2"].values()})
        res["stage2_steps"] = a.stage2_steps
        res["stage2_paired"] = paired(res["stage2"], res["seeds"])
    with open(res_path + ".tmp", "w") as f:
        json.dump(res, f, indent=2)
    os.replace(res_path + ".tmp", res_path)
    write_markdown(res, os.path.join(a.results_dir, "valuation_evidence.md"))
    print(open(os.path.join(a.results_dir, "valuation_evidence.md")).read())


if __name__ == "__main__":
    main()
