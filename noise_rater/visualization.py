"""Sample grids and loss plots written by the training scripts (PNG files; matplotlib only for plots)."""

import math
import os
from typing import Optional, Sequence

import numpy as np
import torch

from .training_utils import read_jsonl

__all__ = ["sample_images", "save_image_grid", "class_grid_labels", "plot_losses", "plot_valuation", "plot_evidence",
           "plot_rater"]


@torch.no_grad()
def sample_images(unet, scheduler_config, num_images, *, num_inference_steps, seed, batch_size, class_labels=None):
    """DDIM (eta = 0) samples from ``unet``, as ``DDPMPipeline`` with a DDIM scheduler does, plus class labels.

    Args:
        unet: a ``UNet2DModel`` (``class_labels`` required when it has ``num_class_embeds``).
        scheduler_config: the training ``DDPMScheduler``'s config (a DDIM scheduler is built from it).
        class_labels (`torch.LongTensor` of shape `(num_images,)`, *optional*).

    Returns:
        float32 `(N, C, H, W)` in [0, 1] on CPU. Uses its own CPU generator seeded with ``seed``; the UNet's
        train/eval mode is restored.
    """
    from diffusers import DDIMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_inference_steps)
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    size = unet.config.sample_size
    hw = (size, size) if isinstance(size, int) else tuple(size)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    was_training = unet.training
    unet.eval()
    out = []
    try:
        for start in range(0, num_images, batch_size):
            bs = min(batch_size, num_images - start)
            image = randn_tensor((bs, unet.config.in_channels) + hw, generator=generator, device=device, dtype=dtype)
            labels = None if class_labels is None else class_labels[start:start + bs].to(device)
            for t in scheduler.timesteps:
                if labels is None:
                    model_output = unet(image, t).sample
                else:
                    model_output = unet(image, t, class_labels=labels).sample
                image = scheduler.step(model_output, t, image, generator=generator).prev_sample
            out.append((image / 2 + 0.5).clamp(0, 1).float().cpu())
    finally:
        if was_training:
            unet.train()
    return torch.cat(out)


def class_grid_labels(num_classes: int, num_images: int, max_rows: int = 16):
    """Labels for a class grid: one row per class (at most ``max_rows``), ``ceil(num_images / rows)`` columns.

    Returns:
        ``(labels (rows * cols,) int64, cols)``; row r holds class r.
    """
    rows = max(1, min(num_classes, max_rows))
    cols = max(1, math.ceil(num_images / rows))
    return torch.arange(rows).repeat_interleave(cols), cols


def save_image_grid(images01: torch.Tensor, path: str, ncols: Optional[int] = None,
                    row_labels: Optional[Sequence[str]] = None) -> None:
    """`(N, C, H, W)` in [0, 1] -> one PNG grid (``ncols``, default ceil(sqrt(N)), columns, 2 px padding),
    enlarged with nearest-neighbour to at least 256 px wide so that small images (8x8 digits) stay visible.
    With ``row_labels``, row r is labelled ``row_labels[r]`` in a margin on the left."""
    from PIL import Image, ImageDraw

    n, c, h, w = images01.shape
    cols = int(ncols) if ncols else int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    pad = 2
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    arr = (images01.permute(0, 2, 3, 1).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = arr[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid, mode="L" if c == 1 else "RGB")
    scale = max(1, int(math.ceil(256 / img.width)))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    if row_labels:
        labels = [str(label) for label in row_labels][:rows]
        draw_probe = ImageDraw.Draw(img)
        margin = 8 + max(int(draw_probe.textlength(label)) for label in labels)
        canvas = Image.new(img.mode, (img.width + margin, img.height), 255 if c == 1 else (255, 255, 255))
        canvas.paste(img, (margin, 0))
        draw = ImageDraw.Draw(canvas)
        cell = (h + pad) * scale
        for r, label in enumerate(labels):
            draw.text((4, pad * scale + r * cell + max(0, (h * scale - 10) // 2)), label, fill=0 if c == 1 else (0, 0, 0))
        img = canvas
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)


def plot_losses(output_dir: str, path: str) -> None:
    """Train loss (raw and smoothed) and validation loss vs step, from metrics.jsonl / validation.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in read_jsonl(os.path.join(output_dir, "metrics.jsonl"))
             if r.get("loss") is not None]
    val = read_jsonl(os.path.join(output_dir, "validation.jsonl"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        steps = np.array([s for s, _ in train])
        losses = np.array([v for _, v in train])
        window = max(1, min(100, len(losses) // 20))
        ax.plot(steps, losses, color="tab:blue", alpha=0.25 if window > 1 else 1.0, lw=0.8, label="train loss")
        if window > 1:
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, color="tab:blue", lw=1.5, label=f"train loss ({window}-step mean)")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", color="tab:red",
                label="validation loss" + (" (EMA)" if "val_loss_raw" in val[0] else ""))
        if "val_loss_raw" in val[0]:
            ax.plot([r["step"] for r in val], [r["val_loss_raw"] for r in val], "s--", color="tab:orange",
                    label="validation loss (raw weights)")
    ax.set_xlabel("step")
    ax.set_ylabel("diffusion loss")
    if train or val:
        vals = [v for _, v in train] + [r["val_loss"] for r in val]
        if vals and min(vals) > 0:
            ax.set_yscale("log")
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_valuation(records, path):
    """valuation_accuracy.png: within-group Spearman rho and fraction of the oracle's gain over meta-steps (one
    point per inner model, and their mean), and the final one-step gain of the worst / random / rater / oracle pick.

    ``records``: the rows of ``valuation.jsonl`` (:func:`noise_rater.valuation.summarize_valuation` plus ``step``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        return
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.6))
    for a, key, name in [(ax[0], "spearman_rho", "within-group Spearman rho(score, influence)"),
                         (ax[1], "fraction_of_oracle", "fraction of the oracle's gain captured")]:
        for m in range(len(records[0]["members"])):
            a.plot(steps, [r["members"][m][key] for r in records], ".", alpha=0.4, label=f"inner model {m}")
        a.plot(steps, [r[key] for r in records], "k-o", ms=3, label="mean")
        a.axhline(0, color="grey", lw=0.6)
        a.set_xlabel("meta-step"); a.set_ylabel(name, fontsize=8); a.legend(fontsize=7)
    last = records[-1]
    names = ["worst", "random", "rater", "oracle"]
    vals = [last["gain_worst"], last["gain_random"], last["gain_rater"], last["gain_oracle"]]
    ax[2].bar(names, vals, color=["tab:red", "tab:grey", "tab:blue", "tab:green"])
    ax[2].axhline(0, color="k", lw=0.5)
    ax[2].set_ylabel("one-step gain of the pick (mean c)", fontsize=8)
    ax[2].set_title(f"final (meta-step {last['step']})", fontsize=9)
    fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)


def plot_evidence(history, path):
    """meta_evidence.png: validation loss after the inner steps with the rater's weights vs uniform weights on
    the same batches (``meta_metrics.jsonl`` rows with ``val_loss_uniform``), and their difference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [h for h in history if "val_loss_uniform" in h and math.isfinite(h["outer_loss"])]
    if not pts:
        return
    steps = [h["step"] for h in pts]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    # the two curves nearly coincide: distinct markers and line styles keep both visible
    ax[0].plot(steps, [h["val_loss_uniform"] for h in pts], "o--", ms=5, mfc="none", label="uniform weights")
    ax[0].plot(steps, [h["outer_loss"] for h in pts], "x-", ms=5, lw=0.8, label="rater soft weights")
    ax[0].set_xlabel("meta-step"); ax[0].set_ylabel("val. loss after K inner steps"); ax[0].legend()
    gain = [h["val_loss_uniform"] - h["outer_loss"] for h in pts]
    ax[1].plot(steps, gain, ".", alpha=0.5)
    k = max(1, len(gain) // 10)
    if len(gain) >= k:
        run = [sum(gain[max(0, i - k + 1):i + 1]) / len(gain[max(0, i - k + 1):i + 1]) for i in range(len(gain))]
        ax[1].plot(steps, run, "-", label=f"running mean ({k})")
    ax[1].axhline(0, color="k", lw=0.5)
    ax[1].set_xlabel("meta-step"); ax[1].set_ylabel("uniform - weighted (>0: rater helps)"); ax[1].legend()
    fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)


@torch.no_grad()
def plot_rater(rater, x0, num_train_timesteps, path, class_labels=None, seed=0):
    """rater_analysis.png: what the rater prefers: score vs timestep, vs noise norm, vs cos(eps, x0), for x0
    `(B, C, H, W)` with one random timestep and noise each (its own generator seeded with ``seed``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = torch.Generator().manual_seed(seed)
    n = x0.shape[0]
    rater.eval()
    t = torch.randint(0, num_train_timesteps, (n,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    s = rater(x0, eps, t, class_labels=class_labels).scores
    d = eps[0].numel()
    norm = eps.flatten(1).norm(dim=1) / math.sqrt(d)
    corr = (eps.flatten(1) * x0.flatten(1)).sum(1) / (eps.flatten(1).norm(dim=1) * x0.flatten(1).norm(dim=1) + 1e-8)
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    for a, xv, name in zip(ax, [t.float(), norm, corr], ["timestep t", "||eps|| / sqrt(d)", "cos(eps, x0)"]):
        a.scatter(xv.numpy(), s.numpy(), s=4, alpha=0.5)
        a.set_xlabel(name); a.set_ylabel("rater score")
    fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)
    rater.train()
