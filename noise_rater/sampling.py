"""Noise selectors: who picks eps for each training sample.

All selectors share two call interfaces::

    # choose within a given pool of N candidates per sample (what noise_rater.training.training_step uses):
    noise = selector.select(x0, timesteps, candidates, class_labels=None, generator=None)
    # draw the candidates themselves with ``generator`` (for direct use):
    noise = selector(x0, timesteps, class_labels=None, generator=None)
    noise, weights = selector(x0, timesteps, generator=g, return_weights=True)

``candidates`` has shape `(B, N, C, H, W)`; ``noise`` has the shape of x0 `(B, C, H, W)`; ``weights``
`(B,)` are per-sample loss weights that keep the objective unbiased (all ones except for the
``"importance"`` rule). In ``select``, ``generator`` only feeds randomised rules (softmax /
importance sampling); no selector touches the global torch RNG when given a generator, so runs that
share the candidate pool (common random numbers) differ only in the choice.

* :class:`UniformNoiseSampler` -- eps ~ N(0, I), the standard objective.
* :class:`KNNNoiseSampler` -- per image, N candidates, keep the nearest to x0 (Improved Immiscible Diffusion).
* :class:`AssignmentNoiseSampler` -- one noise per image, assigned across the batch by linear
  assignment on squared distance (Immiscible Diffusion).
* :class:`NoiseSelectingSampler` -- NoiseRater hard selection: N candidates rated by a frozen
  :class:`NoiseRaterModel`, one kept per sample by argmax, softmax sampling or importance sampling.
"""

import os
from typing import Optional, Union

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from .modeling_noise_rater import NoiseRaterModel

SELECTION_RULES = ("argmax", "softmax", "importance")


def draw_candidates(x0: torch.Tensor, num_candidates: int, generator=None) -> torch.Tensor:
    """N Gaussian candidates per sample: `(B, C, H, W)` -> `(B, N, C, H, W)` on x0's device and dtype."""
    shape = (x0.shape[0], num_candidates) + tuple(x0.shape[1:])
    return randn_tensor(shape, generator=generator, device=x0.device, dtype=x0.dtype)


def _gather(candidates: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """candidates `(B, N, ...)`, index `(B,)` -> `(B, ...)`."""
    return candidates[torch.arange(candidates.shape[0], device=candidates.device), index]


def _finish(noise, weights, return_weights):
    return (noise, weights) if return_weights else noise


class UniformNoiseSampler:
    """eps ~ N(0, I): the standard diffusion objective."""

    def select(self, x0, timesteps, candidates, class_labels=None, generator=None, return_weights=False):
        """candidates `(B, N, C, H, W)` -> candidate 0 of each sample, `(B, C, H, W)` (a plain Gaussian draw)."""
        if candidates.ndim != x0.ndim + 1 or candidates.shape[0] != x0.shape[0] or candidates.shape[2:] != x0.shape[1:]:
            raise ValueError(f"candidates {tuple(candidates.shape)} do not match x0 {tuple(x0.shape)}: "
                             "expected (B, N, *x0.shape[1:]).")
        ones = torch.ones(x0.shape[0], device=x0.device, dtype=x0.dtype)
        return _finish(candidates[:, 0], ones, return_weights)

    def __call__(self, x0, timesteps=None, class_labels=None, generator=None, return_weights=False):
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return _finish(noise, torch.ones(x0.shape[0], device=x0.device, dtype=x0.dtype), return_weights)


class KNNNoiseSampler:
    """Per image, draw ``num_candidates`` noises and keep the one nearest to x0 in L2."""

    def __init__(self, num_candidates: int = 8):
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        self.num_candidates = num_candidates

    def select(self, x0, timesteps, candidates, class_labels=None, generator=None, return_weights=False):
        """candidates `(B, N, C, H, W)` -> the nearest to x0, `(B, C, H, W)`."""
        dist = (candidates - x0.unsqueeze(1)).flatten(2).pow(2).sum(-1)  # (B, N)
        noise = _gather(candidates, dist.argmin(dim=1))
        return _finish(noise, torch.ones(x0.shape[0], device=x0.device, dtype=x0.dtype), return_weights)

    def __call__(self, x0, timesteps=None, class_labels=None, generator=None, return_weights=False):
        cands = draw_candidates(x0, self.num_candidates, generator)
        return self.select(x0, timesteps, cands, class_labels, return_weights=return_weights)


class AssignmentNoiseSampler:
    """Immiscible Diffusion: draw B noises and assign them to the B images minimising the total
    squared distance (``scipy.optimize.linear_sum_assignment``). The noise is permuted, never the
    images, so labels stay aligned. With B == 1 this is plain Gaussian noise."""

    def select(self, x0, timesteps, candidates, class_labels=None, generator=None, return_weights=False):
        """Assign noises to images -> `(B, C, H, W)`.

        ``candidates`` is either a pool `(B, N, C, H, W)`, of which candidate 0 of every sample is used
        (the B noises permuted across the batch), or one noise per image `(B, C, H, W)`. This is a
        batch-level rule: the noise of sample i depends on the whole batch (so splitting a batch into
        micro-batches changes the selection).
        """
        from scipy.optimize import linear_sum_assignment

        if candidates.ndim == x0.ndim + 1:
            candidates = candidates[:, 0]
        if candidates.shape != x0.shape:
            raise ValueError(f"candidates {tuple(candidates.shape)} do not match x0 {tuple(x0.shape)}.")

        cost = torch.cdist(x0.flatten(1).double(), candidates.flatten(1).double()).pow(2)
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        perm = torch.as_tensor(cols[np.argsort(rows)], device=x0.device)
        noise = candidates[perm]
        return _finish(noise, torch.ones(x0.shape[0], device=x0.device, dtype=x0.dtype), return_weights)

    def __call__(self, x0, timesteps=None, class_labels=None, generator=None, return_weights=False):
        cands = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return self.select(x0, timesteps, cands, class_labels, return_weights=return_weights)


class NoiseSelectingSampler:
    r"""NoiseRater hard selection with a frozen rater.

    For each sample i, N candidates eps_i1..eps_iN ~ N(0, I) are scored in one batched no-grad pass,
    s_in = rater(x0_i, eps_in, t_i), and one is kept:

    * ``"argmax"``: eps_i = eps_{i, argmax_n s_in}; weight 1 (biased: the noise is no longer Gaussian).
    * ``"softmax"``: n ~ q_i = softmax(s_i / tau); weight 1 (biased).
    * ``"importance"``: n ~ q_i and weight w_i = 1 / (N q_in). Then E[w f(eps_sel)] = E_{eps~N(0,I)}[f(eps)]
      for every f, so the weighted training objective is the standard one (unbiased), while the
      samples concentrate where the rater's scores are high.

    Args:
        rater (:class:`NoiseRaterModel`): the (frozen) rater; put in eval mode, never updated here.
        num_candidates (`int`): N.
        selection (`str`): one of ``"argmax"``, ``"softmax"``, ``"importance"``.
        temperature (`float`): tau for the softmax rules.
        chunk_size (`int`): max number of (sample, candidate) pairs rated in one forward pass.
    """

    def __init__(
        self,
        rater: NoiseRaterModel,
        num_candidates: int = 8,
        selection: str = "argmax",
        temperature: float = 1.0,
        chunk_size: int = 4096,
    ):
        if selection not in SELECTION_RULES:
            raise ValueError(f"selection must be one of {SELECTION_RULES}, got {selection!r}")
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.rater = rater.eval().requires_grad_(False)
        self.num_candidates = num_candidates
        self.selection = selection
        self.temperature = float(temperature)
        self.chunk_size = chunk_size

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: Union[str, os.PathLike], *, subfolder: Optional[str] = None,
        torch_dtype: Optional[torch.dtype] = None, device=None, cache_dir=None, token=None,
        revision: Optional[str] = None, local_files_only: Optional[bool] = None, **kwargs,
    ) -> "NoiseSelectingSampler":
        """Load a rater (local folder or hub id, via ``NoiseRaterModel.from_pretrained``) and wrap it.

        Remaining ``kwargs`` go to the constructor (``num_candidates``, ``selection``, ...).
        """
        load_kwargs = dict(subfolder=subfolder, cache_dir=cache_dir, token=token, revision=revision)
        if torch_dtype is not None:
            load_kwargs["torch_dtype"] = torch_dtype
        if local_files_only is not None:
            load_kwargs["local_files_only"] = local_files_only
        rater = NoiseRaterModel.from_pretrained(pretrained_model_name_or_path, **load_kwargs)
        if device is not None:
            rater = rater.to(device)
        return cls(rater, **kwargs)

    @torch.no_grad()
    def score_candidates(self, x0, timesteps, candidates, class_labels=None) -> torch.Tensor:
        """Rate candidates in chunks. x0 `(B, C, H, W)`, timesteps `(B,)`, candidates `(B, N, C, H, W)`
        -> scores `(B, N)` in float32."""
        b, n = candidates.shape[:2]
        if candidates.shape[2:] != x0.shape[1:]:
            raise ValueError(f"candidates {tuple(candidates.shape)} do not match x0 {tuple(x0.shape)}")
        param = next(self.rater.parameters())
        dtype, device = param.dtype, param.device
        flat_x0 = x0.unsqueeze(1).expand_as(candidates).reshape(b * n, *x0.shape[1:])
        flat_c = candidates.reshape(b * n, *x0.shape[1:])
        t = torch.as_tensor(timesteps, device=x0.device).reshape(-1)
        t = (t.expand(b) if t.numel() == 1 else t).repeat_interleave(n)
        lab = None if class_labels is None else torch.as_tensor(class_labels, device=x0.device).repeat_interleave(n)
        out = []
        for s in range(0, b * n, self.chunk_size):
            e = s + self.chunk_size
            scores = self.rater(
                flat_x0[s:e].to(device, dtype), flat_c[s:e].to(device, dtype), t[s:e].to(device),
                class_labels=None if lab is None else lab[s:e].to(device),
            ).scores
            out.append(scores.float())
        scores = torch.cat(out).reshape(b, n).to(x0.device)
        if not torch.isfinite(scores).all():
            raise FloatingPointError("NoiseSelectingSampler: the rater returned non-finite scores.")
        return scores

    def select(self, x0, timesteps, candidates, class_labels=None, generator=None, return_weights=False):
        """Keep one of the given candidates `(B, N, C, H, W)` per sample -> noise `(B, C, H, W)`
        (and weights `(B,)` if ``return_weights``)."""
        scores = self.score_candidates(x0, timesteps, candidates, class_labels)
        n = candidates.shape[1]
        ones = torch.ones(x0.shape[0], device=x0.device, dtype=x0.dtype)
        if self.selection == "argmax":
            return _finish(_gather(candidates, scores.argmax(dim=1)), ones, return_weights)
        q = torch.softmax(scores / self.temperature, dim=1)  # (B, N)
        gen_device = generator.device if generator is not None else "cpu"
        index = torch.multinomial(q.to(gen_device), 1, generator=generator).squeeze(1).to(x0.device)
        noise = _gather(candidates, index)
        if self.selection == "softmax":
            return _finish(noise, ones, return_weights)
        q_sel = q.gather(1, index[:, None]).squeeze(1)
        return _finish(noise, (1.0 / (n * q_sel)).to(x0.dtype), return_weights)

    def __call__(self, x0, timesteps, class_labels=None, generator=None, return_weights=False):
        """Draw N candidates per sample with ``generator`` and keep one -> noise `(B, C, H, W)`."""
        candidates = draw_candidates(x0, self.num_candidates, generator)
        return self.select(x0, timesteps, candidates, class_labels, generator, return_weights)


def build_noise_sampler(
    kind: str,
    *,
    num_candidates: int = 8,
    rater_model_name_or_path: Optional[str] = None,
    selection_rule: str = "argmax",
    temperature: float = 1.0,
    device=None,
):
    """Factory used by the scripts: ``kind`` in {uniform, knn, assignment, rater}."""
    if kind == "uniform":
        return UniformNoiseSampler()
    if kind == "knn":
        return KNNNoiseSampler(num_candidates)
    if kind == "assignment":
        return AssignmentNoiseSampler()
    if kind == "rater":
        if not rater_model_name_or_path:
            raise ValueError("--noise_selection=rater needs --rater_model_name_or_path")
        return NoiseSelectingSampler.from_pretrained(
            rater_model_name_or_path, num_candidates=num_candidates, selection=selection_rule,
            temperature=temperature, device=device,
        )
    raise ValueError(f"Unknown noise selection {kind!r}; expected uniform, knn, assignment or rater.")
