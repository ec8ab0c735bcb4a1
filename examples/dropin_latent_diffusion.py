#!/usr/bin/env python
"""NoiseRater in a latent-diffusion loop (diffusers' ``train_text_to_image.py`` style): x0 are VAE latents.

The loop body of diffusers' ``examples/text_to_image/train_text_to_image.py`` reads (abridged)::

    latents = vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist.sample()
    latents = latents * vae.config.scaling_factor
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")

With NoiseRater the last five lines but one become::

    encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
    loss = training_step(unet, noise_scheduler, latents, selector, generators=generators,
                         model_kwargs={"encoder_hidden_states": encoder_hidden_states}).loss

The selector sees latents `(B, 4, h, w)`: a ``NoiseRaterModel`` with ``in_channels=4`` (trained on latents,
see ``noise_rater.bilevel.meta_objective``) or ``KNNNoiseSampler`` (any channel count).

To run offline in seconds, every model here is tiny and randomly initialised: an ``AutoencoderKL`` (3 -> 4
latent channels, 16 px -> 8 px), a ``CLIPTextModel`` built from a ``CLIPTextConfig``, a word-level tokenizer
(a real script loads ``CLIPTokenizer``), and a ``UNet2DConditionModel``; the data are the built-in digits
with prompts "a photo of the digit <k>"::

    python examples/dropin_latent_diffusion.py --noise_selection knn
    python examples/dropin_latent_diffusion.py --noise_selection rater --rater_model_name_or_path LATENT_RATER
"""

import argparse

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from noise_rater import KNNNoiseSampler, NoiseSelectingSampler
from noise_rater.data import make_dataloader, prepare_datasets
from noise_rater.training import NoiseGenerators, training_step

WORDS = ["<pad>", "<eos>", "a", "photo", "of", "the", "digit"] + [str(k) for k in range(10)]
MAX_LENGTH = 8
LATENT_CHANNELS = 4


def tokenize(prompts):
    """Word-level ids `(B, MAX_LENGTH)`, "<eos>"-terminated and "<pad>"-padded (stand-in for CLIPTokenizer)."""
    ids = []
    for prompt in prompts:
        row = [WORDS.index(w) for w in prompt.split()][: MAX_LENGTH - 1] + [WORDS.index("<eos>")]
        ids.append(row + [WORDS.index("<pad>")] * (MAX_LENGTH - len(row)))
    return torch.tensor(ids)


def build_models(resolution):
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=resolution)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
        max_position_embeddings=MAX_LENGTH, pad_token_id=0, bos_token_id=1, eos_token_id=1))
    latent_size = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    unet = UNet2DConditionModel(sample_size=latent_size, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                                block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                cross_attention_dim=16, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return vae, text_encoder, unet


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--noise_selection", choices=["knn", "rater"], default="knn")
    p.add_argument("--rater_model_name_or_path", default=None, help="A NoiseRaterModel with in_channels=4.")
    p.add_argument("--num_candidate_noises", type=int, default=8)
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--train_batch_size", type=int, default=8)
    p.add_argument("--max_train_steps", type=int, default=10)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    """Train for ``--max_train_steps`` steps; returns ``{"losses": [...], "latent_shape": (B, 4, h, w)}``."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    splits = prepare_datasets("digits", resolution=args.resolution, num_channels=3, seed=args.seed, use_labels=True)
    loader = make_dataloader(splits.train, args.train_batch_size, shuffle=True, seed=args.seed)
    vae, text_encoder, unet = build_models(args.resolution)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    noise_scheduler = DDPMScheduler(num_train_timesteps=100)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate)

    if args.noise_selection == "rater":
        selector = NoiseSelectingSampler.from_pretrained(args.rater_model_name_or_path,
                                                         num_candidates=args.num_candidate_noises)
        if selector.rater.config.in_channels != LATENT_CHANNELS:
            raise ValueError(f"{args.rater_model_name_or_path}: the rater has in_channels="
                             f"{selector.rater.config.in_channels}; latents have {LATENT_CHANNELS}.")
    else:
        selector = KNNNoiseSampler(args.num_candidate_noises)
    generators = NoiseGenerators.from_seed(args.seed)
    latent_gen = torch.Generator().manual_seed(args.seed)  # the VAE's posterior samples

    losses, latent_shape, step = [], None, 0
    unet.train()
    while step < args.max_train_steps:
        for batch in loader:
            prompts = [f"a photo of the digit {int(k)}" for k in batch["class_labels"]]
            with torch.no_grad():
                latents = vae.encode(batch["pixel_values"]).latent_dist.sample(generator=latent_gen)
                latents = latents * vae.config.scaling_factor
                encoder_hidden_states = text_encoder(tokenize(prompts), return_dict=False)[0]
            loss = training_step(unet, noise_scheduler, latents, selector, generators=generators,
                                 num_candidates=args.num_candidate_noises,
                                 model_kwargs={"encoder_hidden_states": encoder_hidden_states}).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            latent_shape = tuple(latents.shape)
            step += 1
            if step >= args.max_train_steps:
                break
    print(f"latent {args.noise_selection}: latents {latent_shape}, {step} steps, "
          f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return {"losses": losses, "latent_shape": latent_shape}


if __name__ == "__main__":
    main()
