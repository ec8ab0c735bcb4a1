"""Pipelines the training scripts save: class-conditional DDPM generation.

:class:`ClassConditionalDDPMPipeline` is ``DDPMPipeline`` for a UNet with ``num_class_embeds``: it takes the
classes to generate (indices or class names) and keeps the class names in its config, so ``model_index.json``
records which label is which class::

    import noise_rater  # registers the class with diffusers
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained("runs/cond")          # or ClassConditionalDDPMPipeline.from_pretrained
    images = pipe(class_labels=["cat", "dog", 0], num_inference_steps=50).images

``DiffusionPipeline.from_pretrained`` looks the ``_class_name`` of ``model_index.json`` up in the ``diffusers``
module; importing this module adds the class there (under its own name, only if that name is free), so a saved
folder loads offline with either call once ``noise_rater`` is imported.
"""

from typing import List, Optional, Sequence, Union

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

__all__ = ["ClassConditionalDDPMPipeline"]

ClassLabel = Union[int, str]


class ClassConditionalDDPMPipeline(DiffusionPipeline):
    r"""Ancestral sampling (as ``DDPMPipeline``) from a class-conditional ``UNet2DModel``.

    Args:
        unet ([`UNet2DModel`]): a UNet with ``num_class_embeds`` set (one embedding per class).
        scheduler ([`SchedulerMixin`]): e.g. [`DDPMScheduler`] or [`DDIMScheduler`].
        class_names (`List[str]`, *optional*): ``class_names[i]`` is the name of class index ``i``; saved in
            ``model_index.json``. Default: no names (only indices are accepted).

    Raises:
        ValueError: the UNet is not class-conditional, or ``class_names`` does not have one unique name per class.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler, class_names: Optional[List[str]] = None):
        super().__init__()
        num_classes = unet.config.num_class_embeds
        if num_classes is None:
            raise ValueError("ClassConditionalDDPMPipeline needs a UNet with num_class_embeds (use DDPMPipeline).")
        if class_names is not None:
            class_names = [str(name) for name in class_names]
            if len(class_names) != num_classes or len(set(class_names)) != len(class_names):
                raise ValueError(f"class_names must hold {num_classes} unique names (one per class embedding), "
                                 f"got {class_names!r}.")
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(class_names=class_names)

    @property
    def num_classes(self) -> int:
        return int(self.unet.config.num_class_embeds)

    def class_index(self, label: ClassLabel) -> int:
        """A class index or name -> the index; ValueError naming the label and the valid ones."""
        names = self.config.class_names
        if isinstance(label, torch.Tensor):
            label = label.item()
        if isinstance(label, str):
            if names is None or label not in names:
                known = f"known names: {names}" if names else "this pipeline has no class names; use indices"
                raise ValueError(f"Unknown class {label!r} ({known}).")
            return names.index(label)
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < self.num_classes:
            raise ValueError(f"Class label {label!r} is not a class index in [0, {self.num_classes}).")
        return int(label)

    def class_name(self, index: int) -> str:
        """The name of class ``index`` (its number as text when the pipeline has no names)."""
        names = self.config.class_names
        return names[index] if names else str(index)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Union[ClassLabel, Sequence[ClassLabel], torch.Tensor],
        batch_size: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        num_inference_steps: int = 1000,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        r"""Generate one image per entry of ``class_labels``.

        Args:
            class_labels: a class (index or name), or a sequence / 1-D tensor of them.
            batch_size (`int`, *optional*): with a single class, how many images of it (default 1); with a
                sequence it must equal its length if given.
            generator (`torch.Generator`, *optional*): makes sampling deterministic.
            num_inference_steps (`int`): denoising steps (the scheduler's ``set_timesteps``).
            output_type (`str`): ``"pil"`` (list of PIL images) or ``"np"`` (float array `(B, H, W, C)` in [0, 1]).
            return_dict (`bool`): return an ``ImagePipelineOutput`` instead of a tuple.

        Returns:
            ``ImagePipelineOutput(images=...)`` or ``(images,)``.

        Raises:
            ValueError: an unknown class name or index, or a ``batch_size`` that contradicts ``class_labels``.
        """
        if isinstance(class_labels, torch.Tensor):
            class_labels = class_labels.reshape(-1).tolist()
        if isinstance(class_labels, (int, str)):
            class_labels = [class_labels] * (1 if batch_size is None else int(batch_size))
        elif batch_size is not None and int(batch_size) != len(class_labels):
            raise ValueError(f"batch_size={batch_size} but {len(class_labels)} class labels were given.")
        if len(class_labels) == 0:
            raise ValueError("class_labels is empty: give at least one class to generate.")
        labels = torch.tensor([self.class_index(label) for label in class_labels], device=self.device)

        size = self.unet.config.sample_size
        hw = (size, size) if isinstance(size, int) else tuple(size)
        shape = (len(labels), self.unet.config.in_channels) + hw
        image = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_output = self.unet(image, t, class_labels=labels).sample
            image = self.scheduler.step(model_output, t, image, generator=generator).prev_sample
        image = (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


def _register_with_diffusers() -> None:
    """Make ``DiffusionPipeline.from_pretrained`` resolve ``_class_name: "ClassConditionalDDPMPipeline"``."""
    import diffusers

    if getattr(diffusers, ClassConditionalDDPMPipeline.__name__, None) is None:
        setattr(diffusers, ClassConditionalDDPMPipeline.__name__, ClassConditionalDDPMPipeline)


_register_with_diffusers()
