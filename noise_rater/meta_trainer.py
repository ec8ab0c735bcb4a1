"""Outer loop of stage 1: a population of inner diffusion models and the rater's outer optimiser.

Per meta-step, every member m of the population (P inner models, each with its own parameters
theta_m and inner-optimiser state) runs K rater-weighted inner steps on fresh training batches (B
images, each with one timestep and N candidate noises; weights softmax-normalised within each image's
candidates by default, see :func:`noise_rater.weighting.candidate_soft_weights`), is scored on a
validation batch, and contributes dJ_m/dphi (:func:`noise_rater.bilevel.meta_gradient`: one
forward-mode JVP for K = 1, backpropagation through the unrolled steps for K > 1). The rater phi takes one Adam step on the mean meta-gradient (clipped by norm). Each
member then keeps its updated, detached theta_m, so members keep training across meta-steps;
member m is re-initialised whenever its age reaches ``inner_model_lifetime``; initial ages are
staggered (age_m = m * lifetime / P), so the population always spans early to late training.
"""

import json
import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from safetensors.torch import load_file, save_file

from .bilevel import InnerState, meta_gradient, unroll, validation_loss_at
from .training_utils import NonFiniteError
from .valuation import evaluate_valuation

Batch = Mapping[str, torch.Tensor]


def add_noise_and_timesteps(
    x0: torch.Tensor, num_train_timesteps: int, generator: torch.Generator, class_labels=None,
    num_candidates: Optional[int] = None,
) -> Dict[str, torch.Tensor]:
    """Complete a batch of clean images into a meta-batch: eps ~ N(0, I) and t ~ U{0..T-1}.

    x0 `(B, C, H, W)` -> ``{"x0", "noise", "timesteps" (B,), ["class_labels" (B,)]}`` with noise of shape
    `(B, C, H, W)` (``num_candidates=None``) or `(B, N, C, H, W)` (N candidates per image, the grouped
    layout), all randomness drawn from ``generator`` (a CPU generator; tensors are moved to x0's device).
    """
    shape = tuple(x0.shape) if num_candidates is None else (x0.shape[0], int(num_candidates), *x0.shape[1:])
    noise = torch.randn(shape, generator=generator, dtype=x0.dtype).to(x0.device)
    t = torch.randint(0, num_train_timesteps, (x0.shape[0],), generator=generator).to(x0.device)
    out = {"x0": x0, "noise": noise, "timesteps": t}
    if class_labels is not None:
        out["class_labels"] = class_labels.to(x0.device)
    return out


def held_out_valuation_batches(
    dataset, num_groups: int, num_candidates: int, val_batch_size: int, num_train_timesteps: int, seed: int,
    device=None,
) -> Optional[Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]]:
    """Fixed held-out data for :meth:`MetaTrainer.valuation_report`, drawn from ``dataset`` (a validation
    split of ``{"pixel_values", ["class_labels"]}`` items) with a generator seeded by ``seed`` alone.

    Returns:
        ``(groups, val_batch)``: ``min(num_groups, len // 2)`` images with N candidate noises each (noise
        `(G, N, C, H, W)`) and up to ``val_batch_size`` other images with one noise each; ``None`` if fewer
        than 2 groups fit (a validation split of fewer than 4 images).
    """
    n_val = len(dataset)
    n_groups = min(int(num_groups), n_val // 2)
    if n_groups < 2:
        return None
    g = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n_val, generator=g)

    def stack(idx):
        items = [dataset[int(i)] for i in idx]
        out = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        x0 = out["pixel_values"] if device is None else out["pixel_values"].to(device)
        return x0, out.get("class_labels")

    x0, labels = stack(order[:n_groups])
    groups = add_noise_and_timesteps(x0, num_train_timesteps, g, labels, num_candidates=num_candidates)
    xv, lv = stack(order[n_groups:n_groups + min(n_val - n_groups, int(val_batch_size))])
    return groups, add_noise_and_timesteps(xv, num_train_timesteps, g, lv)


class MetaTrainer:
    r"""Meta-trains a rater with a population of inner diffusion models.

    Args:
        rater: :class:`NoiseRaterModel` (trained in place).
        unet_factory: ``factory() -> nn.Module`` making a freshly initialised inner denoiser (it is
            called under a forked, seeded RNG so re-initialisations are reproducible). The first
            model made also serves as the functional template (its own parameters are never used
            after initialisation).
        scheduler: ``DDPMScheduler``.
        population_size: P.
        inner_steps: K, unrolled inner steps per meta-step.
        inner_lr, inner_optimizer, temperature, truncate_window, weighting_scope: see
            :func:`noise_rater.bilevel.unroll` (``weighting_scope`` "candidates" by default).
        meta_gradient_method: ``"auto"`` (forward-mode for K = 1, reverse otherwise), ``"forward"`` or
            ``"reverse"`` (see :func:`noise_rater.bilevel.meta_gradient`).
        jvp_chunk_size: samples per forward-mode pass of the K = 1 meta-gradient (``None``: all at once);
            smaller chunks lower the peak memory at the same result.
        inner_model_lifetime: meta-steps after which a member is re-initialised.
        outer_lr, outer_betas, outer_weight_decay: the rater's Adam(W) optimiser.
        max_grad_norm: clip the mean meta-gradient to this norm (``None``: no clipping).
        seed: seeds member initialisations.
        grad_reduce: ``fn(list_of_tensors) -> list_of_tensors`` averaging meta-gradients across
            processes (data parallel); identity by default.
        nonfinite: ``"raise"`` (default) stops at a non-finite meta-loss/meta-gradient with an error
            naming the step and quantity; ``"skip"`` skips the outer update and counts it.
        device: where the inner models live.
    """

    def __init__(
        self,
        rater: torch.nn.Module,
        unet_factory: Callable[[], torch.nn.Module],
        scheduler,
        *,
        population_size: int = 4,
        inner_steps: int = 2,
        inner_lr: float = 1e-3,
        inner_optimizer: str = "adam",
        inner_model_lifetime: int = 200,
        temperature: float = 1.0,
        truncate_window: Optional[int] = None,
        weighting_scope: str = "candidates",
        meta_gradient_method: str = "auto",
        jvp_chunk_size: Optional[int] = 32,
        outer_lr: float = 1e-3,
        outer_betas: Tuple[float, float] = (0.9, 0.999),
        outer_weight_decay: float = 0.0,
        max_grad_norm: Optional[float] = 1.0,
        seed: int = 0,
        grad_reduce: Optional[Callable[[List[torch.Tensor]], List[torch.Tensor]]] = None,
        nonfinite: str = "raise",
        device=None,
    ):
        for name, val in [("population_size", population_size), ("inner_steps", inner_steps),
                          ("inner_model_lifetime", inner_model_lifetime)]:
            if int(val) < 1:
                raise ValueError(f"{name} must be >= 1, got {val!r}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        self.rater = rater
        self.unet_factory = unet_factory
        self.scheduler = scheduler
        self.population_size = population_size
        self.inner_steps = inner_steps
        self.inner_lr = inner_lr
        self.inner_optimizer = inner_optimizer
        self.lifetime = inner_model_lifetime
        self.temperature = temperature
        self.truncate_window = truncate_window
        self.weighting_scope = weighting_scope
        self.meta_gradient_method = meta_gradient_method
        self.jvp_chunk_size = jvp_chunk_size
        self.max_grad_norm = max_grad_norm
        self.seed = seed
        self.grad_reduce = grad_reduce
        self.nonfinite = nonfinite
        self.device = device if device is not None else next(rater.parameters()).device
        self.optimizer = torch.optim.AdamW(
            [p for p in rater.parameters() if p.requires_grad], lr=outer_lr, betas=outer_betas,
            weight_decay=outer_weight_decay,
        )
        self.template = self._new_unet(0, -1)
        self.template.requires_grad_(False)
        self.members: List[InnerState] = []
        self.ages: List[int] = []
        self.resets: List[int] = []
        for m in range(population_size):
            self.members.append(self._fresh_state(m, 0))
            self.ages.append((m * inner_model_lifetime) // population_size)
            self.resets.append(0)
        self.step = 0
        self.skipped_steps = 0

    # -- population ---------------------------------------------------------------------------
    def _new_unet(self, member: int, generation: int) -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + member * 10_007 + generation + 1)
            unet = self.unet_factory()
        return unet.to(self.device)

    def _fresh_state(self, member: int, generation: int) -> InnerState:
        unet = self._new_unet(member, generation)
        state = InnerState.from_module(unet)
        for name, p in state.params.items():
            state.params[name] = p.to(self.device)
        return state

    def _reset_expired(self) -> List[int]:
        reset = []
        for m in range(self.population_size):
            if self.ages[m] >= self.lifetime:
                self.resets[m] += 1
                self.members[m] = self._fresh_state(m, self.resets[m])
                self.ages[m] = 0
                reset.append(m)
        return reset

    # -- one meta-step ------------------------------------------------------------------------
    def meta_step(
        self, member_batches: Sequence[Tuple[Sequence[Batch], Batch]], compare_uniform: bool = False
    ) -> Dict[str, float]:
        """One outer update.

        Args:
            member_batches: for each member, ``(train_batches, val_batch)``: K inner batches and one
                validation batch (see :func:`add_noise_and_timesteps`).
            compare_uniform: also unroll each member with uniform weights (w = 1) on the same
                batches and report its validation loss (``val_loss_uniform``): the evidence of
                what the rater's weighting buys at this point of training.

        Returns:
            metrics: ``outer_loss`` (mean validation loss after K weighted steps, before the rater
            update), ``grad_norm`` (before clipping), optionally ``val_loss_uniform``, and
            ``skipped`` (1.0 if the update was skipped for a non-finite value).
        """
        if len(member_batches) != self.population_size:
            raise ValueError(f"expected batches for {self.population_size} members, got {len(member_batches)}")
        params = [p for p in self.rater.parameters() if p.requires_grad]
        total = [torch.zeros_like(p) for p in params]
        outer_losses, uniform_losses, new_states = [], [], []
        bad = None
        self.rater.train()
        for m, (train_batches, val_batch) in enumerate(member_batches):
            if len(train_batches) != self.inner_steps:
                raise ValueError(f"member {m}: expected {self.inner_steps} inner batches, got {len(train_batches)}")
            state = self.members[m]
            mg = meta_gradient(
                self.rater, self.template, self.scheduler, train_batches, val_batch,
                method=self.meta_gradient_method, inner_lr=self.inner_lr, inner_optimizer=self.inner_optimizer,
                temperature=self.temperature, state=state, truncate_window=self.truncate_window,
                weighting_scope=self.weighting_scope, chunk_size=self.jvp_chunk_size,
            )
            J, inner = mg.value, mg.inner
            # A non-finite value is only recorded here: every process must still reach the gradient
            # all-reduce below, which also tells all of them whether any process saw one.
            if not all(bool(torch.isfinite(w).all()) for w in inner.weights):
                bad = bad or f"rater score (soft weights of inner model {m})"
                continue
            if not torch.isfinite(J):
                bad = bad or f"meta-loss (validation loss of inner model {m})"
                continue
            for acc, g in zip(total, mg.grads):
                if g is not None:
                    acc.add_(g.detach())
            outer_losses.append(float(J.detach()))
            new_states.append(inner.state.detached())
            del J, inner, mg
            if compare_uniform:
                uni = unroll(None, self.template, self.scheduler, train_batches, inner_lr=self.inner_lr,
                             inner_optimizer=self.inner_optimizer, state=state, create_graph=False)
                with torch.no_grad():
                    uniform_losses.append(float(validation_loss_at(self.template, self.scheduler,
                                                                   uni.state.params, val_batch)))
        total = [g / self.population_size for g in total]
        flag = torch.tensor([0.0 if bad is None else 1.0], device=total[0].device, dtype=total[0].dtype)
        if self.grad_reduce is not None:
            *total, flag = self.grad_reduce(total + [flag])
        if bad is not None or float(flag) > 0:
            self._nonfinite(bad or "meta-loss or rater score on another process")
            return self._skipped(outer_losses)
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in total]))
        if not torch.isfinite(grad_norm):
            self._nonfinite("meta-gradient of the rater")
            return self._skipped(outer_losses)
        if self.max_grad_norm is not None:
            scale = torch.clamp(self.max_grad_norm / (grad_norm + 1e-6), max=1.0)
            total = [g * scale for g in total]
        for p, g in zip(params, total):
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # members keep their updated parameters and optimiser states
        self.members = new_states
        self.ages = [a + 1 for a in self.ages]
        self._reset_expired()
        self.step += 1
        metrics = {"outer_loss": sum(outer_losses) / len(outer_losses), "grad_norm": float(grad_norm), "skipped": 0.0}
        if compare_uniform:
            metrics["val_loss_uniform"] = sum(uniform_losses) / len(uniform_losses)
        return metrics

    def valuation_report(self, groups: Batch, val_batch: Batch) -> List[Dict[str, float]]:
        """Valuation accuracy of the rater for every member of the population (they span ages from fresh
        to ``inner_model_lifetime``): :func:`noise_rater.valuation.evaluate_valuation` on held-out
        ``groups`` (x0, noise `(G, N, C, H, W)`, timesteps) against the exact one-step influence at each
        member's current parameters, with ``val_batch`` defining L_val. Each dict also has ``member`` and
        ``age`` (meta-steps since its last initialisation)."""
        out = []
        for m, state in enumerate(self.members):
            metrics = evaluate_valuation(self.rater, self.template, self.scheduler, groups, val_batch,
                                         params=state.params)
            out.append(dict(metrics, member=m, age=self.ages[m]))
        return out

    def _nonfinite(self, what: str):
        if self.nonfinite == "raise":
            raise NonFiniteError(f"non-finite {what} at meta-step {self.step}")
        self.skipped_steps += 1

    def _skipped(self, outer_losses):
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"outer_loss": float("nan"), "grad_norm": float("nan"), "skipped": 1.0}

    # -- state ----------------------------------------------------------------------------------
    def save_state(self, directory: str) -> None:
        """Population (safetensors), outer optimiser (torch state dict) and counters (JSON)."""
        tensors = {}
        for m, st in enumerate(self.members):
            for kind, d in (("params", st.params), ("exp_avg", st.exp_avg), ("exp_avg_sq", st.exp_avg_sq)):
                for name, t in d.items():
                    tensors[f"member{m}.{kind}.{name}"] = t.detach().contiguous().cpu()
        save_file(tensors, os.path.join(directory, "population.safetensors"))
        torch.save(self.optimizer.state_dict(), os.path.join(directory, "outer_optimizer.pt"))
        meta = {"step": self.step, "ages": self.ages, "resets": self.resets, "skipped_steps": self.skipped_steps,
                "inner_steps_taken": [st.step for st in self.members], "population_size": self.population_size}
        with open(os.path.join(directory, "meta_trainer.json"), "w") as f:
            json.dump(meta, f, indent=2)

    def load_state(self, directory: str) -> None:
        """Inverse of :meth:`save_state` (the rater's own weights are restored by the caller)."""
        with open(os.path.join(directory, "meta_trainer.json")) as f:
            meta = json.load(f)
        if meta["population_size"] != self.population_size:
            raise ValueError(
                f"checkpoint {directory} has population_size={meta['population_size']}, "
                f"but --population_size={self.population_size}"
            )
        tensors = load_file(os.path.join(directory, "population.safetensors"), device=str(self.device))
        members = []
        for m in range(self.population_size):
            parts = {"params": {}, "exp_avg": {}, "exp_avg_sq": {}}
            prefix = f"member{m}."
            for key, t in tensors.items():
                if key.startswith(prefix):
                    kind, name = key[len(prefix):].split(".", 1)
                    parts[kind][name] = t
            members.append(InnerState(parts["params"], parts["exp_avg"], parts["exp_avg_sq"],
                                      meta["inner_steps_taken"][m]))
        self.members = members
        self.optimizer.load_state_dict(
            torch.load(os.path.join(directory, "outer_optimizer.pt"), map_location="cpu", weights_only=True)
        )
        self.step, self.ages, self.resets = meta["step"], meta["ages"], meta["resets"]
        self.skipped_steps = meta.get("skipped_steps", 0)
