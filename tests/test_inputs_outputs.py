"""Inputs that must never silently go wrong: high-bit-depth and transparent images, grey palettes, stray
files, and the data position of an elastic resume (issue: inputs and outputs). No network."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from noise_rater.data import (
    DataError,
    ResumableBatches,
    decode_image,
    parse_background_color,
    preflight_image_folder,
    prepare_datasets,
)


def to_uint8(pixel_values: torch.Tensor) -> np.ndarray:
    """[-1, 1] floats back to integer pixel values."""
    return torch.round((pixel_values + 1.0) * 127.5).to(torch.int64).numpy()


def load_all(folder, tmp_path, num_channels=1, resolution=16, **kwargs):
    """All images of a folder (train + validation), as integer arrays `(C, H, W)`, keyed by their first pixel."""
    splits = prepare_datasets(train_data_dir=folder, resolution=resolution, num_channels=num_channels,
                              validation_split=0.5, cache_dir=str(tmp_path / "cache"), **kwargs)
    return [to_uint8(ds[i]["pixel_values"]) for ds in (splits.train, splits.validation) for i in range(len(ds))]


# ------------------------------------------------------------------------------------------------
# High bit depth: scaled by range, never clipped
# ------------------------------------------------------------------------------------------------

RAMP8 = np.arange(256).reshape(16, 16)            # the 8-bit values we expect back
RAMP16 = (RAMP8 * 257).astype(np.uint16)          # 0..65535: v16 = 257 * v8 exactly


def write_16bit(path, mode):
    data = RAMP16.astype(">u2" if mode == "I;16B" else "<u2").tobytes()
    Image.frombytes(mode, (16, 16), data).save(path)


@pytest.mark.parametrize("mode,ext", [("I;16", "png"), ("I;16B", "tif")])
def test_16bit_grey_is_scaled_by_its_range(tmp_path, mode, ext):
    folder = tmp_path / "img"
    folder.mkdir()
    for k in range(2):
        write_16bit(folder / f"ramp{k}.{ext}", mode)
    with Image.open(folder / f"ramp0.{ext}") as im:
        assert im.mode.startswith("I;16")  # the bad input really is 16-bit
        # what a plain convert("L") does: everything above 255 becomes white
        assert (np.asarray(im.convert("L")) == 255).mean() > 0.9
    for image in load_all(folder, tmp_path):
        np.testing.assert_array_equal(image[0], RAMP8)


def test_32bit_int_assumes_16bit_range_and_refuses_out_of_range(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    for k in range(2):
        Image.fromarray(RAMP16.astype(np.int32), "I").save(folder / f"ramp{k}.tif")
    for image in load_all(folder, tmp_path):
        np.testing.assert_array_equal(image[0], RAMP8)
    Image.fromarray(np.full((16, 16), 70000, dtype=np.int32), "I").save(folder / "too_bright.tif")
    with pytest.raises(DataError, match=r"too_bright\.tif.*0\.\.65535"):
        preflight_image_folder(folder, expected_channels=1)


def test_16bit_to_rgb_repeats_the_scaled_grey(tmp_path):
    image = Image.frombytes("I;16", (16, 16), RAMP16.astype("<u2").tobytes())
    rgb, composited = decode_image(image, "RGB")
    assert rgb.mode == "RGB" and not composited
    for c in range(3):
        np.testing.assert_array_equal(np.asarray(rgb)[..., c], RAMP8)


# ------------------------------------------------------------------------------------------------
# Transparency: composited onto a background
# ------------------------------------------------------------------------------------------------

def over(rgb, alpha, background):
    """Porter-Duff "over" onto an opaque background, in floats: a * c + (1 - a) * bg."""
    a = np.asarray(alpha, dtype=np.float64)[..., None] / 255.0
    return a * np.asarray(rgb, dtype=np.float64) + (1.0 - a) * np.asarray(background, dtype=np.float64)


def rgba_pixels():
    """4x4 RGBA: fully transparent pixels that store red, opaque green, half-transparent blue."""
    rgb = np.zeros((4, 4, 3), np.uint8)
    alpha = np.zeros((4, 4), np.uint8)
    rgb[0], alpha[0] = (255, 0, 0), 0
    rgb[1], alpha[1] = (0, 255, 0), 255
    rgb[2:], alpha[2:] = (0, 0, 255), 128
    return rgb, alpha


@pytest.mark.parametrize("background,spec", [((255, 255, 255), None), ((0, 0, 0), "black"), ((10, 20, 30), "10,20,30")])
def test_rgba_is_composited(tmp_path, background, spec, caplog):
    folder = tmp_path / "img"
    folder.mkdir()
    rgb, alpha = rgba_pixels()
    for k in range(2):
        Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(folder / f"a{k}.png")
    kwargs = {} if spec is None else {"background_color": spec}
    with caplog.at_level(logging.WARNING, logger="noise_rater.data"):
        images = load_all(folder, tmp_path, num_channels=3, resolution=4, **kwargs)
    expected = over(rgb, alpha, background)
    for image in images:
        assert np.abs(image.transpose(1, 2, 0) - expected).max() <= 1
    assert "2 of 2 image(s) have transparency" in caplog.text


def test_la_and_grey_background(tmp_path):
    grey = np.array([[0, 100], [200, 255]], np.uint8)
    alpha = np.array([[0, 255], [128, 64]], np.uint8)
    image = Image.fromarray(np.dstack([grey, alpha]), "LA")
    out, composited = decode_image(image, "L", (255, 255, 255))
    assert composited
    expected = over(grey[..., None], alpha, (255,))[..., 0]
    assert np.abs(np.asarray(out, dtype=np.float64) - expected).max() <= 1


def test_palette_with_transparency_entry_and_pa(tmp_path):
    # palette: 0 = red (marked transparent), 1 = green
    palette = [255, 0, 0, 0, 255, 0] + [0] * (3 * 254)
    p = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    p.putpalette(palette)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as reloaded:
        assert reloaded.mode == "P" and "transparency" in reloaded.info
        out, composited = decode_image(reloaded, "RGB", (0, 0, 255))
    assert composited
    np.testing.assert_array_equal(np.asarray(out)[0, 0], [0, 0, 255])  # transparent red -> the blue background
    np.testing.assert_array_equal(np.asarray(out)[0, 1], [0, 255, 0])
    pa = Image.new("PA", (2, 1))
    pa.putpalette(palette)
    pa.putdata([(0, 0), (1, 255)])
    out, composited = decode_image(pa, "RGB")
    assert composited
    np.testing.assert_array_equal(np.asarray(out)[0], [[255, 255, 255], [0, 255, 0]])


def test_opaque_images_are_not_composited():
    out, composited = decode_image(Image.new("RGB", (2, 2), (1, 2, 3)), "RGB")
    assert not composited and np.asarray(out)[0, 0].tolist() == [1, 2, 3]


@pytest.mark.parametrize("spec,rgb", [("white", (255, 255, 255)), ("black", (0, 0, 0)), ("#ff8000", (255, 128, 0)),
                                      ("1, 2, 3", (1, 2, 3)), ((4, 5, 6), (4, 5, 6))])
def test_parse_background_color(spec, rgb):
    assert parse_background_color(spec) == rgb


@pytest.mark.parametrize("spec", ["nocolour", "1,2", "1,2,300", "a,b,c"])
def test_parse_background_color_rejects(spec):
    with pytest.raises(DataError, match="not a colour"):
        parse_background_color(spec)


# ------------------------------------------------------------------------------------------------
# Grey palettes and all-grey folders
# ------------------------------------------------------------------------------------------------

def grey_palette_image(values):
    image = Image.fromarray(np.asarray(values, np.uint8), "P")
    image.putpalette([v for i in range(256) for v in (i, i, i)])
    return image


def test_grey_palette_counts_as_grey(tmp_path, caplog):
    folder = tmp_path / "img"
    folder.mkdir()
    grey_palette_image([[0, 50], [100, 250]]).save(folder / "pal.png")
    Image.fromarray(np.array([[1, 2], [3, 4]], np.uint8), "L").save(folder / "plain.png")
    assert len(preflight_image_folder(folder, expected_channels=1)) == 2  # not "mixes channel counts"
    images = load_all(folder, tmp_path, resolution=2)
    assert sorted(im[0].tolist() for im in images) == [[[0, 50], [100, 250]], [[1, 2], [3, 4]]]
    # a colour palette next to grey images is still a mix
    colour = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    colour.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    colour.save(folder / "colour.png")
    with pytest.raises(DataError, match="mixes channel counts"):
        preflight_image_folder(folder, expected_channels=1)


def test_all_grey_folder_with_three_channels_gets_a_note(tmp_path, caplog):
    folder = tmp_path / "img"
    folder.mkdir()
    for k in range(2):
        Image.fromarray(np.full((2, 2), k, np.uint8), "L").save(folder / f"g{k}.png")
    with caplog.at_level(logging.WARNING, logger="noise_rater.data"):
        preflight_image_folder(folder, expected_channels=3)
    assert "all 2 image(s) are grey" in caplog.text and "--num_channels 1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="noise_rater.data"):
        preflight_image_folder(folder, expected_channels=1)
    assert "are grey" not in caplog.text


# ------------------------------------------------------------------------------------------------
# A stray image at the root of a class-conditional folder
# ------------------------------------------------------------------------------------------------

def test_root_image_is_named_as_why_labels_cannot_be_inferred(tmp_path):
    folder = tmp_path / "img"
    for cls in ("cat", "dog"):
        (folder / cls).mkdir(parents=True)
        for k in range(2):
            Image.new("L", (4, 4), k).save(folder / cls / f"{k}.png")
    Image.new("L", (4, 4), 7).save(folder / "stray.png")
    with pytest.raises(DataError, match=r"stray\.png lie at the top level") as info:
        prepare_datasets(train_data_dir=folder, resolution=4, num_channels=1, use_labels=True,
                         cache_dir=str(tmp_path / "cache"))
    assert "class sub-folders" in str(info.value)


# ------------------------------------------------------------------------------------------------
# Elastic resume of the data stream: position in samples
# ------------------------------------------------------------------------------------------------

class Indices(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"pixel_values": torch.tensor([i])}


def take(stream, steps):
    return [int(i) for _ in range(steps) for i in next(stream)["pixel_values"][:, 0]]


def test_batch_size_change_sees_every_sample_once(caplog):
    data = Indices(100)
    first = ResumableBatches(data, 4, seed=3)
    seen = take(first, 10)  # 40 images
    state = first.state_dict()
    assert state["position"] == 40 and state["epoch"] == 0
    resumed = ResumableBatches(data, 8, seed=3)
    with caplog.at_level(logging.WARNING, logger="noise_rater.data"):
        assert resumed.load_state_dict(state) is True
    assert "no longer bit-identical" in caplog.text
    while resumed.epoch == 0:
        batch = take(resumed, 1)
        seen += batch
    # the batch that crossed into epoch 1 holds the 4 last images of epoch 0 and the 4 first of epoch 1
    epoch0 = seen[:100]
    assert sorted(epoch0) == list(range(100))
    order1 = torch.randperm(100, generator=torch.Generator().manual_seed(3 + 1)).tolist()
    assert seen[100:] == order1[:len(seen) - 100]


def test_unchanged_layout_resumes_exactly_and_quietly(caplog):
    data = Indices(30)
    straight = ResumableBatches(data, 4, seed=0)
    reference = take(straight, 20)
    a = ResumableBatches(data, 4, seed=0)
    head = take(a, 7)
    b = ResumableBatches(data, 4, seed=0)
    with caplog.at_level(logging.WARNING, logger="noise_rater.data"):
        assert b.load_state_dict(a.state_dict()) is False
    assert caplog.text == ""
    assert head + take(b, 13) == reference


def test_process_count_change_reshards_by_samples_seen():
    data = Indices(48)
    two = [ResumableBatches(data, 3, seed=5, shard=r, num_shards=2) for r in range(2)]
    seen = []
    for _ in range(4):  # 4 steps x 2 processes x 3 = 24 samples
        for stream in two:
            seen += take(stream, 1)
    states = [s.state_dict() for s in two]
    assert states[0]["position"] == states[1]["position"] == 24
    one = ResumableBatches(data, 3, seed=5)
    assert one.load_state_dict(states[0]) is True
    seen += take(one, 8)  # the other 24
    assert sorted(seen) == list(range(48))
    # and back to three processes from the middle of the next epoch
    mid = one.state_dict()
    three = [ResumableBatches(data, 2, seed=5, shard=r, num_shards=3) for r in range(3)]
    for s in three:
        s.load_state_dict(mid)
    assert sorted(i for s in three for i in take(s, 8)) == list(range(48))


def test_old_batch_counted_state_still_loads():
    data = Indices(40)
    stream = ResumableBatches(data, 4, seed=1)
    stream.load_state_dict({"epoch": 2, "index": 3, "seed": 1, "shard": 0, "num_shards": 1, "batch_size": 4})
    assert (stream.epoch, stream.position) == (2, 12)
    with pytest.raises(DataError, match="batch_size"):
        stream.load_state_dict({"epoch": 0, "index": 3, "seed": 1, "shard": 0, "num_shards": 1})
    with pytest.raises(DataError, match="seed"):
        stream.load_state_dict(dict(stream.state_dict(), seed=2))
    with pytest.raises(DataError, match="41"):
        stream.load_state_dict(dict(stream.state_dict(), num_samples=41))


def test_steps_for_epochs():
    stream = ResumableBatches(Indices(100), 8, seed=0, shard=0, num_shards=1)
    assert stream.steps_for_epochs(1) == 13 and stream.steps_for_epochs(2) == 25


def test_training_state_loads_old_batch_counted_checkpoints(tmp_path):
    """A checkpoint written before positions were counted in samples ('index' in batches of args.json's
    train_batch_size) resumes at the same sample; a batch-size change then warns."""
    import json

    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    from noise_rater.training_state import load_training_state, save_training_state

    accelerator = Accelerator(cpu=True)

    def parts():
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scheduler = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=0, num_training_steps=10)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        return model, optimizer, scheduler

    model, optimizer, scheduler = parts()
    stream = ResumableBatches(Indices(100), 4, seed=0)
    take(stream, 10)
    path = save_training_state(str(tmp_path), 10, accelerator=accelerator, unet=model, ema=None, optimizer=optimizer,
                               lr_scheduler=scheduler, generators={"timesteps": torch.Generator()}, batches=stream, extra={},
                               run_args={"train_batch_size": 4})
    state_file = f"{path}/training_state.json"
    state = json.load(open(state_file))
    state["data"] = [{"epoch": 0, "index": 10, "seed": 0, "shard": 0, "num_shards": 1}]  # the old format
    json.dump(state, open(state_file, "w"))
    model, optimizer, scheduler = parts()
    resumed = ResumableBatches(Indices(100), 8, seed=0)
    load_training_state(path, accelerator=accelerator, unet=model, ema=None, optimizer=optimizer,
                        lr_scheduler=scheduler, generators={"timesteps": torch.Generator()}, batches=resumed)
    assert (resumed.epoch, resumed.position) == (0, 40)
