"""Crash-safe checkpoints made of plain state (tensors, state dicts, RNG states), never pickled modules.

Layout of ``output_dir``::

    checkpoint-1000/            complete checkpoint: payload files + ``checkpoint.json`` (manifest)
    checkpoint-2000/
    latest                      text file naming the newest complete checkpoint dir ("checkpoint-2000")
    .checkpoint-3000.tmp-<rand>  in-progress (or crashed) save; never read, removed by the next save

A save writes everything into a hidden temporary directory next to the final one, fsyncs it, writes the
manifest (step, files with byte size and sha256) last, renames the directory into place and only then
updates ``latest`` (write + ``os.replace``) and prunes old checkpoints. A ``checkpoint-N`` directory is
therefore always complete, and ``latest`` never names a partial one.

Call :func:`save_checkpoint` from one process only (e.g. ``accelerator.is_main_process``): the temporary
directory name is random and a concurrent save into the same ``output_dir`` would remove it as stale.
"""

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

logger = logging.getLogger(__name__)

MANIFEST_NAME = "checkpoint.json"
LATEST_NAME = "latest"
FORMAT_NAME = "noise_rater-checkpoint"
FORMAT_VERSION = 1

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Hidden work dirs: ".checkpoint-{step}.{kind}-{random}" with kind tmp (being written), old (moved aside
# while a checkpoint of the same step is replaced) or trash (being deleted).
_HIDDEN_RE = re.compile(r"^\.checkpoint-(\d+)\.(tmp|old|trash)-.+$")
_HASH_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint (or one of its files) is missing, incomplete, corrupted or cannot be loaded."""


# ----------------------------------------------------------------------------------------------------------------
# Filesystem helpers
# ----------------------------------------------------------------------------------------------------------------


def _fsync_file(path: str) -> None:
    """Flush a file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    """Flush a directory's entries (renames, creations) to disk; a no-op where directories can't be opened."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _random_suffix() -> str:
    """Eight random hex characters (independent of the seeded ``random``/numpy/torch generators)."""
    return os.urandom(4).hex()


def _hidden_dir(output_dir: str, step: int, kind: str) -> str:
    """Path of a fresh hidden work directory name ``.checkpoint-{step}.{kind}-{random}`` (not created)."""
    return os.path.join(output_dir, f".checkpoint-{step}.{kind}-{_random_suffix()}")


def _remove_dir(path: str) -> None:
    """Delete a directory without ever leaving a partially deleted *visible* checkpoint: rename, then rmtree."""
    parent, name = os.path.split(os.path.abspath(path))
    match = _CHECKPOINT_RE.match(name)
    if match:
        trash = _hidden_dir(parent, int(match.group(1)), "trash")
        os.rename(path, trash)
        path = trash
    shutil.rmtree(path, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_default_permissions(path: str) -> None:
    """Give ``path`` (recursively, for a folder) the permissions a plain ``open``/``mkdir`` would have given
    under the current umask. Temporary files and folders (``tempfile``) and some writers (safetensors) create
    owner-only files, which other users of a shared folder could not load."""
    mask = _umask()
    paths = [path]
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            paths += [os.path.join(root, d) for d in dirs] + [os.path.join(root, f) for f in files]
    for p in paths:
        if os.path.islink(p):
            continue
        try:
            os.chmod(p, (0o777 if os.path.isdir(p) else 0o666) & ~mask)
        except OSError:  # not ours to change: leave it
            pass


def _write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory, fsync and ``os.replace``."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        apply_default_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


# ----------------------------------------------------------------------------------------------------------------
# Manifest and validation
# ----------------------------------------------------------------------------------------------------------------


def _payload_files(directory: str) -> List[str]:
    """Relative ('/'-separated) paths of all regular files under ``directory``, sorted; rejects symlinks."""
    files = []
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, directory).replace(os.sep, "/")
            if os.path.islink(full) or not os.path.isfile(full):
                raise CheckpointError(f"Checkpoint payload {rel!r} in {directory} is not a regular file.")
            files.append(rel)
    return sorted(files)


def _build_manifest(directory: str, step: int, metadata: Optional[dict]) -> dict:
    """fsync every payload file (and sub-directory) and describe it by size and sha256."""
    entries = []
    for rel in _payload_files(directory):
        if rel == MANIFEST_NAME:
            raise CheckpointError(f"write_fn must not write {MANIFEST_NAME!r}; the name is reserved for the manifest.")
        full = os.path.join(directory, rel)
        _fsync_file(full)
        entries.append({"path": rel, "size": os.path.getsize(full), "sha256": _sha256(full)})
    for root, _, _ in os.walk(directory):
        _fsync_dir(root)
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "created": time.time(),
        "files": entries,
        "metadata": metadata if metadata is not None else {},
    }


def _read_manifest(path: str) -> dict:
    """Parse and structurally check ``path/checkpoint.json``; raise :class:`CheckpointError` naming it."""
    manifest_path = os.path.join(path, MANIFEST_NAME)
    if not os.path.isdir(path):
        raise CheckpointError(f"Checkpoint {path} does not exist or is not a directory.")
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"Checkpoint {path} is incomplete: manifest {manifest_path} is missing.")
    try:
        with open(manifest_path, "r", encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"Checkpoint manifest {manifest_path} cannot be parsed: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"Checkpoint manifest {manifest_path} is not a {FORMAT_NAME} manifest.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint manifest {manifest_path} has format_version {manifest.get('format_version')!r}; "
            f"this code reads version {FORMAT_VERSION}."
        )
    files = manifest.get("files")
    if not isinstance(manifest.get("step"), int) or not isinstance(files, list):
        raise CheckpointError(f"Checkpoint manifest {manifest_path} lacks an integer 'step' or a 'files' list.")
    for entry in files:
        ok = isinstance(entry, dict) and isinstance(entry.get("path"), str) and isinstance(entry.get("size"), int)
        if not ok or not isinstance(entry.get("sha256"), str):
            raise CheckpointError(f"Checkpoint manifest {manifest_path} has a malformed file entry: {entry!r}")
        parts = entry["path"].split("/")
        if entry["path"].startswith("/") or ".." in parts or os.path.isabs(entry["path"]):
            raise CheckpointError(f"Checkpoint manifest {manifest_path} lists an unsafe path {entry['path']!r}.")
    return manifest


def _check_file(path: str, entry: dict, check_hashes: bool) -> None:
    """Check one manifest entry against the file on disk; raise :class:`CheckpointError` naming it."""
    full = os.path.join(path, *entry["path"].split("/"))
    if not os.path.isfile(full):
        raise CheckpointError(f"Checkpoint {path} is incomplete: file {entry['path']!r} ({full}) is missing.")
    size = os.path.getsize(full)
    if size != entry["size"]:
        what = "truncated" if size < entry["size"] else "too large"
        raise CheckpointError(
            f"Checkpoint {path} is corrupted: file {entry['path']!r} ({full}) has {size} bytes, "
            f"expected {entry['size']} ({what})."
        )
    if check_hashes and _sha256(full) != entry["sha256"]:
        raise CheckpointError(
            f"Checkpoint {path} is corrupted: file {entry['path']!r} ({full}) has the right size but its sha256 "
            f"does not match the manifest (expected {entry['sha256']})."
        )


def validate_checkpoint(path: str, *, check_hashes: bool = True) -> dict:
    """Check that ``path`` is a complete, uncorrupted checkpoint and return its manifest.

    Every file listed in ``checkpoint.json`` must exist with the recorded byte size and (unless
    ``check_hashes=False``) sha256. Raises :class:`CheckpointError` whose message names the offending file.
    """
    path = os.fspath(path)
    manifest = _read_manifest(path)
    match = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    if match and int(match.group(1)) != manifest["step"]:
        raise CheckpointError(
            f"Checkpoint manifest {os.path.join(path, MANIFEST_NAME)} records step {manifest['step']} "
            f"but the directory is named for step {match.group(1)}."
        )
    for entry in manifest["files"]:
        _check_file(path, entry, check_hashes)
    return manifest


def checkpoint_step(path: str) -> int:
    """Training step of a checkpoint: from its directory name ``checkpoint-{step}``, else from its manifest."""
    name = os.path.basename(os.path.normpath(os.fspath(path)))
    match = _CHECKPOINT_RE.match(name) or _HIDDEN_RE.match(name)
    if match:
        return int(match.group(1))
    return _read_manifest(os.fspath(path))["step"]


def _has_manifest(path: str) -> bool:
    """Cheap completeness test: a parseable manifest is present (file hashes are not checked)."""
    try:
        _read_manifest(path)
    except CheckpointError:
        return False
    return True


def _checkpoint_dirs(output_dir: str) -> List[str]:
    """All visible ``checkpoint-{step}`` directories (complete or not), sorted by step ascending."""
    if not os.path.isdir(output_dir):
        return []
    names = [n for n in os.listdir(output_dir) if _CHECKPOINT_RE.match(n)]
    paths = [os.path.join(output_dir, n) for n in names if os.path.isdir(os.path.join(output_dir, n))]
    return sorted(paths, key=checkpoint_step)


def list_checkpoints(output_dir: str) -> List[str]:
    """Complete checkpoints (``checkpoint-{step}`` with a parseable manifest) in ``output_dir``, oldest first.

    File sizes/hashes are not checked here; use :func:`validate_checkpoint` for that.
    """
    return [p for p in _checkpoint_dirs(os.fspath(output_dir)) if _has_manifest(p)]


# ----------------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------------


def _clean_stale(output_dir: str) -> None:
    """Remove work dirs left by crashed saves; put back a checkpoint that a crash left moved aside."""
    for name in sorted(os.listdir(output_dir)):
        if name.startswith(f".{LATEST_NAME}.tmp-"):
            os.remove(os.path.join(output_dir, name))  # pointer update interrupted before os.replace
            continue
        match = _HIDDEN_RE.match(name)
        if not match:
            continue
        path = os.path.join(output_dir, name)
        final = os.path.join(output_dir, f"checkpoint-{match.group(1)}")
        if match.group(2) == "old" and not os.path.exists(final) and _has_manifest(path):
            logger.warning("Restoring %s, moved aside by an interrupted save, as %s.", path, final)
            os.rename(path, final)
            continue
        logger.info("Removing stale checkpoint work directory %s.", path)
        shutil.rmtree(path, ignore_errors=True)
    _fsync_dir(output_dir)


def _prune(output_dir: str, keep: str, total_limit: int) -> None:
    """Delete the oldest complete checkpoints so that at most ``total_limit`` remain; never deletes ``keep``."""
    keep = os.path.abspath(keep)
    others = [p for p in list_checkpoints(output_dir) if os.path.abspath(p) != keep]
    excess = len(others) - (total_limit - 1)
    for path in others[: max(excess, 0)]:
        logger.info("Deleting checkpoint %s (total_limit=%d).", path, total_limit)
        _remove_dir(path)
    _fsync_dir(output_dir)


def save_checkpoint(
    output_dir: str,
    step: int,
    write_fn: Callable[[str], object],
    *,
    total_limit: Optional[int] = None,
    metadata: Optional[dict] = None,
) -> str:
    """Atomically create ``output_dir/checkpoint-{step}`` and point ``output_dir/latest`` at it.

    Args:
        output_dir: directory holding the checkpoints (created if needed).
        step: training step; names the directory and is recorded in the manifest.
        write_fn: ``write_fn(tmp_dir)`` writes all payload files (sub-directories allowed) into ``tmp_dir``,
            e.g. with :func:`save_module_state`, :func:`save_torch_state` and :func:`save_rng_state`.
        total_limit: keep at most this many complete checkpoints (the new one included); older ones are
            deleted only after the new one and ``latest`` are in place.
        metadata: JSON-serializable dict stored in the manifest under ``"metadata"``.

    Returns:
        Path of the new checkpoint directory. If ``write_fn`` raises, the temporary directory is removed
        and existing checkpoints and ``latest`` are left untouched.
    """
    output_dir = os.fspath(output_dir)
    step = int(step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if total_limit is not None and total_limit < 1:
        raise ValueError(f"total_limit must be None or >= 1, got {total_limit}")
    json.dumps(metadata)  # fail before writing anything if metadata is not JSON-serializable
    os.makedirs(output_dir, exist_ok=True)
    _clean_stale(output_dir)

    tmp = tempfile.mkdtemp(prefix=f".checkpoint-{step}.tmp-", dir=output_dir)
    try:
        write_fn(tmp)
        apply_default_permissions(tmp)  # mkdtemp and safetensors create owner-only entries
        manifest = _build_manifest(tmp, step, metadata)
        manifest_path = os.path.join(tmp, MANIFEST_NAME)
        with open(manifest_path, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    final = os.path.join(output_dir, f"checkpoint-{step}")
    aside = None
    if os.path.lexists(final):
        aside = _hidden_dir(output_dir, step, "old")
        os.rename(final, aside)
    os.rename(tmp, final)
    _fsync_dir(output_dir)
    _write_text_atomic(os.path.join(output_dir, LATEST_NAME), os.path.basename(final) + "\n")
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    if total_limit is not None:
        _prune(output_dir, final, total_limit)
    return final


# ----------------------------------------------------------------------------------------------------------------
# Resolving which checkpoint to resume from
# ----------------------------------------------------------------------------------------------------------------


def _read_latest(output_dir: str) -> Optional[str]:
    """Path named by the ``latest`` pointer, or None if the pointer is missing or malformed (warns then)."""
    pointer = os.path.join(output_dir, LATEST_NAME)
    if not os.path.isfile(pointer):
        return None
    try:
        with open(pointer, "r", encoding="utf-8") as f:
            name = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        logger.warning("Checkpoint pointer %s is unreadable (%s); scanning for checkpoints.", pointer, e)
        return None
    if not _CHECKPOINT_RE.match(name):
        logger.warning("Checkpoint pointer %s holds %r, not a checkpoint name; scanning.", pointer, name[:100])
        return None
    return os.path.join(output_dir, name)


def _orphaned_asides(output_dir: str) -> List[str]:
    """Checkpoints moved aside by a save that crashed before the replacement was renamed into place."""
    found = []
    for name in os.listdir(output_dir):
        match = _HIDDEN_RE.match(name)
        if match and match.group(2) == "old":
            if not os.path.exists(os.path.join(output_dir, f"checkpoint-{match.group(1)}")):
                found.append(os.path.join(output_dir, name))
    return found


def _latest_candidates(output_dir: str) -> List[str]:
    """Checkpoints to try for ``"latest"``: the pointer's target, then older ones newest first, then newer ones."""
    target = _read_latest(output_dir)
    others = [p for p in _checkpoint_dirs(output_dir) + _orphaned_asides(output_dir) if p != target]
    others.sort(key=checkpoint_step, reverse=True)
    if target is None:
        return others
    target_step = checkpoint_step(target)
    older = [p for p in others if checkpoint_step(p) <= target_step]
    newer = [p for p in others if checkpoint_step(p) > target_step][::-1]
    return [target] + older + newer


def _resolve_latest(output_dir: str, check_hashes: bool) -> Optional[str]:
    """Newest valid checkpoint (pointer first), warning about every broken one skipped; None if none."""
    if not os.path.isdir(output_dir):
        logger.warning("No checkpoint directory %s; starting fresh.", output_dir)
        return None
    problems = []
    for path in _latest_candidates(output_dir):
        try:
            validate_checkpoint(path, check_hashes=check_hashes)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:
            logger.warning(
                "Falling back to checkpoint %s because newer checkpoint(s) are broken: %s", path, " | ".join(problems)
            )
        return path
    if problems:
        logger.warning("No valid checkpoint in %s; starting fresh. Broken: %s", output_dir, " | ".join(problems))
    else:
        logger.warning("No checkpoint found in %s; starting fresh.", output_dir)
    return None


def resolve_checkpoint(output_dir: str, spec: Optional[str], *, check_hashes: bool = True) -> Optional[str]:
    """Turn a ``--resume_from_checkpoint`` value into a validated checkpoint path.

    Args:
        output_dir: directory the checkpoints are saved in.
        spec: ``"latest"`` (the ``latest`` pointer, else the highest step; broken checkpoints are skipped with
            a warning and None is returned when no valid one exists), or a path: absolute, or a name relative
            to ``output_dir`` (e.g. ``"checkpoint-500"``). ``None``/``""`` returns None.
        check_hashes: verify sha256 of every file (reads all bytes); sizes are always checked.

    Returns:
        The checkpoint path, or None (start fresh). An explicit path that is missing or invalid raises
        :class:`CheckpointError` naming the offending file.
    """
    if spec is None or spec == "":
        return None
    output_dir = os.fspath(output_dir)
    spec = os.fspath(spec)
    if spec == "latest":
        return _resolve_latest(output_dir, check_hashes)
    path = spec if os.path.isabs(spec) else os.path.join(output_dir, spec)
    if not os.path.exists(path) and not os.path.isabs(spec) and os.path.isdir(spec):
        path = spec  # a path relative to the working directory
    path = os.path.normpath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"Checkpoint {path} (from {spec!r}) does not exist or is not a directory.")
    validate_checkpoint(path, check_hashes=check_hashes)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Plain-state payload files
# ----------------------------------------------------------------------------------------------------------------


def save_torch_state(obj, path: str) -> None:
    """``torch.save`` a plain nested state (dicts/lists of tensors, numbers, strings), e.g. an optimizer state dict."""
    torch.save(obj, path)


def load_torch_state(path: str):
    """``torch.load(path, weights_only=True, map_location="cpu")``; any failure -> :class:`CheckpointError`."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise CheckpointError(f"Could not load state file {path}: {type(e).__name__}: {e}") from e


def _plain_tensors(state_dict: Dict[str, torch.Tensor], path: str) -> Dict[str, torch.Tensor]:
    """Detached tensors safetensors can write: shared-storage or non-contiguous ones are cloned contiguous."""
    for key, value in state_dict.items():
        if not torch.is_tensor(value):
            raise CheckpointError(f"Cannot write {path}: state_dict entry {key!r} is a {type(value).__name__}.")
    counts: Dict[tuple, int] = {}
    for value in state_dict.values():
        storage = (value.device, value.untyped_storage().data_ptr())
        counts[storage] = counts.get(storage, 0) + 1
    out = {}
    for key, value in state_dict.items():
        shared = counts[(value.device, value.untyped_storage().data_ptr())] > 1
        value = value.detach()
        out[key] = value.contiguous().clone() if shared or not value.is_contiguous() else value
    return out


def save_module_state(module: torch.nn.Module, path: str) -> None:
    """Write ``module.state_dict()`` to a safetensors file (tied/shared tensors are stored as copies)."""
    from safetensors.torch import save_file

    try:
        save_file(_plain_tensors(module.state_dict(), path), path, metadata={"format": "pt"})
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"Could not write module state {path}: {type(e).__name__}: {e}") from e


def load_module_state(module: torch.nn.Module, path: str) -> None:
    """Load a :func:`save_module_state` file into ``module`` (strict: keys and shapes must match)."""
    from safetensors.torch import load_file

    try:
        state_dict = load_file(path, device="cpu")
        module.load_state_dict(state_dict, strict=True)
    except Exception as e:
        raise CheckpointError(f"Could not load module state {path}: {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------------------------------------------
# RNG state
# ----------------------------------------------------------------------------------------------------------------


def _python_rng_state() -> dict:
    """``random.getstate()`` as JSON-compatible data."""
    version, internal, gauss_next = random.getstate()
    return {"version": version, "internal": list(internal), "gauss_next": gauss_next}


def _numpy_rng_state() -> dict:
    """The legacy global ``np.random`` state as JSON-compatible data."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "bit_generator": name,
        "keys": [int(k) for k in keys],
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _set_numpy_rng_state(state: dict) -> None:
    """Inverse of :func:`_numpy_rng_state`."""
    keys = np.asarray(state["keys"], dtype=np.uint32)
    np.random.set_state((state["bit_generator"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]))


def _generator_state(generator):
    """State of a named generator: a uint8 tensor for ``torch.Generator``, a dict for ``np.random.Generator``."""
    if isinstance(generator, torch.Generator):
        return generator.get_state()
    if isinstance(generator, np.random.Generator):
        return generator.bit_generator.state
    raise TypeError(f"Unsupported generator type {type(generator).__name__}")


def _set_generator_state(generator, state) -> None:
    """Inverse of :func:`_generator_state`."""
    if isinstance(generator, torch.Generator):
        generator.set_state(state)
    elif isinstance(generator, np.random.Generator):
        generator.bit_generator.state = state
    else:
        raise TypeError(f"Unsupported generator type {type(generator).__name__}")


def capture_rng_state(generators: Optional[dict] = None) -> dict:
    """Snapshot of python ``random``, global numpy, torch CPU, all CUDA devices and named ``generators``.

    The result holds only tensors, ints, floats, strings, lists, dicts and None, so ``torch.save`` of it loads
    with ``weights_only=True``. ``generators`` maps names to ``torch.Generator`` (any device) or
    ``np.random.Generator``.
    """
    state = {
        "python": _python_rng_state(),
        "numpy": _numpy_rng_state(),
        "torch": torch.get_rng_state(),
        "cuda": [s.cpu() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None,
        "generators": {name: _generator_state(g) for name, g in (generators or {}).items()},
    }
    return state


def restore_rng_state(state: dict, generators: Optional[dict] = None) -> None:
    """Restore a :func:`capture_rng_state` snapshot (and the named ``generators`` it contains).

    CUDA states are restored when CUDA is available with the same device count, else skipped with a warning;
    a requested generator absent from ``state`` is left unchanged with a warning.
    """
    version = state["python"]["version"]
    random.setstate((version, tuple(state["python"]["internal"]), state["python"]["gauss_next"]))
    _set_numpy_rng_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning("Saved CUDA RNG state for %d device(s) not restored: CUDA devices differ now.", len(cuda))
    saved = state.get("generators", {})
    for name, generator in (generators or {}).items():
        if name in saved:
            _set_generator_state(generator, saved[name])
        else:
            logger.warning("No saved RNG state for generator %r; leaving it unchanged.", name)


def save_rng_state(path: str, generators: Optional[dict] = None) -> None:
    """Write :func:`capture_rng_state` to one file (``torch.save``, loadable with ``weights_only=True``)."""
    save_torch_state(capture_rng_state(generators), path)


def load_rng_state(path: str, generators: Optional[dict] = None) -> None:
    """Read a :func:`save_rng_state` file and restore it; load failures raise :class:`CheckpointError`."""
    state = load_torch_state(path)
    try:
        restore_rng_state(state, generators)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"RNG state file {path} is malformed: {type(e).__name__}: {e}") from e
