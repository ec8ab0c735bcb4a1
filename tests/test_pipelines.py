"""ClassConditionalDDPMPipeline: generates by class index or name, saves model_index.json with the class names,
and loads offline through DiffusionPipeline.from_pretrained and through its own class."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, UNet2DModel

from noise_rater import ClassConditionalDDPMPipeline


def tiny_unet(num_classes=3):
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=num_classes)


@pytest.fixture
def pipe():
    return ClassConditionalDDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=20),
                                        class_names=["cat", "dog", "eel"])


def test_names_and_indices_give_the_same_images(pipe):
    by_name = pipe(["cat", "eel"], generator=torch.Generator().manual_seed(1), num_inference_steps=3,
                   output_type="np").images
    by_index = pipe([0, 2], generator=torch.Generator().manual_seed(1), num_inference_steps=3, output_type="np").images
    assert by_name.shape == (2, 8, 8, 1) and np.isfinite(by_name).all()
    np.testing.assert_array_equal(by_name, by_index)
    other = pipe([1, 1], generator=torch.Generator().manual_seed(1), num_inference_steps=3, output_type="np").images
    assert not np.array_equal(other, by_index)  # the label reaches the UNet


def test_labels_reach_the_unet_as_indices(pipe, monkeypatch):
    seen = []
    forward = pipe.unet.forward

    def spy(sample, t, class_labels=None, **kw):
        seen.append(class_labels.tolist())
        return forward(sample, t, class_labels=class_labels, **kw)

    monkeypatch.setattr(pipe.unet, "forward", spy)
    pipe("dog", batch_size=2, num_inference_steps=2, output_type="np")
    assert seen == [[1, 1], [1, 1]]


@pytest.mark.parametrize("labels,match", [(["wolf"], "Unknown class 'wolf'"), ([3], r"\[0, 3\)"), ([], "empty")])
def test_bad_labels(pipe, labels, match):
    with pytest.raises(ValueError, match=match):
        pipe(labels, num_inference_steps=1)


def test_rejects_unconditional_unet_and_bad_names():
    with pytest.raises(ValueError, match="num_class_embeds"):
        ClassConditionalDDPMPipeline(unet=tiny_unet(None), scheduler=DDPMScheduler())
    with pytest.raises(ValueError, match="3 unique names"):
        ClassConditionalDDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(), class_names=["a", "a", "b"])


def test_save_and_load_offline(pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "ClassConditionalDDPMPipeline"
    assert index["class_names"] == ["cat", "dog", "eel"]
    reference = pipe(["dog"], generator=torch.Generator().manual_seed(3), num_inference_steps=2, output_type="np")
    for loader in (DiffusionPipeline, ClassConditionalDDPMPipeline):
        loaded = loader.from_pretrained(tmp_path)
        assert isinstance(loaded, ClassConditionalDDPMPipeline)
        assert loaded.config.class_names == ["cat", "dog", "eel"]
        out = loaded(["dog"], generator=torch.Generator().manual_seed(3), num_inference_steps=2, output_type="np")
        np.testing.assert_allclose(out.images, reference.images, atol=1e-5)
    # the scheduler can be swapped like any diffusers pipeline
    loaded.scheduler = DDIMScheduler.from_config(loaded.scheduler.config)
    assert len(loaded("cat", num_inference_steps=2).images) == 1


def test_fresh_interpreter_resolves_the_class(pipe, tmp_path):
    """The saved folder loads in a new process that only imports noise_rater and diffusers."""
    import subprocess
    import sys

    pipe.save_pretrained(tmp_path)
    code = ("import noise_rater, diffusers; p = diffusers.DiffusionPipeline.from_pretrained(%r); "
            "print(type(p).__name__, len(p(['eel', 0], num_inference_steps=1).images))" % str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ClassConditionalDDPMPipeline", "2"]
