r"""The stage-2 training step as one call, for any diffusers-style training loop.

One step of diffusion training with a noise selector (stage 2 of NoiseRater):

    t_i ~ Uniform{0, ..., T-1}                               (timestep generator)
    eps_i1..eps_iN ~ N(0, I)                                 (candidate-pool generator)
    eps_i = selector.select(x0, t, pool)  (+ importance weights a_i)   (selection generator)
    w_i = a_i * weighting_i                                   uniform / Min-SNR-gamma / rater soft weights
    l_i = || model(x_t, t) - target ||^2 / d                  (noise_rater.diffusion, one definition)
    loss = mean_i w_i * l_i                                   what the training loop backpropagates

:func:`training_step` returns a :class:`TrainingStepOutput` holding all of these; the loop keeps
``accelerator.backward(out.loss)``, the optimiser, EMA and logging. It replaces, in diffusers'
``train_unconditional.py``::

    noise = torch.randn(clean_images.shape, device=clean_images.device)
    timesteps = torch.randint(0, T, (bsz,), device=clean_images.device).long()
    noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
    model_output = model(noisy_images, timesteps).sample
    loss = F.mse_loss(model_output.float(), noise.float())

by ``loss = training_step(model, noise_scheduler, clean_images, selector, generators=g).loss``.

Common random numbers (CRN): the three random streams come from three separate generators
(:class:`NoiseGenerators`), none of which depends on the selector. The full pool of N candidates is
drawn for every selector (also the uniform one, which trains on candidate 0), so two runs with the
same seed and different selectors see the same timesteps and the same candidate pools at every step
and differ only in which candidate they train on.
"""

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np
import torch

from .diffusion import per_sample_diffusion_loss, sample_timesteps
from .modeling_noise_rater import NoiseRaterModel
from .sampling import build_noise_sampler, draw_candidates
from .training_utils import UsageError
from .weighting import compute_snr, min_snr_weights, soft_weights

logger = logging.getLogger(__name__)

LOSS_WEIGHTINGS = ("uniform", "min_snr", "rater_soft")
GENERATOR_NAMES = ("timesteps", "candidates", "selection")


def _stream_seed(seed: int, process_index: int, stream: int) -> int:
    """A 63-bit seed for stream ``stream`` of process ``process_index`` (numpy ``SeedSequence`` mixing)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(process_index), int(stream)])
    return int(state.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


@dataclass
class NoiseGenerators:
    """The three CPU random streams of a stage-2 step, independent of the noise selector.

    Attributes:
        timesteps: draws t `(B,)`.
        candidates: draws the candidate pool `(B, N, C, H, W)`.
        selection: feeds randomised selection rules (softmax / importance multinomial draws).

    Draws happen on the CPU and are moved to the data's device, so a seed gives the same numbers on
    every device. :meth:`state_dict` / :meth:`load_state_dict` give their states (uint8 tensors),
    e.g. for ``noise_rater.checkpointing.capture_rng_state(generators.as_dict())``.
    """

    timesteps: torch.Generator
    candidates: torch.Generator
    selection: torch.Generator

    @classmethod
    def from_seed(cls, seed: int, process_index: int = 0) -> "NoiseGenerators":
        """Seed the three streams from ``(seed, process_index)``: distinct, reproducible, method-independent."""
        gens = [torch.Generator(device="cpu").manual_seed(_stream_seed(seed, process_index, k))
                for k in range(len(GENERATOR_NAMES))]
        return cls(*gens)

    def as_dict(self) -> Dict[str, torch.Generator]:
        """``{"timesteps": ..., "candidates": ..., "selection": ...}``."""
        return {name: getattr(self, name) for name in GENERATOR_NAMES}

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {name: g.get_state() for name, g in self.as_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = [name for name in GENERATOR_NAMES if name not in state]
        if missing:
            raise KeyError(f"NoiseGenerators state lacks {missing}; it has {sorted(state)}.")
        for name, g in self.as_dict().items():
            g.set_state(state[name])


@dataclass
class TrainingStepOutput:
    """What :func:`training_step` returns.

    Attributes:
        loss: scalar, mean_i w_i l_i, in the autograd graph of the denoiser (backpropagate this).
        per_sample_loss: `(B,)` l_i in float32 (float64 for a float64 model), in the graph.
        weights: `(B,)` w_i in the same dtype (detached): selector importance weights x loss weighting.
        timesteps: `(B,)` int64 t_i.
        noise: `(B, C, H, W)` the chosen eps_i.
        select_time_s: seconds spent drawing the pool, selecting and weighting (device-synchronised).
        selection_failed: True if ``catch_nonfinite_scores`` caught non-finite rater scores; then
            ``noise`` is zeros and ``weights`` ones, and the loop must not apply this step.
    """

    loss: torch.Tensor
    per_sample_loss: torch.Tensor
    weights: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor
    select_time_s: float
    selection_failed: bool = False

    def logs(self) -> Dict[str, float]:
        """Scalars for a tracker: selection time and the spread of the weights."""
        w = self.weights
        return {"select_time_s": self.select_time_s, "weight_mean": float(w.mean()), "weight_min": float(w.min()),
                "weight_max": float(w.max())}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def with_model_kwargs(model: Callable, model_kwargs: Optional[Mapping[str, Any]]) -> Callable:
    """``f(x_t, t, class_labels=None)`` calling ``model(x_t, t, [class_labels=...], **model_kwargs)``.

    E.g. ``model_kwargs={"encoder_hidden_states": text_embeddings}`` for ``UNet2DConditionModel``.
    """
    if not model_kwargs:
        return model
    extra = dict(model_kwargs)

    def denoiser(x_t, t, class_labels=None):
        if class_labels is None:
            return model(x_t, t, **extra)
        return model(x_t, t, class_labels=class_labels, **extra)

    return denoiser


def loss_weights(
    loss_weighting: str,
    scheduler,
    x0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    class_labels: Optional[torch.Tensor] = None,
    snr_gamma: float = 5.0,
    rater: Optional[torch.nn.Module] = None,
    rater_temperature: float = 1.0,
) -> torch.Tensor:
    r"""Per-sample loss weights `(B,)` float32 for the chosen (x0, eps, t).

    * ``"uniform"``: w = 1.
    * ``"min_snr"``: Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
      Weighting Strategy", eq. 8 and its eps / v forms), see :func:`noise_rater.weighting.min_snr_weights`.
    * ``"rater_soft"``: w = B softmax(s / tau) over the batch with s = rater(x0, eps, t) (no grad): a
      batch-level weighting (each w_i depends on the whole batch).

    Raises:
        ValueError: unknown ``loss_weighting``, or ``"rater_soft"`` without a rater.
        FloatingPointError: the rater returned non-finite scores.
    """
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}")
    ones = torch.ones(x0.shape[0], device=x0.device, dtype=torch.float32)
    if loss_weighting == "uniform":
        return ones
    if loss_weighting == "min_snr":
        snr = compute_snr(scheduler.alphas_cumprod, timesteps)
        return min_snr_weights(snr, snr_gamma, scheduler.config.prediction_type).float()
    if rater is None:
        raise ValueError("loss_weighting='rater_soft' needs a rater.")
    param = next(rater.parameters())
    with torch.no_grad():
        scores = rater(x0.to(param.device, param.dtype), noise.to(param.device, param.dtype),
                       timesteps.to(param.device), class_labels=class_labels).scores
    if not bool(torch.isfinite(scores).all()):
        raise FloatingPointError("non-finite rater scores (loss_weighting='rater_soft')")
    return soft_weights(scores.float(), rater_temperature).to(x0.device)


def training_step(
    model: Callable,
    scheduler,
    x0: torch.Tensor,
    selector,
    *,
    generators: Optional[NoiseGenerators] = None,
    num_candidates: int = 8,
    class_labels: Optional[torch.Tensor] = None,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    loss_weighting: str = "uniform",
    snr_gamma: float = 5.0,
    rater: Optional[torch.nn.Module] = None,
    rater_temperature: float = 1.0,
    timesteps: Optional[torch.Tensor] = None,
    candidates: Optional[torch.Tensor] = None,
    catch_nonfinite_scores: bool = False,
) -> TrainingStepOutput:
    r"""One stage-2 step: timesteps -> candidate pool -> selected eps -> weights -> per-sample loss.

    Args:
        model: the denoiser, called as ``model(x_t, t, class_labels=...)`` (``UNet2DModel``, a DiT; the
            label is omitted when ``class_labels`` is None) plus ``**model_kwargs``; any callable with
            that signature works (e.g. a ``functools.partial`` of ``torch.func.functional_call``). Its
            output may be a tensor, a tuple or an object with ``.sample``.
        scheduler: a ``DDPMScheduler`` (``add_noise``, ``get_velocity``, ``alphas_cumprod``,
            ``config.num_train_timesteps`` and ``config.prediction_type``).
        x0 (`torch.Tensor` of shape `(B, C, H, W)`): clean images or latents (any channel count).
        selector: any object with ``select(x0, timesteps, candidates, class_labels=None,
            generator=None, return_weights=False)`` returning ``(noise (B, C, H, W), weights (B,))``
            with ``return_weights=True`` (the selectors of :mod:`noise_rater.sampling`).
        generators: the three streams (:class:`NoiseGenerators`); None uses the global torch RNG.
        num_candidates: N, the pool size per sample (drawn for every selector, see the module doc).
        class_labels (`(B,)`, optional): passed to the denoiser, the selector and the rater.
        model_kwargs: extra keyword arguments of every denoiser call, e.g.
            ``{"encoder_hidden_states": h}`` `(B, L, D)` for ``UNet2DConditionModel``.
        loss_weighting, snr_gamma, rater, rater_temperature: see :func:`loss_weights`; the result
            multiplies the selector's importance weights.
        timesteps (`(B,)`, optional), candidates (`(B, N, C, H, W)`, optional): use these instead of
            drawing them (the corresponding generator is then not advanced).
        catch_nonfinite_scores: on non-finite rater scores (selector or ``rater_soft``) return with
            ``selection_failed=True`` instead of raising, so that data-parallel processes can agree on
            skipping the step before any of them runs a backward pass.

    Returns:
        :class:`TrainingStepOutput`.

    Raises:
        ValueError: bad ``num_candidates``, ``loss_weighting`` or shapes.
        FloatingPointError: non-finite rater scores (unless ``catch_nonfinite_scores``).
    """
    if x0.ndim < 2:
        raise ValueError(f"x0 must be batched (B, C, ...), got shape {tuple(x0.shape)}")
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}")
    gens = generators if generators is not None else NoiseGenerators(None, None, None)
    batch_size, device = x0.shape[0], x0.device

    _sync(device)
    start = time.perf_counter()
    if timesteps is None:
        timesteps = sample_timesteps(batch_size, scheduler.config.num_train_timesteps, generator=gens.timesteps,
                                     device=device)
    if candidates is None:
        candidates = draw_candidates(x0, num_candidates, generator=gens.candidates)
    if candidates.shape[0] != batch_size or candidates.shape[2:] != x0.shape[1:]:
        raise ValueError(f"candidates {tuple(candidates.shape)} do not match x0 {tuple(x0.shape)}.")
    failed = False
    try:
        noise, weights = selector.select(x0, timesteps, candidates, class_labels=class_labels,
                                         generator=gens.selection, return_weights=True)
        weights = weights.float() * loss_weights(
            loss_weighting, scheduler, x0, noise, timesteps, class_labels=class_labels, snr_gamma=snr_gamma,
            rater=rater, rater_temperature=rater_temperature)
    except FloatingPointError:
        if not catch_nonfinite_scores:
            raise
        failed = True
        noise = torch.zeros_like(x0)
        weights = torch.ones(batch_size, device=device, dtype=torch.float32)
    _sync(device)
    select_time = time.perf_counter() - start

    per_sample = per_sample_diffusion_loss(with_model_kwargs(model, model_kwargs), scheduler, x0, noise, timesteps,
                                           class_labels=class_labels)
    per_sample = per_sample if per_sample.dtype == torch.float64 else per_sample.float()
    weights = weights.detach().to(per_sample.dtype)
    loss = (weights * per_sample).mean()
    return TrainingStepOutput(loss=loss, per_sample_loss=per_sample, weights=weights, timesteps=timesteps,
                              noise=noise, select_time_s=select_time, selection_failed=failed)


def build_selector_and_rater(
    noise_selection: str,
    *,
    num_candidates: int = 8,
    loss_weighting: str = "uniform",
    rater_model_name_or_path: Optional[str] = None,
    selection_rule: str = "argmax",
    selection_temperature: float = 1.0,
    in_channels: Optional[int] = None,
    class_conditional: bool = False,
    resolution: Optional[int] = None,
    device=None,
):
    """The selector for :func:`training_step` and the frozen rater (or None) that it and ``rater_soft`` use.

    ``noise_selection`` in {uniform, knn, assignment, rater, oracle}; for ``"oracle"`` the selector returned is
    ``None``: :class:`noise_rater.valuation.OracleNoiseSelector` needs the model being trained, so the caller
    builds it once that model exists. A rater is loaded from
    ``rater_model_name_or_path`` (folder or hub id) for ``noise_selection="rater"`` or
    ``loss_weighting="rater_soft"``, in eval mode without gradients.

    Raises:
        UsageError: the rater cannot be loaded, its ``in_channels`` differs from ``in_channels`` (the
            images' or latents' channels), or it is class-conditional while ``class_conditional`` is False.
        A rater whose ``sample_size`` differs from ``resolution`` gets a warning (its scores may not transfer).
    """
    selector, rater = None, None
    path = rater_model_name_or_path
    if path and (noise_selection == "rater" or loss_weighting == "rater_soft") and not os.path.isdir(path) and (
            os.path.isabs(path) or path.startswith(".") or path.count("/") != 1):
        raise UsageError(f"--rater_model_name_or_path {path!r}: no such folder (and not a Hub id 'owner/name').")
    try:
        if noise_selection == "rater":
            selector = build_noise_sampler("rater", num_candidates=num_candidates,
                                           rater_model_name_or_path=rater_model_name_or_path,
                                           selection_rule=selection_rule, temperature=selection_temperature,
                                           device=device)
            rater = selector.rater
        elif loss_weighting == "rater_soft":
            rater = NoiseRaterModel.from_pretrained(rater_model_name_or_path).to(device)
            rater = rater.eval().requires_grad_(False)
    except (OSError, ValueError) as e:
        raise UsageError(f"--rater_model_name_or_path {rater_model_name_or_path!r}: cannot load the rater ({e}).") \
            from None
    if selector is None and noise_selection != "oracle":
        selector = build_noise_sampler(noise_selection, num_candidates=num_candidates)
    if rater is not None and in_channels is not None and rater.config.in_channels != in_channels:
        raise UsageError(f"The rater has in_channels={rater.config.in_channels}, the data have {in_channels} "
                         "channel(s).")
    size = None if rater is None else rater.config.sample_size
    if resolution is not None and size is not None and size != resolution:
        logger.warning("The rater was trained at sample_size=%s but scores %dx%d inputs here; its scores may not "
                       "transfer to another resolution.", size, resolution, resolution)
    if rater is not None and rater.config.num_class_embeds is not None and not class_conditional:
        raise UsageError(f"The rater is class-conditional (num_class_embeds={rater.config.num_class_embeds}); "
                         "pass --class_conditional.")
    return selector, rater
