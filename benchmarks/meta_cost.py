#!/usr/bin/env python
"""Cost of one stage-1 meta-step against K (unrolled inner steps): wall time and peak memory.

    python benchmarks/meta_cost.py --ks 1 2 4 --resolution 28 --batch_size 64

Each K runs in a fresh subprocess so its peak resident memory (ru_maxrss) is its own. One inner
model (P = 1); a population of P costs P times the time, while memory stays that of one member
(members are unrolled one after another and each graph is freed before the next).
Writes benchmarks/results/meta_cost.json.
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


def one(k, resolution, batch_size, repeats, inner_optimizer):
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    from noise_rater import NoiseRaterModel
    from noise_rater.meta_trainer import MetaTrainer, add_noise_and_timesteps
    from noise_rater.training_utils import default_unet_config

    torch.manual_seed(0)
    cfg = default_unet_config(resolution, 1)
    rater = NoiseRaterModel(sample_size=resolution, in_channels=1)
    trainer = MetaTrainer(rater, lambda: UNet2DModel(**cfg), DDPMScheduler(), population_size=1, inner_steps=k,
                          inner_optimizer=inner_optimizer)
    g = torch.Generator().manual_seed(0)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(repeats + 1):
        batches = [([add_noise_and_timesteps(torch.rand(batch_size, 1, resolution, resolution, generator=g) * 2 - 1, 1000, g)
                     for _ in range(k)], add_noise_and_timesteps(torch.rand(batch_size, 1, resolution, resolution, generator=g) * 2 - 1, 1000, g))]
        t0 = time.perf_counter()
        trainer.meta_step(batches)
        if i > 0:  # the first step warms up allocators
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"K": k, "median_s": statistics.median(times), "min_s": min(times), "repeats": repeats,
            "peak_rss_gb": peak / 1024**2, "rss_before_gb": rss0 / 1024**2,
            "unet_params": sum(p.numel() for p in UNet2DModel(**cfg).parameters()),
            "rater_params": sum(p.numel() for p in rater.parameters()), "threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--resolution", type=int, default=28)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--inner_optimizer", default="adam")
    ap.add_argument("--_one", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--output", default=os.path.join(HERE, "results", "meta_cost.json"))
    a = ap.parse_args()
    if a._one is not None:
        print(json.dumps(one(a._one, a.resolution, a.batch_size, a.repeats, a.inner_optimizer)))
        return
    rows = []
    for k in a.ks:
        out = subprocess.run([sys.executable, __file__, "--_one", str(k), "--resolution", str(a.resolution),
                              "--batch_size", str(a.batch_size), "--repeats", str(a.repeats),
                              "--inner_optimizer", a.inner_optimizer], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    res = {"command": "python benchmarks/meta_cost.py " + " ".join(sys.argv[1:]), "rows": rows,
           "resolution": a.resolution, "batch_size": a.batch_size, "inner_optimizer": a.inner_optimizer,
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
           "date": time.strftime("%Y-%m-%d %H:%M")}
    os.makedirs(os.path.dirname(a.output), exist_ok=True)
    with open(a.output, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
