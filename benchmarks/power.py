#!/usr/bin/env python
"""Power budget of the paired benchmark: how many seeds resolve a given effect, and what the seeds run resolve.

    python benchmarks/power.py benchmarks/results/digits8              # table from pilot (or full) results
    python benchmarks/power.py benchmarks/results/fmnist16 --json      # the same as JSON

The unit of replication is the seed. Within a seed every method sees the same data order, timesteps and
candidate pools (common random numbers), so the quantity of interest is the *paired* relative difference

    d_s = 100 * (metric(method, seed s) - metric(uniform, seed s)) / metric(uniform, seed s)     [%]

over the seeds s both ran. With n seeds, sample mean m and sample standard deviation sd of the d_s:

* 95 % interval: m +- t_{0.975, n-1} * sd / sqrt(n)  (Student t; one-sample t on the paired differences).
* Seeds needed for a half-width <= B: the smallest n >= 2 with t_{0.975, n-1} * sd / sqrt(n) <= B, taking the
  pilot's sd as the truth (planning value).
* Minimal detectable effect (two-sided alpha, power 1 - beta):
  MDE = (t_{1-alpha/2, n-1} + t_{1-beta, n-1}) * sd / sqrt(n), the standard normal-approximation sample-size
  formula with t quantiles in place of z (e.g. Cohen 1988, ch. 2; for large n, alpha 0.05 and 80 % power it is
  (1.960 + 0.842) * SE = 2.80 * SE). :func:`paired_t_power` gives the exact power at any effect from the
  noncentral t distribution: at the MDE it is 0.77 for n = 3, 0.79 for n = 5 and 0.80 from n = 8 on.
"""

import argparse
import glob
import json
import math
import os
import sys
from collections import defaultdict

BUDGET_PCT = {"val_loss": 2.0, "fd": 5.0}  # the targets for the 95 % half-width of the paired difference


# ---- loading -----------------------------------------------------------------------------------------------


def load_runs(results_dir):
    """``{method: {seed: record}}`` from ``results_dir/run_*.json``."""
    runs = defaultdict(dict)
    for path in sorted(glob.glob(os.path.join(results_dir, "run_*.json"))):
        with open(path) as f:
            r = json.load(f)
        runs[r["method"]][int(r["seed"])] = r
    return dict(runs)


def final_val_loss(record):
    """Final validation loss of a run record (None if missing)."""
    return record.get("final", {}).get("val_loss")


def final_fd(record):
    """FD-EffLite0 at the last training step of a run record (None without FD)."""
    fd = record.get("fd") or {}
    last = fd.get(str(record.get("steps")))
    return None if last is None else last.get("fd_efflite0")


METRICS = {"val_loss": final_val_loss, "fd": final_fd}


# ---- statistics --------------------------------------------------------------------------------------------


def t_quantile(p, df):
    """Quantile ``p`` of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(p, df))


def _finite(values):
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def mean_sd(values):
    """(mean, sample standard deviation with n - 1, n) of the finite values; sd is nan for n < 2."""
    v = _finite(values)
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), 0
    m = sum(v) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1)) if n > 1 else float("nan")
    return m, sd, n


def t_halfwidth(sd, n, confidence=0.95):
    """Half-width of the two-sided ``confidence`` t-interval of a mean: t_{(1+c)/2, n-1} * sd / sqrt(n)."""
    if n < 2 or not math.isfinite(sd):
        return float("nan")
    return t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)


def mean_ci(values, confidence=0.95):
    """(mean, half-width of the t-interval, n) of the finite values (half-width nan for n < 2)."""
    m, sd, n = mean_sd(values)
    return m, t_halfwidth(sd, n, confidence), n


def paired_relative_differences(method, baseline):
    """``{seed: 100 * (method - baseline) / baseline}`` over the seeds both have (finite values only), in %."""
    out = {}
    for s in sorted(set(method) & set(baseline)):
        m, b = method[s], baseline[s]
        if m is None or b is None or not (math.isfinite(m) and math.isfinite(b)) or b == 0:
            continue
        out[s] = 100.0 * (m - b) / b
    return out


def seeds_needed(sd, target_halfwidth, confidence=0.95, n_max=10000):
    """Smallest n >= 2 with t_{(1+c)/2, n-1} * sd / sqrt(n) <= target_halfwidth; None if above ``n_max`` or
    sd is not finite."""
    if not math.isfinite(sd) or target_halfwidth <= 0:
        return None
    if sd == 0:
        return 2
    # t * sd / sqrt(n) decreases in n: bisect on [2, n_max]
    if t_halfwidth(sd, n_max, confidence) > target_halfwidth:
        return None
    lo, hi = 2, n_max
    while lo < hi:
        mid = (lo + hi) // 2
        if t_halfwidth(sd, mid, confidence) <= target_halfwidth:
            hi = mid
        else:
            lo = mid + 1
    return lo


def minimal_detectable_effect(sd, n, alpha=0.05, power=0.8):
    """MDE = (t_{1-alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n) of a two-sided paired t-test (nan for n < 2)."""
    if n < 2 or not math.isfinite(sd):
        return float("nan")
    return (t_quantile(1 - alpha / 2, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)


def paired_t_power(effect, sd, n, alpha=0.05):
    """Exact power of the two-sided one-sample t-test of mean 0 when the true mean is ``effect``:
    P(|T| > t_{1-alpha/2, n-1}) with T ~ noncentral t(n - 1, effect / (sd / sqrt(n)))."""
    from scipy.stats import nct

    crit = t_quantile(1 - alpha / 2, n - 1)
    nc = effect / (sd / math.sqrt(n))
    return float(nct.sf(crit, n - 1, nc) + nct.cdf(-crit, n - 1, nc))


def power_rows(runs, metric="val_loss", baseline="uniform", budget_pct=None, confidence=0.95):
    """One row per method (other than ``baseline``) with paired statistics of ``metric`` (see module doc).

    Returns a list of dicts: method, n, mean_pct, sd_pct, halfwidth_pct, meets_budget (bool or None when
    n < 2), seeds_needed (int or None), mde_pct (at the n run, alpha 0.05, 80 % power), budget_pct."""
    budget = BUDGET_PCT[metric] if budget_pct is None else budget_pct
    get = METRICS[metric]
    base = {s: get(r) for s, r in runs.get(baseline, {}).items()}
    rows = []
    for m in runs:
        if m == baseline:
            continue
        d = paired_relative_differences({s: get(r) for s, r in runs[m].items()}, base)
        if not d:
            continue
        mean, sd, n = mean_sd(list(d.values()))
        hw = t_halfwidth(sd, n, confidence)
        rows.append({"method": m, "metric": metric, "n": n, "mean_pct": mean, "sd_pct": sd, "halfwidth_pct": hw,
                     "meets_budget": (hw <= budget) if math.isfinite(hw) else None,
                     "seeds_needed": seeds_needed(sd, budget, confidence), "mde_pct": minimal_detectable_effect(sd, n),
                     "budget_pct": budget})
    return rows


def _fmt(x, digits=2):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def markdown_table(rows):
    """The power table as markdown lines."""
    L = ["| method | metric | seeds | mean paired diff. % | sd % | 95 % half-width % | budget % | meets | "
         "seeds needed | MDE % (80 % power) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        meets = {True: "yes", False: "**no**", None: "n/a"}[r["meets_budget"]]
        L.append(f"| {r['method']} | {r['metric']} | {r['n']} | {_fmt(r['mean_pct'])} | {_fmt(r['sd_pct'])} | "
                 f"{_fmt(r['halfwidth_pct'])} | {r['budget_pct']:g} | {meets} | {r['seeds_needed'] or 'n/a'} | "
                 f"{_fmt(r['mde_pct'])} |")
    return L


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results_dir", help="A protocol's results folder (run_<method>_seed<k>.json files).")
    ap.add_argument("--val_budget", type=float, default=BUDGET_PCT["val_loss"], help="Target half-width, %%.")
    ap.add_argument("--fd_budget", type=float, default=BUDGET_PCT["fd"], help="Target half-width, %%.")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if not os.path.isdir(a.results_dir):
        print(f"error: {a.results_dir} is not a folder", file=sys.stderr)
        return 2
    runs = load_runs(a.results_dir)
    if "uniform" not in runs:
        print(f"error: {a.results_dir} has no uniform runs (run_uniform_seed*.json): nothing to pair with",
              file=sys.stderr)
        return 2
    rows = power_rows(runs, "val_loss", budget_pct=a.val_budget) + power_rows(runs, "fd", budget_pct=a.fd_budget)
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        print("\n".join(markdown_table(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
