#!/usr/bin/env python
"""Stage 1 of NoiseRater: meta-train a rater of diffusion training noise.

    accelerate launch train_noiserater.py --dataset_name=fashion_mnist --output_dir=rater-fmnist

A population of small inner diffusion models (UNet2DModel) takes K optimiser steps on a loss
re-weighted by softmax-normalised rater scores; the rater is updated by the exact meta-gradient
of the validation diffusion loss after those steps (see ``noise_rater/bilevel.py`` and
``noise_rater/meta_trainer.py``). An inner batch holds B images (``--train_batch_size``), each with
one timestep and N candidate noises (``--num_candidate_noises``); by default the weights are a softmax
over each image's N candidates (``--weighting_scope candidates``): the decision stage 2 makes.
Every ``--compare_every`` meta-steps the run also measures valuation accuracy: on fixed held-out
groups, how well the rater ranks candidates against their exact one-step influence
(``noise_rater/valuation.py``). The result loads with ``NoiseRaterModel.from_pretrained(output_dir)``.
"""

import argparse
import json
import logging
import math
import os
import sys
import time

import torch

from noise_rater import NoiseRaterModel
from noise_rater.checkpointing import (
    CheckpointError,
    apply_default_permissions,
    capture_rng_state,
    load_module_state,
    load_torch_state,
    resolve_checkpoint,
    restore_rng_state,
    save_checkpoint,
    save_module_state,
    save_torch_state,
)
from noise_rater.data import DataError, ResumableBatches, prepare_datasets
from noise_rater.meta_trainer import MetaTrainer, add_noise_and_timesteps, held_out_valuation_batches
from noise_rater.model_card import rater_model_card
from noise_rater.valuation import summarize_valuation
from noise_rater.visualization import plot_evidence, plot_rater, plot_valuation
from noise_rater.training_utils import (
    NonFiniteError,
    SkipCounter,
    UsageError,
    add_data_args,
    add_diffusion_args,
    add_run_args,
    append_jsonl,
    read_jsonl,
    truncate_jsonl,
    check_positive,
    check_resolution,
    load_json_config,
    preflight_push_to_hub,
    resolve_unet_config,
    validate_common_args,
    write_json,
)

logger = logging.getLogger("train_noiserater")


def parse_args(argv=None):
    from noise_rater.training_utils import HelpFormatter  # --help shows every default

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_data_args(parser)
    add_diffusion_args(parser)
    add_run_args(parser)
    g = parser.add_argument_group("rater and meta-training")
    g.add_argument("--rater_config_name_or_path", type=str, default=None,
                   help="NoiseRaterModel config JSON (file or folder); default: a ~6e4-parameter rater.")
    g.add_argument("--inner_steps", type=int, default=1,
                   help="K: inner steps per meta-step (K=1: exact meta-gradient by one forward-mode JVP).")
    g.add_argument("--num_candidate_noises", type=int, default=8,
                   help="N: candidate noises per image in each inner batch (as in stage 2); B*N samples per step.")
    g.add_argument("--weighting_scope", type=str, default="candidates", choices=["candidates", "batch"],
                   help="Softmax of the soft weights over each image's N candidates (the choice stage 2 makes) "
                        "or over the whole batch of B*N samples (also weights images/timesteps).")
    g.add_argument("--meta_gradient", type=str, default="auto", choices=["auto", "forward", "reverse"],
                   help="auto: forward-mode JVP for K=1, backpropagation through the unrolled steps for K>1.")
    g.add_argument("--val_batch_size", type=int, default=None,
                   help="Samples in each validation batch of the outer loss; default B*N.")
    g.add_argument("--num_valuation_groups", type=int, default=64,
                   help="Held-out (x0, t) groups of N candidates for the valuation-accuracy report (0: off).")
    g.add_argument("--inner_lr", type=float, default=1e-3)
    g.add_argument("--inner_optimizer", type=str, default="adam", choices=["sgd", "adam"])
    g.add_argument("--population_size", type=int, default=2, help="P: inner models per process.")
    g.add_argument("--inner_model_lifetime", type=int, default=200,
                   help="Meta-steps after which an inner model is re-initialised (staggered).")
    g.add_argument("--temperature", type=float, default=1.0, help="tau of the soft weights softmax(s / tau).")
    g.add_argument("--truncate_window", type=int, default=None,
                   help="Backpropagate through only the last W inner steps (an approximation).")
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--adam_weight_decay", type=float, default=0.0)
    g.add_argument("--compare_every", type=int, default=10,
                   help="Every N meta-steps also unroll with uniform weights on the same batches, and measure "
                        "valuation accuracy (evidence).")
    g.add_argument("--dry_run", action="store_true", help="Print the resolved configuration and exit.")
    parser.set_defaults(max_train_steps=500, checkpointing_steps=100, train_batch_size=8)
    args = parser.parse_args(argv)
    return args


def validate_args(args):
    validate_common_args(args)
    check_positive(args, "inner_steps", "inner_lr", "population_size", "inner_model_lifetime", "temperature",
                   "truncate_window", "compare_every", "max_grad_norm", "num_candidate_noises", "val_batch_size")
    check_positive(args, "num_valuation_groups", allow_zero=True)
    if args.weighting_scope == "candidates" and args.num_candidate_noises < 2:
        raise UsageError("--weighting_scope candidates needs --num_candidate_noises >= 2 (with one noise per image "
                         "every weight is 1); use --weighting_scope batch for one noise per image.")
    if args.meta_gradient == "forward" and (args.inner_steps != 1 or args.truncate_window is not None):
        raise UsageError("--meta_gradient forward is exact for --inner_steps 1 only (and no --truncate_window); "
                         "use --meta_gradient reverse or auto.")


def build_rater_config(args, channels, num_classes):
    cfg = (load_json_config(args.rater_config_name_or_path, "--rater_config_name_or_path")
           if args.rater_config_name_or_path else {})
    cfg.update(sample_size=args.resolution, in_channels=channels, num_train_timesteps=args.ddpm_num_steps)
    if num_classes is not None:
        cfg["num_class_embeds"] = num_classes
    return cfg


def main(argv=None):
    args = parse_args(argv)
    validate_args(args)
    # a resolution the UNet cannot divide is refused before any data or model (also with --dry_run)
    check_resolution(args.resolution or 28,
                     resolve_unet_config(args.model_config_name_or_path, args.resolution or 28, _channels(args), None),
                     "the UNet of --model_config_name_or_path" if args.model_config_name_or_path else "the default UNet")
    if not args.dry_run:
        preflight_push_to_hub(args)
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import DDPMScheduler, UNet2DModel
    from tqdm.auto import tqdm

    # --- data first: bad input fails before any model is built ---------------------------------
    splits = prepare_datasets(
        args.dataset_name, args.dataset_config_name, args.train_data_dir, resolution=args.resolution or 28,
        num_channels=_channels(args), center_crop=args.center_crop, random_flip=args.random_flip,
        validation_split=args.validation_split, seed=args.seed, max_train_samples=args.max_train_samples,
        cache_dir=args.cache_dir, image_column=args.image_column, label_column=args.label_column,
        use_labels=args.class_conditional, allow_mixed_channels=args.allow_mixed_channels,
        background_color=args.background_color,
    )
    args.resolution = splits.resolution
    unet_cfg = resolve_unet_config(args.model_config_name_or_path, args.resolution, splits.num_channels,
                                   splits.num_classes)
    rater_cfg = build_rater_config(args, splits.num_channels, splits.num_classes)
    if args.dry_run:
        print(json.dumps({"args": vars(args), "unet": unet_cfg, "rater": rater_cfg, "data": splits.description},
                         indent=2, default=str))
        return 0

    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # multi-process CPU runs then use DDP over gloo
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.mixed_precision != "no":
        logger.warning("--mixed_precision=%s is accepted for CLI compatibility; meta-gradients are computed in float32.", args.mixed_precision)
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(args.seed)  # identical rater initialisation on every process
    os.makedirs(args.output_dir, exist_ok=True)
    device = accelerator.device

    try:
        UNet2DModel.from_config(unet_cfg)
    except Exception as e:  # a config that diffusers cannot build
        raise UsageError(f"--model_config_name_or_path: cannot build a UNet2DModel ({e})") from None
    rater = NoiseRaterModel(**rater_cfg).to(device)
    scheduler = DDPMScheduler(num_train_timesteps=args.ddpm_num_steps, beta_schedule=args.ddpm_beta_schedule,
                              prediction_type=args.prediction_type)

    def grad_reduce(grads):
        if world == 1:
            return grads
        return [accelerator.reduce(g, reduction="mean") for g in grads]

    trainer = MetaTrainer(
        rater, lambda: UNet2DModel.from_config(unet_cfg), scheduler,
        population_size=args.population_size, inner_steps=args.inner_steps, inner_lr=args.inner_lr,
        inner_optimizer=args.inner_optimizer, inner_model_lifetime=args.inner_model_lifetime,
        temperature=args.temperature, truncate_window=args.truncate_window,
        weighting_scope=args.weighting_scope, meta_gradient_method=args.meta_gradient, outer_lr=args.learning_rate,
        outer_weight_decay=args.adam_weight_decay, max_grad_norm=args.max_grad_norm,
        seed=args.seed * 1000 + rank, grad_reduce=grad_reduce, nonfinite="raise", device=device,
    )
    train_stream = ResumableBatches(splits.train, args.train_batch_size, seed=args.seed, shard=rank, num_shards=world)
    val_bs = args.val_batch_size or args.train_batch_size * args.num_candidate_noises
    val_stream = ResumableBatches(splits.validation, min(val_bs, len(splits.validation) // world),
                                  seed=args.seed + 7919, shard=rank, num_shards=world)
    noise_gen = torch.Generator().manual_seed(args.seed * 1000 + rank + 17)
    skips = SkipCounter(args.max_consecutive_skips)
    history_path = os.path.join(args.output_dir, "meta_metrics.jsonl")
    valuation_path = os.path.join(args.output_dir, "valuation.jsonl")
    valuation_data = None
    if args.num_valuation_groups:  # fixed held-out groups: identical at every measurement and on resume
        valuation_data = held_out_valuation_batches(
            splits.validation, args.num_valuation_groups, args.num_candidate_noises,
            args.val_batch_size or args.train_batch_size * args.num_candidate_noises, args.ddpm_num_steps,
            seed=args.seed + 424242, device=device)
        if valuation_data is None:
            logger.warning("Valuation-accuracy report skipped: the validation split has %d image(s), too few for "
                           "held-out groups (raise --validation_split or add data; --num_valuation_groups 0 "
                           "silences this).", len(splits.validation))

    # --- resume ---------------------------------------------------------------------------------
    start = 0
    if args.resume_from_checkpoint:
        ckpt = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
        if ckpt is None:
            logger.warning("No valid checkpoint found in %s: starting from scratch.", args.output_dir)
        else:
            load_module_state(rater, os.path.join(ckpt, "rater.safetensors"))
            trainer.load_state(ckpt)
            state = json.load(open(os.path.join(ckpt, "training_state.json")))
            start = state["step"]
            rank_state = load_torch_state(os.path.join(ckpt, f"rank{rank}.pt"))
            train_stream.load_state_dict(rank_state["train_stream"])
            val_stream.load_state_dict(rank_state["val_stream"])
            restore_rng_state(rank_state["rng"], {"noise": noise_gen})
            skips.consecutive, skips.total = state["skips_consecutive"], state["skips_total"]
            if accelerator.is_main_process:  # keep only the history up to the checkpoint
                truncate_jsonl(history_path, start)
                truncate_jsonl(valuation_path, start)
            logger.info("Resumed from %s at meta-step %d", ckpt, start)
    elif accelerator.is_main_process:
        for path in (history_path, valuation_path):
            if os.path.exists(path):
                os.remove(path)

    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("train_noiserater", config={k: v for k, v in vars(args).items()
                                                              if isinstance(v, (int, float, str, bool))})

    def save(step):
        # every process writes its own RNG + stream state; the main process then commits the checkpoint
        tmp_rank = os.path.join(args.output_dir, f".rank{rank}-state.pt")
        save_torch_state({"rng": capture_rng_state({"noise": noise_gen}), "train_stream": train_stream.state_dict(),
                          "val_stream": val_stream.state_dict()}, tmp_rank)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            def write_fn(d):
                save_module_state(rater, os.path.join(d, "rater.safetensors"))
                rater.save_config(d)
                trainer.save_state(d)
                for r in range(world):
                    os.replace(os.path.join(args.output_dir, f".rank{r}-state.pt"), os.path.join(d, f"rank{r}.pt"))
                write_json(os.path.join(d, "training_state.json"),
                           {"step": step, "skips_consecutive": skips.consecutive, "skips_total": skips.total,
                            "world_size": world})
                write_json(os.path.join(d, "args.json"), vars(args))
            save_checkpoint(args.output_dir, step, write_fn, total_limit=args.checkpoints_total_limit,
                            metadata={"script": "train_noiserater.py"})
        accelerator.wait_for_everyone()

    def next_meta_batch(stream, num_candidates=None):
        b = next(stream)
        x0 = b["pixel_values"].to(device)
        return add_noise_and_timesteps(x0, args.ddpm_num_steps, noise_gen, b.get("class_labels"),
                                       num_candidates=num_candidates)

    def measure_valuation(step):
        """Valuation accuracy on the fixed held-out groups (main process; the rater is identical on all)."""
        summary = summarize_valuation(trainer.valuation_report(*valuation_data), args.num_candidate_noises)
        summary["step"] = step
        append_jsonl(valuation_path, summary)
        return summary

    progress = tqdm(range(start, args.max_train_steps), initial=start, total=args.max_train_steps,
                    disable=not accelerator.is_local_main_process, desc="meta-steps")
    t_start = time.perf_counter()
    for step in range(start, args.max_train_steps):
        member_batches = [([next_meta_batch(train_stream, args.num_candidate_noises) for _ in range(args.inner_steps)],
                           next_meta_batch(val_stream)) for _ in range(args.population_size)]
        # fault injection (tests): on the last process only, so that multi-process runs see a one-rank fault
        if args.inject_nonfinite_at_step is not None and step == args.inject_nonfinite_at_step and rank == world - 1:
            member_batches[0][1]["x0"] = member_batches[0][1]["x0"] * float("nan")
        compare = (step + 1) % args.compare_every == 0 or step == 0
        t0 = time.perf_counter()
        try:
            trainer.nonfinite = "raise"
            metrics = trainer.meta_step(member_batches, compare_uniform=compare)
            skips.ok()
        except NonFiniteError as e:
            if args.nonfinite == "raise":
                raise NonFiniteError(f"{e} (train_noiserater step {step}); last good checkpoint left intact") from None
            skips.skipped(e)
            trainer.step += 1
            metrics = {"outer_loss": float("nan"), "skipped": 1.0}
            logger.warning("skipped meta-step %d: %s", step, e)
        metrics = {k: _mean_across(accelerator, v) for k, v in metrics.items()}
        metrics.update(step=step + 1, meta_step_time_s=time.perf_counter() - t0)
        if accelerator.is_main_process:
            append_jsonl(history_path, metrics)
            if args.report_to != "none":
                accelerator.log({k: v for k, v in metrics.items() if math.isfinite(v)}, step=step + 1)
        if valuation_data is not None and compare and accelerator.is_main_process:
            v = measure_valuation(step + 1)
            metrics.update(valuation_rho=v["spearman_rho"], valuation_fraction_of_oracle=v["fraction_of_oracle"])
            if args.report_to != "none":
                accelerator.log({"valuation_rho": v["spearman_rho"],
                                 "valuation_fraction_of_oracle": v["fraction_of_oracle"]}, step=step + 1)
        progress.set_postfix(outer=f"{metrics['outer_loss']:.4f}", refresh=False)
        progress.update(1)
        if (step + 1) % args.checkpointing_steps == 0 or step + 1 == args.max_train_steps:
            save(step + 1)
    progress.close()

    # --- outputs -----------------------------------------------------------------------------------
    ranks_consistent = _check_ranks_consistent(accelerator, rater)
    if accelerator.is_main_process:
        rater.save_pretrained(args.output_dir)
        history = read_jsonl(history_path)
        gains = [h["val_loss_uniform"] - h["outer_loss"] for h in history
                 if "val_loss_uniform" in h and math.isfinite(h.get("outer_loss", float("nan")))]
        last = history[-1] if history else {}
        valuation = None
        if valuation_data is not None:
            records = read_jsonl(valuation_path)
            if not records or records[-1]["step"] != args.max_train_steps:
                measure_valuation(args.max_train_steps)
                records = read_jsonl(valuation_path)
            valuation = records[-1]
            plot_valuation(records, os.path.join(args.output_dir, "valuation_accuracy.png"))
        summary = {"step": args.max_train_steps, "outer_loss": last.get("outer_loss"), "valuation": valuation,
                   "mean_gain": sum(gains) / len(gains) if gains else None, "num_comparisons": len(gains),
                   "wall_time_s": time.perf_counter() - t_start, "skipped_steps": skips.total,
                   "data": splits.description, "world_size": world, "ranks_consistent": ranks_consistent}
        write_json(os.path.join(args.output_dir, "meta_summary.json"), summary)
        with open(os.path.join(args.output_dir, "README.md"), "w") as f:
            f.write(rater_model_card(args, splits.description, summary, sum(p.numel() for p in rater.parameters())))
        plot_evidence(history, os.path.join(args.output_dir, "meta_evidence.png"))
        apply_default_permissions(args.output_dir)
        vb = next(ResumableBatches(splits.validation, min(256, len(splits.validation)), seed=0, shuffle=False))
        plot_rater(rater.cpu(), vb["pixel_values"], args.ddpm_num_steps, os.path.join(args.output_dir, "rater_analysis.png"),
                   class_labels=vb.get("class_labels"))
        if args.push_to_hub:
            from huggingface_hub import create_repo, upload_folder

            repo_id = create_repo(args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)),
                                  exist_ok=True, token=args.hub_token, private=args.hub_private_repo).repo_id
            upload_folder(repo_id=repo_id, folder_path=args.output_dir, token=args.hub_token,
                          ignore_patterns=["checkpoint-*", ".checkpoint-*", "logs/*"])
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def _channels(args):
    """C: from the UNet config, else the rater config, else 1 for the grey built-ins and 3 otherwise."""
    for path, flag in [(args.model_config_name_or_path, "--model_config_name_or_path"),
                       (args.rater_config_name_or_path, "--rater_config_name_or_path")]:
        if path:
            cfg = load_json_config(path, flag)
            if "in_channels" in cfg:
                return int(cfg["in_channels"])
    return 1 if args.dataset_name and args.dataset_name.replace("-", "_") in ("digits", "fashion_mnist") else 3


def _check_ranks_consistent(accelerator, rater):
    """With several processes, verify the rater is bit-identical on every rank (raises if not)."""
    if accelerator.num_processes == 1:
        return True
    flat = torch.cat([p.detach().reshape(-1) for p in rater.parameters()])[None]
    gathered = accelerator.gather(flat)
    if not all(torch.equal(gathered[0], gathered[r]) for r in range(gathered.shape[0])):
        raise RuntimeError("rater parameters differ across processes after meta-training")
    return True


def _mean_across(accelerator, v):
    if accelerator.num_processes == 1:
        return float(v)
    t = torch.tensor([float(v)], device=accelerator.device)
    return float(accelerator.reduce(t, reduction="mean"))


def cli(argv=None):
    try:
        return main(argv)
    except (UsageError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(cli())
