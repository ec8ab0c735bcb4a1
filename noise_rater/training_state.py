"""Stage-2 training state on disk: one checkpoint folder holding everything a run needs to continue.

A checkpoint (written atomically by :func:`noise_rater.checkpointing.save_checkpoint`) holds

* ``unet.safetensors`` (the raw weights), ``ema.pt`` (with EMA), ``optimizer.pt``, ``lr_scheduler.pt``,
  ``grad_scaler.pt`` (fp16 loss scaling only);
* ``rng_rank{r}.pt``: every RNG state of process r (python, numpy, torch CPU/CUDA, the script's named generators);
* ``training_state.json``: ``step``, ``num_processes``, ``data`` (the :class:`~noise_rater.data.ResumableBatches`
  state of every process, positioned in samples) and the script's extra counters;
* ``args.json``: the flags of the run.

Resuming with the same number of processes and batch size restores every state, so the run continues
bit-identically (on CPU). Resuming with another ``--train_batch_size`` or another number of processes
(*elastic resume*) restores the model, EMA, optimiser, learning-rate schedule and step, re-shards the data
by the number of samples seen (every sample is still seen once per epoch) and re-seeds the RNGs from
``(seed, step, rank)``; it logs a warning that the run is no longer bit-identical to an uninterrupted one.
"""

import json
import logging
import os
import random
from typing import Any, Dict, Optional

import numpy as np
import torch

from .checkpointing import (
    CheckpointError,
    capture_rng_state,
    load_module_state,
    load_torch_state,
    restore_rng_state,
    save_checkpoint,
    save_module_state,
    save_torch_state,
)
from .training_utils import write_json

logger = logging.getLogger(__name__)

__all__ = ["save_training_state", "load_training_state"]


def save_training_state(output_dir: str, step: int, *, accelerator, unet, ema, optimizer, lr_scheduler, generators,
                        batches, extra: Dict[str, Any], run_args: Dict[str, Any], total_limit: Optional[int] = None,
                        metadata: Optional[Dict[str, Any]] = None) -> Optional[str]:
    """Write ``output_dir/checkpoint-{step}``. Call on EVERY process: the RNG and data states are gathered,
    only the main process writes, the others wait.

    Args:
        generators: name -> ``torch.Generator``, the script's own random streams (e.g.
            :meth:`noise_rater.training.NoiseGenerators.as_dict`: timesteps, candidates, selection).
        extra: counters of the script stored in ``training_state.json`` (e.g. skipped steps, timings).
        run_args: the run's flags, stored as ``args.json``.
        total_limit: keep at most this many checkpoints (older ones are pruned).
        metadata: stored in the checkpoint's manifest.

    Returns:
        The checkpoint path on the main process, None on the others.
    """
    from accelerate.utils import gather_object

    rng_states = gather_object([capture_rng_state(dict(generators))])
    data_states = gather_object([batches.state_dict()])
    path = None
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(unet)

        def write_fn(tmp):
            save_module_state(model, os.path.join(tmp, "unet.safetensors"))
            if ema is not None:
                save_torch_state(ema.state_dict(), os.path.join(tmp, "ema.pt"))
            save_torch_state(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
            save_torch_state(lr_scheduler.state_dict(), os.path.join(tmp, "lr_scheduler.pt"))
            if accelerator.scaler is not None:  # fp16 loss scaling
                save_torch_state(accelerator.scaler.state_dict(), os.path.join(tmp, "grad_scaler.pt"))
            for rank, state in enumerate(rng_states):
                save_torch_state(state, os.path.join(tmp, f"rng_rank{rank}.pt"))
            write_json(os.path.join(tmp, "training_state.json"),
                       dict(extra, step=step, num_processes=accelerator.num_processes, data=data_states))
            write_json(os.path.join(tmp, "args.json"), run_args)

        path = save_checkpoint(output_dir, step, write_fn, total_limit=total_limit,
                               metadata=dict(metadata or {}, step=step, num_processes=accelerator.num_processes))
        logger.info("Saved checkpoint %s", path)
    accelerator.wait_for_everyone()
    return path


def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"Cannot read {path}: {e}") from e


def _reseed(seed: int, step: int, rank: int, generators: Dict[str, torch.Generator]) -> None:
    """Fresh, reproducible RNG streams for an elastic resume (no saved stream belongs to this rank layout)."""
    value = (int(seed) * 1_000_003 + int(step) * 1_009 + int(rank)) % (2 ** 31)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)  # also seeds every CUDA device
    for k, name in enumerate(sorted(generators)):
        generators[name].manual_seed(value + 1 + k)


def _rescale_lr_schedule(lr_scheduler, optimizer, old_processes: int, new_processes: int) -> None:
    """Accelerate's prepared scheduler advances ``num_processes`` times per optimiser step, so its counter is in
    units of the saving run's processes; convert it to this run's and set the learning rate it implies."""
    inner = getattr(lr_scheduler, "scheduler", lr_scheduler)
    if not hasattr(inner, "lr_lambdas"):
        raise CheckpointError(
            f"Cannot resume a {type(inner).__name__} learning-rate schedule on {new_processes} process(es) "
            f"after {old_processes}; resume with {old_processes} process(es)."
        )
    inner.last_epoch = int(round(inner.last_epoch * new_processes / old_processes))
    lrs = [base * fn(inner.last_epoch) for fn, base in zip(inner.lr_lambdas, inner.base_lrs)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    inner._last_lr = lrs


def load_training_state(path: str, *, accelerator, unet, ema, optimizer, lr_scheduler, generators,
                        batches) -> Dict[str, Any]:
    """Restore what :func:`save_training_state` wrote, on every process; returns ``training_state.json``.

    With the checkpoint's number of processes and batch size, every state (RNGs and data position included) is
    restored exactly. Otherwise (elastic resume) the data stream continues at the number of samples seen,
    the learning-rate schedule is converted to this number of processes, the RNGs are re-seeded from
    ``(seed, step, rank)``, and a warning says that the run is no longer bit-identical.

    Raises:
        CheckpointError: missing or malformed files, EMA state missing while EMA is used, optimiser state
            that does not fit the model, or data positions that differ between the saving processes.
        DataError: the data stream cannot be resumed (another seed or data set size).
    """
    state = _read_json(os.path.join(path, "training_state.json"))
    old_processes, new_processes = int(state["num_processes"]), accelerator.num_processes
    rank = accelerator.process_index
    data_states = list(state["data"])
    if any("position" not in d and "batch_size" not in d for d in data_states):  # older, batch-counted checkpoints
        saved_args = _read_json(os.path.join(path, "args.json"))
        data_states = [dict(d, batch_size=int(saved_args["train_batch_size"])) for d in data_states]
    if len(data_states) != old_processes:
        raise CheckpointError(f"{path}: training_state.json holds {len(data_states)} data state(s) for "
                              f"{old_processes} process(es).")

    load_module_state(accelerator.unwrap_model(unet), os.path.join(path, "unet.safetensors"))
    if ema is not None:
        ema_file = os.path.join(path, "ema.pt")
        if not os.path.isfile(ema_file):
            raise CheckpointError(f"Checkpoint {path} has no EMA state (ema.pt) but this run uses --use_ema.")
        try:
            ema.load_state_dict(load_torch_state(ema_file))
        except ValueError as e:
            raise CheckpointError(f"EMA state {ema_file} is malformed: {e}") from e
        ema.to(accelerator.device)
    try:
        optimizer.load_state_dict(load_torch_state(os.path.join(path, "optimizer.pt")))
        lr_scheduler.load_state_dict(load_torch_state(os.path.join(path, "lr_scheduler.pt")))
        scaler_file = os.path.join(path, "grad_scaler.pt")
        if accelerator.scaler is not None and os.path.isfile(scaler_file):
            accelerator.scaler.load_state_dict(load_torch_state(scaler_file))
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"Optimizer / lr scheduler state in {path} does not fit this run: {e}") from e

    if old_processes == new_processes:
        changed = batches.load_state_dict(data_states[rank])
        rng = load_torch_state(os.path.join(path, f"rng_rank{rank}.pt"))
        missing = [name for name in generators if name not in rng.get("generators", {})]
        if missing:
            raise CheckpointError(f"Checkpoint {path} has no state for the RNG stream(s) {missing} (older format).")
        restore_rng_state(rng, dict(generators))
    else:
        positions = {(int(d["epoch"]), int(d.get("position", -1)), int(d.get("index", -1))) for d in data_states}
        if len(positions) != 1:
            raise CheckpointError(f"{path}: the saving processes were at different data positions {sorted(positions)}.")
        batches.load_state_dict(data_states[0])  # the global position; this run's shard is its own
        _rescale_lr_schedule(lr_scheduler, optimizer, old_processes, new_processes)
        _reseed(batches.seed, int(state["step"]), rank, dict(generators))
        changed = True
    if changed and accelerator.is_main_process:
        logger.warning(
            "Elastic resume from %s: written by %d process(es) with batch size %s per process, resumed on %d with "
            "%d. Model, EMA, optimiser, learning-rate schedule and step %d are restored and the data continues at "
            "the samples seen, but this run is no longer bit-identical to an uninterrupted one.",
            path, old_processes, data_states[0].get("batch_size"), new_processes, batches.batch_size,
            int(state["step"]))
    return state
