#!/usr/bin/env python
"""Cost of one stage-1 meta-step next to a plain training step: wall time and peak memory.

    python benchmarks/meta_cost.py                       # plain, forward K=1, reverse K=1 (+ reverse K=2, 4)
    python benchmarks/meta_cost.py --modes plain forward reverse --repeats 5

Every mode runs on the same UNet (default 28x28, ~0.69M parameters) and the same M = B*N samples (B images
x N candidate noises, default 8 x 8 = 64; a plain step trains on the same 64 flat samples):

* ``plain``   -- one ordinary training step (forward, backward, AdamW step) of the UNet on the M samples;
* ``forward`` -- one meta-step with K = 1 by forward-mode AD (``noise_rater.bilevel.one_step_meta_gradient``);
* ``reverse`` -- one meta-step with K = 1 by backpropagation through the unrolled update;
* ``reverse2``, ``reverse4`` -- K = 2, 4 unrolled steps (reverse mode, the only exact route for K > 1).

One inner model (P = 1; a population of P costs P times the time, memory stays that of one member). Each
mode runs in a fresh subprocess so its peak resident memory (ru_maxrss) is its own; the modes are run one
after another in one invocation so that their ratios are measured under the same conditions (time them on
an idle machine). Writes benchmarks/results/meta_cost.json with the ratios to ``plain``.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODES = {"plain": ("plain", 1), "forward": ("forward", 1), "reverse": ("reverse", 1), "reverse2": ("reverse", 2),
         "reverse4": ("reverse", 4)}
TARGET = {"time_ratio": 2.5, "peak_rss_ratio": 1.25}


def one(mode, resolution, images, candidates, repeats, inner_optimizer, threads):
    import torch

    if threads:
        torch.set_num_threads(threads)
    from diffusers import DDPMScheduler, UNet2DModel

    sys.path.insert(0, ROOT)
    from noise_rater import NoiseRaterModel
    from noise_rater.bilevel import flatten_candidates
    from noise_rater.diffusion import per_sample_diffusion_loss
    from noise_rater.meta_trainer import MetaTrainer, add_noise_and_timesteps
    from noise_rater.training_utils import default_unet_config

    method, k = MODES[mode]
    torch.manual_seed(0)
    cfg = default_unet_config(resolution, 1)
    sched = DDPMScheduler()
    g = torch.Generator().manual_seed(0)

    def batches():
        x = lambda n: torch.rand(n, 1, resolution, resolution, generator=g) * 2 - 1  # noqa: E731
        train = [add_noise_and_timesteps(x(images), 1000, g, num_candidates=candidates) for _ in range(k)]
        return train, add_noise_and_timesteps(x(images * candidates), 1000, g)

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if method == "plain":
        unet = UNet2DModel(**cfg)
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)

        def step():
            flat, _, _ = flatten_candidates(batches()[0][0])
            loss = per_sample_diffusion_loss(unet, sched, flat["x0"], flat["noise"], flat["timesteps"]).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        rater = NoiseRaterModel(sample_size=resolution, in_channels=1)
        trainer = MetaTrainer(rater, lambda: UNet2DModel(**cfg), sched, population_size=1, inner_steps=k,
                              inner_optimizer=inner_optimizer, meta_gradient_method=method,
                              weighting_scope="candidates")

        def step():
            trainer.meta_step([batches()])
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        step()
        if i > 0:  # the first step warms up allocators
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "method": method, "K": k, "median_s": statistics.median(times), "min_s": min(times),
            "repeats": repeats, "peak_rss_gb": peak / 1024**2, "rss_before_gb": rss0 / 1024**2,
            "unet_params": sum(p.numel() for p in UNet2DModel(**cfg).parameters()), "threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--resolution", type=int, default=28)
    ap.add_argument("--images", type=int, default=8, help="B: images per inner batch.")
    ap.add_argument("--candidates", type=int, default=8, help="N: candidate noises per image (M = B*N samples).")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--inner_optimizer", default="adam", choices=["sgd", "adam"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own).")
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--output", default=os.path.join(HERE, "results", "meta_cost.json"))
    a = ap.parse_args()
    common = ["--resolution", str(a.resolution), "--images", str(a.images), "--candidates", str(a.candidates),
              "--repeats", str(a.repeats), "--inner_optimizer", a.inner_optimizer]
    if a.threads:
        common += ["--threads", str(a.threads)]
    if a._one is not None:
        print(json.dumps(one(a._one, a.resolution, a.images, a.candidates, a.repeats, a.inner_optimizer, a.threads)))
        return
    rows = []
    for mode in a.modes:
        out = subprocess.run([sys.executable, __file__, "--_one", mode, *common], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"mode {mode} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    plain = next((r for r in rows if r["mode"] == "plain"), None)
    if plain is not None:
        for r in rows:
            r["time_ratio_to_plain"] = r["median_s"] / plain["median_s"]
            r["peak_rss_ratio_to_plain"] = r["peak_rss_gb"] / plain["peak_rss_gb"]
    fwd = next((r for r in rows if r["mode"] == "forward"), None)
    verdict = None
    if plain is not None and fwd is not None:
        verdict = {"target": TARGET, "forward_time_ratio": fwd["time_ratio_to_plain"],
                   "forward_peak_rss_ratio": fwd["peak_rss_ratio_to_plain"],
                   "time_target_met": fwd["time_ratio_to_plain"] <= TARGET["time_ratio"],
                   "memory_target_met": fwd["peak_rss_ratio_to_plain"] <= TARGET["peak_rss_ratio"]}
    import torch

    res = {"command": "python benchmarks/meta_cost.py " + " ".join(sys.argv[1:]), "rows": rows, "verdict": verdict,
           "resolution": a.resolution, "images": a.images, "candidates": a.candidates,
           "samples_per_step": a.images * a.candidates, "inner_optimizer": a.inner_optimizer,
           "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
                      f"torch {torch.__version__}",
           "load_average_at_end": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M")}
    os.makedirs(os.path.dirname(a.output), exist_ok=True)
    with open(a.output, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(verdict, indent=2))


if __name__ == "__main__":
    main()
