#!/usr/bin/env python
"""Evaluate a trained ``DDPMPipeline``: FD-EffLite0 / KID (and optionally Inception FID) of generated samples
against held-out real images, plus the held-out diffusion loss per timestep band.

FD-EffLite0 uses EfficientNet-Lite0 features (weights ship in a pip wheel, no download). It is NOT FID and is
NOT comparable to published FID numbers; use it to compare models evaluated with this script. Standard FID is
computed only with ``--inception_weights PATH`` (a local pytorch-fid ``pt_inception-2015-12-05-*.pth``, needs
``pip install pytorch-fid``); FD_DINOv2 (the metric EDM2 reports) with ``--dinov2_checkpoint`` (a local DINOv2
folder or a Hub id such as ``facebook/dinov2-large``). The FD / KID numbers come from the project's ``evaluate``
metric, ``evaluate.load(noise_rater.evaluation.FD_METRIC_PATH)``.

Example::

    python evaluate_pipeline.py --pipeline_path ./ddpm-fashion --dataset_name fashion_mnist --resolution 32 \
        --num_samples 1000 --num_inference_steps 50 --scheduler ddim --output_json metrics.json
"""

import argparse
import json
import logging
import math
import os
import sys
import warnings

import torch

logger = logging.getLogger(__name__)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Evaluate a DDPMPipeline (FD-EffLite0, KID, FID, FD_DINOv2, "
                                     "held-out loss).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pipeline_path", type=str, required=True,
                        help="Folder of a DDPMPipeline saved with `save_pretrained` (unet/ + scheduler/).")
    parser.add_argument("--dataset_name", type=str, default=None,
                        help="Data set of the real images, as used for training: a built-in (digits, fashion_mnist), "
                        "an alias (ffhq -> merkol/ffhq-256, imagenet -> ILSVRC/imagenet-1k), a Hub dataset id "
                        "(owner/name) or a local data set folder, loaded with datasets.load_dataset.")
    parser.add_argument("--dataset_config_name", type=str, default=None, help="Dataset config name.")
    parser.add_argument("--train_data_dir", type=str, default=None,
                        help="Local image folder (alternative to --dataset_name).")
    parser.add_argument("--resolution", type=int, default=None,
                        help="Image resolution of the real images; None means the unet's sample_size.")
    parser.add_argument("--center_crop", action="store_true",
                        help="Accepted for compatibility with diffusers' scripts; no effect: images are resized so "
                        "that the shorter edge is --resolution and then always centre-cropped (never random).")
    parser.add_argument("--validation_split", type=float, default=0.1,
                        help="Held-out fraction; must match training so the held-out images were never trained on.")
    parser.add_argument("--split_seed", type=int, default=None,
                        help="Seed of the train/validation split: the training run's --seed, so that the held-out "
                             "images were never trained on. Default: read from the pipeline folder's "
                             "final_metrics.json (written by train_diffusion_hard.py), else 0.")
    parser.add_argument("--max_real_images", type=int, default=None,
                        help="Use at most this many held-out real images; None means all.")
    parser.add_argument("--num_samples", type=int, default=1000, help="Number of generated images.")
    parser.add_argument("--num_inference_steps", type=int, default=50, help="Sampler steps per generated image.")
    parser.add_argument("--scheduler", type=str, default="ddim", choices=["ddim", "ddpm"],
                        help="Sampler: DDIM (eta = 0) or ancestral DDPM, built from the pipeline's scheduler config.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampler noise and KID subsets.")
    parser.add_argument("--batch_size", type=int, default=64, help="Sampling, feature and loss batch size.")
    parser.add_argument("--no_efflite0", action="store_true", help="Skip FD-EffLite0 / KID.")
    parser.add_argument("--inception_weights", type=str, default=None,
                        help="Local pytorch-fid Inception weights file; enables standard FID (never downloaded).")
    parser.add_argument("--dinov2_checkpoint", type=str, default=None,
                        help="DINOv2 checkpoint for FD_DINOv2 (as EDM2 reports): a local folder saved with "
                        "save_pretrained, or a Hub id such as facebook/dinov2-large (downloaded by transformers "
                        "unless cached; never with HF_HUB_OFFLINE=1).")
    parser.add_argument("--fd_method", type=str, default="sqrtm", choices=["sqrtm", "eigh"],
                        help="Frechet distance trace term: scipy sqrtm (pytorch-fid) or an equivalent, faster eigh.")
    parser.add_argument("--no_val_loss", action="store_true", help="Skip the held-out diffusion loss.")
    parser.add_argument("--val_loss_repeats", type=int, default=1,
                        help="(noise, timestep) draws per held-out image for the validation loss.")
    parser.add_argument("--val_loss_seed", type=int, default=1234, help="Seed of the fixed validation triples.")
    parser.add_argument("--val_loss_bands", type=int, default=4, help="Number of equal timestep bands.")
    parser.add_argument("--device", type=str, default=None, help="Device; None means cuda if available, else cpu.")
    parser.add_argument("--output_json", type=str, default=None, help="Where to write the metrics JSON.")
    args = parser.parse_args(input_args)
    if args.dataset_name is None and args.train_data_dir is None:
        parser.error("Specify --dataset_name or --train_data_dir for the held-out real images.")
    return args


def load_real_images(args, num_channels: int, resolution: int, use_labels: bool = False):
    """Held-out real images `(M, C, H, W)` in `[-1, 1]` and class labels `(M,)` (or None)."""
    from noise_rater.data import prepare_datasets  # lazy: only needed by the CLI

    extra = {"use_labels": True} if use_labels else {}
    splits = prepare_datasets(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_data_dir=args.train_data_dir,
        resolution=resolution,
        num_channels=num_channels,
        center_crop=args.center_crop,
        random_flip=False,
        validation_split=args.validation_split,
        seed=args.split_seed,
        **extra,
    )
    val = splits.validation
    if val is None or len(val) == 0:
        raise ValueError("The dataset has no held-out validation split; set --validation_split > 0.")
    n = len(val) if args.max_real_images is None else min(len(val), args.max_real_images)
    images, labels = [], []
    for i in range(n):
        item = val[i]
        images.append(torch.as_tensor(item["pixel_values"]).float())
        if "class_labels" in item and item["class_labels"] is not None:
            labels.append(int(item["class_labels"]))
    class_labels = torch.tensor(labels, dtype=torch.long) if len(labels) == n and n > 0 else None
    return torch.stack(images), class_labels


def _json_safe(obj):
    """NaN/inf -> None so the output is strict JSON."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _load_pipeline(pipeline_cls, path):
    """``pipeline_cls.from_pretrained(path)``; a missing folder or unloadable pipeline prints ``error: ...`` and
    exits 2 (a local-looking path that is not a folder is refused without asking the Hub)."""
    looks_local = os.path.isabs(path) or path.startswith(".") or path.count("/") != 1 or os.path.exists(path)
    if looks_local and not os.path.isdir(path):
        print(f"error: --pipeline_path {path!r} is not a folder (expected a saved pipeline with model_index.json).",
              file=sys.stderr)
        sys.exit(2)
    try:
        return pipeline_cls.from_pretrained(path)
    except (OSError, ValueError, EnvironmentError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: --pipeline_path {path!r}: cannot load the pipeline ({first})", file=sys.stderr)
        sys.exit(2)


def _training_seed(pipeline_path: str) -> int:
    """The --seed of the run that wrote ``pipeline_path`` (its train/validation split), else 0 (logged)."""
    path = os.path.join(pipeline_path, "final_metrics.json")
    try:
        with open(path) as f:
            seed = int(json.load(f)["args"]["seed"])
        logger.info("Held-out split seed %d, from %s (the training run's --seed).", seed, path)
        return seed
    except (OSError, KeyError, TypeError, ValueError):
        logger.warning("No training seed found in %s: the held-out split uses --split_seed 0; pass the training "
                       "run's --seed as --split_seed if it was another.", path)
        return 0


def main(input_args=None):
    args = parse_args(input_args)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)

    from diffusers import DDPMPipeline

    from noise_rater.evaluation import RankDeficientCovarianceWarning, evaluate_pipeline, make_eval_triples

    pipe = _load_pipeline(DDPMPipeline, args.pipeline_path)
    if args.split_seed is None:
        args.split_seed = _training_seed(args.pipeline_path)
    unet_cfg = pipe.unet.config
    sample_size = unet_cfg.sample_size
    resolution = args.resolution or (sample_size if isinstance(sample_size, int) else int(sample_size[0]))
    # A class-conditional unet needs the held-out labels for its validation loss.
    conditional = getattr(unet_cfg, "num_class_embeds", None) is not None or \
        getattr(unet_cfg, "class_embed_type", None) is not None
    real_images, class_labels = load_real_images(args, unet_cfg.in_channels, resolution,
                                                 use_labels=conditional and not args.no_val_loss)
    logger.info("Loaded %d held-out real images of shape %s", real_images.shape[0], tuple(real_images.shape[1:]))

    triples = None
    if not args.no_val_loss:
        triples = make_eval_triples(
            real_images,
            pipe.scheduler.config.num_train_timesteps,
            seed=args.val_loss_seed,
            repeats=args.val_loss_repeats,
            class_labels=class_labels if conditional else None,
        )

    num_samples = args.num_samples
    if conditional and num_samples > 0:
        logger.warning("The unet is class-conditional; DDPMPipeline cannot sample it, so FD/KID are skipped.")
        num_samples = 0

    # A real (or generated) set too small for a full-rank covariance: log the metric's reason and remedy.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RankDeficientCovarianceWarning)
        metrics = evaluate_pipeline(
            pipe,
            real_images,
            num_samples=num_samples,
            num_inference_steps=args.num_inference_steps,
            scheduler=args.scheduler,
            seed=args.seed,
            feature_extractor=None if args.no_efflite0 else "efflite0",
            inception_weights=args.inception_weights,
            dinov2_checkpoint=args.dinov2_checkpoint,
            triples=triples,
            batch_size=args.batch_size,
            device=args.device,
            loss_bands=args.val_loss_bands,
            fd_method=args.fd_method,
        )
    for w in caught:
        if issubclass(w.category, RankDeficientCovarianceWarning):
            logger.warning("%s", w.message)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    result = {"metrics": _json_safe(metrics), "config": vars(args)}
    text = json.dumps(result, indent=2, sort_keys=True, default=str)
    print(text)
    if args.output_json:
        out_dir = os.path.dirname(os.path.abspath(args.output_json))
        os.makedirs(out_dir, exist_ok=True)
        with open(args.output_json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        logger.info("Wrote metrics to %s", args.output_json)
    return metrics


if __name__ == "__main__":
    main()
