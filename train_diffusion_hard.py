#!/usr/bin/env python
"""Stage 2 of NoiseRater: train a diffusion model (``UNet2DModel`` + ``DDPMScheduler``) with hard noise selection.

Modelled on diffusers' ``examples/unconditional_image_generation/train_unconditional.py``: same flags where the
two overlap, an ``Accelerator`` for devices / mixed precision / multi-process data parallel, ``EMAModel``,
``get_scheduler``, checkpoints every ``--checkpointing_steps`` and a ``DDPMPipeline`` saved in ``--output_dir``
at the end. What is different:

* the training noise eps of every sample is picked by a noise selector (``--noise_selection``): plain Gaussian
  (``uniform``), nearest of N candidates (``knn``), Immiscible-Diffusion batch assignment (``assignment``), or a
  frozen NoiseRater (``rater``; ``--selection_rule`` argmax / softmax / importance);
* optional per-sample loss weights (``--loss_weighting``): Min-SNR-gamma, or soft weights from the rater's scores;
* the data stream is exactly resumable and checkpoints hold every RNG state, so a run stopped at step k and
  resumed with ``--resume_from_checkpoint latest`` ends bit-identical (on CPU) to an uninterrupted run; resumed
  with another ``--train_batch_size`` or number of processes it continues at the samples seen, with a warning
  (see ``noise_rater/training_state.py``);
* a held-out validation loss under *standard Gaussian* noise on fixed (x0, eps, t) triples (the same for every
  method and run), overall and per timestep band.

Examples::

    accelerate launch train_diffusion_hard.py --dataset_name fashion_mnist --resolution 28 \\
        --output_dir runs/uniform --noise_selection uniform --max_train_steps 20000 --use_ema

    accelerate launch train_diffusion_hard.py --dataset_name fashion_mnist --resolution 28 \\
        --output_dir runs/rater --noise_selection rater --rater_model_name_or_path runs/rater-stage1 \\
        --num_candidate_noises 8 --selection_rule argmax --max_train_steps 20000 --use_ema

Outputs in ``--output_dir``: the ``DDPMPipeline`` (``model_index.json``, ``unet/``, ``scheduler/``; with
``--class_conditional`` a ``noise_rater.ClassConditionalDDPMPipeline`` holding the class names),
``samples_final.png``, ``final_metrics.json``, ``plot_loss.png``, ``metrics.jsonl`` (every step),
``validation.jsonl``, ``checkpoint-N/`` + ``latest``, ``samples/`` (with ``--save_images_steps``) and
``logs/`` (tensorboard).
"""

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch

from noise_rater.checkpointing import CheckpointError, apply_default_permissions, resolve_checkpoint
from noise_rater.data import BUILTIN_DATASETS, DataError, ResumableBatches, prepare_datasets
from noise_rater.evaluation.validation import make_validation_triples, run_validation
from noise_rater.data_workers import WorkerBatches
from noise_rater.training import LOSS_WEIGHTINGS, NoiseGenerators, build_selector_and_rater, training_step
from noise_rater.training_state import load_training_state as load_state
from noise_rater.training_state import save_training_state as save_state
from noise_rater.training_utils import (
    SkipCounter,
    UsageError,
    add_data_args,
    add_diffusion_args,
    add_run_args,
    append_jsonl,
    truncate_jsonl,
    check_positive,
    grad_norm,
    check_resolution,
    default_unet_config,
    nonfinite_error,
    load_json_config,
    preflight_push_to_hub,
    resolve_unet_config,
    validate_common_args,
    write_json,
)
from noise_rater.visualization import class_grid_labels, plot_losses, sample_images, save_image_grid

SCRIPT_NAME = "train_diffusion_hard"
NOISE_SELECTIONS = ("uniform", "rater", "knn", "assignment", "oracle")
SELECTION_RULES = ("argmax", "softmax", "importance")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
NUM_GRID_IMAGES = 16

logger = logging.getLogger(SCRIPT_NAME)


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def parse_args(input_args=None):
    from noise_rater.training_utils import HelpFormatter  # --help shows every default

    parser = argparse.ArgumentParser(
        description="Train a diffusion model (UNet2DModel + DDPMScheduler) with hard noise selection "
                    "(NoiseRater stage 2).", formatter_class=HelpFormatter,
    )
    add_data_args(parser)
    add_diffusion_args(parser)
    add_run_args(parser)

    g = parser.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="Fine-tune an existing DDPMPipeline (folder or hub id; its unet/) or a UNet2DModel folder.")
    g.add_argument("--variant", type=str, default=None,
                   help="Load the pretrained UNet's variant weights, e.g. fp16 for diffusion_pytorch_model.fp16.safetensors "
                        "(loaded in float32 for training).")
    g.add_argument("--num_channels", type=int, default=None, choices=[1, 3],
                   help="Image channels; default: the model config's in_channels, else 1 for the built-in data sets "
                        f"({', '.join(BUILTIN_DATASETS)}) and 3 otherwise.")

    g = parser.add_argument_group("optimisation (as in train_unconditional.py)")
    g.add_argument("--num_epochs", type=int, default=100, help="Used when --max_train_steps is not given.")
    g.add_argument("--lr_scheduler", type=str, default="cosine", choices=LR_SCHEDULERS)
    g.add_argument("--lr_warmup_steps", type=int, default=500)
    g.add_argument("--adam_beta1", type=float, default=0.95)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-6)
    g.add_argument("--adam_epsilon", type=float, default=1e-08)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping; <= 0 disables clipping.")
    g.add_argument("--use_ema", action="store_true", help="Keep an EMA of the weights (used for samples and saved).")
    g.add_argument("--ema_max_decay", type=float, default=0.9999)
    g.add_argument("--ema_inv_gamma", type=float, default=1.0)
    g.add_argument("--ema_power", type=float, default=3 / 4)

    g = parser.add_argument_group("scale (as in diffusers' examples)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="Micro-batches of --train_batch_size per optimizer step (the loss is averaged over them). "
                        "Steps, LR schedule, EMA, checkpoints and validation count optimizer steps. Equal to one "
                        "large batch for per-sample selectors (uniform, knn, rater) and weightings (uniform, "
                        "min_snr); batch-level rules (assignment, rater_soft) act on each micro-batch.")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="Recompute the UNet's activations in backward (UNet2DModel.enable_gradient_checkpointing).")
    g.add_argument("--dataloader_num_workers", type=int, default=0,
                   help="0: load batches in the training process (random flips from the global torch RNG). N > 0: "
                        "N worker processes build the same batches, with flips seeded per batch (seed, process, "
                        "epoch, batch): as reproducible and exactly resumable, but other flips than with 0.")
    g.add_argument("--allow_tf32", action="store_true",
                   help="Allow TF32 matmuls / convolutions on Ampere+ GPUs (no effect on CPU).")

    g = parser.add_argument_group("noise selection and loss weighting")
    g.add_argument("--noise_selection", type=str, default="uniform", choices=NOISE_SELECTIONS)
    g.add_argument("--rater_model_name_or_path", type=str, default=None,
                   help="A trained NoiseRaterModel (folder or hub id), for --noise_selection rater or "
                        "--loss_weighting rater_soft.")
    g.add_argument("--num_candidate_noises", type=int, default=8, help="N candidates per sample (rater, knn, oracle).")
    g.add_argument("--oracle_val_batch_size", type=int, default=64,
                   help="--noise_selection oracle: validation images per step defining the exact one-step influence "
                        "<grad l(x0, eps, t), grad L_val> by which each sample's best candidate is kept (the ceiling "
                        "of any rater; costs about one backward and one forward-mode pass over the candidates).")
    g.add_argument("--selection_rule", type=str, default="argmax", choices=SELECTION_RULES,
                   help="How the rater's scores pick one candidate; 'importance' reweights to stay unbiased.")
    g.add_argument("--selection_temperature", type=float, default=1.0, help="tau of the softmax selection rules.")
    g.add_argument("--loss_weighting", type=str, default="uniform", choices=LOSS_WEIGHTINGS)
    g.add_argument("--snr_gamma", type=float, default=5.0, help="gamma of --loss_weighting min_snr.")
    g.add_argument("--rater_temperature", type=float, default=1.0,
                   help="tau of --loss_weighting rater_soft: w = B softmax(s / tau) over the batch.")

    g = parser.add_argument_group("validation and samples")
    g.add_argument("--validation_steps", type=int, default=250,
                   help="Held-out loss (standard Gaussian noise) every N steps and at the end.")
    g.add_argument("--num_validation_triples", type=int, default=512)
    g.add_argument("--validation_seed", type=int, default=1234,
                   help="Seed of the fixed validation (x0, eps, t) triples; keep it equal across compared runs.")
    g.add_argument("--save_images_steps", type=int, default=None,
                   help="Save a sample grid every N steps (default: only at the end).")
    g.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps for the sample grids.")
    g.add_argument("--eval_batch_size", type=int, default=64)
    g.add_argument("--dry_run", action="store_true", help="Print the resolved configuration as JSON and exit.")
    return parser.parse_args(input_args)


def check_args(args) -> None:
    """All flag checks (shared + this script's); raises :class:`UsageError`."""
    validate_common_args(args)
    check_positive(args, "num_epochs", "gradient_accumulation_steps", "num_candidate_noises", "oracle_val_batch_size",
                   "selection_temperature",
                   "snr_gamma", "rater_temperature", "validation_steps", "num_validation_triples", "save_images_steps",
                   "num_inference_steps", "eval_batch_size", "ema_inv_gamma")
    check_positive(args, "lr_warmup_steps", "dataloader_num_workers", "adam_weight_decay", "adam_epsilon",
                   "ema_power", allow_zero=True)
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise UsageError(f"--{name} must be in [0, 1), got {getattr(args, name)!r}")
    if not 0.0 <= args.ema_max_decay <= 1.0:
        raise UsageError(f"--ema_max_decay must be in [0, 1], got {args.ema_max_decay!r}")
    if not math.isfinite(args.max_grad_norm):
        raise UsageError(f"--max_grad_norm must be finite, got {args.max_grad_norm!r}")
    if args.noise_selection == "rater" and not args.rater_model_name_or_path:
        raise UsageError("--noise_selection rater needs --rater_model_name_or_path (a trained NoiseRaterModel).")
    if args.loss_weighting == "rater_soft" and not args.rater_model_name_or_path:
        raise UsageError("--loss_weighting rater_soft needs --rater_model_name_or_path (a trained NoiseRaterModel).")
    if args.variant is not None and not args.pretrained_model_name_or_path:
        raise UsageError("--variant selects weights of --pretrained_model_name_or_path; give that too.")
    if args.pretrained_model_name_or_path and args.model_config_name_or_path:
        raise UsageError("Give at most one of --pretrained_model_name_or_path and --model_config_name_or_path.")
    if args.report_to not in ("tensorboard", "wandb", "all", "none"):
        raise UsageError(f"--report_to must be tensorboard, wandb, all or none, got {args.report_to!r}")


def _pretrained_unet_location(path: str):
    """``(path, subfolder)`` of the UNet of a DDPMPipeline (``unet/``) or a bare UNet2DModel folder / hub id."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "unet", "config.json")):
            return path, "unet"
        if os.path.isfile(os.path.join(path, "config.json")):
            return path, None
        raise UsageError(f"--pretrained_model_name_or_path {path!r} holds neither unet/config.json nor config.json.")
    from diffusers import UNet2DModel

    for sub in ("unet", None):  # a hub id: a pipeline repo first, then a bare model repo
        try:
            UNet2DModel.load_config(path, subfolder=sub)
            return path, sub
        except (OSError, ValueError):
            continue
    raise UsageError(f"--pretrained_model_name_or_path {path!r}: no UNet2DModel found (not a folder, not reachable).")


def _weight_variants(folder: str):
    """``(has plain weights, sorted variant names)`` of a local model folder (``diffusion_pytorch_model.<v>.<ext>``)."""
    plain, variants = False, set()
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            parts = name.split(".")
            if parts[0] != "diffusion_pytorch_model" or parts[-1] not in ("safetensors", "bin"):
                continue
            if len(parts) == 2 or (len(parts) == 3 and parts[1].endswith("index")):
                plain = True
            elif len(parts) >= 3:
                variants.add(parts[1])
    return plain, sorted(variants)


def check_variant(args, path, sub) -> None:
    """A local UNet folder must hold the weights ``--variant`` asks for; fp16-only folders need ``--variant fp16``."""
    folder = os.path.join(path, sub) if sub else path
    if not os.path.isdir(folder):
        return  # a hub id: diffusers reports a missing variant itself
    plain, variants = _weight_variants(folder)
    if args.variant is None and not plain and variants:
        raise UsageError(
            f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path!r}: {folder} holds only the variant "
            f"weight(s) {', '.join(variants)} (e.g. diffusion_pytorch_model.{variants[0]}.safetensors); "
            f"pass --variant {variants[0]}."
        )
    if args.variant is not None and args.variant not in variants:
        have = ", ".join(variants) if variants else "none"
        raise UsageError(
            f"--variant {args.variant}: {folder} has no diffusion_pytorch_model.{args.variant}.* weights "
            f"(variants found: {have}" + ("; it has plain weights, so drop --variant" if plain else "") + ")."
        )


def _pretrained_unet_config(args) -> dict:
    from diffusers import UNet2DModel

    path, sub = _pretrained_unet_location(args.pretrained_model_name_or_path)
    check_variant(args, path, sub)
    try:
        return dict(UNet2DModel.load_config(path, subfolder=sub))
    except (OSError, ValueError) as e:
        raise UsageError(f"--pretrained_model_name_or_path {path!r}: cannot read the UNet config ({e}).") from None


def resolve_shapes(args):
    """Image channels and resolution from the flags and the model config (no data, no model built).

    Returns ``(num_channels, resolution, base_config)`` where ``base_config`` is the config JSON / the pretrained
    UNet config (or None for the default config).
    """
    base = None
    if args.pretrained_model_name_or_path:
        base = _pretrained_unet_config(args)
    elif args.model_config_name_or_path:
        base = load_json_config(args.model_config_name_or_path, "--model_config_name_or_path")
    cfg_channels = base.get("in_channels") if base else None
    if args.num_channels is not None:
        if cfg_channels is not None and cfg_channels != args.num_channels:
            raise UsageError(
                f"--num_channels {args.num_channels} contradicts the model config's in_channels={cfg_channels}."
            )
        channels = args.num_channels
    elif cfg_channels is not None:
        channels = int(cfg_channels)
    else:
        builtin = args.dataset_name is not None and args.dataset_name.replace("-", "_") in BUILTIN_DATASETS
        channels = 1 if builtin else 3
    if channels not in (1, 3):
        raise UsageError(f"Images must have 1 or 3 channels; the model config asks for {channels}.")
    resolution = args.resolution
    if resolution is None:
        size = base.get("sample_size") if base else None
        resolution = int(size if isinstance(size, int) else (size[0] if size else 28))
    what = ("the pretrained UNet" if args.pretrained_model_name_or_path else
            "the UNet of --model_config_name_or_path" if args.model_config_name_or_path else "the default UNet")
    check_resolution(resolution, base if base is not None else default_unet_config(resolution, channels), what)
    return channels, resolution, base


def load_data(args, channels: int, resolution: int):
    """The train / validation splits (with the data preflight: bad files, channels, labels)."""
    return prepare_datasets(
        args.dataset_name, args.dataset_config_name, args.train_data_dir,
        resolution=resolution, num_channels=channels, center_crop=args.center_crop, random_flip=args.random_flip,
        validation_split=args.validation_split, seed=args.seed, max_train_samples=args.max_train_samples,
        cache_dir=args.cache_dir, image_column=args.image_column, label_column=args.label_column,
        use_labels=args.class_conditional, allow_mixed_channels=args.allow_mixed_channels,
        background_color=args.background_color,
    )


def dry_run_config(args) -> dict:
    """The resolved configuration, after the same data preflight and rater checks as a real run (nothing is
    trained or written)."""
    channels, resolution, base = resolve_shapes(args)
    splits = load_data(args, channels, resolution)
    build_selector_and_rater(
        args.noise_selection, num_candidates=args.num_candidate_noises, loss_weighting=args.loss_weighting,
        rater_model_name_or_path=args.rater_model_name_or_path, selection_rule=args.selection_rule,
        selection_temperature=args.selection_temperature, in_channels=channels,
        class_conditional=args.class_conditional, resolution=resolution)
    if args.pretrained_model_name_or_path:
        unet_config = {k: v for k, v in base.items() if not k.startswith("_")}
    else:
        unet_config = resolve_unet_config(args.model_config_name_or_path, resolution, channels, None)
        if args.class_conditional:
            unet_config["num_class_embeds"] = "from the data set's number of classes"
    return {
        "script": SCRIPT_NAME,
        "args": vars(args),
        "data": splits.description,
        "resolved": {
            "num_channels": channels,
            "resolution": resolution,
            "unet_config": unet_config,
            "scheduler": {"class": "DDPMScheduler", "num_train_timesteps": args.ddpm_num_steps,
                          "beta_schedule": args.ddpm_beta_schedule, "prediction_type": args.prediction_type},
            "max_train_steps": args.max_train_steps
            if args.max_train_steps is not None else f"{args.num_epochs} epochs x batches per epoch (from the data)",
        },
    }


# ----------------------------------------------------------------------------------------------------------------
# Small helpers: RNG isolation
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def isolated_torch_rng():
    """Run a block (validation, sampling) without touching the global torch CPU / CUDA RNG streams."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _finite_or_none(x):
    return x if x is not None and math.isfinite(x) else None


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def build_unet(args, channels, resolution, num_classes):
    from diffusers import UNet2DModel

    if args.pretrained_model_name_or_path:
        path, sub = _pretrained_unet_location(args.pretrained_model_name_or_path)
        try:
            unet = UNet2DModel.from_pretrained(path, subfolder=sub, variant=args.variant, torch_dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise UsageError(f"--pretrained_model_name_or_path {path!r}: cannot load the UNet ({e}).") from None
        if unet.config.in_channels != channels:
            raise UsageError(f"The pretrained UNet has in_channels={unet.config.in_channels}, the data {channels}.")
        if args.class_conditional and unet.config.num_class_embeds != num_classes:
            raise UsageError(
                f"--class_conditional: the pretrained UNet has num_class_embeds={unet.config.num_class_embeds}, "
                f"the data set has {num_classes} classes."
            )
        if not args.class_conditional and unet.config.num_class_embeds is not None:
            raise UsageError(
                "The pretrained UNet is class-conditional (num_class_embeds set); pass --class_conditional."
            )
        return unet
    config = resolve_unet_config(args.model_config_name_or_path, resolution, channels,
                                 num_classes if args.class_conditional else None)
    if not args.class_conditional and config.get("num_class_embeds") is not None:
        raise UsageError("The model config sets num_class_embeds; pass --class_conditional (labels are needed).")
    try:
        return UNet2DModel(**config)
    except (TypeError, ValueError) as e:
        raise UsageError(f"Bad UNet2DModel config: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


def save_training_state(args, accelerator, step, unet, ema, optimizer, lr_scheduler, generators, batches, extra):
    """Checkpoint ``output_dir/checkpoint-{step}`` (call on every process); see :mod:`noise_rater.training_state`."""
    save_state(args.output_dir, step, accelerator=accelerator, unet=unet, ema=ema, optimizer=optimizer,
               lr_scheduler=lr_scheduler, generators=generators.as_dict(), batches=batches, extra=extra, run_args=vars(args),
               total_limit=args.checkpoints_total_limit,
               metadata={"script": SCRIPT_NAME, "noise_selection": args.noise_selection,
                         "loss_weighting": args.loss_weighting, "use_ema": bool(args.use_ema)})


def load_training_state(path, accelerator, unet, ema, optimizer, lr_scheduler, generators, batches):
    """Restore a checkpoint on every process (elastic across batch sizes and process counts); returns its state."""
    return load_state(path, accelerator=accelerator, unet=unet, ema=ema, optimizer=optimizer,
                      lr_scheduler=lr_scheduler, generators=generators.as_dict(), batches=batches)


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------


def save_grid(args, model, ema, noise_scheduler, num_classes, path, step, accelerator, class_names=None):
    """Sample a grid (with EMA weights if given) and save it; class-conditional grids hold one labelled row per
    class."""
    labels, ncols, row_labels = None, None, None
    if args.class_conditional:
        labels, ncols = class_grid_labels(num_classes, NUM_GRID_IMAGES)
        rows = int(labels.max()) + 1
        row_labels = [class_names[r] if class_names else str(r) for r in range(rows)]
    with isolated_torch_rng():
        if ema is not None:
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
        try:
            images = sample_images(model, noise_scheduler.config, NUM_GRID_IMAGES if labels is None else len(labels),
                                   num_inference_steps=args.num_inference_steps, seed=args.seed,
                                   batch_size=args.eval_batch_size, class_labels=labels)
        finally:
            if ema is not None:
                ema.restore(model.parameters())
    save_image_grid(images, path, ncols=ncols, row_labels=row_labels)
    if args.report_to in ("tensorboard", "all"):
        try:
            writer = accelerator.get_tracker("tensorboard", unwrap=True)
            writer.add_images("samples", images, step)
        except (ValueError, AttributeError, KeyError):
            pass


def parameters_in_sync(accelerator, unet) -> bool:
    """With several processes: are the parameters bit-identical on every rank (as DDP should keep them)?"""
    if accelerator.num_processes == 1:
        return True
    import hashlib

    from accelerate.utils import gather_object

    digest = hashlib.sha256()
    for p in accelerator.unwrap_model(unet).parameters():
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digests = gather_object([digest.hexdigest()])
    in_sync = len(set(digests)) == 1
    if not in_sync:
        logger.warning("The parameters differ between processes at the end of training: %s", digests)
    return in_sync


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def main(args):
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from noise_rater.pipelines import ClassConditionalDDPMPipeline

    start_wall = time.perf_counter()
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    # `accelerate launch --multi_gpu` (torchrun) on a machine without CUDA: run the processes on CPU (gloo)
    # instead of letting each one believe it is alone (they would overwrite each other's outputs).
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        cpu=world_size > 1 and not torch.cuda.is_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
    )
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and accelerator.num_processes != world_size:
        raise UsageError(f"Launched with WORLD_SIZE={world_size} but Accelerate set up {accelerator.num_processes} "
                         "process(es); check the accelerate config / launcher flags.")
    log = get_logger(SCRIPT_NAME, log_level="INFO")
    if args.mixed_precision != "no" and not accelerator.native_amp:  # e.g. fp16 on CPU
        log.warning("--mixed_precision %s: no autocast on %s, Accelerate trains in float32.", args.mixed_precision,
                    accelerator.device.type)
    set_seed(args.seed)
    device = accelerator.device

    # ---- data (preflight before any model is built) ----
    channels, resolution, _ = resolve_shapes(args)
    splits = load_data(args, channels, resolution)
    log.info(accelerator.state, main_process_only=False)  # after the preflight, so a data error is the only output
    log.info("Data: %s", splits.description)
    batches = ResumableBatches(splits.train, args.train_batch_size, seed=args.seed,
                               shard=accelerator.process_index, num_shards=accelerator.num_processes)
    if args.dataloader_num_workers > 0:
        batches = WorkerBatches(batches, args.dataloader_num_workers)
    accum = args.gradient_accumulation_steps
    max_train_steps = args.max_train_steps or math.ceil(batches.steps_for_epochs(args.num_epochs) / accum)
    if args.lr_warmup_steps >= max_train_steps:
        log.warning("--lr_warmup_steps %d >= %d training steps: the learning rate never leaves warm-up.",
                    args.lr_warmup_steps, max_train_steps)

    # ---- models ----
    unet = build_unet(args, channels, resolution, splits.num_classes)
    noise_scheduler = DDPMScheduler(num_train_timesteps=args.ddpm_num_steps, beta_schedule=args.ddpm_beta_schedule,
                                    prediction_type=args.prediction_type)
    selector, rater = build_selector_and_rater(
        args.noise_selection, num_candidates=args.num_candidate_noises, loss_weighting=args.loss_weighting,
        rater_model_name_or_path=args.rater_model_name_or_path, selection_rule=args.selection_rule,
        selection_temperature=args.selection_temperature, in_channels=channels,
        class_conditional=args.class_conditional, resolution=resolution, device=device)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    ema = None
    if args.use_ema:
        ema = EMAModel(unet.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, inv_gamma=args.ema_inv_gamma,
                       power=args.ema_power, model_cls=UNet2DModel, model_config=unet.config)

    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    # The prepared scheduler steps once per process per optimizer step, hence the factors.
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_train_steps * accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    if ema is not None:
        ema.to(device)
    if args.noise_selection == "oracle":  # needs the model being trained, so it is built here
        from noise_rater.valuation import OracleNoiseSelector, ValidationMinibatches

        oracle_val = ValidationMinibatches(splits.validation, args.oracle_val_batch_size, args.ddpm_num_steps,
                                           seed=args.seed + 7_777 + accelerator.process_index, device=device)
        selector = OracleNoiseSelector(accelerator.unwrap_model(unet), noise_scheduler, oracle_val,
                                       num_candidates=args.num_candidate_noises)
    # Timesteps, candidate pools, selection draws: three CPU streams per process, the same for every method (CRN).
    generators = NoiseGenerators.from_seed(args.seed, accelerator.process_index)

    # ---- resume ----
    global_step, skips = 0, SkipCounter(args.max_consecutive_skips)
    totals = {"select_time_s": 0.0, "train_time_s": 0.0, "validation_time_s": 0.0}
    if args.resume_from_checkpoint:
        path = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
        if path is None:
            log.info("No checkpoint to resume from in %s; starting a new training run.", args.output_dir)
        else:
            state = load_training_state(path, accelerator, unet, ema, optimizer, lr_scheduler, generators, batches)
            global_step = int(state["step"])
            skips.total, skips.consecutive = int(state["skipped_total"]), int(state["skipped_consecutive"])
            totals.update({k: float(state.get(k, 0.0)) for k in totals})
            log.info("Resumed from %s at step %d", path, global_step)
            if args.noise_selection == "oracle":  # one oracle validation minibatch per micro-batch so far
                selector.val_batch_fn.calls = global_step * accum

    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    validation_path = os.path.join(args.output_dir, "validation.jsonl")
    repo_id = None
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        truncate_jsonl(metrics_path, global_step)
        truncate_jsonl(validation_path, global_step)
        if args.push_to_hub:
            from huggingface_hub import create_repo

            repo_id = create_repo(repo_id=args.hub_model_id or Path(args.output_dir).name, exist_ok=True,
                                  token=args.hub_token, private=args.hub_private_repo).repo_id
        tracker_config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}
        accelerator.init_trackers(SCRIPT_NAME, config=tracker_config)
    triples = None
    if accelerator.is_main_process:
        triples = make_validation_triples(splits.validation, args.num_validation_triples, args.ddpm_num_steps,
                                          seed=args.validation_seed)

    num_params = sum(p.numel() for p in accelerator.unwrap_model(unet).parameters())
    log.info("***** Running training *****")
    log.info("  Num train examples = %d, validation = %d", len(splits.train), len(splits.validation))
    log.info("  UNet parameters = %d", num_params)
    log.info("  Batch size per process = %d, processes = %d, accumulation steps = %d", args.train_batch_size,
             accelerator.num_processes, accum)
    log.info("  Noise selection = %s (%s), loss weighting = %s", args.noise_selection, args.selection_rule,
             args.loss_weighting)
    log.info("  Total optimization steps = %d (starting at %d)", max_train_steps, global_step)

    def validate_and_log(step):
        t0 = time.perf_counter()
        record = run_validation(accelerator.unwrap_model(unet), ema, noise_scheduler, triples,
                                batch_size=args.eval_batch_size)
        totals["validation_time_s"] += time.perf_counter() - t0
        record["step"] = step
        append_jsonl(validation_path, record)
        accelerator.log({k: v for k, v in record.items() if k.startswith("val_loss")}, step=step)
        log.info("step %d: validation loss %.5f", step, record["val_loss"])
        return record

    progress_bar = tqdm(total=max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process,
                        desc="Steps")
    loop_start = time.perf_counter()
    steps_this_run = 0
    last_val = None
    unet.train()
    try:  # close the bar first, so that an error message is the last thing printed
        while global_step < max_train_steps:
            step = global_step + 1
            t0 = time.perf_counter()
            losses, weights, select_time, error = [], [], 0.0, None
            for _ in range(accum):  # micro-batches; accelerate syncs the gradients on the last one
                batch = next(batches)
                labels = batch["class_labels"].to(device) if args.class_conditional else None
                with accelerator.accumulate(unet):
                    out = training_step(unet, noise_scheduler, batch["pixel_values"].to(device), selector,
                                        generators=generators, num_candidates=args.num_candidate_noises,
                                        class_labels=labels, loss_weighting=args.loss_weighting,
                                        snr_gamma=args.snr_gamma, rater=rater, rater_temperature=args.rater_temperature,
                                        catch_nonfinite_scores=True)
                    loss = out.loss * (float("nan") if step == args.inject_nonfinite_at_step else 1.0)
                    # every process learns about a non-finite value, so all skip or stop together
                    status = accelerator.gather(torch.stack([loss.detach().float(), torch.tensor(
                        float(out.selection_failed), device=device)])[None])
                    losses.append(float(status[:, 0].mean()))
                    select_time += out.select_time_s
                    weights.append(out.weights)
                    error = error or nonfinite_error(status, step)
                    if error is None:
                        accelerator.backward(loss)  # scaled by 1 / --gradient_accumulation_steps
            if error is None:
                if args.max_grad_norm > 0:
                    norm = accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                else:
                    norm = grad_norm(unet.parameters())
                if accelerator.mixed_precision != "fp16":  # with fp16 the GradScaler handles overflowing gradients
                    error = nonfinite_error(None, step, norm)
            if error is not None and args.nonfinite == "raise":
                raise error
            step_loss = sum(losses) / len(losses)
            if error is None:
                optimizer.step()
                lr_scheduler.step()
                if ema is not None:
                    ema.step(unet.parameters())
                skips.ok()
            else:
                log.warning("Skipping step %d: %s", step, error)
                skips.skipped(error)  # raises NonFiniteError after --max_consecutive_skips in a row
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            train_time = time.perf_counter() - t0 - select_time  # data, forward, backward, optimizer

            global_step = step
            steps_this_run += 1
            totals["select_time_s"] += select_time
            totals["train_time_s"] += train_time
            progress_bar.update(1)
            lr = lr_scheduler.get_last_lr()[0]
            weights = torch.cat(weights)
            logs = {"loss": _finite_or_none(step_loss), "lr": lr, "select_time_s": select_time,
                    "train_time_s": train_time, "step": global_step, "epoch": batches.epoch,
                    "skipped": error is not None, "weight_min": float(weights.min()),
                    "weight_max": float(weights.max())}
            if ema is not None:
                logs["ema_decay"] = ema.cur_decay_value
            progress_bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
            accelerator.log({k: v for k, v in logs.items() if isinstance(v, (int, float)) and k != "step"},
                            step=global_step)
            if accelerator.is_main_process:
                append_jsonl(metrics_path, logs)

            # ---- checkpoint (all processes), then validation / samples (main process) ----
            if global_step % args.checkpointing_steps == 0:
                extra = dict(totals, skipped_total=skips.total, skipped_consecutive=skips.consecutive)
                save_training_state(args, accelerator, global_step, unet, ema, optimizer, lr_scheduler, generators,
                                    batches, extra)
            if accelerator.is_main_process:
                if global_step % args.validation_steps == 0 or global_step == max_train_steps:
                    last_val = validate_and_log(global_step)
                grid_due = args.save_images_steps and global_step % args.save_images_steps == 0
                if grid_due and global_step != max_train_steps:
                    save_grid(args, accelerator.unwrap_model(unet), ema, noise_scheduler, splits.num_classes,
                              os.path.join(args.output_dir, "samples", f"samples_step{global_step:06d}.png"),
                              global_step, accelerator, splits.class_names)
            accelerator.wait_for_everyone()
    finally:
        progress_bar.close()
    loop_time = time.perf_counter() - loop_start
    ranks_in_sync = parameters_in_sync(accelerator, unet)

    # ---- the end: pipeline, samples, metrics, plot ----
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(unet)
        if last_val is None or last_val["step"] != global_step:
            last_val = validate_and_log(global_step)
        if ema is not None:
            ema.copy_to(model.parameters())
        step_time = totals["select_time_s"] + totals["train_time_s"]  # over all steps, resumed runs included
        if args.class_conditional:  # generates with pipe(class_labels=[...]); class names in model_index.json
            pipeline = ClassConditionalDDPMPipeline(unet=model, scheduler=noise_scheduler,
                                                    class_names=splits.class_names)
        else:
            pipeline = DDPMPipeline(unet=model, scheduler=noise_scheduler)
        pipeline.save_pretrained(args.output_dir)
        save_grid(args, model, None, noise_scheduler, splits.num_classes,
                  os.path.join(args.output_dir, "samples_final.png"), global_step, accelerator, splits.class_names)
        final = {
            "final_val_loss": last_val["val_loss"],
            **{k.replace("val_loss", "final_val_loss"): v for k, v in last_val.items()
               if k.startswith("val_loss") and k != "val_loss"},
            "band_edges": last_val["band_edges"],
            "weights": "ema" if ema is not None else "raw",
            "steps": global_step,
            "steps_this_run": steps_this_run,
            "skipped_steps": skips.total,
            "wall_time_s": time.perf_counter() - start_wall,
            "loop_time_s": loop_time,
            "s_per_step": step_time / max(global_step, 1),
            "loop_s_per_step": loop_time / steps_this_run if steps_this_run else None,
            "select_time_s": totals["select_time_s"],
            "train_time_s": totals["train_time_s"],
            "validation_time_s": totals["validation_time_s"],
            "select_time_fraction": totals["select_time_s"] / max(step_time, 1e-12),
            "num_processes": accelerator.num_processes,
            "ranks_in_sync": ranks_in_sync,
            "num_parameters": num_params,
            "data": splits.description,
            "args": vars(args),
        }
        write_json(os.path.join(args.output_dir, "final_metrics.json"), final)
        plot_losses(args.output_dir, os.path.join(args.output_dir, "plot_loss.png"))
        apply_default_permissions(args.output_dir)
        log.info("Done: %d steps, final validation loss %.5f, %s", global_step, final["final_val_loss"],
                 args.output_dir)
        if args.push_to_hub:
            from huggingface_hub import upload_folder

            upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="End of training",
                          token=args.hub_token,
                          ignore_patterns=["step_*", "epoch_*", "checkpoint-*", ".checkpoint-*", "latest", "logs/*"])
    accelerator.wait_for_everyone()
    accelerator.end_training()


def cli(input_args=None) -> None:
    """Parse, check, run; expected errors end with ``error: ...`` on stderr and exit 2 (3 for non-finite values)."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        level=logging.INFO)
    args = parse_args(input_args)
    try:
        check_args(args)
        if args.dry_run:
            print(json.dumps(dry_run_config(args), indent=2, sort_keys=True, default=str))
            return
        preflight_push_to_hub(args)
        main(args)
    except FloatingPointError as e:  # NonFiniteError and non-finite rater scores
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except (UsageError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
