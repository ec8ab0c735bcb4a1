#!/usr/bin/env python
"""NoiseRater in diffusers' ``train_unconditional.py``: the few-line change, as a loop that runs.

The training loop of diffusers' ``examples/unconditional_image_generation/train_unconditional.py`` reads
(abridged)::

    for step, batch in enumerate(train_dataloader):
        clean_images = batch["input"].to(weight_dtype)
        noise = torch.randn(clean_images.shape, dtype=weight_dtype, device=clean_images.device)
        bsz = clean_images.shape[0]
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,),
                                  device=clean_images.device).long()
        noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
        with accelerator.accumulate(model):
            model_output = model(noisy_images, timesteps).sample
            loss = F.mse_loss(model_output.float(), noise.float())
            accelerator.backward(loss)
            ...

With NoiseRater selection (a rater trained by ``train_noiserater.py``) it becomes::

    + from noise_rater import NoiseSelectingSampler
    + from noise_rater.training import NoiseGenerators, training_step
    + selector = NoiseSelectingSampler.from_pretrained(args.rater_model_name_or_path, num_candidates=8,
    +                                                  device=accelerator.device)
    + generators = NoiseGenerators.from_seed(args.seed, accelerator.process_index)
      for step, batch in enumerate(train_dataloader):
          clean_images = batch["input"].to(weight_dtype)
    -     noise = torch.randn(...)
    -     timesteps = torch.randint(...)
    -     noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
          with accelerator.accumulate(model):
    -         model_output = model(noisy_images, timesteps).sample
    -         loss = F.mse_loss(model_output.float(), noise.float())
    +         loss = training_step(model, noise_scheduler, clean_images, selector, generators=generators,
    +                              num_candidates=8).loss
              accelerator.backward(loss)

``training_step`` draws the timesteps and N candidate noises per image, lets the selector choose, and
returns the (optionally Min-SNR / importance-weighted) loss; the target follows the scheduler's
``prediction_type``. Any selector of ``noise_rater.sampling`` fits (``KNNNoiseSampler`` needs no rater).

This file is that loop on the built-in 8x8 digits (offline), small enough to run in seconds::

    python examples/dropin_train_unconditional.py --noise_selection randn     # diffusers' original lines
    python examples/dropin_train_unconditional.py --noise_selection knn
    python examples/dropin_train_unconditional.py --noise_selection rater --rater_model_name_or_path RATER
"""

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from noise_rater import KNNNoiseSampler, NoiseSelectingSampler
from noise_rater.data import make_dataloader, prepare_datasets
from noise_rater.training import NoiseGenerators, training_step


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--noise_selection", choices=["randn", "knn", "rater"], default="knn")
    p.add_argument("--rater_model_name_or_path", default=None)
    p.add_argument("--num_candidate_noises", type=int, default=8)
    p.add_argument("--resolution", type=int, default=8)
    p.add_argument("--train_batch_size", type=int, default=16)
    p.add_argument("--max_train_steps", type=int, default=20)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default=None, help="Save the DDPMPipeline here (optional).")
    return p.parse_args(argv)


def main(argv=None):
    """Train for ``--max_train_steps`` micro-batches; returns the list of losses."""
    args = parse_args(argv)
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps)
    torch.manual_seed(args.seed)
    splits = prepare_datasets("digits", resolution=args.resolution, num_channels=1, seed=args.seed)
    train_dataloader = make_dataloader(splits.train, args.train_batch_size, shuffle=True, seed=args.seed)
    model = UNet2DModel(sample_size=args.resolution, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                        layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "UpBlock2D"))
    noise_scheduler = DDPMScheduler(num_train_timesteps=100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)

    # NoiseRater: a selector and the three random streams (timesteps, candidate pool, selection draws).
    if args.noise_selection == "rater":
        selector = NoiseSelectingSampler.from_pretrained(args.rater_model_name_or_path,
                                                         num_candidates=args.num_candidate_noises,
                                                         device=accelerator.device)
    else:
        selector = KNNNoiseSampler(args.num_candidate_noises)
    generators = NoiseGenerators.from_seed(args.seed, accelerator.process_index)

    losses, step = [], 0
    model.train()
    while step < args.max_train_steps:
        for batch in train_dataloader:
            clean_images = batch["pixel_values"]
            with accelerator.accumulate(model):
                if args.noise_selection == "randn":  # diffusers' original lines
                    noise = torch.randn(clean_images.shape, device=clean_images.device)
                    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps,
                                              (clean_images.shape[0],), device=clean_images.device).long()
                    noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
                    model_output = model(noisy_images, timesteps).sample
                    loss = F.mse_loss(model_output.float(), noise.float())
                else:  # the NoiseRater replacement
                    loss = training_step(model, noise_scheduler, clean_images, selector, generators=generators,
                                         num_candidates=args.num_candidate_noises).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
            losses.append(loss.item())
            step += 1
            if step >= args.max_train_steps:
                break
    print(f"{args.noise_selection}: {step} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    if args.output_dir:
        DDPMPipeline(unet=accelerator.unwrap_model(model), scheduler=noise_scheduler).save_pretrained(args.output_dir)
    return losses


if __name__ == "__main__":
    main()
