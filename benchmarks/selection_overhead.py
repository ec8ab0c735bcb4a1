#!/usr/bin/env python
"""Stage-2 overhead of noise selection: wall time of selecting noise vs one training step.

    python benchmarks/selection_overhead.py --resolution 28 --batch_size 64 --num_candidates 8

The training step is what train_diffusion_hard.py does per step (UNet forward + backward + AdamW
on the plain loss); the selection is NoiseSelectingSampler (default NoiseRaterModel, argmax of N
candidates) and, for reference, KNN (N candidates) and batch assignment. Step and selection are
timed interleaved, median over repeats, so background load affects both alike.
Writes benchmarks/results/selection_overhead.json.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from diffusers import DDPMScheduler, UNet2DModel

from noise_rater import AssignmentNoiseSampler, KNNNoiseSampler, NoiseRaterModel, NoiseSelectingSampler
from noise_rater.diffusion import per_sample_diffusion_loss

HERE = os.path.dirname(os.path.abspath(__file__))
UNETS = {
    "1.1M": dict(block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
    "4.4M": dict(block_out_channels=(64, 128, 128), down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--resolution", type=int, default=28)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--num_candidates", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--unets", nargs="+", default=["1.1M", "4.4M"])
    ap.add_argument("--output", default=os.path.join(HERE, "results", "selection_overhead.json"))
    a = ap.parse_args()
    torch.manual_seed(0)
    res, b = a.resolution, a.batch_size
    sched = DDPMScheduler()
    rater = NoiseRaterModel(sample_size=res, in_channels=1)
    selectors = {"rater": NoiseSelectingSampler(rater, num_candidates=a.num_candidates),
                 "knn": KNNNoiseSampler(a.num_candidates), "assignment": AssignmentNoiseSampler()}
    rows = []
    for name in a.unets:
        unet = UNet2DModel(sample_size=res, in_channels=1, out_channels=1, layers_per_block=1, norm_num_groups=8,
                           attention_head_dim=32, **UNETS[name])
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(0)
        x0 = torch.rand(b, 1, res, res, generator=g) * 2 - 1
        times = {"train": [], **{k: [] for k in selectors}}
        for i in range(a.repeats + 1):
            t = torch.randint(0, 1000, (b,), generator=g)
            for k, sel in selectors.items():
                t0 = time.perf_counter()
                sel(x0, t, generator=g)
                if i:
                    times[k].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            loss = per_sample_diffusion_loss(unet, sched, x0, torch.randn(x0.shape, generator=g), t).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            if i:
                times["train"].append(time.perf_counter() - t0)
        step = statistics.median(times["train"])
        for k in selectors:
            sel = statistics.median(times[k])
            rows.append({"selector": k, "unet": name, "unet_params": sum(p.numel() for p in unet.parameters()),
                         "rater_params": sum(p.numel() for p in rater.parameters()), "resolution": res,
                         "batch_size": b, "num_candidates": a.num_candidates if k != "assignment" else b,
                         "train_step_s": step, "select_s": sel, "overhead": sel / step})
            print(rows[-1], flush=True)
    out = {"command": "python benchmarks/selection_overhead.py " + " ".join(sys.argv[1:]), "rows": rows,
           "threads": torch.get_num_threads(),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}",
           "date": time.strftime("%Y-%m-%d %H:%M")}
    os.makedirs(os.path.dirname(a.output), exist_ok=True)
    with open(a.output, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
