"""Tests for noise_rater.data (no network: Hub calls are monkeypatched, data is written to tmp_path)."""

import gzip
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from noise_rater import data
from noise_rater.data import (
    BUILTIN_DATASETS,
    FASHION_MNIST_DIR,
    DataError,
    DatasetSplits,
    infinite_batches,
    make_dataloader,
    preflight_image_folder,
    prepare_datasets,
)


def to_uint8(pixel_values: torch.Tensor) -> torch.Tensor:
    """Invert ToTensor + Normalize([0.5], [0.5]) back to integer pixel values."""
    return torch.round((pixel_values + 1.0) * 127.5).to(torch.int64)


def expected_unit(values) -> torch.Tensor:
    """uint8 pixel values -> the exact float32 tensor ToTensor() + Normalize([0.5], [0.5]) would give."""
    return (torch.as_tensor(np.asarray(values, dtype=np.float32)) / 255.0 - 0.5) / 0.5


# ------------------------------------------------------------------------------------------------
# Synthetic Fashion-MNIST
# ------------------------------------------------------------------------------------------------


def synthetic_image(k: int, size: int = 4) -> np.ndarray:
    """Image k: a ramp 0..size*size-1 offset by 16*k, so its top-left pixel identifies it."""
    return (np.arange(size * size).reshape(size, size) + 16 * k).astype(np.uint8)


def write_idx(directory, images: np.ndarray, labels: np.ndarray):
    directory.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    header = (0x00000803).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (n, h, w))
    with gzip.open(directory / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(header + images.astype(np.uint8).tobytes())
    header = (0x00000801).to_bytes(4, "big") + n.to_bytes(4, "big")
    with gzip.open(directory / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(header + labels.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    """12 synthetic 4x4 images (image k has label k % 10) behind NOISE_RATER_FASHION_MNIST_DIR."""
    directory = tmp_path / "fashion"
    n = 12
    write_idx(directory, np.stack([synthetic_image(k) for k in range(n)]), np.arange(n) % 10)
    monkeypatch.setenv("NOISE_RATER_FASHION_MNIST_DIR", str(directory))
    return directory


def image_ids(dataset) -> list:
    """Which synthetic image each item is (from its top-left pixel)."""
    return [int(to_uint8(dataset[i]["pixel_values"])[0, 0, 0]) // 16 for i in range(len(dataset))]


# ------------------------------------------------------------------------------------------------
# Built-ins
# ------------------------------------------------------------------------------------------------


def test_builtin_names():
    assert BUILTIN_DATASETS == ("digits", "fashion_mnist")
    assert FASHION_MNIST_DIR == "/usr/share/datasets/fashion-mnist"
    assert issubclass(DataError, ValueError)


def test_digits_shapes_range_and_labels():
    from sklearn.datasets import load_digits

    splits = prepare_datasets("digits", resolution=8, num_channels=1, use_labels=True)
    assert isinstance(splits, DatasetSplits)
    assert (len(splits.train), len(splits.validation)) == (1617, 180)  # round(0.1 * 1797) = 180 held out
    assert splits.num_classes == 10 and splits.num_channels == 1 and splits.resolution == 8
    assert splits.description == "digits (1617 train / 180 val, 8x8, 1ch, 10 classes)"

    item = splits.train[0]
    assert set(item) == {"pixel_values", "class_labels"}
    assert item["pixel_values"].shape == (1, 8, 8) and item["pixel_values"].dtype == torch.float32
    assert item["class_labels"].dtype == torch.int64 and item["class_labels"].shape == ()

    # Every item is a digits image scaled 0..16 -> 0..255 with its own label.
    digits = load_digits()
    scaled = np.rint(digits.images * 255.0 / 16.0).astype(np.uint8)
    lookup = {}
    for image, label in zip(scaled, digits.target):
        lookup.setdefault(image.tobytes(), set()).add(int(label))
    pixels = torch.stack([splits.train[i]["pixel_values"] for i in range(len(splits.train))])
    labels = torch.stack([splits.train[i]["class_labels"] for i in range(len(splits.train))])
    assert pixels.min() == -1.0 and pixels.max() == 1.0
    for x, y in zip(pixels[:200], labels[:200]):
        as_uint8 = to_uint8(x)[0].numpy().astype(np.uint8)
        assert int(y) in lookup[as_uint8.tobytes()]
        torch.testing.assert_close(x, expected_unit(as_uint8)[None], rtol=0, atol=0)
    assert sorted(set(labels.tolist())) == list(range(10))


def test_digits_without_labels_has_no_class_labels():
    splits = prepare_datasets("digits", resolution=8, num_channels=1)
    assert splits.num_classes is None
    assert set(splits.train[0]) == {"pixel_values"}
    assert splits.description == "digits (1617 train / 180 val, 8x8, 1ch)"


def test_digits_rgb_and_resize_match_pil():
    grey = prepare_datasets("digits", resolution=16, num_channels=1, validation_split=0.5)
    rgb = prepare_datasets("digits", resolution=16, num_channels=3, validation_split=0.5)
    x1, x3 = grey.validation[5]["pixel_values"], rgb.validation[5]["pixel_values"]
    assert x1.shape == (1, 16, 16) and x3.shape == (3, 16, 16)
    for c in range(3):
        assert torch.equal(x3[c], x1[0])
    # The up-front torch resize agrees with diffusers' PIL bilinear resize to within one grey level.
    native = prepare_datasets("digits", resolution=8, num_channels=1, validation_split=0.5)
    for i in range(20):
        small = to_uint8(native.validation[i]["pixel_values"])[0].numpy().astype(np.uint8)
        ref = np.asarray(Image.fromarray(small).resize((16, 16), Image.BILINEAR), dtype=np.int64)
        ours = to_uint8(grey.validation[i]["pixel_values"])[0].numpy()
        assert np.abs(ours - ref).max() <= 1


def test_builtin_rejects_two_channels():
    with pytest.raises(DataError, match="num_channels"):
        prepare_datasets("digits", resolution=8, num_channels=2)


def test_fashion_mnist_synthetic_idx(fake_fashion):
    splits = prepare_datasets("fashion_mnist", resolution=4, num_channels=1, validation_split=0.25, use_labels=True)
    assert (len(splits.train), len(splits.validation)) == (9, 3)
    assert splits.num_classes == 10
    assert splits.description == "fashion_mnist (9 train / 3 val, 4x4, 1ch, 10 classes)"
    ids = image_ids(splits.train) + image_ids(splits.validation)
    assert sorted(ids) == list(range(12))
    for dataset in (splits.train, splits.validation):
        for i in range(len(dataset)):
            item = dataset[i]
            k = int(to_uint8(item["pixel_values"])[0, 0, 0]) // 16
            torch.testing.assert_close(item["pixel_values"], expected_unit(synthetic_image(k))[None], rtol=0, atol=0)
            assert int(item["class_labels"]) == k % 10
    # Hand check of one value: image 1 starts with pixel 16 -> 16 / 127.5 - 1.
    everything = [d[i] for d in (splits.train, splits.validation) for i in range(len(d))]
    first_pixels = sorted(float(item["pixel_values"][0, 0, 0]) for item in everything)
    assert first_pixels[0] == -1.0 and abs(first_pixels[1] - (16 / 127.5 - 1)) < 1e-6


def test_fashion_mnist_alias_and_upsampling(fake_fashion):
    splits = prepare_datasets("fashion-mnist", resolution=8, num_channels=3, validation_split=0.25)
    assert splits.train[0]["pixel_values"].shape == (3, 8, 8)
    assert splits.description.startswith("fashion_mnist (9 train / 3 val, 8x8, 3ch")


def test_fashion_mnist_corrupt_idx(tmp_path, monkeypatch):
    directory = tmp_path / "broken"
    write_idx(directory, np.zeros((3, 4, 4), np.uint8), np.zeros(3, np.uint8))
    with gzip.open(directory / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x04" + bytes(40))  # wrong magic number
    monkeypatch.setenv("NOISE_RATER_FASHION_MNIST_DIR", str(directory))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        prepare_datasets("fashion_mnist", resolution=4, num_channels=1)


def test_fashion_mnist_missing_install(tmp_path, monkeypatch):
    missing = tmp_path / "not-installed"
    monkeypatch.setenv("NOISE_RATER_FASHION_MNIST_DIR", str(missing))
    with pytest.raises(DataError) as info:
        prepare_datasets("fashion_mnist", resolution=28, num_channels=1)
    message = str(info.value)
    assert "install it with: apt-get install dataset-fashion-mnist" in message
    assert str(missing) in message


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")),
    reason="dataset-fashion-mnist is not installed",
)
def test_fashion_mnist_real_files(monkeypatch):
    monkeypatch.delenv("NOISE_RATER_FASHION_MNIST_DIR", raising=False)
    splits = prepare_datasets("fashion_mnist", resolution=28, num_channels=1, use_labels=True)
    assert (len(splits.train), len(splits.validation)) == (54000, 6000)
    assert splits.description == "fashion_mnist (54000 train / 6000 val, 28x28, 1ch, 10 classes)"
    item = splits.validation[0]
    assert item["pixel_values"].shape == (1, 28, 28)
    assert -1.0 <= float(item["pixel_values"].min()) and float(item["pixel_values"].max()) <= 1.0
    assert 0 <= int(item["class_labels"]) < 10


# ------------------------------------------------------------------------------------------------
# Image folders
# ------------------------------------------------------------------------------------------------


def rgb_image(k: int) -> np.ndarray:
    """4x4 RGB image k: top-left pixel (16k, 16k, 16k) identifies it; pixel (0, 1) is pure red, (0, 2) a mix."""
    array = np.full((4, 4, 3), 200, np.uint8)
    array[..., 0] = np.arange(16).reshape(4, 4) * 10  # R ramp
    array[0, 0] = 16 * k
    array[0, 1] = (255, 0, 0)
    array[0, 2] = (10, 200, 30)
    return array


def expected_grey(k: int) -> np.ndarray:
    """PIL's 'L' conversion of rgb_image(k): L = (19595 R + 38470 G + 7471 B + 2**15) >> 16."""
    rgb = rgb_image(k).astype(np.int64)
    return ((19595 * rgb[..., 0] + 38470 * rgb[..., 1] + 7471 * rgb[..., 2] + 2**15) >> 16).astype(np.uint8)


def write_rgb_folder(directory, n: int = 4):
    directory.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        Image.fromarray(rgb_image(k), "RGB").save(directory / f"img_{k}.png")
    (directory / "notes.txt").write_text("not an image")
    (directory / "metadata.json").write_text("{}")


def test_expected_grey_matches_hand_values():
    grey = expected_grey(3)
    assert grey[0, 0] == 48 and grey[0, 1] == 76 and grey[0, 2] == 124


def test_imagefolder_rgb_to_one_channel(tmp_path):
    folder = tmp_path / "images"
    write_rgb_folder(folder)
    splits = prepare_datasets(
        train_data_dir=str(folder), resolution=4, num_channels=1, validation_split=0.25, cache_dir=str(tmp_path / "c")
    )
    assert (len(splits.train), len(splits.validation)) == (3, 1)
    assert splits.num_classes is None
    assert splits.description == f"imagefolder:{folder} (3 train / 1 val, 4x4, 1ch)"
    seen = []
    for dataset in (splits.train, splits.validation):
        for i in range(len(dataset)):
            x = dataset[i]["pixel_values"]
            assert x.shape == (1, 4, 4) and x.dtype == torch.float32
            assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
            k = int(to_uint8(x)[0, 0, 0]) // 16
            seen.append(k)
            torch.testing.assert_close(x, expected_unit(expected_grey(k))[None], rtol=0, atol=0)
    assert sorted(seen) == [0, 1, 2, 3]
    # The pure red pixel is L = 76 -> 76 / 127.5 - 1.
    assert abs(float(splits.validation[0]["pixel_values"][0, 0, 1]) - (76 / 127.5 - 1)) < 1e-6


def test_imagefolder_rgb_three_channels_exact(tmp_path):
    folder = tmp_path / "images"
    write_rgb_folder(folder, n=2)
    splits = prepare_datasets(
        train_data_dir=folder, resolution=4, num_channels=3, validation_split=0.5, cache_dir=str(tmp_path / "c")
    )
    x = splits.validation[0]["pixel_values"]
    k = int(to_uint8(x)[0, 0, 0]) // 16
    torch.testing.assert_close(x, expected_unit(rgb_image(k)).permute(2, 0, 1), rtol=0, atol=0)


def test_imagefolder_grey_to_rgb_and_non_square_resize(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(3):
        Image.fromarray(np.full((6, 9), 40 * k, np.uint8), "L").save(folder / f"g{k}.png")  # 9 wide, 6 high
    splits = prepare_datasets(
        train_data_dir=folder, resolution=4, num_channels=3, validation_split=0.34, cache_dir=str(tmp_path / "c")
    )
    x = splits.train[0]["pixel_values"]
    assert x.shape == (3, 4, 4)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    k = int(to_uint8(x)[0, 0, 0]) // 40
    torch.testing.assert_close(x, expected_unit(np.full((3, 4, 4), 40 * k)), rtol=0, atol=0)


def test_imagefolder_center_crop_and_bilinear_downsampling(tmp_path):
    # 8 wide x 4 high, column c has value 30 c: the shorter edge is already 4, so only the centre crop
    # (columns 2..5, as torchvision's CenterCrop) applies.
    wide = tmp_path / "wide"
    wide.mkdir()
    for k in range(2):
        Image.fromarray(np.tile((np.arange(8) * 30).astype(np.uint8), (4, 1)), "L").save(wide / f"w{k}.png")
    splits = prepare_datasets(train_data_dir=wide, resolution=4, num_channels=1, cache_dir=str(tmp_path / "c"))
    expected = np.tile(np.array([60, 90, 120, 150]), (4, 1))
    torch.testing.assert_close(splits.train[0]["pixel_values"], expected_unit(expected)[None], rtol=0, atol=0)

    # 8x8 -> 4x4 is PIL's antialiased bilinear resize, which the built-ins' torch resize matches to 1 level.
    busy = tmp_path / "busy"
    busy.mkdir()
    pattern = np.random.default_rng(1).integers(0, 256, size=(8, 8), dtype=np.uint8)
    for k in range(2):
        Image.fromarray(pattern, "L").save(busy / f"b{k}.png")
    splits = prepare_datasets(train_data_dir=busy, resolution=4, num_channels=1, cache_dir=str(tmp_path / "c"))
    ours = to_uint8(splits.validation[0]["pixel_values"])[0]
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(pattern)[None, None].float(), size=(4, 4), mode="bilinear", antialias=True
    )[0, 0].round().long()
    assert (ours - ref).abs().max() <= 1
    block_means = torch.from_numpy(pattern).float().reshape(4, 2, 4, 2).mean(dim=(1, 3))
    assert (ours.float() - block_means).abs().max() < 40  # a nearest-neighbour resize would be far off


def test_imagefolder_labels_from_subfolders(tmp_path):
    folder = tmp_path / "classes"
    for name, value in (("cat", 0), ("dog", 255)):
        (folder / name).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(np.full((4, 4), value, np.uint8), "L").save(folder / name / f"{k}.png")
    splits = prepare_datasets(
        train_data_dir=folder, resolution=4, num_channels=1, use_labels=True, validation_split=0.3,
        cache_dir=str(tmp_path / "c"),
    )
    assert splits.num_classes == 2
    for dataset in (splits.train, splits.validation):
        for i in range(len(dataset)):
            item = dataset[i]
            expected_label = 0 if float(item["pixel_values"][0, 0, 0]) == -1.0 else 1
            assert int(item["class_labels"]) == expected_label


def test_imagefolder_without_labels_rejects_use_labels(tmp_path):
    folder = tmp_path / "images"
    write_rgb_folder(folder)
    with pytest.raises(DataError, match="use_labels"):
        prepare_datasets(
            train_data_dir=folder, resolution=4, num_channels=1, use_labels=True, cache_dir=str(tmp_path / "c")
        )


def test_empty_folder(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(DataError, match="No image files found"):
        preflight_image_folder(folder)
    (folder / "readme.txt").write_text("hello")
    with pytest.raises(DataError, match=r"No image files found.*readme\.txt"):
        prepare_datasets(train_data_dir=str(folder), resolution=4, num_channels=1)


def test_missing_folder(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(DataError, match="does not exist") as info:
        prepare_datasets(train_data_dir=str(missing), resolution=4, num_channels=1)
    assert str(missing) in str(info.value)


def test_bad_files_are_all_listed(tmp_path, monkeypatch):
    folder = tmp_path / "bad"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(synthetic_image(1), "L").save(folder / "good.png")
    zero = folder / "zero.png"
    zero.write_bytes(b"")
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise, "RGB").save(folder / "full.png")
    truncated = folder / "sub" / "truncated.png"
    truncated.write_bytes((folder / "full.png").read_bytes()[:2000])
    (folder / "full.png").unlink()
    text = folder / "text.png"
    text.write_text("this is not a png")
    (folder / "metadata.csv").write_text("file_name\n")

    def must_not_load(*args, **kwargs):
        raise AssertionError("load_dataset must not be reached: the preflight runs first")

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", must_not_load)
    with pytest.raises(DataError) as info:
        prepare_datasets(train_data_dir=str(folder), resolution=4, num_channels=1)
    message = str(info.value)
    assert message.startswith("3 bad image file(s)")
    for path in (zero, truncated, text):
        assert str(path) in message
    assert "good.png" not in message and "metadata.csv" not in message
    assert "0 bytes" in message


def test_preflight_rejects_mixed_grey_and_colour_unless_allowed(tmp_path, caplog):
    folder = tmp_path / "mixed"
    (folder / "b").mkdir(parents=True)
    Image.fromarray(synthetic_image(0), "L").save(folder / "b" / "z.PNG")
    Image.fromarray(rgb_image(0), "RGB").save(folder / "a.jpg")
    (folder / ".hidden.png").write_bytes(b"")  # hidden files are skipped, like datasets does
    (folder / "info.txt").write_text("x")
    with pytest.raises(DataError, match="mixes channel counts: 1 grey and 1 colour") as err:
        preflight_image_folder(folder, expected_channels=1)
    assert "allow_mixed_channels" in str(err.value) and "z.PNG" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="noise_rater.data"):
        paths = preflight_image_folder(folder, expected_channels=1, allow_mixed_channels=True)
    assert paths == [str(folder / "a.jpg"), str(folder / "b" / "z.PNG")]
    assert "mixes image modes" in caplog.text and "'L'" in caplog.text and "'RGB'" in caplog.text
    with pytest.raises(DataError, match="expected_channels"):
        preflight_image_folder(folder, expected_channels=2)


def test_preflight_rgb_and_rgba_are_not_a_channel_mix(tmp_path, caplog):
    folder = tmp_path / "colour"
    folder.mkdir()
    Image.fromarray(rgb_image(0), "RGB").save(folder / "a.png")
    Image.new("RGBA", (4, 4), (1, 2, 3, 4)).save(folder / "b.png")
    with caplog.at_level(logging.WARNING, logger="noise_rater.data"):
        assert len(preflight_image_folder(folder, expected_channels=3)) == 2
    assert "mixes image modes" in caplog.text


def test_imagefolder_rejects_two_channels(tmp_path):
    folder = tmp_path / "images"
    write_rgb_folder(folder)
    with pytest.raises(DataError, match="num_channels"):
        prepare_datasets(train_data_dir=folder, resolution=4, num_channels=2)


def test_imagefolder_single_image_cannot_be_split(tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    Image.fromarray(synthetic_image(0), "L").save(folder / "only.png")
    with pytest.raises(DataError, match="at least 1 image in each"):
        prepare_datasets(train_data_dir=folder, resolution=4, num_channels=1, cache_dir=str(tmp_path / "c"))


# ------------------------------------------------------------------------------------------------
# Hub data sets (monkeypatched: no network)
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def _no_hub_probe(monkeypatch):
    """These tests replace datasets.load_dataset; skip the (network) reachability probe that precedes it, and
    take the online path even when the suite runs with HF_HUB_OFFLINE=1."""
    import noise_rater.data

    monkeypatch.setattr(noise_rater.data, "_probe_hub_dataset", lambda repo_id, what: None)
    monkeypatch.setattr(noise_rater.data, "_hub_offline", lambda: False)


@pytest.mark.usefixtures("_no_hub_probe")
def test_hub_failure_is_wrapped(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/some-data' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as info:
        prepare_datasets("someone/some-data", resolution=4, num_channels=1)
    message = str(info.value)
    assert "'someone/some-data'" in message and "unreachable" in message
    assert isinstance(info.value.__cause__, ConnectionError)


@pytest.mark.usefixtures("_no_hub_probe")
def test_hub_dataset_columns(monkeypatch):
    import datasets

    images = [Image.fromarray(synthetic_image(k), "L") for k in range(5)]
    features = datasets.Features(
        {"picture": datasets.Image(), "kind": datasets.ClassLabel(names=["a", "b", "c", "d", "e"]),
         "caption": datasets.Value("string")}
    )
    table = datasets.Dataset.from_dict(
        {"picture": images, "kind": list(range(5)), "caption": [str(k) for k in range(5)]}, features=features
    )
    calls = []

    def fake_load(name, config=None, **kwargs):
        calls.append((name, config, kwargs))
        return table

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    splits = prepare_datasets(
        "user/pictures", "cfg", resolution=4, num_channels=1, validation_split=0.2, label_column="kind",
        use_labels=True, cache_dir="/tmp/unused",
    )
    assert calls == [("user/pictures", "cfg", {"cache_dir": "/tmp/unused", "split": "train"})]
    assert splits.num_classes == 5
    assert splits.description == "user/pictures (4 train / 1 val, 4x4, 1ch, 5 classes)"
    for i in range(4):
        item = splits.train[i]
        k = int(to_uint8(item["pixel_values"])[0, 0, 0]) // 16
        assert int(item["class_labels"]) == k
        torch.testing.assert_close(item["pixel_values"], expected_unit(synthetic_image(k))[None], rtol=0, atol=0)

    with pytest.raises(DataError, match=r"image_column 'photo'.*\['picture', 'kind', 'caption'\]"):
        prepare_datasets("user/pictures", resolution=4, num_channels=1, image_column="photo")
    with pytest.raises(DataError, match=r"no 'label'/'labels' column.*'kind'"):
        prepare_datasets("user/pictures", resolution=4, num_channels=1, use_labels=True)


@pytest.mark.usefixtures("_no_hub_probe")
def test_hub_dataset_without_image_column(monkeypatch):
    import datasets

    table = datasets.Dataset.from_dict({"text": ["a", "b"], "score": [1, 2]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: table)
    with pytest.raises(DataError, match=r"No image column.*\['text', 'score'\]"):
        prepare_datasets("user/text-only", resolution=4, num_channels=1)


# ------------------------------------------------------------------------------------------------
# Options, splits, flips, loaders
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "exactly one of dataset_name and train_data_dir"),
        (dict(dataset_name="digits", train_data_dir="/tmp"), "exactly one of dataset_name and train_data_dir"),
        (dict(dataset_name="digits", validation_split=0.0), "validation_split"),
        (dict(dataset_name="digits", validation_split=1.0), "validation_split"),
        (dict(dataset_name="digits", max_train_samples=0), "max_train_samples"),
        (dict(dataset_name="digits", resolution=0), "resolution"),
    ],
)
def test_option_errors(kwargs, match):
    kwargs = {"resolution": 8, "num_channels": 1, **kwargs}
    with pytest.raises(DataError, match=match):
        prepare_datasets(**kwargs)


def test_validation_split_deterministic_and_disjoint(tmp_path, monkeypatch):
    directory = tmp_path / "fashion50"
    n = 15  # 16 * 14 + 15 < 256: every image has a distinct top-left pixel
    write_idx(directory, np.stack([synthetic_image(k) for k in range(n)]), np.arange(n) % 10)
    monkeypatch.setenv("NOISE_RATER_FASHION_MNIST_DIR", str(directory))

    def split(seed, **kwargs):
        s = prepare_datasets("fashion_mnist", resolution=4, num_channels=1, validation_split=0.2, seed=seed, **kwargs)
        return image_ids(s.train), image_ids(s.validation)

    train_a, val_a = split(0)
    train_b, val_b = split(0)
    assert (train_a, val_a) == (train_b, val_b)
    assert len(val_a) == 3 and len(train_a) == 12
    assert not set(train_a) & set(val_a) and sorted(train_a + val_a) == list(range(n))
    other = [split(seed)[1] for seed in (1, 2, 3)]
    assert any(v != val_a for v in other)

    # max_train_samples: a deterministic subset of the train split; validation unchanged.
    train_c, val_c = split(0, max_train_samples=5)
    assert val_c == val_a and len(train_c) == 5 and set(train_c) <= set(train_a)
    assert split(0, max_train_samples=5) == (train_c, val_c)
    assert split(0, max_train_samples=1000)[0] == train_a


def test_max_train_samples_digits():
    splits = prepare_datasets("digits", resolution=8, num_channels=1, max_train_samples=7)
    assert (len(splits.train), len(splits.validation)) == (7, 180)
    assert splits.description.startswith("digits (7 train / 180 val")


def test_random_flip_reproducible():
    plain = prepare_datasets("digits", resolution=8, num_channels=1, seed=3)
    flipping = prepare_datasets("digits", resolution=8, num_channels=1, seed=3, random_flip=True)

    def draw():
        return [flipping.train[i]["pixel_values"] for i in range(64)]

    torch.manual_seed(1234)
    first = draw()
    torch.manual_seed(1234)
    second = draw()
    assert all(torch.equal(a, b) for a, b in zip(first, second))

    flipped = 0
    for i, x in enumerate(first):
        original = plain.train[i]["pixel_values"]
        if torch.equal(x, original.flip(-1)) and not torch.equal(x, original):
            flipped += 1
        else:
            assert torch.equal(x, original)
    assert 10 < flipped < 54  # about half of 64 are flipped

    # The flips follow torch.rand(1) < 0.5 drawn once per item from the global RNG.
    torch.manual_seed(1234)
    decisions = [torch.rand(1).item() < 0.5 for _ in range(64)]
    for i, x in enumerate(first):
        original = plain.train[i]["pixel_values"]
        assert torch.equal(x, original.flip(-1) if decisions[i] else original)

    # Validation is never flipped.
    for i in range(20):
        assert torch.equal(flipping.validation[i]["pixel_values"], plain.validation[i]["pixel_values"])


def test_make_dataloader_reproducible_and_infinite():
    splits = prepare_datasets("digits", resolution=8, num_channels=1, use_labels=True, max_train_samples=20)

    def labels_in_order(seed):
        loader = make_dataloader(splits.train, batch_size=8, shuffle=True, seed=seed)
        assert len(loader) == 2  # drop_last: 20 // 8
        return [batch["class_labels"].tolist() for batch in loader]

    assert labels_in_order(5) == labels_in_order(5)
    batch = next(iter(make_dataloader(splits.train, batch_size=8, shuffle=False, seed=0)))
    assert batch["pixel_values"].shape == (8, 1, 8, 8) and batch["class_labels"].shape == (8,)
    assert batch["class_labels"].tolist() == [int(splits.train[i]["class_labels"]) for i in range(8)]

    loader = make_dataloader(splits.train, batch_size=8, shuffle=True, seed=0)
    stream = infinite_batches(loader)
    batches = [next(stream) for _ in range(5)]  # 2.5 epochs
    assert all(b["pixel_values"].shape == (8, 1, 8, 8) for b in batches)
    # Each epoch is reshuffled by the loader's generator, yet the whole stream is reproducible.
    stream2 = infinite_batches(make_dataloader(splits.train, batch_size=8, shuffle=True, seed=0))
    assert [next(stream2)["class_labels"].tolist() for _ in range(5)] == [b["class_labels"].tolist() for b in batches]


def test_make_dataloader_too_small_for_a_batch():
    splits = prepare_datasets("digits", resolution=8, num_channels=1, max_train_samples=3)
    with pytest.raises(DataError, match="batch_size=4"):
        make_dataloader(splits.train, batch_size=4, shuffle=True, seed=0)
    loader = make_dataloader(splits.train, batch_size=4, shuffle=True, seed=0, drop_last=False)
    assert next(infinite_batches(loader))["pixel_values"].shape == (3, 1, 8, 8)
    with pytest.raises(DataError, match="no batch"):
        next(infinite_batches([]))


def test_module_exports():
    assert set(data.__all__) >= {
        "DataError", "BUILTIN_DATASETS", "FASHION_MNIST_DIR", "DatasetSplits", "preflight_image_folder",
        "prepare_datasets", "make_dataloader", "infinite_batches",
    }
