#!/usr/bin/env python
"""Stage-1 evidence: does the rater's soft weighting lower the validation loss reached after K inner
steps, compared with uniform weights on the *same* batches? Reads the ``meta_metrics.jsonl`` of
``train_noiserater.py`` runs (rows with ``val_loss_uniform`` are the paired comparisons) and writes
``benchmarks/results/stage1_evidence.{json,png}``.

    python benchmarks/stage1_evidence.py digits_cand=benchmarks/runs/raters/<key> digits=demo_output/rater

(the benchmark's raters live in ``benchmarks/runs/raters/<key>/``, the key is in
``benchmarks/results/<protocol>/rater_<scope>.json``; the previous protocol's evidence is in
``benchmarks/results/legacy/``).
"""

import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, fig_rows = {}, []
    for spec in sys.argv[1:]:
        name, path = spec.split("=", 1)
        rows = [json.loads(l) for l in open(os.path.join(path, "meta_metrics.jsonl")) if l.strip()]
        pairs = [(r["step"], r["outer_loss"], r["val_loss_uniform"]) for r in rows
                 if "val_loss_uniform" in r and math.isfinite(r["outer_loss"])]
        gains = [u - w for _, w, u in pairs]
        rel = [(u - w) / u for _, w, u in pairs]
        n = len(gains)
        m = sum(gains) / n
        sd = math.sqrt(sum((g - m) ** 2 for g in gains) / (n - 1)) if n > 1 else float("nan")
        half = n // 2
        late = gains[half:]
        summary = json.load(open(os.path.join(path, "meta_summary.json")))
        out[name] = {"run": path, "meta_steps": summary.get("step"), "wall_time_s": summary.get("wall_time_s"),
                     "comparisons": n, "mean_gain": m, "gain_95ci_halfwidth": 1.96 * sd / math.sqrt(n) if n > 1 else None,
                     "mean_relative_gain": sum(rel) / n, "fraction_rater_better": sum(g > 0 for g in gains) / n,
                     "mean_gain_second_half": sum(late) / len(late) if late else None, "data": summary.get("data")}
        fig_rows.append((name, pairs))
        print(name, json.dumps(out[name], indent=1))
    fig, axes = plt.subplots(1, len(fig_rows), figsize=(5.5 * len(fig_rows), 3.6), squeeze=False)
    for ax, (name, pairs) in zip(axes[0], fig_rows):
        steps = [p[0] for p in pairs]
        ax.plot(steps, [100 * (u - w) / u for _, w, u in pairs], ".-")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(f"{name}: uniform vs rater weights, same batches")
        ax.set_xlabel("meta-step"); ax.set_ylabel("(uniform - weighted) / uniform, %")
    fig.tight_layout()
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    fig.savefig(os.path.join(HERE, "results", "stage1_evidence.png"), dpi=100)
    with open(os.path.join(HERE, "results", "stage1_evidence.json"), "w") as f:
        json.dump({"command": "python benchmarks/stage1_evidence.py " + " ".join(sys.argv[1:]), "runs": out}, f, indent=2)


if __name__ == "__main__":
    main()
