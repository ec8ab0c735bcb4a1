"""Held-out diffusion loss on fixed validation triples (x0, eps, t), overall and per timestep band.

Everything here is deterministic for a given seed, so that different training methods (uniform noise vs.
NoiseRater-selected noise) are compared on *identical* validation triples.

* :func:`make_eval_triples`: a fixed, seeded set of (x0, eps, t) triples with stratified timesteps.
* :func:`validation_loss`: the plain diffusion loss under standard Gaussian noise (no noise selection, no
  weighting) on those triples; the loss itself is :func:`noise_rater.diffusion.per_sample_diffusion_loss`.
* :func:`make_validation_triples` / :func:`run_validation`: the same two steps as a training script uses them
  (triples from a validation ``Dataset``; the loss with raw and EMA weights, without touching the global RNG).

Images are float tensors of shape `(N, C, H, W)` with values in `[-1, 1]` (the diffusers convention).
"""

from typing import Dict, Optional, Tuple, Union

import torch

from ..diffusion import per_sample_diffusion_loss

__all__ = ["make_eval_triples", "validation_loss", "make_validation_triples", "run_validation"]


def make_eval_triples(
    x0: torch.Tensor,
    num_train_timesteps: int,
    *,
    seed: int,
    repeats: int = 1,
    class_labels: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    r"""Build a fixed set of validation triples (x0, eps, t) from a seeded CPU generator.

    Each of the `B` images is used ``repeats`` times (tiled: sample ``r * B + i`` is image ``i``), each time
    with its own standard Gaussian noise and timestep, giving `N = B * repeats` triples. Timesteps are
    *stratified* over `[0, T)`: `[0, T)` is cut into `N` equal strata, each stratum receives exactly one
    timestep (drawn uniformly inside it), and strata are assigned to samples by a random permutation. Hence
    every band of `[0, T)` of width `T / k` receives `N / k` timesteps (exactly, when `k` divides `N` and `T`),
    which lowers the variance of per-band validation losses compared with i.i.d. uniform `t`.

    The result depends only on (``x0``, ``num_train_timesteps``, ``seed``, ``repeats``, ``class_labels``), so
    the same triples can be reused to compare different training methods.

    Args:
        x0 (`torch.Tensor` of shape `(B, C, H, W)`): clean held-out images in `[-1, 1]`.
        num_train_timesteps (`int`): `T` of the training scheduler.
        seed (`int`): seed of the CPU ``torch.Generator`` drawing noise, timesteps and the permutation.
        repeats (`int`, defaults to 1): how many (eps, t) pairs per image.
        class_labels (`torch.Tensor` of shape `(B,)`, *optional*): tiled like ``x0``.

    Returns:
        `dict` with ``"x0"`` `(N, C, H, W)` float32, ``"noise"`` `(N, C, H, W)` float32, ``"timesteps"` `(N,)`
        int64 in `[0, T)`, and ``"class_labels"`` `(N,)` int64 when given. All on CPU.
    """
    if x0.ndim != 4:
        raise ValueError(f"x0 must have shape (B, C, H, W), got {tuple(x0.shape)}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    x0 = x0.detach().to("cpu", torch.float32)
    x0_rep = x0.repeat(repeats, 1, 1, 1).contiguous()
    n = x0_rep.shape[0]
    noise = torch.randn(x0_rep.shape, generator=gen, dtype=torch.float32)
    # Stratified timesteps: stratum j = [j T / N, (j + 1) T / N), one uniform draw per stratum.
    strata = torch.randperm(n, generator=gen).to(torch.float64)
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    timesteps = torch.floor((strata + u) * num_train_timesteps / n).long().clamp_(0, num_train_timesteps - 1)
    out = {"x0": x0_rep, "noise": noise, "timesteps": timesteps}
    if class_labels is not None:
        class_labels = torch.as_tensor(class_labels).detach().to("cpu", torch.long).reshape(-1)
        if class_labels.shape[0] != x0.shape[0]:
            raise ValueError(f"class_labels has {class_labels.shape[0]} entries for {x0.shape[0]} images")
        out["class_labels"] = class_labels.repeat(repeats)
    return out


def _band_edges(num_train_timesteps: int, bands: int) -> list:
    """Integer edges `e_0 = 0 < ... < e_bands = T`; band `k` is `e_k <= t < e_{k+1}` (equal ranges of t)."""
    return [int(round(k * num_train_timesteps / bands)) for k in range(bands + 1)]


def _module_device_dtype(model) -> Tuple[torch.device, Optional[torch.dtype]]:
    """Device and floating dtype of the first parameter (or buffer) of ``model``; CPU / None if it has none."""
    for getter in ("parameters", "buffers"):
        fn = getattr(model, getter, None)
        if fn is None:
            continue
        for p in fn():
            return p.device, (p.dtype if p.is_floating_point() else None)
    return torch.device("cpu"), None


@torch.no_grad()
def validation_loss(
    model,
    scheduler,
    triples: Dict[str, torch.Tensor],
    *,
    batch_size: int = 256,
    bands: int = 4,
) -> Dict[str, Union[float, list, int]]:
    r"""Plain mean diffusion loss on fixed validation triples, overall and per timestep band.

    `L = mean_i || model(x_t_i, t_i) - target_i ||^2 / d` with `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`,
    computed by :func:`noise_rater.diffusion.per_sample_diffusion_loss` (standard Gaussian noise as stored in
    ``triples``; no noise selection, no loss weighting). Batches are moved to the model's device and floating
    dtype; losses are accumulated in float64 on CPU. A ``torch.nn.Module`` model is put in eval mode for the
    evaluation and its previous mode restored afterwards.

    Args:
        model: denoiser called as ``model(x_t, t[, class_labels=...])`` (e.g. a ``UNet2DModel``).
        scheduler: training scheduler (``DDPMScheduler``); its ``config.num_train_timesteps`` defines the bands
            and its ``config.prediction_type`` the target.
        triples (`dict`): output of :func:`make_eval_triples` (``"x0"``, ``"noise"`` `(N, C, H, W)`,
            ``"timesteps"`` `(N,)`, optional ``"class_labels"`` `(N,)`).
        batch_size (`int`, defaults to 256): evaluation batch size (the result does not depend on it).
        bands (`int`, defaults to 4): number of timestep bands of equal width in `t`.

    Returns:
        `dict` with ``"loss"`` (float, mean over all N triples), ``"loss_band_k"`` for `k = 0..bands-1` (float,
        mean over triples with `e_k <= t < e_{k+1}`, NaN for an empty band), ``"band_edges"`` (list of
        `bands + 1` ints `[0, ..., T]`), ``"num_samples"`` (N).
    """
    x0_all, noise_all, t_all = triples["x0"], triples["noise"], triples["timesteps"]
    labels_all = triples.get("class_labels")
    n = x0_all.shape[0]
    if n == 0:
        raise ValueError("validation_loss needs at least one triple")
    num_train_timesteps = int(scheduler.config.num_train_timesteps)
    edges = _band_edges(num_train_timesteps, bands)
    device, dtype = _module_device_dtype(model)

    was_training = getattr(model, "training", None)
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        losses = []
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            x0 = x0_all[sl].to(device=device, dtype=dtype or x0_all.dtype)
            noise = noise_all[sl].to(device=device, dtype=dtype or noise_all.dtype)
            t = t_all[sl].to(device=device, dtype=torch.long)
            labels = labels_all[sl].to(device) if labels_all is not None else None
            loss = per_sample_diffusion_loss(model, scheduler, x0, noise, t, class_labels=labels)
            losses.append(loss.detach().to("cpu", torch.float64))
    finally:
        if isinstance(model, torch.nn.Module) and was_training:
            model.train()
    losses = torch.cat(losses)
    t_cpu = t_all.to("cpu", torch.long)
    band_idx = torch.bucketize(t_cpu, torch.tensor(edges[1:-1], dtype=torch.long), right=True)
    out: Dict[str, Union[float, list, int]] = {"loss": float(losses.mean())}
    for k in range(bands):
        mask = band_idx == k
        out[f"loss_band_{k}"] = float(losses[mask].mean()) if bool(mask.any()) else float("nan")
    out["band_edges"] = edges
    out["num_samples"] = int(n)
    return out



def make_validation_triples(validation, num_triples: int, num_train_timesteps: int, *, seed: int
                            ) -> Dict[str, torch.Tensor]:
    r"""Fixed validation triples from a validation ``Dataset``: images `i % len(validation)` for `i < N`.

    Each item of ``validation`` is a dict with ``"pixel_values"`` `(C, H, W)` in `[-1, 1]` and optionally
    ``"class_labels"`` (a scalar tensor), as :func:`noise_rater.data.prepare_datasets` returns them. The triples
    are :func:`make_eval_triples` of those `N` images with ``repeats=1``: eps ~ N(0, I), stratified t. They
    depend only on the validation split, `N`, `T` and ``seed``, so they are identical for every method and run.

    Args:
        validation: a non-empty indexable data set (``len`` and ``__getitem__``).
        num_triples (`int`): `N >= 1`.
        num_train_timesteps (`int`): `T` of the training scheduler.
        seed (`int`): seed of the noise and timesteps.

    Returns:
        `dict` as :func:`make_eval_triples` returns it.

    Raises:
        ValueError: ``validation`` is empty or ``num_triples < 1``.
    """
    if len(validation) == 0:
        raise ValueError("make_validation_triples needs a non-empty validation set")
    if num_triples < 1:
        raise ValueError(f"num_triples must be >= 1, got {num_triples}")
    items = [validation[i % len(validation)] for i in range(num_triples)]
    x0 = torch.stack([it["pixel_values"] for it in items])
    labels = torch.stack([torch.as_tensor(it["class_labels"]) for it in items]) if "class_labels" in items[0] else None
    return make_eval_triples(x0, num_train_timesteps, seed=seed, repeats=1, class_labels=labels)


def run_validation(model, ema, noise_scheduler, triples: Dict[str, torch.Tensor], *, batch_size: int = 256,
                   bands: int = 4) -> Dict[str, Union[float, list]]:
    r"""Held-out loss with the raw weights and, when ``ema`` is given, with the EMA weights.

    Runs :func:`validation_loss` inside ``torch.random.fork_rng`` (CPU and every CUDA device), so the global
    torch RNG streams of the training run are untouched. With ``ema`` (a ``diffusers.training_utils.EMAModel``
    of ``model``'s parameters) the EMA weights are copied into ``model`` for the second evaluation and the raw
    weights restored afterwards, also on error.

    Args:
        model: the denoiser (see :func:`validation_loss`).
        ema: ``EMAModel`` or None.
        noise_scheduler: the training scheduler.
        triples (`dict`): from :func:`make_eval_triples` / :func:`make_validation_triples`.
        batch_size (`int`, defaults to 256), bands (`int`, defaults to 4): see :func:`validation_loss`.

    Returns:
        `dict` with ``"band_edges"`` and ``"val_loss"``, ``"val_loss_band_k"`` for the weights that get saved
        (EMA if ``ema`` is given, else raw); with ``ema`` also ``"val_loss_raw"``, ``"val_loss_raw_band_k"``
        for the raw weights.
    """

    def flat(res, prefix):  # {"loss", "loss_band_k"} -> {prefix, prefix_band_k}
        return {prefix + key[len("loss"):]: value for key, value in res.items() if key.startswith("loss")}

    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        batch_size = max(int(batch_size), 1)
        raw = validation_loss(model, noise_scheduler, triples, batch_size=batch_size, bands=bands)
        record: Dict[str, Union[float, list]] = {"band_edges": raw["band_edges"]}
        if ema is None:
            record.update(flat(raw, "val_loss"))
        else:
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
            try:
                with_ema = validation_loss(model, noise_scheduler, triples, batch_size=batch_size, bands=bands)
            finally:
                ema.restore(model.parameters())
            record.update(flat(with_ema, "val_loss"))
            record.update(flat(raw, "val_loss_raw"))
    return record
