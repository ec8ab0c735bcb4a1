"""Hub data set names (ffhq, imagenet aliases) and the fast, clear failure when the Hub cannot be reached.

Everything runs offline: the aliases are pointed at a local parquet data set of the same shape as the Hub copies
(column "image" of PNG bytes, "label" for ImageNet), and the failure cases use HF_HUB_OFFLINE=1 or an endpoint
that refuses connections.
"""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from noise_rater import data as nr_data
from noise_rater.data import HUB_DATASET_ALIASES, DataError, prepare_datasets, resolve_dataset_name

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_aliases_resolve_and_full_ids_pass_through(tmp_path, monkeypatch, caplog):
    assert HUB_DATASET_ALIASES == {"ffhq": "merkol/ffhq-256", "imagenet": "ILSVRC/imagenet-1k"}
    with caplog.at_level(logging.INFO, logger="noise_rater.data"):
        assert resolve_dataset_name("ffhq") == "merkol/ffhq-256"
        assert resolve_dataset_name("ImageNet") == "ILSVRC/imagenet-1k"
    assert "'ffhq' resolves to 'merkol/ffhq-256'" in caplog.text
    assert resolve_dataset_name("someone/ffhq-1024") == "someone/ffhq-1024"
    assert resolve_dataset_name("cifar10") == "cifar10"
    # An existing local folder of that name is what the user means.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ffhq").mkdir()
    assert resolve_dataset_name("ffhq") == "ffhq"


def _write_parquet_dataset(folder, colors, labels=None):
    """A folder ``data/train-00000-of-00001.parquet`` as on the Hub: column "image" (PNG bytes), optional "label"."""
    import datasets
    from PIL import Image

    columns = {"image": [Image.new("RGB", (12, 10), tuple(int(v) for v in c)) for c in colors]}
    features = {"image": datasets.Image()}
    if labels is not None:
        columns["label"] = labels
        features["label"] = datasets.ClassLabel(num_classes=int(max(labels)) + 1)
    ds = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    ds.to_parquet(os.path.join(folder, "data", "train-00000-of-00001.parquet"))
    return folder


def test_ffhq_and_imagenet_names_load_a_local_copy_of_the_same_shape(tmp_path, monkeypatch):
    colors = np.stack([np.arange(20) * 10, 255 - np.arange(20) * 10, np.full(20, 7)], axis=1)
    ffhq = _write_parquet_dataset(str(tmp_path / "ffhq-256"), colors)
    imagenet = _write_parquet_dataset(str(tmp_path / "imagenet-1k"), colors, labels=[i % 4 for i in range(20)])
    monkeypatch.setitem(HUB_DATASET_ALIASES, "ffhq", ffhq)
    monkeypatch.setitem(HUB_DATASET_ALIASES, "imagenet", imagenet)

    splits = prepare_datasets("ffhq", resolution=8, num_channels=3, validation_split=0.25, seed=0,
                              cache_dir=str(tmp_path / "cache"))
    assert len(splits.train) == 15 and len(splits.validation) == 5
    seen = set()
    for ds in (splits.train, splits.validation):
        for i in range(len(ds)):
            x = ds[i]["pixel_values"]
            assert x.shape == (3, 8, 8)
            # A solid colour stays solid through resize + crop: x = c / 127.5 - 1 for the colour c of some row.
            c = torch.round((x[:, 0, 0] + 1) * 127.5).to(torch.int64).tolist()
            assert torch.allclose(x, (torch.tensor(c, dtype=torch.float32) / 127.5 - 1).view(3, 1, 1), atol=1e-6)
            seen.add(tuple(c))
    assert seen == {tuple(int(v) for v in row) for row in colors}

    labelled = prepare_datasets("imagenet", resolution=8, num_channels=3, use_labels=True,
                                cache_dir=str(tmp_path / "cache"))
    assert labelled.num_classes == 4
    assert all(int(labelled.train[i]["class_labels"]) in range(4) for i in range(len(labelled.train)))


_CHILD = r"""
import json, sys, time
from noise_rater.data import DataError, prepare_datasets
out = {}
for name in sys.argv[1:]:
    start = time.perf_counter()
    try:
        prepare_datasets(name, resolution=8, num_channels=3)
        out[name] = {"error": None}
    except DataError as e:
        out[name] = {"error": str(e)}
    out[name]["seconds"] = time.perf_counter() - start
print(json.dumps(out))
"""


def _run_child(env_update, names, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(PYTHONPATH=REPO_ROOT, HF_HOME=str(tmp_path / "hf_home"), **env_update)
    proc = subprocess.run([sys.executable, "-c", _CHILD, *names], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("env_update, reason", [
    ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "is unreachable"),  # nothing listens on port 9
])
def test_offline_or_unreachable_hub_fails_fast_with_one_clear_message(env_update, reason, tmp_path):
    out = _run_child(env_update, ["ffhq", "imagenet"], tmp_path)
    for name, hub_id in (("ffhq", "merkol/ffhq-256"), ("imagenet", "ILSVRC/imagenet-1k")):
        msg, seconds = out[name]["error"], out[name]["seconds"]
        assert msg is not None, out
        # datasets' own retries take ~25 s against an unreachable Hub; one short probe fails at once.
        assert seconds < 10.0, (name, seconds)
        assert reason in msg and hub_id in msg and repr(name) in msg
        for needle in ("HF_HUB_OFFLINE", "--train_data_dir", "digits", "fashion_mnist"):
            assert needle in msg, (needle, msg)
        assert "\n" not in msg
    if "HF_HUB_OFFLINE" in env_update:
        assert "hf auth login" in out["imagenet"]["error"] and "huggingface-cli login" in out["imagenet"]["error"]
        assert "hf auth login" not in out["ffhq"]["error"]


def test_not_found_on_the_hub_names_aliases(monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    class _Response:
        status_code, headers, url, request = 404, {}, "https://huggingface.co/api/datasets/x", None

    def not_found(self, repo_id, **kwargs):
        raise RepositoryNotFoundError(f"404 {repo_id}", response=_Response())

    monkeypatch.setattr(HfApi, "dataset_info", not_found)
    monkeypatch.setattr(nr_data, "_hub_offline", lambda: False)
    with pytest.raises(DataError, match=r"no data set 'ffhq256'.*ffhq -> merkol/ffhq-256.*digits, fashion_mnist"):
        prepare_datasets("ffhq256", resolution=8, num_channels=3)
