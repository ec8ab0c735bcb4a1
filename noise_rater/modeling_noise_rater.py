"""The rater: a small network that scores one noise realisation eps for an image x0 at timestep t.

Paper symbols: x0 (clean image), eps (noise), t (timestep), s = rater(x0, eps, t) (score).
Higher scores mean "this noise is more useful for training on x0 at t".
"""

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput


@dataclass
class NoiseRaterOutput(BaseOutput):
    """Output of :class:`NoiseRaterModel`.

    Args:
        scores (`torch.Tensor` of shape `(B,)`): one score per (x0, eps, t) triple.
    """

    scores: torch.Tensor


class _FiLMBlock(nn.Module):
    """conv3x3 (stride s) -> GroupNorm -> FiLM(temb) -> SiLU."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, stride: int, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1)
        self.norm = nn.GroupNorm(min(groups, out_ch), out_ch)
        self.film = nn.Linear(temb_dim, 2 * out_ch)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv(h))
        scale, shift = self.film(temb)[:, :, None, None].chunk(2, dim=1)
        return F.silu(h * (1 + scale) + shift)


class NoiseRaterModel(ModelMixin, ConfigMixin):
    r"""Scores a noise realisation eps for a clean image x0 at diffusion timestep t.

    The network sees, per pixel, the channels ``[x0, eps, x0 * eps, eps**2]`` (so that global
    pooling can directly express the correlation <x0, eps> and the norm |eps|^2), a sinusoidal
    timestep embedding (diffusers ``Timesteps`` + ``TimestepEmbedding``), and optionally a class
    embedding. A few strided convolutions modulated by the embedding (FiLM), global average and
    standard-deviation pooling and an MLP head give one scalar per sample. It is resolution
    agnostic; ``sample_size`` is recorded for documentation and for the sampler's checks.

    Parameters:
        sample_size (`int`, *optional*, defaults to 28): image height/width the rater was trained at.
        in_channels (`int`, defaults to 1): channels C of x0 and eps.
        block_out_channels (`Tuple[int]`): channels of the strided conv blocks.
        downsample (`Tuple[bool]`): whether each block halves the resolution.
        time_embedding_dim (`int`): width of the timestep / class embedding.
        num_train_timesteps (`int`): T of the diffusion scheduler; t is divided by it before embedding
            so the embedding frequencies cover the timestep range.
        num_class_embeds (`int`, *optional*): number of classes for class-conditional rating.
        norm_num_groups (`int`): groups of the GroupNorm layers.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        sample_size: Optional[int] = 28,
        in_channels: int = 1,
        block_out_channels: Sequence[int] = (16, 32, 64),
        downsample: Sequence[bool] = (True, True, False),
        time_embedding_dim: int = 64,
        num_train_timesteps: int = 1000,
        num_class_embeds: Optional[int] = None,
        norm_num_groups: int = 8,
    ):
        super().__init__()
        if len(block_out_channels) != len(downsample):
            raise ValueError(
                f"block_out_channels ({len(block_out_channels)}) and downsample ({len(downsample)}) "
                "must have the same length."
            )
        self.time_proj = Timesteps(time_embedding_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(time_embedding_dim, time_embedding_dim)
        self.class_embedding = (
            nn.Embedding(num_class_embeds, time_embedding_dim) if num_class_embeds is not None else None
        )
        blocks = []
        ch = 4 * in_channels
        for out_ch, down in zip(block_out_channels, downsample):
            blocks.append(_FiLMBlock(ch, out_ch, time_embedding_dim, 2 if down else 1, norm_num_groups))
            ch = out_ch
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(
            nn.Linear(2 * ch + time_embedding_dim, time_embedding_dim),
            nn.SiLU(),
            nn.Linear(time_embedding_dim, 1),
        )

    def forward(
        self,
        x0: torch.Tensor,
        noise: torch.Tensor,
        timesteps: Union[torch.Tensor, float, int],
        class_labels: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Union[NoiseRaterOutput, Tuple[torch.Tensor]]:
        r"""Score noise realisations.

        Args:
            x0 (`torch.Tensor` of shape `(B, C, H, W)`): clean images, scaled to [-1, 1].
            noise (`torch.Tensor` of shape `(B, C, H, W)`): noise realisations eps.
            timesteps (`torch.Tensor` of shape `(B,)` or scalar): diffusion timesteps t.
            class_labels (`torch.Tensor` of shape `(B,)`, *optional*): labels, required iff the model
                was built with ``num_class_embeds``.
            return_dict (`bool`): return a :class:`NoiseRaterOutput` instead of a tuple.

        Returns:
            :class:`NoiseRaterOutput` with ``scores`` of shape `(B,)`, or the tuple ``(scores,)``.
        """
        if x0.shape != noise.shape:
            raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape.")
        if x0.ndim != 4 or x0.shape[1] != self.config.in_channels:
            raise ValueError(
                f"Expected x0 of shape (B, {self.config.in_channels}, H, W), got {tuple(x0.shape)}."
            )
        b = x0.shape[0]
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], device=x0.device)
        timesteps = timesteps.to(x0.device).reshape(-1)
        if timesteps.numel() == 1:
            timesteps = timesteps.expand(b)
        # Timesteps are rescaled to [0, 1000) so frequencies are the same whatever T is.
        t_scaled = timesteps.float() * (1000.0 / self.config.num_train_timesteps)
        temb = self.time_embedding(self.time_proj(t_scaled).to(dtype=x0.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels must be given: the rater was built with num_class_embeds.")
            temb = temb + self.class_embedding(class_labels.to(x0.device).long()).to(temb.dtype)

        h = torch.cat([x0, noise, x0 * noise, noise * noise], dim=1)
        for block in self.blocks:
            h = block(h, temb)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.std(dim=(2, 3), unbiased=False)], dim=1)
        scores = self.head(torch.cat([pooled, temb], dim=1)).squeeze(-1)
        if not return_dict:
            return (scores,)
        return NoiseRaterOutput(scores=scores)
