"""Tests for crash-safe checkpoints (noise_rater/checkpointing.py)."""

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from noise_rater import checkpointing as ckpt
from noise_rater.checkpointing import (
    CheckpointError,
    capture_rng_state,
    checkpoint_step,
    list_checkpoints,
    load_module_state,
    load_rng_state,
    load_torch_state,
    resolve_checkpoint,
    restore_rng_state,
    save_checkpoint,
    save_module_state,
    save_rng_state,
    save_torch_state,
    validate_checkpoint,
)

LOGGER = "noise_rater.checkpointing"


def _write_bytes(name: str, data: bytes):
    """A write_fn that writes one payload file."""

    def write_fn(tmp_dir):
        with open(os.path.join(tmp_dir, name), "wb") as f:
            f.write(data)

    return write_fn


def _save_simple(out, step, **kwargs):
    """Checkpoint with a 'payload.bin' (content depends on step) and a nested 'sub/extra.txt'."""

    def write_fn(tmp_dir):
        _write_bytes("payload.bin", bytes([step % 256]) * 1000 + os.urandom(24))(tmp_dir)
        os.makedirs(os.path.join(tmp_dir, "sub"))
        _write_bytes(os.path.join("sub", "extra.txt"), f"step {step}".encode())(tmp_dir)

    return save_checkpoint(out, step, write_fn, **kwargs)


def _hidden(out):
    return sorted(n for n in os.listdir(out) if n.startswith("."))


def _visible_checkpoints(out):
    return sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))


def _read_latest(out):
    with open(os.path.join(out, "latest")) as f:
        return f.read().strip()


def _flip_byte(path, offset=10):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


class _Model(torch.nn.Module):
    """Tied input/output embedding (shared storage) and a BatchNorm with an int64 buffer."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.hidden = torch.nn.Linear(6, 6)
        self.out = torch.nn.Linear(6, 11, bias=False)
        self.out.weight = self.embed.weight  # tied (shared storage)
        self.norm = torch.nn.BatchNorm1d(6)  # has int64 buffer num_batches_tracked


# ---------------------------------------------------------------------------------------------------------------
# Saving / loading
# ---------------------------------------------------------------------------------------------------------------


def test_roundtrip(tmp_path):
    out = str(tmp_path / "out")
    torch.manual_seed(0)
    model = _Model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3)
    model.out(model.norm(model.hidden(model.embed(torch.tensor([1, 2]))))).sum().backward()
    opt.step()
    sched.step()
    gen = torch.Generator().manual_seed(5)

    def write_fn(d):
        save_module_state(model, os.path.join(d, "model.safetensors"))
        train_state = {"optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict()}
        save_torch_state(train_state, os.path.join(d, "train.pt"))
        save_rng_state(os.path.join(d, "rng.pt"), {"noise": gen})

    path = save_checkpoint(out, 7, write_fn, metadata={"epoch": 1, "note": "x"})
    assert path == os.path.join(out, "checkpoint-7")
    assert checkpoint_step(path) == 7
    assert list_checkpoints(out) == [path]
    assert _hidden(out) == []

    manifest = validate_checkpoint(path)
    assert manifest["step"] == 7 and manifest["metadata"] == {"epoch": 1, "note": "x"}
    assert sorted(e["path"] for e in manifest["files"]) == ["model.safetensors", "rng.pt", "train.pt"]
    with open(os.path.join(path, "checkpoint.json")) as f:
        assert json.load(f) == manifest

    model2 = _Model()
    load_module_state(model2, os.path.join(path, "model.safetensors"))
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), k
    assert model2.out.weight.data_ptr() == model2.embed.weight.data_ptr()  # tie survives the load

    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=3)
    state = load_torch_state(os.path.join(path, "train.pt"))
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["lr_scheduler"])
    assert sched2.state_dict() == sched.state_dict()
    for group_a, group_b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        for key in group_a:
            assert torch.equal(torch.as_tensor(group_a[key]), torch.as_tensor(group_b[key]))


def test_latest_pointer_and_overwrite(tmp_path):
    out = str(tmp_path)
    for step in (1, 2, 3):
        _save_simple(out, step)
        assert _read_latest(out) == f"checkpoint-{step}"
    assert resolve_checkpoint(out, "latest") == os.path.join(out, "checkpoint-3")
    assert resolve_checkpoint(out, "checkpoint-1") == os.path.join(out, "checkpoint-1")
    assert resolve_checkpoint(out, os.path.join(out, "checkpoint-2")) == os.path.join(out, "checkpoint-2")
    assert resolve_checkpoint(out, None) is None

    # Saving an existing step replaces it; latest follows the most recent save even if its step is lower.
    old_payload = open(os.path.join(out, "checkpoint-2", "payload.bin"), "rb").read()
    path = _save_simple(out, 2)
    assert _read_latest(out) == "checkpoint-2"
    assert resolve_checkpoint(out, "latest") == path
    assert open(os.path.join(path, "payload.bin"), "rb").read() != old_payload
    assert _hidden(out) == []
    assert [checkpoint_step(p) for p in list_checkpoints(out)] == [1, 2, 3]


def test_total_limit_prunes_only_after_new_checkpoint_is_complete(tmp_path):
    out = str(tmp_path)
    for step in range(1, 6):
        _save_simple(out, step, total_limit=2)
    assert _visible_checkpoints(out) == ["checkpoint-4", "checkpoint-5"]

    seen_during_write = []

    def write_fn(d):
        seen_during_write.append([checkpoint_step(p) for p in list_checkpoints(out)])
        _write_bytes("payload.bin", b"six")(d)

    save_checkpoint(out, 6, write_fn, total_limit=2)
    assert seen_during_write == [[4, 5]]  # nothing deleted before the new one existed
    assert _visible_checkpoints(out) == ["checkpoint-5", "checkpoint-6"]
    assert _read_latest(out) == "checkpoint-6"

    # A save that fails part way leaves old checkpoints and `latest` untouched.
    def failing(d):
        _write_bytes("payload.bin", b"partial")(d)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(out, 7, failing, total_limit=1)
    assert _visible_checkpoints(out) == ["checkpoint-5", "checkpoint-6"]
    assert _read_latest(out) == "checkpoint-6"
    assert resolve_checkpoint(out, "latest") == os.path.join(out, "checkpoint-6")

    # Work dirs left by a crashed process are removed by the next save.
    os.makedirs(os.path.join(out, ".checkpoint-7.tmp-deadbeef"))
    _write_bytes("junk", b"x" * 100)(os.path.join(out, ".checkpoint-7.tmp-deadbeef"))
    _write_bytes(".latest.tmp-abc", b"checkpoint-7")(out)
    assert _hidden(out) != []
    _save_simple(out, 7, total_limit=1)
    assert _hidden(out) == []
    assert _visible_checkpoints(out) == ["checkpoint-7"]
    assert _read_latest(out) == "checkpoint-7"


def test_total_limit_never_deletes_the_new_checkpoint(tmp_path):
    out = str(tmp_path)
    _save_simple(out, 10)
    _save_simple(out, 5, total_limit=1)  # e.g. a restarted run saving a lower step
    assert _visible_checkpoints(out) == ["checkpoint-5"]
    assert resolve_checkpoint(out, "latest") == os.path.join(out, "checkpoint-5")


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError):
        _save_simple(str(tmp_path), 1, total_limit=0)
    with pytest.raises(TypeError):
        _save_simple(str(tmp_path), 1, metadata={"bad": object()})
    assert not os.path.exists(tmp_path / "checkpoint-1")
    with pytest.raises(CheckpointError, match="reserved"):
        save_checkpoint(str(tmp_path), 1, _write_bytes("checkpoint.json", b"{}"))
    assert _visible_checkpoints(str(tmp_path)) == [] and _hidden(str(tmp_path)) == []


# ---------------------------------------------------------------------------------------------------------------
# Validation and fallback
# ---------------------------------------------------------------------------------------------------------------


def test_truncated_file_explicit_resolve_raises_naming_file(tmp_path):
    out = str(tmp_path)
    _save_simple(out, 1)
    path = _save_simple(out, 2)
    target = os.path.join(path, "sub", "extra.txt")
    with open(target, "r+b") as f:
        f.truncate(3)
    for spec in ("checkpoint-2", path):
        with pytest.raises(CheckpointError) as info:
            resolve_checkpoint(out, spec)
        assert "sub/extra.txt" in str(info.value) and "truncated" in str(info.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(out, "checkpoint-99")


def test_missing_or_bad_manifest(tmp_path):
    out = str(tmp_path)
    path = _save_simple(out, 1)
    manifest = os.path.join(path, "checkpoint.json")
    with open(manifest, "w") as f:
        f.write('{"format": "noise_rater-checkpoint", "step": 1, "fil')  # torn write
    with pytest.raises(CheckpointError, match="checkpoint.json.*cannot be parsed"):
        validate_checkpoint(path)
    os.remove(manifest)
    with pytest.raises(CheckpointError, match="checkpoint.json is missing"):
        resolve_checkpoint(out, "checkpoint-1")
    assert list_checkpoints(out) == []

    path = _save_simple(out, 2)
    os.remove(os.path.join(path, "payload.bin"))
    with pytest.raises(CheckpointError, match="payload.bin.*missing"):
        validate_checkpoint(path)


def test_corrupted_byte_same_size_detected_by_sha256(tmp_path):
    out = str(tmp_path)
    path = _save_simple(out, 1)
    target = os.path.join(path, "payload.bin")
    size = os.path.getsize(target)
    _flip_byte(target)
    assert os.path.getsize(target) == size
    with pytest.raises(CheckpointError) as info:
        validate_checkpoint(path)
    assert "payload.bin" in str(info.value) and "sha256" in str(info.value)
    validate_checkpoint(path, check_hashes=False)  # sizes alone can't see it


def test_latest_falls_back_to_previous_good_checkpoint(tmp_path, caplog):
    out = str(tmp_path)
    for step in (1, 2, 3):
        _save_simple(out, step)
    _flip_byte(os.path.join(out, "checkpoint-3", "payload.bin"))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert resolve_checkpoint(out, "latest") == os.path.join(out, "checkpoint-2")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checkpoint-2" in w and "payload.bin" in w and "checkpoint-3" in w for w in warnings), warnings

    # Everything broken -> None (start fresh) with a warning.
    caplog.clear()
    for step in (1, 2):
        with open(os.path.join(out, f"checkpoint-{step}", "sub", "extra.txt"), "ab") as f:
            f.write(b"!")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert resolve_checkpoint(out, "latest") is None
    assert any("No valid checkpoint" in r.getMessage() for r in caplog.records)


def test_latest_without_or_with_broken_pointer_scans_by_step(tmp_path, caplog):
    out = str(tmp_path)
    assert resolve_checkpoint(str(tmp_path / "missing"), "latest") is None
    assert resolve_checkpoint(out, "latest") is None
    for step in (2, 10, 9):
        _save_simple(out, step)
    os.remove(os.path.join(out, "latest"))
    assert resolve_checkpoint(out, "latest") == os.path.join(out, "checkpoint-10")

    with open(os.path.join(out, "latest"), "w") as f:
        f.write("checkpoint-42\n")  # names a checkpoint that doesn't exist
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        # next-newest *older* than the pointer target first
        assert resolve_checkpoint(out, "latest") == os.path.join(out, "checkpoint-10")
    assert any("checkpoint-42" in r.getMessage() for r in caplog.records)

    with open(os.path.join(out, "latest"), "w") as f:
        f.write("../../etc")
    assert resolve_checkpoint(out, "latest") == os.path.join(out, "checkpoint-10")

    with open(os.path.join(out, "latest"), "w") as f:
        f.write("checkpoint-9")
    shutil.rmtree(os.path.join(out, "checkpoint-9"))
    assert resolve_checkpoint(out, "latest") == os.path.join(out, "checkpoint-2")


def test_crash_while_replacing_same_step_recovers_moved_aside_checkpoint(tmp_path):
    out = str(tmp_path)
    _save_simple(out, 1)
    path = _save_simple(out, 2)
    # Simulate a crash after the old checkpoint-2 was renamed aside but before the new one was renamed in.
    aside = os.path.join(out, ".checkpoint-2.old-cafe")
    os.rename(path, aside)
    assert resolve_checkpoint(out, "latest") == aside
    _save_simple(out, 3)  # the next save puts it back
    assert _visible_checkpoints(out) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert _hidden(out) == []
    validate_checkpoint(os.path.join(out, "checkpoint-2"))


# ---------------------------------------------------------------------------------------------------------------
# Plain-state helpers
# ---------------------------------------------------------------------------------------------------------------


def _draw(torch_gen, np_gen):
    return (
        [random.random() for _ in range(3)] + [random.gauss(0, 1)],
        np.random.rand(4).tolist() + [np.random.randn()],
        torch.rand(4).tolist() + torch.randn(2).tolist(),
        torch.rand(5, generator=torch_gen).tolist(),
        np_gen.standard_normal(3).tolist(),
    )


def test_rng_roundtrip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch_gen = torch.Generator().manual_seed(4)
    np_gen = np.random.default_rng(5)
    random.gauss(0, 1)  # leaves a cached gaussian (gauss_next) in the python state
    np.random.randn()  # odd count leaves numpy's cached gaussian set
    gens = {"noise": torch_gen, "np": np_gen}

    state = capture_rng_state(gens)
    first = _draw(torch_gen, np_gen)
    restore_rng_state(state, gens)
    assert _draw(torch_gen, np_gen) == first

    path = str(tmp_path / "rng.pt")
    save_rng_state(path, gens)
    first = _draw(torch_gen, np_gen)
    _draw(torch_gen, np_gen)  # advance further
    load_rng_state(path, gens)
    assert _draw(torch_gen, np_gen) == first

    raw = torch.load(path, weights_only=True)  # plain data only
    json.dumps(raw["python"]), json.dumps(raw["numpy"])
    assert raw["torch"].dtype == torch.uint8


def test_rng_restore_warns_for_unknown_generator(caplog):
    state = capture_rng_state()
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        restore_rng_state(state, {"new": g})
    assert torch.equal(g.get_state(), before)
    assert any("'new'" in r.getMessage() for r in caplog.records)


def test_module_state_roundtrip_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = _Model()
    model.hidden.weight = torch.nn.Parameter(torch.randn(6, 6).t())  # non-contiguous parameter
    assert not model.hidden.weight.is_contiguous()
    with torch.no_grad():
        model.norm.running_mean.copy_(torch.tensor([float("nan"), -0.0, 1e-45, 3.0, -2.0, 1e30]))
        model.norm.num_batches_tracked.fill_(123)
    path = str(tmp_path / "model.safetensors")
    save_module_state(model, path)

    other = _Model()
    load_module_state(other, path)
    sd_a, sd_b = model.state_dict(), other.state_dict()
    assert list(sd_a) == list(sd_b)
    for k in sd_a:
        assert sd_a[k].dtype == sd_b[k].dtype and sd_a[k].shape == sd_b[k].shape
        assert sd_a[k].reshape(-1).view(torch.uint8).equal(sd_b[k].reshape(-1).view(torch.uint8)), k


def test_module_state_strict_and_load_errors_name_path(tmp_path):
    path = str(tmp_path / "model.safetensors")
    save_module_state(torch.nn.Linear(3, 4), path)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_module_state(torch.nn.Linear(3, 5), path)  # shape mismatch
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_module_state(torch.nn.Linear(3, 4, bias=False), path)  # unexpected key
    with open(path, "r+b") as f:
        f.truncate(20)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_module_state(torch.nn.Linear(3, 4), path)


def test_torch_state_refuses_pickled_objects_and_garbage(tmp_path):
    path = str(tmp_path / "opt.pt")
    save_torch_state({"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}, path)
    assert load_torch_state(path)["param_groups"][0]["lr"] == 0.1

    bad = str(tmp_path / "module.pt")
    torch.save(torch.nn.Linear(2, 2), bad)  # a pickled module: must not be loadable
    with pytest.raises(CheckpointError, match="module.pt"):
        load_torch_state(bad)
    garbage = str(tmp_path / "garbage.pt")
    _write_bytes("garbage.pt", b"not a torch file")(str(tmp_path))
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_torch_state(garbage)
    with pytest.raises(CheckpointError, match="nope.pt"):
        load_torch_state(str(tmp_path / "nope.pt"))


# ---------------------------------------------------------------------------------------------------------------
# Real crash: SIGKILL a process while it is saving
# ---------------------------------------------------------------------------------------------------------------

_SAVER = textwrap.dedent(
    """
    import importlib.util, os, sys
    spec = importlib.util.spec_from_file_location("nr_checkpointing", sys.argv[1])
    ckpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ckpt)
    import torch

    out = sys.argv[2]
    last = ckpt.resolve_checkpoint(out, "latest")
    start = ckpt.checkpoint_step(last) + 1 if last else 1
    model = torch.nn.Linear(512, 512)

    def write_fn(d):
        for i in range(4):
            with open(os.path.join(d, f"shard-{i}.bin"), "wb") as f:
                for _ in range(8):
                    f.write(os.urandom(256 * 1024))
        ckpt.save_module_state(model, os.path.join(d, "model.safetensors"))
        ckpt.save_rng_state(os.path.join(d, "rng.pt"))

    for step in range(start, start + 10000):
        ckpt.save_checkpoint(out, step, write_fn, total_limit=2, metadata={"step": step})
        print(f"saved {step}", flush=True)
    """
)


def test_sigkill_during_saves_leaves_a_valid_latest(tmp_path, caplog):
    out = str(tmp_path / "out")
    module_path = ckpt.__file__
    rng = random.Random(0)
    killed_mid_save = 0
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", _SAVER, module_path, out],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            saved = []
            deadline = time.monotonic() + 120
            while len(saved) < 2 and time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line:
                    pytest.fail(f"saver exited early (rc={proc.wait()}): {proc.stderr.read()}")
                saved.append(int(line.split()[1]))
            assert len(saved) >= 2, "saver too slow"
            time.sleep(rng.uniform(0.0, 0.2))  # land somewhere inside a later save
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL

        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            path = resolve_checkpoint(out, "latest")
        assert path is not None
        manifest = validate_checkpoint(path)
        assert manifest["step"] >= saved[-1]  # every reported save is durable and visible
        assert os.path.basename(path) == _read_latest(out)  # the pointer itself was valid, no fallback needed
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        for name in _visible_checkpoints(out):  # no visible checkpoint-* is ever partial
            validate_checkpoint(os.path.join(out, name))
        assert len(_visible_checkpoints(out)) <= 3  # total_limit=2, plus at most one not yet pruned
        killed_mid_save += any(".tmp-" in n for n in _hidden(out))
    assert killed_mid_save > 0, "no kill landed inside a save; the test did not exercise a crash"


def test_checkpoint_files_follow_the_umask_not_owner_only(tmp_path):
    """mkdtemp and safetensors create owner-only entries; a saved checkpoint must be readable as the umask allows."""
    import stat

    from noise_rater.checkpointing import apply_default_permissions, save_checkpoint, save_module_state

    old = os.umask(0o022)
    try:
        path = save_checkpoint(str(tmp_path), 1, lambda d: save_module_state(torch.nn.Linear(2, 2),
                                                                             os.path.join(d, "m.safetensors")))
        for p in [path, os.path.join(path, "m.safetensors")]:
            mode = stat.S_IMODE(os.stat(p).st_mode)
            assert mode & 0o044 == 0o044, (p, oct(mode))  # group and others can read
        private = tmp_path / "private.bin"
        private.write_bytes(b"x")
        os.chmod(private, 0o600)
        apply_default_permissions(str(private))
        assert stat.S_IMODE(os.stat(private).st_mode) == 0o644
    finally:
        os.umask(old)
