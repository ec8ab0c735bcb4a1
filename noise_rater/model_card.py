"""Model cards written next to what the training scripts save (markdown text only)."""

import json

__all__ = ["rater_model_card", "valuation_markdown"]


def rater_model_card(args, data_description: str, metrics: dict, rater_params: int) -> str:
    """The model card (README.md) of a rater meta-trained by ``train_noiserater.py``.

    Args:
        args: that run's parsed flags (an ``argparse.Namespace``); test-only flags are left out of the card.
        data_description: one line naming the data set and split sizes.
        metrics: the run summary (``step``, ``outer_loss``, ``mean_gain``, ``valuation``).
        rater_params: the rater's number of parameters.
    """
    shown = {k: v for k, v in vars(args).items() if not k.startswith("inject_")}
    return f"""---
library_name: diffusers
tags:
- noise-rater
- diffusion
- meta-learning
---

# NoiseRater rater

A `NoiseRaterModel` that scores diffusion training noise realisations eps for an image x0 at
timestep t, meta-trained with `train_noiserater.py` (bilevel optimisation: {args.inner_steps}
`{args.inner_optimizer}` inner step(s) at lr {args.inner_lr}, population of {args.population_size} inner UNets
per process, lifetime {args.inner_model_lifetime} meta-steps, temperature {args.temperature}; inner batches of
{args.train_batch_size} images x {args.num_candidate_noises} candidate noises, soft weights over
`{args.weighting_scope}`; meta-gradient `{args.meta_gradient}`).

- Data: {data_description}
- Meta-steps: {metrics.get('step')} ; outer learning rate {args.learning_rate}; batch size {args.train_batch_size}
- Scheduler: DDPM, {args.ddpm_num_steps} steps, `{args.ddpm_beta_schedule}` betas, `{args.prediction_type}` prediction
- Parameters: {rater_params}
- Last logged outer loss (validation diffusion loss after the inner steps): {metrics.get('outer_loss')}
- Mean over the run of (uniform - weighted) validation loss on identical batches: {metrics.get('mean_gain')}

## Valuation accuracy (held-out groups, final rater)

{valuation_markdown(metrics.get('valuation'))}

## Use

```python
from noise_rater import NoiseSelectingSampler
sampler = NoiseSelectingSampler.from_pretrained("{args.hub_model_id or args.output_dir}",
                                                num_candidates={args.num_candidate_noises})
noise = sampler(x0, timesteps)  # (B, C, H, W)
```

or in stage 2: `accelerate launch train_diffusion_hard.py --noise_selection rater --rater_model_name_or_path ...`.

Command-line arguments of this run:

```json
{json.dumps(shown, indent=2, sort_keys=True, default=str)}
```
"""


def valuation_markdown(val) -> str:
    """Markdown for a valuation summary (:func:`noise_rater.valuation.summarize_valuation`): a table per inner
    model and one sentence; ``None`` -> "not measured"."""
    if not val:
        return "Not measured (`--num_valuation_groups 0`)."
    lines = [f"On {val['num_groups']} held-out (x0, t) groups of {val['num_candidates']} candidate noises, against the "
             "exact one-step influence c = <grad l(x0, eps, t), grad L_val> of each candidate at each inner model's "
             "parameters (larger c = more useful):", "",
             "| inner model age (meta-steps) | within-group Spearman rho | gain of rater's pick | random pick | "
             "oracle pick | fraction of oracle's gain captured |", "|---|---|---|---|---|---|"]
    for r in val["members"]:
        lines.append(f"| {r['age']} | {r['spearman_rho']:+.3f} | {r['gain_rater']:.3e} | {r['gain_random']:.3e} | "
                     f"{r['gain_oracle']:.3e} | {r['fraction_of_oracle']:+.3f} |")
    lines += ["", f"Mean over inner models: rho {val['spearman_rho']:+.3f}, fraction of the oracle's gain "
              f"{val['fraction_of_oracle']:+.3f} (1 = picks like the oracle, 0 = no better than a random pick)."]
    return "\n".join(lines)
