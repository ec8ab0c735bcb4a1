"""Pieces shared by the two training scripts: flags, validation of flag values, model configs,
model cards, non-finite guards. Library code: it never imports the scripts."""

import argparse
import copy
import json
import math
import os
from typing import Any, Dict, Optional

import torch

from .data import BUILTIN_DATASETS


class UsageError(ValueError):
    """A bad flag value or combination; the scripts print it without a traceback and exit 2."""


class NonFiniteError(FloatingPointError):
    """A non-finite loss, gradient, meta-gradient or rater score, detected at the step it happens."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` keeps the description's line breaks and shows every option's default, including options
    declared without a help text (argparse's own ``ArgumentDefaultsHelpFormatter`` skips those)."""

    def _format_action(self, action):
        if not action.help and action.option_strings and action.default is not argparse.SUPPRESS:
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data (as in diffusers' train_unconditional.py)")
    g.add_argument("--dataset_name", type=str, default=None,
                   help=f"A Hub dataset name, or a built-in offline one: {', '.join(BUILTIN_DATASETS)}.")
    g.add_argument("--dataset_config_name", type=str, default=None)
    g.add_argument("--train_data_dir", type=str, default=None, help="A folder of images (HF imagefolder).")
    g.add_argument("--cache_dir", type=str, default=None)
    g.add_argument("--image_column", type=str, default=None)
    g.add_argument("--label_column", type=str, default=None)
    g.add_argument("--resolution", type=int, default=None,
                   help="Image size; defaults to the model config's sample_size, else 28.")
    g.add_argument("--center_crop", action="store_true")
    g.add_argument("--random_flip", action="store_true")
    g.add_argument("--validation_split", type=float, default=0.1)
    g.add_argument("--max_train_samples", type=int, default=None)
    g.add_argument("--allow_mixed_channels", action="store_true",
                   help="Accept an image folder mixing grey and colour images (all converted to the model's channels).")
    g.add_argument("--class_conditional", action="store_true",
                   help="Feed dataset labels to num_class_embeds of the UNet and the rater.")
    g.add_argument("--background_color", type=str, default="white",
                   help="Colour that transparent pixels (RGBA, LA, palette transparency) are composited onto: "
                        "a name (white, black, ...), #rrggbb or R,G,B.")


def add_diffusion_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("diffusion")
    g.add_argument("--model_config_name_or_path", type=str, default=None,
                   help="A UNet2DModel config JSON (file or folder) for the diffusion model(s).")
    g.add_argument("--ddpm_num_steps", type=int, default=1000)
    g.add_argument("--ddpm_beta_schedule", type=str, default="linear",
                   choices=["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
    g.add_argument("--prediction_type", type=str, default="epsilon", choices=["epsilon", "v_prediction", "sample"])


def add_run_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("run, checkpoints, logging, hub")
    g.add_argument("--output_dir", type=str, required=True)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--train_batch_size", type=int, default=64)
    g.add_argument("--max_train_steps", type=int, default=None)
    g.add_argument("--learning_rate", type=float, default=1e-3)
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help='A checkpoint folder, or "latest" (falls back to the newest valid one).')
    g.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    g.add_argument("--report_to", type=str, default="tensorboard",
                   help='"tensorboard", "wandb", "all" or "none".')
    g.add_argument("--logging_dir", type=str, default="logs")
    g.add_argument("--nonfinite", type=str, default="raise", choices=["raise", "skip"],
                   help="On a non-finite loss/gradient/score: stop with an error (default) or skip the step.")
    g.add_argument("--max_consecutive_skips", type=int, default=10,
                   help="With --nonfinite=skip, abort after this many skipped steps in a row.")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", type=str, default=None)
    g.add_argument("--hub_token", type=str, default=None)
    g.add_argument("--hub_private_repo", action="store_true")
    # fault injection for the test-suite (hidden): make the loss non-finite at this step
    g.add_argument("--inject_nonfinite_at_step", type=int, default=None, help=argparse.SUPPRESS)


def check_positive(args, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        val = getattr(args, name, None)
        if val is None:
            continue
        bad = (val < 0) if allow_zero else (val <= 0)
        if bad or (isinstance(val, float) and not math.isfinite(val)):
            raise UsageError(f"--{name} must be {'>= 0' if allow_zero else '> 0'}, got {val!r}")


def validate_common_args(args) -> None:
    """Flag checks shared by both scripts; raises :class:`UsageError`."""
    if (args.dataset_name is None) == (args.train_data_dir is None):
        raise UsageError("Give exactly one of --dataset_name and --train_data_dir.")
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        raise UsageError(f"--train_data_dir {args.train_data_dir!r} does not exist or is not a folder.")
    check_positive(args, "train_batch_size", "learning_rate", "checkpointing_steps", "ddpm_num_steps",
                   "resolution", "max_train_steps", "checkpoints_total_limit", "max_train_samples",
                   "max_consecutive_skips")
    if not 0.0 < args.validation_split < 1.0:
        raise UsageError(f"--validation_split must be in (0, 1), got {args.validation_split!r}")
    if args.push_to_hub and args.hub_token is not None and os.environ.get("NOISE_RATER_ALLOW_HUB_TOKEN") is None:
        # Same policy as diffusers' examples: a token on the command line is a leak risk.
        raise UsageError("Do not pass --hub_token on the command line with --push_to_hub; use `hf auth login`.")
    from .data import DataError, parse_background_color

    try:
        parse_background_color(args.background_color)
    except DataError as e:
        raise UsageError(f"--background_color: {e}") from None


def unet_downsampling_factor(config: Dict[str, Any]) -> int:
    """How many times a ``UNet2DModel`` built from ``config`` halves the image: 2^(number of down blocks - 1)
    (every down block but the last ends with a stride-2 downsampler; diffusers' ``UNet2DModel``)."""
    import inspect

    from diffusers import UNet2DModel

    blocks = config.get("down_block_types")
    if not blocks:
        blocks = inspect.signature(UNet2DModel.__init__).parameters["down_block_types"].default
    return 2 ** (len(blocks) - 1)


def check_resolution(resolution: int, unet_config: Dict[str, Any], what: str = "the UNet") -> None:
    """Refuse a resolution the UNet's downsampling cannot divide (the skip connections would not line up).

    Raises:
        UsageError: naming the required multiple and the nearest valid resolutions.
    """
    factor = unet_downsampling_factor(unet_config)
    if resolution % factor:
        lower, upper = (resolution // factor) * factor, (resolution // factor + 1) * factor
        nearest = f"{lower} or {upper}" if lower > 0 else f"{upper}"
        raise UsageError(
            f"--resolution {resolution} is not a multiple of {factor}: {what} has "
            f"{int(math.log2(factor)) + 1} down blocks, so it "
            f"halves the image {int(math.log2(factor))} time(s) and needs a resolution divisible by {factor} "
            f"(e.g. {nearest})."
        )


def preflight_push_to_hub(args) -> None:
    """With ``--push_to_hub``: fail before training, not after it, when the Hub cannot be used.

    Checks, without retries: ``HF_HUB_OFFLINE`` is not set, a token is available (``--hub_token`` or
    ``hf auth login``), and the Hub answers ``whoami`` with it.

    Raises:
        UsageError: naming what is missing.
    """
    if not getattr(args, "push_to_hub", False):
        return
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise UsageError("--push_to_hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set (offline mode). "
                         "Unset it, or drop --push_to_hub and upload the output folder later.")
    token = args.hub_token or get_token()
    if not token:
        raise UsageError("--push_to_hub needs a Hugging Face token: run `hf auth login` first (or drop --push_to_hub).")
    from huggingface_hub import whoami

    try:
        whoami(token=token)
    except Exception as e:  # noqa: BLE001 - any failure means the upload at the end would fail too
        raise UsageError(f"--push_to_hub: the Hugging Face Hub cannot be reached with this token "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Check the network and "
                         "`hf auth login`, or drop --push_to_hub.") from None


def load_json_config(path: str, what: str, default_name: str = "config.json") -> Dict[str, Any]:
    """Read a model config JSON from a file or a folder holding ``config.json``."""
    file = os.path.join(path, default_name) if os.path.isdir(path) else path
    try:
        with open(file) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{what}: config file {file!r} not found.") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{what}: {file!r} is not valid JSON ({e}).") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"{what}: {file!r} must hold a JSON object.")
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def default_unet_config(resolution: int, channels: int) -> Dict[str, Any]:
    """A small UNet2DModel (0.69M parameters at 1 channel, 0.70M below 16 px) that trains on CPU.

    Three levels (16, 32, 64 channels; attention at the lowest) from 16 px up, two (32, 64) below.
    """
    deep = resolution >= 16
    return dict(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(16, 32, 64) if deep else (32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D") if deep else ("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D") if deep else ("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=32,
    )


def resolve_unet_config(path: Optional[str], resolution: Optional[int], channels: int,
                        num_class_embeds: Optional[int]) -> Dict[str, Any]:
    cfg = load_json_config(path, "--model_config_name_or_path") if path else default_unet_config(resolution or 28, channels)
    if resolution is not None:
        cfg["sample_size"] = resolution
    cfg.setdefault("in_channels", channels)
    cfg.setdefault("out_channels", cfg["in_channels"])
    if num_class_embeds is not None:
        cfg["num_class_embeds"] = num_class_embeds
    return cfg


def check_finite(value: torch.Tensor, what: str, step: int) -> None:
    """Raise :class:`NonFiniteError` naming ``what`` and ``step`` if ``value`` has a NaN/inf."""
    if not bool(torch.isfinite(value).all()):
        raise NonFiniteError(f"non-finite {what} at step {step}")


def nonfinite_error(status, step, norm=None):
    """A :class:`NonFiniteError` for a gathered ``[loss, selection_failed]`` status `(P, 2)` or a gradient
    norm that is not finite, else None."""
    try:
        if status is not None:
            if bool(status[:, 1].any()):
                raise NonFiniteError(f"non-finite rater score at step {step}")
            check_finite(status[:, 0], "loss", step)
        if norm is not None:
            check_finite(torch.as_tensor(norm), "gradient", step)
    except NonFiniteError as e:
        return e
    return None


def grad_norm(parameters) -> torch.Tensor:
    grads = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())


class SkipCounter:
    """Counts consecutive skipped steps for ``--nonfinite=skip`` and aborts after ``limit`` in a row."""

    def __init__(self, limit: int):
        self.limit, self.consecutive, self.total = limit, 0, 0

    def skipped(self, err: Exception) -> None:
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.limit:
            raise NonFiniteError(f"{err} ({self.consecutive} consecutive non-finite steps; aborting)") from err

    def ok(self) -> None:
        self.consecutive = 0


def write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def append_jsonl(path: str, obj: Dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")


def truncate_jsonl(path: str, max_step: int) -> None:
    """Drop records with ``step > max_step`` (written after the checkpoint a run resumes from)."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if int(rec.get("step", 0)) <= max_step:
                keep.append(line)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(line + "\n" for line in keep)
    os.replace(tmp, path)


def read_jsonl(path: str):
    """All records of a JSON-lines file (skipping a line cut by a crash); [] if the file is missing."""
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return out
