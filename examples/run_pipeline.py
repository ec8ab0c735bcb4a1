#!/usr/bin/env python
"""The main job, end to end: stage 1 meta-trains a rater, stage 2 trains the same diffusion model with
hard noise selection and with uniform noise (same seed, data order and steps), then a short report.
With the defaults it takes about 6 minutes (5m47s measured on 2 CPU cores, one of them busy with another job).

    python examples/run_pipeline.py --output_dir demo_output          # built-in digits data

Each stage is launched with ``accelerate launch`` exactly as a user would run it; every stage
resumes from its last checkpoint if the job is interrupted and started again, and keeps at most two
checkpoints. The terminal shows one live progress line per stage (stage name, steps done, elapsed time
and ETA, the bar's own fields) and the validation lines; everything the stages print is kept verbatim in
``<output_dir>/job.log``. Each stage runs with ``--num_threads`` CPU threads (default: ``$OMP_NUM_THREADS``,
or 1 when it is unset: the demo's 8x8 models gain nothing from more, and extra threads on a busy machine
slow every step down many times over).

Outputs: ``<output_dir>/report.md`` with, per result, the numbers, a 95 % interval where there are several
values, and one sentence saying what the sign and the interval mean; plots (``learning_curves.png``) and
sample grids side by side.
"""

import argparse
import codecs
import collections
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from noise_rater.training_utils import HelpFormatter, read_jsonl  # noqa: E402

# ------------------------------------------------------------------------------------------------------------
# Progress: the stages' tqdm bars, re-drawn as one line per stage
# ------------------------------------------------------------------------------------------------------------

# tqdm's "n/total [elapsed<eta, rate, postfix...]" part; the text before it (percentage, bar) and the postfix
# fields vary with the terminal width and the script, so only this part is relied on.
BAR_RE = re.compile(r"(?P<n>\d+)/(?P<total>\d+) \[(?P<elapsed>[0-9:]+)<(?P<eta>[0-9:?]+)(?P<rest>[^\]]*)\]")
DESC_RE = re.compile(r"^\s*(?P<desc>[^|]*?):\s*\d+%\|")
# log lines worth showing while a stage runs (the message part of "date - LEVEL - logger - message")
SHOW_RE = re.compile(r"validation loss|Resumed from|skipped|falling back|no valid checkpoint|^error", re.IGNORECASE)
# "11/29/2026 19:41:33 - INFO - name - [RANK 0] msg" (accelerate) or "2026-11-29 19:41:13,811 WARNING name: msg"
LOG_PREFIX_RE = re.compile(r"^\S+ [\d:,.]+ (?:- )?(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) (?:- )?[\w.]+(?: -|:) (?:\[RANK \d+\] )?")


def parse_progress(segment):
    """Fields of one tqdm update, or None if ``segment`` is not a tqdm bar with a known total.

    Returns a dict with ``desc`` (str, may be empty), ``n`` and ``total`` (int), ``elapsed`` and ``eta``
    (tqdm's ``[H:]MM:SS`` strings) and ``extra`` (the rate and postfix fields, e.g. ``"1.50it/s, loss=0.1"``).
    """
    m = BAR_RE.search(segment)
    if m is None:
        return None
    d = DESC_RE.match(segment[: m.start()])
    extra = ", ".join(part.strip() for part in m.group("rest").split(",") if part.strip())
    return {"desc": d.group("desc").strip() if d else "", "n": int(m.group("n")), "total": int(m.group("total")),
            "elapsed": m.group("elapsed"), "eta": m.group("eta"), "extra": extra}


def format_progress(stage, p):
    """One status line: ``[stage] desc n/total pct% | elapsed E, ETA R | rate, postfix``."""
    pct = 100.0 * p["n"] / p["total"] if p["total"] else 0.0
    desc = f"{p['desc']} " if p["desc"] else ""
    extra = f" | {p['extra']}" if p["extra"] else ""
    return f"[{stage}] {desc}{p['n']}/{p['total']} {pct:3.0f}% | elapsed {p['elapsed']}, ETA {p['eta']}{extra}"


class StageDisplay:
    """Turns a stage's raw output (tqdm's carriage-return updates and log lines) into terminal lines.

    On a terminal the progress line is redrawn in place; elsewhere (a pipe, a CI log) one progress line is
    printed at most every ``min_interval`` seconds, plus the first and the last update of each bar.
    Validation, resume and error lines are printed as they come, prefixed with the stage name.
    """

    def __init__(self, stage, stream=None, tty=None, min_interval=10.0, clock=time.monotonic):
        self.stage = stage
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.min_interval = min_interval
        self.clock = clock
        self.buffer = ""
        self.bar_line = None  # the progress line shown on a terminal
        self.last_key, self.last_print = None, -math.inf
        self.tail = collections.deque(maxlen=40)  # last non-progress lines, shown if the stage fails

    def feed(self, text):
        """Process a chunk of the child's output (any split: partial lines are kept until completed)."""
        parts = re.split(r"[\r\n]", self.buffer + text)
        self.buffer = parts.pop()
        for segment in parts:
            self._segment(segment)
        # tqdm ends an update with the *next* update's '\r': show a complete pending bar now
        if self.buffer.endswith("]") and parse_progress(self.buffer):
            self._progress(parse_progress(self.buffer))

    def close(self):
        if self.buffer:
            self._segment(self.buffer)
            self.buffer = ""
        if self.tty and self.bar_line is not None:
            self.stream.write("\n")
        self.stream.flush()

    def _segment(self, segment):
        if not segment.strip():
            return
        p = parse_progress(segment)
        if p is not None:
            self._progress(p)
            rest = segment[BAR_RE.search(segment).end():]
            if rest.strip():  # a log line printed right after a bar update, with no '\r' between them
                self._segment(rest)
            return
        self.tail.append(segment)
        message = LOG_PREFIX_RE.sub("", segment)
        if SHOW_RE.search(message):
            self._line(f"[{self.stage}] {message.strip()}")

    def _progress(self, p):
        key = (p["desc"], p["n"], p["total"])
        if key == self.last_key:
            return
        new_bar = self.last_key is None or self.last_key[0] != p["desc"] or p["n"] < self.last_key[1]
        self.last_key = key
        line = format_progress(self.stage, p)
        if self.tty:
            width = max(shutil.get_terminal_size((120, 24)).columns - 1, 20)
            line = line[:width]
            pad = max(len(self.bar_line or "") - len(line), 0)
            self.stream.write("\r" + line + " " * pad)
            self.bar_line = line
        else:
            now = self.clock()
            if new_bar or p["n"] == p["total"] or now - self.last_print >= self.min_interval:
                self.stream.write(line + "\n")
                self.last_print = now
        self.stream.flush()

    def _line(self, line):
        if self.tty and self.bar_line is not None:
            self.stream.write("\r" + " " * len(self.bar_line) + "\r" + line + "\n" + self.bar_line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def launch(script, args, log_path, stage, num_threads):
    """Run ``accelerate launch script args`` with a live progress line; returns the wall time in s."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", str(num_threads),
           os.path.join(ROOT, script), *args]
    print(f"== {stage} ==\n$ accelerate launch " + " ".join([script, *args]), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(num_threads), "PYTHONUNBUFFERED": "1"}
    display = StageDisplay(stage)
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write(f"\n== {stage} ==\n$ accelerate launch {' '.join([script, *args])}\n")
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            chunk = os.read(p.stdout.fileno(), 65536)
            if not chunk:
                break
            text = decoder.decode(chunk)
            log.write(text)  # verbatim, tqdm's carriage returns included
            log.flush()
            display.feed(text)
        p.wait()
    display.close()
    if p.returncode != 0:
        sys.stderr.write(f"[{stage}] last lines of its output:\n" + "\n".join(display.tail) + "\n")
        sys.exit(f"{script} failed (exit {p.returncode}); see {log_path}")
    return time.time() - t0


# ------------------------------------------------------------------------------------------------------------
# Verdicts: pure functions of the numbers
# ------------------------------------------------------------------------------------------------------------


def mean_t_interval(values, confidence=0.95):
    """Mean and half-width of the two-sided Student-t confidence interval of the mean.

    ``half = t_{(1+c)/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard deviation (n - 1 denominator).
    Non-finite values are dropped. Returns ``(mean, half_width, n)``; ``mean`` is NaN for n = 0 and
    ``half_width`` NaN for n < 2.
    """
    from scipy import stats

    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = sum(vals) / n
    if n < 2:
        return mean, float("nan"), 1
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    return mean, float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n), n


def fmt_value(x, digits=3):
    """Compact number: 3 significant digits (scientific notation for small or large magnitudes)."""
    return f"{x:.{digits}g}"


def interval_verdict(mean, half_width, n, *, positive, negative, unit="", scope="at this budget, one seed"):
    """One plain sentence saying what the sign and the 95 % interval of a difference mean.

    ``positive`` / ``negative`` complete "<scope>, ... by X ± Y" for an interval entirely above / below 0.
    An interval containing 0 says the difference is within noise; fewer than two values say no interval
    can be given.
    """
    scope_cap = scope[:1].upper() + scope[1:]
    if n == 0 or not math.isfinite(mean):
        return f"{scope_cap}, no comparison was recorded, so there is no verdict."
    if n < 2 or not math.isfinite(half_width):
        return (f"{scope_cap}, there is a single value ({fmt_value(mean)}{unit}) and so no interval: "
                "its sign alone is not evidence either way.")
    est = f"{fmt_value(abs(mean))} ± {fmt_value(half_width)}{unit}"
    if mean - half_width > 0:
        return f"{scope_cap}, {positive} by {est} (95 % interval above 0, n = {n})."
    if mean + half_width < 0:
        return f"{scope_cap}, {negative} by {est} (95 % interval below 0, n = {n})."
    return (f"{scope_cap}, the difference is within noise: {fmt_value(mean)} ± {fmt_value(half_width)}{unit} "
            f"(95 % interval, n = {n}) contains 0.")


def stage1_gains(history):
    """Paired stage-1 evidence: (uniform - rater-weighted) validation loss after the inner steps, one value per
    meta-step that also unrolled with uniform weights on the same batches (finite values only)."""
    return [h["val_loss_uniform"] - h["outer_loss"] for h in history
            if "val_loss_uniform" in h and math.isfinite(h.get("outer_loss", float("nan")))
            and math.isfinite(h["val_loss_uniform"])]


def band_relative_differences(baseline, method):
    """Per timestep band, ``100 * (L_baseline - L_method) / L_baseline`` (% ; > 0: the method's loss is lower).

    ``baseline`` and ``method`` are final_metrics dicts with ``final_val_loss_band_k`` keys; bands missing or
    non-finite in either are skipped. Returns a list of ``(k, L_baseline, L_method, difference %)``.
    """
    out, k = [], 0
    while f"final_val_loss_band_{k}" in baseline:
        b, m = baseline[f"final_val_loss_band_{k}"], method.get(f"final_val_loss_band_{k}", float("nan"))
        if b is not None and m is not None and math.isfinite(b) and math.isfinite(m) and b > 0:
            out.append((k, b, m, 100.0 * (b - m) / b))
        k += 1
    return out


# ------------------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--output_dir", default="demo_output", help="Where every stage and the report write.")
    ap.add_argument("--dataset_name", default="digits", help="Any --dataset_name the training scripts accept.")
    ap.add_argument("--resolution", type=int, default=8, help="Image side in pixels.")
    ap.add_argument("--model_config_name_or_path", default=None,
                    help="UNet2DModel config JSON for both stages (default: the scripts' default UNet).")
    ap.add_argument("--meta_steps", type=int, default=100, help="Stage-1 meta-steps.")
    ap.add_argument("--meta_batch_size", type=int, default=8,
                    help="Stage-1 images per inner batch, each with --num_candidate_noises candidates.")
    ap.add_argument("--compare_every", type=int, default=5,
                    help="Stage 1 also unrolls with uniform weights every N meta-steps (the paired evidence).")
    ap.add_argument("--train_steps", type=int, default=800, help="Stage-2 training steps per run.")
    ap.add_argument("--train_batch_size", type=int, default=64, help="Stage-2 batch size.")
    ap.add_argument("--num_candidate_noises", type=int, default=8, help="N candidates per sample (hard selection).")
    ap.add_argument("--validation_steps", type=int, default=100, help="Stage-2 validation every N steps.")
    ap.add_argument("--num_validation_triples", type=int, default=512, help="Stage-2 fixed (x0, eps, t) triples.")
    ap.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps for the sample grids.")
    ap.add_argument("--seed", type=int, default=0, help="Seed of every stage.")
    ap.add_argument("--num_threads", type=int, default=None,
                    help="CPU threads per stage (accelerate's --num_cpu_threads_per_process); "
                         "default: $OMP_NUM_THREADS, or 1 when it is unset.")
    a = ap.parse_args(argv)
    for name in ("resolution", "meta_steps", "meta_batch_size", "compare_every", "train_steps", "train_batch_size",
                 "num_candidate_noises", "validation_steps", "num_validation_triples", "num_inference_steps"):
        if getattr(a, name) <= 0:
            ap.error(f"--{name} must be positive, got {getattr(a, name)}")
    if a.num_threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        a.num_threads = int(env) if env.isdigit() and int(env) > 0 else 1
    elif a.num_threads <= 0:
        ap.error(f"--num_threads must be positive, got {a.num_threads}")
    return a


def main(argv=None):
    a = parse_args(argv)
    out = os.path.abspath(a.output_dir)
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "job.log")
    common = ["--dataset_name", a.dataset_name, "--resolution", str(a.resolution), "--seed", str(a.seed),
              "--report_to", "tensorboard", "--resume_from_checkpoint", "latest", "--checkpoints_total_limit", "2"]
    if a.model_config_name_or_path:
        common += ["--model_config_name_or_path", os.path.abspath(a.model_config_name_or_path)]
    timings_path = os.path.join(out, "timings.json")
    timings = json.load(open(timings_path)) if os.path.exists(timings_path) else {}
    print(f"output: {out} (full log: {log}); {a.num_threads} CPU thread(s) per stage", flush=True)

    def stage(key, label, done_file, script, args):
        """Run a stage unless it already finished (then its recorded wall time is kept)."""
        if key in timings and os.path.exists(done_file):
            print(f"== {label}: already done ({timings[key]:.0f} s), skipped ==", flush=True)
            return
        timings[key] = launch(script, args, log, label, a.num_threads)
        with open(timings_path, "w") as f:
            json.dump(timings, f, indent=2)

    rater_dir = os.path.join(out, "rater")
    stage("stage1_s", "stage 1: meta-train rater", os.path.join(rater_dir, "meta_summary.json"),
          "train_noiserater.py", [
              *common, "--output_dir", rater_dir, "--max_train_steps", str(a.meta_steps),
              "--train_batch_size", str(a.meta_batch_size), "--num_candidate_noises", str(a.num_candidate_noises),
              "--population_size", "2", "--inner_steps", "1",
              "--compare_every", str(a.compare_every), "--checkpointing_steps", str(max(a.meta_steps // 4, 1)),
              "--inner_model_lifetime", "50"])

    runs = {"uniform": ["--noise_selection", "uniform"],
            "noiserater_hard": ["--noise_selection", "rater", "--rater_model_name_or_path", rater_dir,
                                "--num_candidate_noises", str(a.num_candidate_noises), "--selection_rule", "argmax"]}
    for name, flags in runs.items():
        stage(f"stage2_{name}_s", f"stage 2: {name}", os.path.join(out, name, "final_metrics.json"),
              "train_diffusion_hard.py", [
                  *common, "--output_dir", os.path.join(out, name), "--max_train_steps", str(a.train_steps),
                  "--train_batch_size", str(a.train_batch_size), "--learning_rate", "1e-3",
                  "--lr_warmup_steps", str(min(50, a.train_steps // 4)), "--validation_steps", str(a.validation_steps),
                  "--num_validation_triples", str(a.num_validation_triples),
                  "--checkpointing_steps", str(max(a.train_steps // 4, 1)),
                  "--num_inference_steps", str(a.num_inference_steps), *flags])
    report = write_report(out, runs, timings, a)
    print(report["stage1_verdict"] + "\n" + report["stage2_verdict"])
    print(f"report: {os.path.join(out, 'report.md')}")


def write_report(out, runs, timings, a):
    """Write ``report.md`` and ``learning_curves.png``; returns the verdict sentences (dict)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = json.load(open(os.path.join(out, "rater", "meta_summary.json")))
    history = read_jsonl(os.path.join(out, "rater", "meta_metrics.jsonl"))
    finals, curves = {}, {}
    for name in runs:
        finals[name] = json.load(open(os.path.join(out, name, "final_metrics.json")))
        curves[name] = read_jsonl(os.path.join(out, name, "validation.jsonl"))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for (name, rows), marker, style in zip(curves.items(), "os", ["-", "--"]):
        ax.plot([r["step"] for r in rows], [r["val_loss"] for r in rows], style, marker=marker, fillstyle="none",
                label=name)
    ax.set_xlabel("training step"); ax.set_ylabel("validation loss (Gaussian noise)"); ax.set_yscale("log"); ax.legend()
    fig.tight_layout(); fig.savefig(os.path.join(out, "learning_curves.png"), dpi=110); plt.close(fig)

    # stage 1: paired gains, one per comparison
    g_mean, g_half, g_n = mean_t_interval(stage1_gains(history))
    v1 = interval_verdict(
        g_mean, g_half, g_n, scope="at this budget, one seed",
        positive="the rater's weights lowered the validation loss after the inner steps compared with uniform weights",
        negative="uniform weights gave a lower validation loss after the inner steps than the rater's weights")
    gain_txt = (f"{fmt_value(g_mean)} ± {fmt_value(g_half)} (mean ± 95 % t-interval)" if g_n >= 2
                else f"{fmt_value(g_mean)} (a single comparison, no interval)" if g_n == 1 else "none recorded")

    # stage 2: final validation loss, hard selection vs uniform, per timestep band
    base, hard = finals["uniform"], finals["noiserater_hard"]
    bands = band_relative_differences(base, hard)
    d_mean, d_half, d_n = mean_t_interval([d for *_, d in bands])
    v2 = interval_verdict(
        d_mean, d_half, d_n, unit=" %", scope="at this budget, one seed",
        positive="hard selection ended with a lower validation loss than uniform noise",
        negative="uniform noise ended with a lower validation loss than hard selection")
    overall = 100.0 * (base["final_val_loss"] - hard["final_val_loss"]) / base["final_val_loss"]

    L = ["# NoiseRater demo report", "",
         f"Data: `{a.dataset_name}` at {a.resolution}x{a.resolution}; seed {a.seed}; {a.meta_steps} stage-1 meta-steps; "
         f"{a.train_steps} stage-2 steps, batch {a.train_batch_size}. One seed only: a demonstration of the pipeline, "
         "not a benchmark (see BENCHMARKS.md for the multi-seed comparison).", "",
         "## Stage 1: meta-training the rater", "",
         f"- {meta['step']} meta-steps in {timings['stage1_s']:.0f} s; last outer loss {meta['outer_loss']:.4f}.",
         "- Paired evidence: (uniform - rater-weighted) validation loss after the inner steps, on the same batches "
         f"(> 0 means the rater's weighting helped), over {g_n} comparison{'' if g_n == 1 else 's'}: {gain_txt}.", "",
         f"**Verdict (stage 1).** {v1}", "",
         "![meta evidence](rater/meta_evidence.png) ![rater analysis](rater/rater_analysis.png)", ""]
    # --- valuation accuracy (stage 1): embedded when train_noiserater.py has written the figure -----------
    val_path = os.path.join(out, "rater", "valuation.jsonl")
    if os.path.exists(val_path):
        records = read_jsonl(val_path)
        # the last three measurements x inner models: a spread of the fraction of the oracle's gain captured
        fr = [100.0 * m["fraction_of_oracle"] for r in records[-3:] for m in r["members"]]
        rho = [m["spearman_rho"] for r in records[-3:] for m in r["members"]]
        f_mean, f_half, f_n = mean_t_interval(fr)
        r_mean, r_half, r_n = mean_t_interval(rho)
        v_val = interval_verdict(
            f_mean, f_half, f_n, unit=" %", scope="on held-out groups, one seed",
            positive="the rater's pick among the candidates captured part of the oracle's one-step gain over a "
                     "random pick",
            negative="the rater's pick among the candidates was less useful than a random pick")
        L += ["### Valuation accuracy: does the rater pick the useful noise?", "",
              "On fixed held-out (x0, t) groups of candidate noises, the rater's ranking is compared with the exact "
              "one-step influence of each candidate on the validation loss (the oracle).", "",
              f"- Within-group Spearman rho (score vs influence), last {min(3, len(records))} measurements x inner "
              f"models: {fmt_value(r_mean)} ± {fmt_value(r_half)}.",
              f"- Share of the oracle's one-step gain over a random pick that the rater's pick captures: "
              f"{fmt_value(f_mean)} ± {fmt_value(f_half)} % (100 % = the oracle, 0 % = random).", "",
              f"**Verdict (valuation).** {v_val}", "", "![valuation accuracy](rater/valuation_accuracy.png)", ""]
    # -------------------------------------------------------------------------------------------------------
    L += ["## Stage 2: hard selection vs uniform noise", "",
          "| run | final validation loss (Gaussian noise) | wall time s | selection time s |", "|---|---|---|---|"]
    for name in runs:
        f = finals[name]
        L.append(f"| {name} | {f['final_val_loss']:.4f} | {timings[f'stage2_{name}_s']:.0f} | "
                 f"{f.get('select_time_s', float('nan')):.1f} |")
    L += ["", f"Overall, (uniform - hard) / uniform = {overall:+.2f} % (> 0: hard selection is better). Per timestep band:",
          "", "| timesteps | uniform | noiserater_hard | (uniform - hard) / uniform |", "|---|---|---|---|"]
    edges = base.get("band_edges") or []
    for k, b, m, d in bands:
        t_range = f"{edges[k]}-{edges[k + 1] - 1}" if len(edges) > k + 1 else f"band {k}"
        L.append(f"| {t_range} | {b:.4f} | {m:.4f} | {d:+.2f} % |")
    L += ["", f"**Verdict (stage 2).** {v2} This is the mean over the {d_n} timestep bands (each band weighted "
          f"equally, unlike the overall {overall:+.2f} % above, which weights every validation triple equally); the "
          "interval is the spread over the bands of this one run and does not include seed-to-seed variation, which "
          "BENCHMARKS.md measures.", ""]
    if math.isfinite(hard.get("select_time_fraction", float("nan"))):
        L += [f"Selecting among {a.num_candidate_noises} candidate noises took "
              f"{100 * hard['select_time_fraction']:.1f} % of the hard-selection run's step time "
              f"({hard['select_time_s']:.1f} s of {hard['select_time_s'] + hard['train_time_s']:.1f} s).", ""]
    L += ["![learning curves](learning_curves.png)", "", "Samples (final model, same sampler seed):", ""]
    for name in runs:
        L.append(f"**{name}**: ![{name}]({name}/samples_final.png)")
    L += ["", "Reproduce: `make demo` (or `python examples/run_pipeline.py --output_dir demo_output`)."]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(L) + "\n")
    return {"stage1_verdict": "Stage 1: " + v1, "stage2_verdict": "Stage 2: " + v2}


if __name__ == "__main__":
    main()
