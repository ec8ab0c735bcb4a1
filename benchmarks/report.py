#!/usr/bin/env python
"""Generate BENCHMARKS.md from the result files (nothing typed in by hand).

    python benchmarks/report.py                         # all protocols under benchmarks/results/ -> BENCHMARKS.md
    python benchmarks/report.py --results_root R --output OUT.md

Reads, per protocol folder ``benchmarks/results/<protocol>/``: ``protocol.json``, ``run_<method>_seed<k>.json``,
``rater_<scope>.json``, ``fd_floor.json`` (all written by ``benchmarks/run_benchmark.py``); the protocol
``gpu32`` goes into its own section. ``benchmarks/results/legacy/`` (the previous protocol) is summarised in a
labelled section. Statistics (intervals, power budget, minimal detectable effect) are those of
``benchmarks/power.py``.
"""

import argparse
import json
import math
import os
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from power import (BUDGET_PCT, METRICS, final_fd, final_val_loss, load_runs, markdown_table,  # noqa: E402
                   mean_ci, mean_sd, paired_relative_differences, power_rows)
from protocols import (DEFAULT_LR_SCHEDULER, METHOD_ORDER, METHODS, PROTOCOLS, RATER_METHODS,  # noqa: E402
                       STAGE1_SEED_NOTE)

GPU_PROTOCOLS = ("gpu32",)
LEGACY_LABEL = {"uniform": "uniform", "min_snr": "Min-SNR-5", "knn": "KNN (N=8)", "assignment": "batch assignment",
                "nr_hard": "NoiseRater hard (argmax of 8)", "nr_importance": "NoiseRater importance (8)",
                "nr_soft": "NoiseRater soft weighting"}


# ---- small helpers -----------------------------------------------------------------------------------------


# Folders of benchmarks/results/ that are not protocols: the previous protocol's files and the figures of
# benchmarks/valuation_evidence.py.
NOT_PROTOCOLS = ("legacy", "valuation")

def _valuation_cell(rater_info, key):
    """A stage-1 rater's final valuation number (``meta_summary.json`` -> ``valuation``) as a table cell."""
    v = (rater_info.get("meta_summary") or {}).get("valuation") or {}
    x = v.get(key)
    return f"{x:+.3f}" if isinstance(x, (int, float)) and x == x else "n/a"


def mean_s_per_step(records):
    """Mean ``s_per_step`` of an iterable of run records (nan when none has one)."""
    return mean_sd([r.get("s_per_step") for r in records])[0]


def seeds_by(runs, key, methods=None):
    """{key(record): {method: [seed, ...]}} over ``runs`` (method -> seed -> record) in method order, optionally only
    for ``methods``: which runs share a machine, a rater computation, ..."""
    groups = defaultdict(lambda: defaultdict(list))
    for m in ordered_methods(runs):
        if methods is None or m in methods:
            for seed in sorted(runs[m]):
                groups[key(runs[m][seed])][m].append(str(seed))
    return groups


def rater_provenance(r, runs):
    """Markdown lines for a stage-1 record ``r`` (``rater_<scope>.json``) meta-trained more than once under its cache
    key with different weights (``earlier_computations``, see ``run_benchmark.rater_record``): each computation and,
    by the weights hash each stage-2 run of ``runs`` recorded, which one the run used. Empty when there was one."""
    earlier = r.get("earlier_computations") or []
    if not earlier:
        return []

    def what(e):
        return (f"fraction of the oracle's one-step gain {_valuation_cell(e, 'fraction_of_oracle')}, "
                f"rho {_valuation_cell(e, 'spearman_rho')}")
    names = {r.get("weights_sha256"): f"the computation of {r.get('date')}"}
    for e in earlier:
        if e.get("weights_sha256"):
            names.setdefault(e["weights_sha256"], f"the computation of {e.get('date') or 'an earlier date'}")
    L = [f"- The {r['scope']}-scope rater was meta-trained again on {r.get('date')} ({r.get('machine')}) from the same "
         "cache key (the same configuration and seed) and gave other weights than "
         + "; ".join(f"the computation of {e.get('date') or 'an earlier date (not recorded)'}"
                     + (f" ({e['machine']})" if e.get("machine") else "") + f" ({what(e)})" for e in earlier)
         + f". The table above shows the latest ({what(r)}). Stage 1 is seeded and bit-reproducible on one machine "
           "(`tests/test_train_noiserater.py::test_exact_resume_after_kill_9` compares two runs bit for bit), so "
           "other weights under the same key point at floating-point differences between machines (not verified). "
           "Which computation each run used:"]
    groups = seeds_by(runs, lambda run: (run.get("rater") or {}).get("weights_sha256"),
                      [m for m in runs if METHODS.get(m, {}).get("rater_scope") == r["scope"]])
    for sha, by_method in groups.items():
        who = "; ".join(f"{m} seeds {','.join(seeds)}" for m, seeds in by_method.items())
        if sha is None:
            used = "not recorded (made before weight hashes were kept)"
        elif sha in names:
            used = f"{names[sha]} (weights sha256 {sha[:12]})"
        else:
            used = f"weights sha256 {sha[:12]}, which matches no recorded computation"
        L.append(f"  - {who}: {used}.")
    return L + [""]


def machines_line(runs):
    """[] when every run records one machine (or none records any); else one line listing which runs were timed
    on which machine (``machine``/``date`` of each run record), since s/step compares only within a machine."""
    groups = seeds_by(runs, lambda r: f"{r['machine']}, {r.get('date')}" if r.get("machine") else "machine not recorded")
    if len(groups) < 2:
        return []
    parts = [f"{where}: " + ", ".join(f"{m} {','.join(seeds)}" for m, seeds in by_m.items())
             for where, by_m in groups.items()]
    return ["- **Runs were timed on different machines**, so seconds per step and wall-clock compare only within one "
            "machine: " + "; ".join(parts) + "."]


def label(m):
    return METHODS[m]["label"] if m in METHODS else LEGACY_LABEL.get(m, m)


def finite(x):
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def fmt_ci(m, h, digits=4, unit=""):
    if not finite(m):
        return "n/a"
    if not finite(h):
        return f"{m:.{digits}f}{unit} (1 seed)"
    return f"{m:.{digits}f} ± {h:.{digits}f}{unit}"


def fmt_pct(m, h):
    if not finite(m):
        return "n/a"
    if not finite(h):
        return f"{m:+.2f} % (1 seed)"
    return f"{m:+.2f} ± {h:.2f} %"


def read_json(path, default=None):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def ordered_methods(runs):
    return [m for m in METHOD_ORDER if m in runs] + sorted(set(runs) - set(METHOD_ORDER))


def paired(runs, method, metric, baseline="uniform"):
    """``{seed: relative difference in %}`` of ``metric`` between ``method`` and ``baseline``."""
    get = METRICS[metric]
    return paired_relative_differences({s: get(r) for s, r in runs.get(method, {}).items()},
                                       {s: get(r) for s, r in runs.get(baseline, {}).items()})


def mean_curve(records):
    """Mean validation curve over records, at the steps every record logged: [(step, mean)]."""
    by_step = defaultdict(list)
    for r in records:
        for s, v in dict((int(s), v) for s, v in r.get("val_curve", [])).items():
            by_step[s].append(v)
    return [(s, sum(v) / len(v)) for s, v in sorted(by_step.items()) if len(v) == len(records)]


def first_crossing(curve, target):
    """First step at which a curve (list of (step, value), increasing steps) reaches ``value <= target``,
    linearly interpolated between the two logged steps around the crossing; None if never reached."""
    prev = None
    for s, v in curve:
        if v is not None and v <= target:
            if prev is None or prev[1] == v:
                return float(s)
            s0, v0 = prev
            return s0 + (s - s0) * (v0 - target) / (v0 - v)
        prev = (s, v)
    return None


def flatness(curve, steps, fraction=0.2):
    """Relative change in % of a validation curve over the last ``fraction`` of training:
    100 * (v(steps) - v(s0)) / v(s0), with s0 the last logged step <= (1 - fraction) * steps. None if the curve
    lacks either point."""
    d = dict((int(s), v) for s, v in curve)
    if steps not in d:
        return None
    before = [s for s in d if s <= (1 - fraction) * steps]
    if not before:
        return None
    s0 = max(before)
    return 100.0 * (d[steps] - d[s0]) / d[s0]


def flatness_phrase(fm):
    """What a (mean, half-width, n) change over the last 20 % of training says about convergence."""
    mean, hw = fm[0], fm[1]
    if not finite(mean):
        return ""
    if abs(mean) < 1:
        return "It is flat to within 1 % on average."
    if finite(hw) and mean + hw < 0:
        return ("It is still falling, by more than 1 % on average: the comparison is one of models that have not "
                "converged.")
    return ("The mean change exceeds 1 % but its interval includes 0: not shown to be flat, nor to be still "
            "falling.")


def classify(mean, hw, budget, n):
    """Verdict phrase for a paired difference (in %, negative = better than uniform) against its budget."""
    if n < 2 or not finite(hw):
        return "unresolved", f"only {n} seed(s): no interval"
    interval = f"{mean:+.2f} % (95 % CI {mean - hw:+.2f} to {mean + hw:+.2f} %)"
    wide = hw > budget
    if mean + hw < 0:
        kind, text = "better", f"beats uniform by {-mean:.2f} %: {interval}"
    elif mean - hw > 0:
        kind, text = "worse", f"is worse than uniform by {mean:.2f} %: {interval}"
    else:
        kind, text = "tie", f"shows no difference from uniform that these seeds resolve: {interval}"
    if wide:
        text += f"; the interval's half-width {hw:.2f} % is wider than the ±{budget:g} % budget"
    return kind, text


# ---- one protocol ------------------------------------------------------------------------------------------


def rater_costs(results_root):
    """``{rater key: (cost_s, number of stage-2 runs that used it, in every protocol)}``."""
    cost, uses = {}, defaultdict(int)
    for name in sorted(os.listdir(results_root)) if os.path.isdir(results_root) else []:
        d = os.path.join(results_root, name)
        if not os.path.isdir(d) or name in NOT_PROTOCOLS:
            continue
        for scope in ("batch", "candidates"):
            r = read_json(os.path.join(d, f"rater_{scope}.json"))
            if r and finite(r.get("cost_s")):
                cost[r["key"]] = r["cost_s"]
        for runs in load_runs(d).values():
            for rec in runs.values():
                if rec.get("rater"):
                    uses[rec["rater"]["key"]] += 1
    return {k: (cost.get(k), uses.get(k, 0)) for k in set(cost) | set(uses)}


def reproduce_commands(name, p, runs):
    """One ``run_benchmark.py`` command per group of methods that ran at the same seeds (as the result files
    say), so that following them reruns exactly what the tables report."""
    groups = defaultdict(list)
    for m in ordered_methods(runs):
        groups[tuple(sorted(runs[m]))].append(m)
    own = p.get("method_seeds", {})
    cmds = []
    for seeds, methods in groups.items():
        cmd = (f"python benchmarks/run_benchmark.py --protocol {name} --methods {' '.join(methods)} "
               f"--seeds {' '.join(map(str, seeds))}")
        ms = [m for m in methods if m in own and own[m] != list(seeds)]
        if ms:
            cmd += " --method_seeds " + " ".join(f"{m}={','.join(map(str, seeds))}" for m in ms)
        cmds.append(cmd + (" --jobs 2" if name not in GPU_PROTOCOLS else ""))
    return cmds


def step_cost_ratios(results_root):
    """{method: mean over CPU protocols of (method's mean s/step) / (uniform's mean s/step)}, from every protocol
    folder where both ran; the basis for estimating the cost of a run not made yet."""
    cpu, _ = protocol_dirs(results_root)
    ratios = defaultdict(list)
    for name in cpu:
        runs = load_runs(os.path.join(results_root, name))
        if not runs.get("uniform"):
            continue
        u = mean_s_per_step(runs["uniform"].values())
        for m, rs in runs.items():
            v = mean_s_per_step(rs.values())
            if m != "uniform" and finite(u) and finite(v) and u > 0:
                ratios[m].append(v / u)
    return {m: sum(v) / len(v) for m, v in ratios.items()}


def not_measured(name, p, runs, ratios):
    """Methods the protocol's definition lists that have no result file: [(method, estimated training hours per run or None,
    seeds the protocol plans for it)]. The estimate is this protocol's uniform s/step x the method's s/step
    ratio to uniform measured on the other protocols x the protocol's steps (training only: validation and FD
    excluded)."""
    plan = PROTOCOLS.get(name, p)  # the definition: protocol.json's copy holds the last invocation's --methods
    u = mean_s_per_step(runs["uniform"].values()) if runs.get("uniform") else None
    out = []
    for m in plan.get("methods", []):
        if runs.get(m):
            continue
        ratio = 1.0 if m == "uniform" else ratios.get(m)
        hours = u * ratio * p.get("steps", 0) / 3600 if finite(u) and ratio is not None else None
        out.append((m, hours, plan.get("method_seeds", {}).get(m, plan.get("seeds", []))))
    return out


def not_measured_line(name, missing):
    """One markdown line naming the protocol's methods without results, their estimated cost and the command."""
    def cost(h):
        return f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h"
    parts = [f"{label(m)} (`{m}`" + (f", about {cost(h)} of training per run on one core" if h is not None else "")
             + ")" for m, h, _ in missing]
    seeds = sorted({s for _, _, ss in missing for s in ss})
    own = [m for m, _, ss in missing if ss != seeds]
    cmd = (f"python benchmarks/run_benchmark.py --protocol {name} --methods {' '.join(m for m, _, _ in missing)} "
           f"--seeds {' '.join(map(str, seeds))}" + (" --jobs 2" if name not in GPU_PROTOCOLS else ""))
    return (f"- Not measured on this protocol yet (the protocol lists them; CPU time so far went to the methods "
            f"above): {'; '.join(parts)}. Run: `{cmd}`" + (f" ({', '.join(own)} at the protocol's own seeds)"
                                                          if own else "") + ".")


def protocol_section(name, d, results_root, costs, level="##", doc_dir=ROOT, figures_dir=None, ratios=None):
    """(markdown lines, summary dict for the verdict) of the protocol whose results are in folder ``d``."""
    info = read_json(os.path.join(d, "protocol.json"), {})
    p = info.get("resolved") or dict(PROTOCOLS.get(name, {}), name=name)
    runs = load_runs(d)
    methods = ordered_methods(runs)
    rel = os.path.relpath(d, ROOT)
    L = [f"{level} Protocol `{name}`\n", p.get("description", ""), ""]
    reproduce = reproduce_commands(name, p, runs)
    summary = {"name": name, "runs": runs, "rows": {}, "fd": bool(p.get("fd")), "oracle": None, "captured": {},
               "missing": not_measured(name, p, runs, ratios or {})}
    if not runs:
        how = ("`bash benchmarks/gpu_benchmark.sh` on a CUDA machine" if name in GPU_PROTOCOLS else
               f"`python benchmarks/run_benchmark.py --protocol {name} --jobs 2 --max_hours 2.3` (repeat until done)")
        L.append(f"No results yet. Run {how}, then `python benchmarks/report.py`.\n")
        return L, summary

    # -- protocol facts
    fd = p.get("fd")
    seeds_by_method = {m: sorted(runs[m]) for m in methods}
    L.append(f"- Data: `{p.get('dataset_name')}` {p.get('resolution')}x{p.get('resolution')}, "
             f"{p.get('num_channels')} channel(s). Stage-2 UNet: {info.get('unet_params', 'n/a')} parameters "
             f"(`{json.dumps(p.get('unet'))}`); stage-1 inner UNet: {info.get('stage1_unet_params', 'n/a')} parameters.")
    schedule = p.get("lr_scheduler", DEFAULT_LR_SCHEDULER)
    after = {"constant_with_warmup": "constant", "cosine": "cosine decay to 0",
             "linear": "linear decay to 0"}.get(schedule, schedule)
    L.append(f"- {p.get('steps')} steps, batch {p.get('batch_size')}, AdamW lr {p.get('learning_rate')} "
             f"({after} after {p.get('lr_warmup_steps')} warm-up steps), DDPM 1000 steps, epsilon prediction.")
    L.append(f"- Common random numbers: every method of a seed ran with the same `--seed` and the same pool of "
             f"N = {p.get('num_candidate_noises')} candidate noises per sample (uniform trains on candidate 0).")
    L.append("- Seeds per method: " + "; ".join(f"{m} {','.join(map(str, s))}" for m, s in seeds_by_method.items()) + ".")
    if summary["missing"]:
        L.append(not_measured_line(name, summary["missing"]))
    L.append(f"- Validation loss (primary metric): plain diffusion loss under Gaussian noise on "
             f"{p.get('num_validation_triples')} fixed (x0, eps, t) triples of the seed's held-out split "
             f"(validation seed {p.get('validation_seed')}), every {p.get('validation_steps')} steps.")
    floor = read_json(os.path.join(d, "fd_floor.json"))
    if fd:
        L.append(f"- FD-EffLite0: {fd['num_generated']} generated images ({fd['scheduler'].upper()}, "
                 f"{fd['num_inference_steps']} steps, sample seed {fd['sample_seed']}, the same for all methods) vs "
                 f"{fd['num_real']} real images no run trained on, at steps "
                 f"{', '.join(str(int(round(p['steps'] * f))) for f in fd['at_fractions'])}. EfficientNet-Lite0 "
                 "features: **not comparable to published FID**.")
        if floor:
            L.append(f"- FD floor (real vs real, two disjoint halves of {floor['source']}): "
                     f"{floor['fd_real_vs_real_halves']:.2f} at {floor['num_real_reference']} vs "
                     f"{floor['num_real_reference']}; {floor['fd_real_vs_real_at_generated_count']:.2f} at "
                     f"{floor['num_generated']} vs {floor['num_real_reference']} (the generated-vs-real counts).")
        if info.get("fd_off_protocol"):
            L.append(f"- **{info['fd_off_protocol']}.**")
    else:
        L.append(f"- FD: not computed. {p.get('fd_note', '')}")
    s1 = p.get("stage1", {})
    L.append(f"- Stage 1 (rater methods only): {s1.get('meta_steps')} meta-steps, population {s1.get('population_size')}, "
             f"K = {s1.get('inner_steps')} inner steps at lr {s1.get('inner_lr')}, seed {s1.get('seed')}"
             + (f" ({STAGE1_SEED_NOTE.format(seed=s1.get('seed'))})." if s1 else "."))
    if info.get("machine"):
        L.append(f"- Machine: {info['machine']}; first run {info.get('date')}.")
    L += machines_line(runs)
    L.append(f"- Reproduce (into a fresh folder, `--results_dir DIR`; in `{rel}/` the finished runs are skipped): "
             f"`{'`; `'.join(reproduce)}`, then `python benchmarks/report.py`.\n")

    # -- stage 1
    raters = [r for r in (read_json(os.path.join(d, f"rater_{scope}.json")) for scope in ("batch", "candidates")) if r]
    if raters:
        L.append(f"{level}# Stage-1 raters used here\n")
        L.append("| scope | cache key | meta-steps | cost s | stage-2 runs sharing it (all protocols) | amortised s per run "
                 "| mean stage-1 gain (uniform - weighted val. loss) | valuation rho | fraction of oracle's one-step gain |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for r in raters:
            cost, uses = costs.get(r["key"], (r.get("cost_s"), 0))
            gain = r.get("meta_summary", {}).get("mean_gain")
            L.append(f"| {r['scope']} | `{r['key']}` | {r.get('stage1', {}).get('meta_steps')} | "
                     f"{f'{cost:.0f}' if finite(cost) else 'n/a'} | {uses} | "
                     f"{f'{cost / uses:.0f}' if finite(cost) and uses else 'n/a'} | "
                     f"{f'{gain:.2e}' if finite(gain) else 'n/a'} | "
                     f"{_valuation_cell(r, 'spearman_rho')} | {_valuation_cell(r, 'fraction_of_oracle')} |")
        L.append("")
        L.append("Valuation (stage 1's final measurement on held-out groups): within-group Spearman rho between rater "
                 "score and exact one-step influence, and the share of the oracle's one-step gain over a random pick "
                 "that the rater's pick captures (mean over inner models).\n")
        for r in raters:
            L += rater_provenance(r, runs)
        for r in raters:
            for fig in ("rater_analysis.png", "meta_evidence.png", "valuation_accuracy.png"):
                path = os.path.join(d, f"rater_{r['scope']}_{fig}")
                if os.path.exists(path):
                    L.append(f"![{r['scope']} rater: {fig[:-4].replace('_', ' ')}]({os.path.relpath(path, doc_dir)})")
        L.append("")

    # -- main table
    L.append(f"{level}# Final quality, paired with uniform (negative difference = better than uniform)\n")
    head = "| method | seeds | final val. loss | seeds paired with uniform | vs uniform (paired) |"
    sep = "|---|---|---|---|---|"
    if fd:
        head += " final FD | FD vs uniform (paired) |"
        sep += "---|---|"
    L += [head + " s/step |", sep + "---|"]
    for m in methods:
        rs = runs[m]
        vl = mean_ci([final_val_loss(r) for r in rs.values()])
        dv = mean_ci(list(paired(runs, m, "val_loss").values())) if m != "uniform" else None
        row = (f"| {label(m)} | {len(rs)} | {fmt_ci(vl[0], vl[1])} | {dv[2] if dv else '—'} | "
               f"{fmt_pct(*dv[:2]) if dv else '—'} |")
        if fd:
            f = mean_ci([final_fd(r) for r in rs.values()])
            df = mean_ci(list(paired(runs, m, "fd").values())) if m != "uniform" else None
            row += f" {fmt_ci(f[0], f[1], 2)} | {fmt_pct(*df[:2]) if df else '—'} |"
        sps = mean_s_per_step(rs.values())
        L.append(row + f" {sps:.3f} |" if finite(sps) else row + " n/a |")
    L.append("\nIntervals: mean ± half-width of the 95 % Student-t interval over seeds; paired columns are "
             "100 (method - uniform) / uniform per seed, then the interval over the seeds both ran "
             "(`benchmarks/power.py`).\n")

    # -- power budget
    rows = power_rows(runs, "val_loss") + (power_rows(runs, "fd") if fd else [])
    summary["rows"] = {(r["method"], r["metric"]): r for r in rows}
    if rows:
        L.append(f"{level}# Power budget and minimal detectable effect\n")
        L.append("Budget: 95 % half-width of the paired difference <= "
                 f"{BUDGET_PCT['val_loss']:g} % (final validation loss) and <= {BUDGET_PCT['fd']:g} % (FD). "
                 "'seeds needed' takes this run's seed-to-seed sd as the truth: n = smallest n with "
                 "t(0.975, n-1) sd / sqrt(n) <= budget. MDE = (t(0.975, n-1) + t(0.80, n-1)) sd / sqrt(n) at the "
                 "seeds run (two-sided alpha 0.05, 80 % power; about 2.8 x SE for large n). "
                 f"Reproduce: `python benchmarks/power.py {rel}`.\n")
        L += markdown_table(rows)
        L.append("")

    # -- oracle ceiling
    if "oracle" in runs and "uniform" in runs:
        L.append(f"{level}# Oracle ceiling\n")
        od = paired(runs, "oracle", "val_loss")
        om = mean_ci(list(od.values()))
        summary["oracle"] = {"mean": om[0], "hw": om[1], "n": om[2]}
        L.append(f"The oracle (exact one-step influence, per candidate) changes the final validation loss by "
                 f"{fmt_pct(*om[:2])} vs uniform ({om[2]} seeds: {', '.join(map(str, sorted(od)))}). Fraction of "
                 "the oracle's gain captured = (mean paired difference of the method) / (mean paired difference of "
                 "the oracle), both over the oracle's seeds; 1 = as good as the oracle, 0 = no better than uniform, "
                 "< 0 = worse than uniform.\n")
        L.append("| method | seeds shared with the oracle | method vs uniform | oracle vs uniform | fraction captured | gap to oracle (points) |")
        L.append("|---|---|---|---|---|---|")
        for m in methods:
            if m in ("uniform", "oracle"):
                continue
            md = paired(runs, m, "val_loss")
            common = sorted(set(md) & set(od))
            if not common:
                continue
            mm = sum(md[s] for s in common) / len(common)
            oo = sum(od[s] for s in common) / len(common)
            frac = mm / oo if oo < 0 else None
            if m in RATER_METHODS:
                summary["captured"][m] = {"fraction": frac, "gap": mm - oo, "n": len(common)}
            L.append(f"| {label(m)} | {len(common)} | {mm:+.2f} % | {oo:+.2f} % | "
                     f"{f'{frac:.2f}' if frac is not None else 'undefined (oracle gains nothing)'} | {mm - oo:+.2f} |")
        L.append("")

    # -- steps and wall-clock to uniform's final quality
    if "uniform" in runs:
        L += reach_table(name, p, runs, methods, costs, level, fd)

    # -- flatness
    if "uniform" in runs:
        fl = [flatness(r.get("val_curve", []), p.get("steps")) for r in runs["uniform"].values()]
        fm = mean_ci(fl)
        summary["flatness"] = fm
        L.append(f"{level}# Was training long enough?\n")
        L.append(f"Uniform's validation loss changed by {fmt_pct(*fm[:2])} over the last 20 % of the "
                 f"{p.get('steps')} steps (from the last validation at or before step "
                 f"{int(0.8 * p.get('steps', 0))} to the end; mean over {fm[2]} seeds). "
                 + flatness_phrase(fm) + "\n")

    png = plot_curves(runs, methods, d if figures_dir is None else figures_dir, f"{name}_" if figures_dir else "")
    if png:
        L.append(f"![learning curves, {name}]({os.path.relpath(png, doc_dir)})\n")
    return L, summary


def reach_table(name, p, runs, methods, costs, level, fd):
    """Steps (and seconds) each method needs to reach uniform's final quality, paired by seed: a method is
    compared with uniform on the seeds both ran, so a method run at fewer seeds (the oracle) is not measured
    against a target set by other seeds."""
    L = [f"{level}# Steps and wall-clock to reach uniform's final quality\n"]
    has_fd = bool(fd) and any(finite(final_fd(r)) for r in runs["uniform"].values())
    L.append("Paired by seed: for each method, the target is uniform's mean final validation loss"
             + (" (and mean final FD)" if has_fd else "") + " over the seeds both ran, and the steps are the first "
             "step at which the method's mean curve over those seeds reaches it, linearly interpolated between "
             "validations (FD: between FD evaluations); 'vs uniform' divides by the steps uniform's own mean curve "
             "over the same seeds needs. Wall-clock: those steps times the method's measured seconds per step "
             "(selection + training, validation excluded). Stage 1, for rater methods: its cost divided over all "
             "stage-2 runs that used the same cached rater (amortised), and in full. Per-step times were measured on "
             "a shared machine: differences below ~20 % are load noise.\n")
    head = ("| method | seeds | target val. loss | steps to target | vs uniform | wall-clock s | + stage 1 amortised s "
            "| + stage 1 in full s |")
    if has_fd:
        head += " steps to FD target | vs uniform |"
    L += [head, "|---|---|---|---|---|---|---|---|" + ("---|---|" if has_fd else "")]
    for m in methods:
        common = sorted(set(runs[m]) & set(runs["uniform"]))
        if not common:
            continue
        rs = [runs[m][s] for s in common]
        us = [runs["uniform"][s] for s in common]
        target = mean_sd([final_val_loss(r) for r in us])[0]
        reach = first_crossing(mean_curve(rs), target)
        base = first_crossing(mean_curve(us), target)
        sps = mean_s_per_step(rs)
        wall = reach * sps if reach is not None and finite(sps) else None
        amort = full = "—"
        keys = {r["rater"]["key"] for r in rs if r.get("rater")}
        if keys and wall is not None:
            c = [costs.get(k, (None, 0)) for k in keys]
            if all(finite(cost) and uses for cost, uses in c):
                amort = f"{wall + sum(cost / uses for cost, uses in c) / len(c):.0f}"
                full = f"{wall + sum(cost for cost, _ in c) / len(c):.0f}"
            else:
                amort = full = "stage-1 cost not recorded"
        ratio = f"{reach / base:.2f}x" if reach is not None and base else "n/a"
        row = (f"| {label(m)} | {','.join(map(str, common))} | {target:.5f} | "
               f"{f'{reach:.0f}' if reach is not None else 'not reached'} | {ratio} | "
               f"{f'{wall:.0f}' if wall is not None else 'not reached'} | {amort} | {full} |")
        if has_fd:
            fd_target = mean_sd([final_fd(r) for r in us])[0]
            fr = first_crossing(fd_mean_curve(rs), fd_target)
            fb = first_crossing(fd_mean_curve(us), fd_target)
            row += (f" {f'{fr:.0f}' if fr is not None else 'not reached'} | "
                    f"{f'{fr / fb:.2f}x' if fr is not None and fb else 'n/a'} |")
        L.append(row)
    L.append("")
    return L


def fd_mean_curve(records):
    by_step = defaultdict(list)
    for r in records:
        for s, v in (r.get("fd") or {}).items():
            if finite(v.get("fd_efflite0")):
                by_step[int(s)].append(v["fd_efflite0"])
    return [(s, sum(v) / len(v)) for s, v in sorted(by_step.items()) if len(v) == len(records)]


def transfer_section(results_root, level="##"):
    """Rater transfer: paired differences at the large stage-2 UNet (protocol ``transfer``) next to the same
    methods at the small UNet the rater was meta-trained with (its ``small_protocol``)."""
    d = os.path.join(results_root, "transfer")
    info = read_json(os.path.join(d, "protocol.json"), {})
    p = info.get("resolved") or PROTOCOLS["transfer"]
    small_name = p.get("small_protocol", "digits8")
    big = load_runs(d) if os.path.isdir(d) else {}
    small = load_runs(os.path.join(results_root, small_name)) if os.path.isdir(os.path.join(results_root, small_name)) else {}
    L = [f"{level} Rater transfer: small inner UNet -> larger stage-2 UNet\n"]
    if not big:
        return []
    sinfo = read_json(os.path.join(results_root, small_name, "protocol.json"), {})
    L.append(f"Raters meta-trained with the {info.get('stage1_unet_params', 'n/a')}-parameter inner UNet drive stage 2 "
             f"of a {info.get('unet_params', 'n/a')}-parameter UNet "
             + (f"({info['unet_params'] / info['stage1_unet_params']:.1f}x)" if info.get("stage1_unet_params") else "")
             + f"; each column is paired with uniform at its own size. Small size: protocol `{small_name}` "
             f"({sinfo.get('unet_params', 'n/a')} parameters). Reproduce: `python benchmarks/run_benchmark.py "
             f"--protocol transfer` and `--protocol {small_name}`.\n")
    L.append("| method | seeds (large) | val. loss vs uniform, large UNet | seeds (small) | val. loss vs uniform, small UNet |")
    L.append("|---|---|---|---|---|")
    for m in ordered_methods(big):
        if m == "uniform":
            continue
        b = mean_ci(list(paired(big, m, "val_loss").values()))
        s = mean_ci(list(paired(small, m, "val_loss").values())) if m in small else (float("nan"), float("nan"), 0)
        L.append(f"| {label(m)} | {b[2]} | {fmt_pct(*b[:2])} | {s[2]} | {fmt_pct(*s[:2]) if s[2] else 'not run'} |")
    L.append("")
    return L


# ---- verdict -----------------------------------------------------------------------------------------------


def verdict(summaries):
    """Markdown lines answering: does any NoiseRater variant beat uniform, by how much, how far from the oracle;
    which intervals miss the budget and why. Built only from the summaries' numbers."""
    L = ["## Verdict\n"]
    measured = [s for s in summaries if s["runs"].get("uniform") and any(m in s["runs"] for m in RATER_METHODS)]
    if not measured:
        L.append("No protocol has both uniform and NoiseRater results yet: no verdict.\n")
        return L
    winners, over_budget = [], []
    for s in measured:
        metrics = ["val_loss"] + (["fd"] if s["fd"] else [])
        L.append(f"**`{s['name']}`**\n")
        for m in RATER_METHODS:
            for metric in metrics:
                r = s["rows"].get((m, metric))
                if r is None:
                    continue
                kind, text = classify(r["mean_pct"], r["halfwidth_pct"], r["budget_pct"], r["n"])
                what = "final validation loss" if metric == "val_loss" else "final FD"
                line = f"- {label(m)}, {what} ({r['n']} seed{'s' if r['n'] != 1 else ''}): {text}"
                if kind == "better":
                    winners.append((s["name"], m, metric, r))
                if r["meets_budget"] is False:
                    need = r["seeds_needed"]
                    line += (f" (seed-to-seed sd of the paired difference {r['sd_pct']:.2f} %: the budget needs "
                             f"{need} seeds" if need else f" (sd {r['sd_pct']:.2f} %: no feasible seed count")
                    line += f"; minimal detectable effect at {r['n']} seeds: {r['mde_pct']:.2f} %)"
                    over_budget.append((s["name"], m, metric))
                elif r["meets_budget"] and kind == "tie":
                    line += f"; minimal detectable effect {r['mde_pct']:.2f} %"
                L.append(line + ".")
        o = s.get("oracle")
        if o:
            L.append(f"- Oracle ceiling: {fmt_pct(o['mean'], o['hw'])} vs uniform ({o['n']} seeds).")
            for m, c in s["captured"].items():
                if c["fraction"] is None:
                    L.append(f"  - {label(m)}: the oracle gains nothing here, so no fraction of its gain is defined "
                             f"(gap {c['gap']:+.2f} points).")
                else:
                    L.append(f"  - {label(m)} captures {c['fraction']:.2f} of the oracle's gain "
                             f"({c['gap']:+.2f} percentage points from the oracle, {c['n']} shared seeds).")
        if s.get("missing"):
            L.append(f"- Not measured here yet: {', '.join(f'`{m}`' for m, _, _ in s['missing'])} (see the "
                     "protocol's section for the estimated cost and the command).")
        fl = s.get("flatness")
        if fl and finite(fl[0]) and abs(fl[0]) >= 1:
            L.append(f"- Uniform's validation loss changed by {fmt_pct(fl[0], fl[1])} over the last 20 % of steps. "
                     + flatness_phrase(fl))
        L.append("")
    resolved = [r for s in measured for (m, _), r in s["rows"].items() if m in RATER_METHODS and r["n"] >= 2]
    if not resolved:
        L.insert(1, "**Undetermined: no NoiseRater method has been paired with uniform at 2 or more seeds yet, so "
                    "no interval exists.**\n")
    elif winners:
        best = min(winners, key=lambda w: w[3]["mean_pct"])
        L.insert(1, f"**Yes: {len(winners)} NoiseRater comparison(s) beat uniform with a 95 % interval below zero. "
                    f"Largest: {label(best[1])} on `{best[0]}` ({'validation loss' if best[2] == 'val_loss' else 'FD'} "
                    f"{best[3]['mean_pct']:+.2f} ± {best[3]['halfwidth_pct']:.2f} %).**\n")
    else:
        L.insert(1, "**No: no NoiseRater variant beats uniform with a 95 % interval below zero on any protocol "
                    "measured.**\n")
    if over_budget:
        L.append("Intervals wider than the power budget: " + ", ".join(f"`{p}` {m} ({metric})" for p, m, metric in
                                                                      over_budget)
                 + ". The reason is the seed-to-seed spread of the paired difference at the seeds run; the "
                   "'seeds needed' column of each power table says how many seeds would meet the budget.\n")
    return L


# ---- previous protocol -------------------------------------------------------------------------------------


def legacy_section(d, doc_dir=ROOT):
    runs = load_runs(d)
    if not runs:
        return []
    cfg = read_json(os.path.join(d, "benchmark_config.json"), {})
    L = ["## Previous protocol (before common random numbers; kept for the record)\n",
         f"Fashion-MNIST 16x16, {cfg.get('steps')} steps, seeds {cfg.get('seeds')}, one generator for timesteps and "
         "candidates (methods drifted apart after step 1), FD on "
         f"{cfg.get('fd_samples')} generated vs {cfg.get('fd_real')} real images. Not comparable with the protocols "
         f"above. Full report: [{os.path.relpath(d, doc_dir)}/BENCHMARKS_previous.md]"
         f"({os.path.relpath(d, doc_dir)}/BENCHMARKS_previous.md); data: `{os.path.relpath(d, ROOT)}/`.\n",
         "| method | seeds | final val. loss | vs uniform (paired) | final FD vs uniform (paired) |",
         "|---|---|---|---|---|"]
    order = [m for m in LEGACY_LABEL if m in runs] + sorted(set(runs) - set(LEGACY_LABEL))
    for m in order:
        vl = mean_ci([final_val_loss(r) for r in runs[m].values()])
        dv = mean_ci(list(paired(runs, m, "val_loss").values())) if m != "uniform" else None
        df = mean_ci(list(paired(runs, m, "fd").values())) if m != "uniform" else None
        L.append(f"| {LEGACY_LABEL.get(m, m)} | {len(runs[m])} | {fmt_ci(vl[0], vl[1])} | "
                 f"{fmt_pct(*dv[:2]) if dv else '—'} | {fmt_pct(*df[:2]) if df else '—'} |")
    L.append("")
    return L


def cost_section(results_root):
    L = []
    ov = read_json(os.path.join(results_root, "selection_overhead.json"))
    if ov:
        L += ["## Stage-2 selection overhead\n", f"`{ov.get('command')}`\n",
              "| selector | UNet params | resolution | batch | candidates | train step s | selection s | overhead |",
              "|---|---|---|---|---|---|---|---|"]
        for r in ov["rows"]:
            L.append(f"| {r['selector']} | {r['unet_params']} | {r['resolution']} | {r['batch_size']} | "
                     f"{r['num_candidates']} | {r['train_step_s']:.3f} | {r['select_s']:.4f} | {100 * r['overhead']:.1f}% |")
        L.append("")
    mc = read_json(os.path.join(results_root, "meta_cost.json"))
    if mc and all("mode" in r for r in mc["rows"]):
        L += ["## Stage-1 meta-step cost\n",
              f"`{mc.get('command')}` ({mc.get('resolution')}x{mc.get('resolution')}, {mc.get('images')} images x "
              f"{mc.get('candidates')} candidates = {mc.get('samples_per_step')} samples, one inner model, "
              f"{mc.get('machine')}, {mc.get('date')})\n",
              "| mode | K | median s / step | x plain | peak RSS GB | x plain |", "|---|---|---|---|---|---|"]
        for r in mc["rows"]:
            L.append(f"| {r['mode']} | {r['K']} | {r['median_s']:.3f} | {r.get('time_ratio_to_plain', float('nan')):.2f} | "
                     f"{r['peak_rss_gb']:.2f} | {r.get('peak_rss_ratio_to_plain', float('nan')):.2f} |")
        v = mc.get("verdict")
        if v:
            L.append(f"\nForward-mode K = 1 meta-step: {v['forward_time_ratio']:.2f}x a plain step in time (target <= "
                     f"{v['target']['time_ratio']}x: {'met' if v['time_target_met'] else 'not met'}) and "
                     f"{v['forward_peak_rss_ratio']:.2f}x in peak RSS (target <= {v['target']['peak_rss_ratio']}x: "
                     f"{'met' if v['memory_target_met'] else 'not met'}).")
        L.append("")
    return L


def valuation_evidence_section(results_root):
    """The markdown written by ``benchmarks/valuation_evidence.py`` (if it has run)."""
    path = os.path.join(results_root, "valuation_evidence.md")
    if not os.path.exists(path):
        return []
    return [open(path).read().rstrip() + "\n"]


def plot_curves(runs, methods, out_dir, prefix=""):
    """Mean validation curves and their ratio to uniform -> ``out_dir/<prefix>learning_curves.png``."""
    curves = {m: mean_curve(list(runs[m].values())) for m in methods}
    if not any(curves.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    base = dict(curves.get("uniform", []))
    for m, c in curves.items():
        if not c:
            continue
        ax[0].plot([s for s, _ in c], [v for _, v in c], label=label(m))
        if base:
            ax[1].plot([s for s, _ in c if s in base], [v / base[s] for s, v in c if s in base], label=label(m))
    ax[0].set_xlabel("training step"); ax[0].set_ylabel("validation loss (Gaussian noise)"); ax[0].set_yscale("log")
    ax[0].legend(fontsize=7)
    ax[1].axhline(1.0, color="k", lw=0.5)
    ax[1].set_xlabel("training step"); ax[1].set_ylabel("mean curve / uniform's mean curve")
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{prefix}learning_curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- document ----------------------------------------------------------------------------------------------


def protocol_dirs(results_root):
    """Protocol folders in report order: the known CPU protocols, other folders, then GPU protocols."""
    names = [n for n in sorted(os.listdir(results_root)) if n not in NOT_PROTOCOLS
             and os.path.isdir(os.path.join(results_root, n))] if os.path.isdir(results_root) else []
    known = [n for n in PROTOCOLS if n not in GPU_PROTOCOLS]
    cpu = [n for n in known] + [n for n in names if n not in PROTOCOLS]
    return cpu, [n for n in GPU_PROTOCOLS]


def build_report(results_root, doc_dir=ROOT, figures_dir=None):
    """BENCHMARKS.md text. Learning-curve figures go into each protocol's results folder, or into
    ``figures_dir`` (as ``<protocol>_learning_curves.png``) when given."""
    cpu, gpu = protocol_dirs(results_root)
    costs = rater_costs(results_root)
    ratios = step_cost_ratios(results_root)
    body, summaries = [], []
    for name in cpu:
        lines, s = protocol_section(name, os.path.join(results_root, name), results_root, costs, doc_dir=doc_dir,
                                    figures_dir=figures_dir, ratios=ratios)
        body += lines
        summaries.append(s)
        if name == "transfer":
            body += transfer_section(results_root)
    gpu_body, gpu_summaries = [], []
    for name in gpu:
        lines, s = protocol_section(name, os.path.join(results_root, name), results_root, costs, level="###",
                                    doc_dir=doc_dir, figures_dir=figures_dir, ratios=ratios)
        gpu_body += lines
        gpu_summaries.append(s)
    L = ["# Benchmarks\n",
         "Generated by `python benchmarks/report.py` from the result files under `benchmarks/results/`, written by "
         "`python benchmarks/run_benchmark.py --protocol NAME` (resumable, in pieces: `--max_hours`). Every number "
         "below comes from those files; each section names the command that reproduces it. Protocols are defined "
         "in `benchmarks/protocols.py`.\n",
         "Workflow: a pilot (`python benchmarks/run_benchmark.py --protocol digits8 --seeds 0 1 2 --jobs 2 --max_hours 2.3`), "
         "then `python benchmarks/power.py benchmarks/results/digits8` gives the seeds each method needs for the "
         "budget (95 % half-width of the paired difference <= 2 % for validation loss, <= 5 % for FD); run more "
         "seeds for one method *and for uniform*, which it is paired with (`--methods knn uniform --seeds 0 1 ... n-1`; "
         "finished runs are skipped; the oracle also needs `--method_seeds oracle=...`), commit `benchmarks/results/` "
         "after each piece, and regenerate this file. To reproduce a table from scratch, give `--results_dir` a "
         "fresh folder (its runs go to `<results_dir>.runs`) and `report.py --results_root` its parent.\n"]
    L += verdict(summaries)
    L += body
    L.append("## GPU protocol (reported separately)\n")
    L.append("Run by `bash benchmarks/gpu_benchmark.sh` on a CUDA machine; not pooled with the CPU protocols.\n")
    L += gpu_body
    if any(s["runs"] for s in gpu_summaries):
        L += ["### GPU verdict\n"] + verdict(gpu_summaries)[1:]
    L += valuation_evidence_section(results_root)
    L += cost_section(results_root)
    L += legacy_section(os.path.join(results_root, "legacy"), doc_dir)
    return "\n".join(L) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results_root", default=os.path.join(HERE, "results"))
    ap.add_argument("--output", default=os.path.join(ROOT, "BENCHMARKS.md"))
    a = ap.parse_args(argv)
    out_dir = os.path.dirname(os.path.abspath(a.output))
    default = os.path.abspath(a.output) == os.path.join(ROOT, "BENCHMARKS.md") and \
        os.path.abspath(a.results_root) == os.path.join(HERE, "results")
    text = build_report(a.results_root, out_dir, figures_dir=None if default else out_dir)
    with open(a.output, "w") as f:
        f.write(text)
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
