"""Named benchmark protocols and the methods they compare (plain data; no training code here).

A protocol fixes everything a comparison needs: data, resolution, the stage-2 UNet config (and the stage-1
inner UNet config, which differs from it only in the ``transfer`` protocol), steps, batch, learning rate, the
shared candidate-pool size N, seeds per method, validation triples, FD sample counts and the meta-training
(stage 1) settings, and optionally ``lr_scheduler`` (a diffusers ``get_scheduler`` name; default
``constant_with_warmup``). ``benchmarks/run_benchmark.py --protocol NAME`` runs one; ``--dry_run`` prints the
resolved protocol.

Common random numbers: stage 2 draws data order, timesteps and the pool of N candidate noises per sample from
generators that depend only on ``--seed`` (uniform trains on candidate 0 of the pool). The runner therefore
passes the same ``--seed`` and the same ``--num_candidate_noises`` to *every* method of a protocol, so that
within a seed every difference between two runs is the method.
"""

import copy
import hashlib
import json

# ---- methods ---------------------------------------------------------------------------------------------
# flags: stage-2 flags of the method (the pool size and the seed are added by the runner, identical for all);
# rater_scope: None, or the --weighting_scope of the stage-1 rater the method needs.
METHODS = {
    "uniform": {"label": "uniform (candidate 0 of the pool)", "rater_scope": None,
                "flags": ["--noise_selection", "uniform", "--loss_weighting", "uniform"]},
    "min_snr": {"label": "Min-SNR-5 weighting", "rater_scope": None,
                "flags": ["--noise_selection", "uniform", "--loss_weighting", "min_snr", "--snr_gamma", "5"]},
    "knn": {"label": "KNN noise (nearest of N)", "rater_scope": None,
            "flags": ["--noise_selection", "knn", "--loss_weighting", "uniform"]},
    "assignment": {"label": "Immiscible (batch assignment)", "rater_scope": None,
                   "flags": ["--noise_selection", "assignment", "--loss_weighting", "uniform"]},
    "rater_batch": {"label": "NoiseRater, batch-scope rater, argmax", "rater_scope": "batch",
                    "flags": ["--noise_selection", "rater", "--selection_rule", "argmax", "--loss_weighting", "uniform"]},
    "rater_cand": {"label": "NoiseRater, candidate-scope rater, argmax", "rater_scope": "candidates",
                   "flags": ["--noise_selection", "rater", "--selection_rule", "argmax", "--loss_weighting", "uniform"]},
    "rater_cand_importance": {"label": "NoiseRater, candidate-scope rater, importance", "rater_scope": "candidates",
                              "flags": ["--noise_selection", "rater", "--selection_rule", "importance",
                                        "--loss_weighting", "uniform"]},
    "oracle": {"label": "oracle (one-step influence, the ceiling)", "rater_scope": None,
               "flags": ["--noise_selection", "oracle", "--loss_weighting", "uniform"]},
}
METHOD_ORDER = list(METHODS)
RATER_METHODS = [m for m in METHOD_ORDER if METHODS[m]["rater_scope"] is not None]

# ---- UNet configs ------------------------------------------------------------------------------------------
_TWO_LEVEL = {"down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"],
              "norm_num_groups": 8}
UNET_S = {"block_out_channels": [32, 64], "layers_per_block": 1, **_TWO_LEVEL}          # 0.65 M parameters
UNET_L = {"block_out_channels": [64, 128], "layers_per_block": 2, **_TWO_LEVEL}         # 3.66 M (5.6x UNET_S)
UNET_GPU = {"block_out_channels": [64, 128, 256], "layers_per_block": 2, "norm_num_groups": 32,
            "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
            "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]}             # 15.7 M at 32x32

# Stage 1: K = 1 inner step (exact meta-gradient by one forward-mode JVP); inner batches of 8 images x N = 8
# candidate noises (64 samples, as many as one stage-2 batch of 64 in flat samples).
STAGE1_DEFAULT = {"meta_steps": 300, "population_size": 2, "inner_steps": 1, "inner_lr": 1e-3,
                  "inner_model_lifetime": 100, "compare_every": 10, "checkpointing_steps": 25,
                  "train_batch_size": 8, "seed": 1000}

DIGITS_NO_FD = ("scikit-learn digits has 1,797 images in total (180 held out at validation_split 0.1): FD at "
                ">= 2,000 generated vs >= 5,000 held-out real images is impossible, and FD at the few hundred "
                "images available varies by tens of percent between seeds. Validation loss is the primary "
                "metric here; FD is not computed.")

_DIGITS8 = {
    "description": "8x8 digits: the many-seed comparison of every method (CPU).",
    "dataset_name": "digits", "resolution": 8, "num_channels": 1,
    "unet": UNET_S, "stage1_unet": UNET_S,
    "steps": 2000, "batch_size": 64, "learning_rate": 1e-3, "lr_warmup_steps": 50,
    "num_candidate_noises": 8,
    "methods": METHOD_ORDER,
    "seeds": list(range(10)), "method_seeds": {"oracle": [0, 1, 2]},
    "validation_steps": 100, "num_validation_triples": 2048, "validation_seed": 1234,
    "checkpointing_steps": 500,
    "fd": None, "fd_note": DIGITS_NO_FD,
    "stage1": dict(STAGE1_DEFAULT),
}

_FMNIST16 = {
    "description": "Fashion-MNIST 16x16 with the small UNet (CPU budget); FD is the second primary metric.",
    "dataset_name": "fashion_mnist", "resolution": 16, "num_channels": 1,
    "unet": UNET_S, "stage1_unet": UNET_S,
    "steps": 3000, "batch_size": 64, "learning_rate": 1e-3, "lr_warmup_steps": 50,
    "num_candidate_noises": 8,
    "methods": METHOD_ORDER,
    "seeds": list(range(5)), "method_seeds": {"oracle": [0, 1]},
    "validation_steps": 250, "num_validation_triples": 2048, "validation_seed": 1234,
    "checkpointing_steps": 500,
    "fd": {"num_generated": 2000, "num_real": 5000, "scheduler": "ddim", "num_inference_steps": 50,
           "sample_seed": 1234, "at_fractions": [0.5, 1.0], "batch_size": 250},
    "stage1": dict(STAGE1_DEFAULT),
}

PROTOCOLS = {
    "digits8": _DIGITS8,
    "digits8_long": {
        **_DIGITS8,
        "description": "8x8 digits trained 4x longer with cosine learning-rate decay, so that uniform's validation "
                       "loss flattens: does digits8's difference persist at the end of training?",
        "steps": 8000, "lr_scheduler": "cosine",
        "methods": ["uniform", "rater_batch", "rater_cand", "rater_cand_importance"],
        "seeds": list(range(5)), "method_seeds": {},
        "validation_steps": 200, "checkpointing_steps": 1000,
    },
    "fmnist16": _FMNIST16,
    "fmnist16_cosine": {
        **_FMNIST16,
        "description": "Fashion-MNIST 16x16 as fmnist16, with cosine learning-rate decay to zero: fmnist16's final "
                       "iterate at a constant learning rate spread so much in FD between seeds that the FD budget "
                       "was out of reach (its power table); a decayed final iterate is meant to cut that spread.",
        "lr_scheduler": "cosine",
    },
    "transfer": {
        "description": "Rater transfer: raters meta-trained with the small inner UNet (digits8's stage 1, reused "
                       "from the cache) drive stage 2 of a UNet >= 4x larger, compared with uniform at that size.",
        "dataset_name": "digits", "resolution": 8, "num_channels": 1,
        "unet": UNET_L, "stage1_unet": UNET_S, "small_protocol": "digits8",
        "steps": 2000, "batch_size": 64, "learning_rate": 1e-3, "lr_warmup_steps": 50,
        "num_candidate_noises": 8,
        "methods": ["uniform", "rater_batch", "rater_cand", "rater_cand_importance"],
        "seeds": list(range(6)), "method_seeds": {},
        "validation_steps": 100, "num_validation_triples": 2048, "validation_seed": 1234,
        "checkpointing_steps": 500,
        "fd": None, "fd_note": DIGITS_NO_FD,
        "stage1": dict(STAGE1_DEFAULT),
    },
    "gpu32": {
        "description": "Fashion-MNIST 32x32 with a 15.7M-parameter UNet (attention at 8x8); needs a CUDA GPU "
                       "(benchmarks/gpu_benchmark.sh). Reported separately.",
        "dataset_name": "fashion_mnist", "resolution": 32, "num_channels": 1,
        "unet": UNET_GPU, "stage1_unet": UNET_GPU,
        "steps": 4000, "batch_size": 128, "learning_rate": 2e-4, "lr_warmup_steps": 200,
        "num_candidate_noises": 8,
        "methods": ["uniform", "knn", "rater_cand", "oracle"],
        "seeds": [0, 1, 2], "method_seeds": {"oracle": [0]},
        "validation_steps": 500, "num_validation_triples": 4096, "validation_seed": 1234,
        "checkpointing_steps": 1000,
        "fd": {"num_generated": 5000, "num_real": 5000, "scheduler": "ddim", "num_inference_steps": 50,
               "sample_seed": 1234, "at_fractions": [0.5, 1.0], "batch_size": 500},
        "stage1": {**STAGE1_DEFAULT, "meta_steps": 500, "train_batch_size": 16, "inner_model_lifetime": 200},
    },
}

# Stage-2 learning-rate schedule of a protocol without an ``lr_scheduler`` key, and the names one may give
# (those of train_diffusion_hard.py's --lr_scheduler that need no extra arguments).
DEFAULT_LR_SCHEDULER = "constant_with_warmup"
LR_SCHEDULERS = ("constant_with_warmup", "cosine", "linear")

# Why stage 1 has its own seed, and what that does not prevent (BENCHMARKS.md prints it beside stage 1).
# The overlap figures are measured by (one line, from the repository root):
# python -c "from noise_rater.data import _split_indices as s; [print(n, [len(set(s(n, .1, 1000, None, 'x')[1].tolist()) & set(s(n, .1, k, None, 'x')[1].tolist())) / round(n * .1) for k in range(10)]) for n in (1797, 60000)]"  # noqa: E501
STAGE1_SEED_NOTE = ("stage 1 uses seed {seed}, none of the stage-2 seeds; splits are seeded by --seed, so its "
                    "meta-validation split is another random draw than each stage-2 seed's held-out split, and the "
                    "two share by chance about validation_split of the held-out images (measured for seeds 0-9: "
                    "7 to 16 % on digits, 10 % on Fashion-MNIST), which if anything favours the rater methods in "
                    "validation loss")

# Minimums the issue sets for FD (a protocol below them is reported as off-protocol).
FD_MIN_GENERATED = 2000
FD_MIN_REAL = 5000


class ProtocolError(ValueError):
    """A protocol or an override is inconsistent (names the key and the value).

    ``key`` (a dotted path such as ``"stage1.meta_steps"``) and ``value`` are set for range errors, so that a
    command line can name its own flag for the same check."""

    def __init__(self, message, key=None, value=None):
        super().__init__(message)
        self.key = key
        self.value = value


# Keys that must be positive ints (dotted paths; the fd.* ones only when the protocol computes FD).
POSITIVE_INT_KEYS = ("steps", "batch_size", "validation_steps", "num_validation_triples", "checkpointing_steps",
                     "num_candidate_noises", "stage1.meta_steps", "fd.num_generated", "fd.num_real",
                     "fd.num_inference_steps")


def get_protocol(name, overrides=None):
    """The protocol ``name`` (a deep copy) with ``overrides`` (a flat dict of top-level keys) applied.

    Raises:
        ProtocolError: unknown name or key, or an inconsistent result (see :func:`check_protocol`).
    """
    if name not in PROTOCOLS:
        raise ProtocolError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    p = copy.deepcopy(PROTOCOLS[name])
    p["name"] = name
    for k, v in (overrides or {}).items():
        if k not in p and k not in ("fd",):
            raise ProtocolError(f"protocol {name!r} has no key {k!r}")
        p[k] = v
    check_protocol(p)
    return p


def check_protocol(p):
    """Raise ProtocolError if ``p`` is inconsistent."""
    name = p.get("name", "?")
    for m in p["methods"]:
        if m not in METHODS:
            raise ProtocolError(f"protocol {name!r}: unknown method {m!r}; known: {', '.join(METHODS)}")
    for m, seeds in p.get("method_seeds", {}).items():
        if m not in METHODS:
            raise ProtocolError(f"protocol {name!r}: method_seeds names unknown method {m!r}")
        if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds):
            raise ProtocolError(f"protocol {name!r}: method_seeds[{m!r}] must be a list of ints, got {seeds!r}")
    for key in POSITIVE_INT_KEYS:
        head, _, tail = key.partition(".")
        if tail and p.get(head) is None:
            continue
        v = p[head].get(tail) if tail else p[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ProtocolError(f"protocol {name!r}: {key} must be a positive int, got {v!r}", key=key, value=v)
    if any(not isinstance(s, int) or s < 0 for s in p["seeds"]):
        raise ProtocolError(f"protocol {name!r}: seeds must be ints >= 0, got {p['seeds']!r}")
    if p.get("lr_scheduler", DEFAULT_LR_SCHEDULER) not in LR_SCHEDULERS:
        raise ProtocolError(f"protocol {name!r}: lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, "
                            f"got {p['lr_scheduler']!r}", key="lr_scheduler", value=p["lr_scheduler"])
    if p["steps"] % p["validation_steps"]:
        raise ProtocolError(f"protocol {name!r}: steps ({p['steps']}) must be a multiple of validation_steps "
                            f"({p['validation_steps']}) so that the final step is validated")
    fd = p.get("fd")
    if fd is not None:
        for f in fd["at_fractions"]:
            step = fd_step(p, f)
            if step != p["steps"] and step % p["checkpointing_steps"]:
                raise ProtocolError(f"protocol {name!r}: FD at fraction {f} is step {step}, which is not a "
                                    f"multiple of checkpointing_steps ({p['checkpointing_steps']})")


def fd_step(p, fraction):
    """The training step at which FD is measured for ``fraction`` of the run."""
    return int(round(p["steps"] * fraction))


def seeds_for(p, method):
    """Seeds a method runs at: the protocol's seeds, or its ``method_seeds`` entry restricted to them."""
    seeds = list(p["seeds"])
    if method in p.get("method_seeds", {}):
        return [s for s in p["method_seeds"][method] if s in seeds]
    return seeds


def fd_off_protocol(p):
    """None if the FD sample counts meet the issue's minimums, else a sentence saying which do not."""
    fd = p.get("fd")
    if fd is None:
        return None
    bad = []
    if fd["num_generated"] < FD_MIN_GENERATED:
        bad.append(f"{fd['num_generated']} generated images (< {FD_MIN_GENERATED})")
    if fd["num_real"] < FD_MIN_REAL:
        bad.append(f"{fd['num_real']} real images (< {FD_MIN_REAL})")
    return ("FD below the protocol's sample counts: " + ", ".join(bad)) if bad else None


def stage1_key(p, scope):
    """Cache key of a stage-1 rater: everything that determines it (data, inner UNet, meta settings, scope).

    Two protocols with equal keys share one rater (``transfer`` reuses ``digits8``'s)."""
    spec = {"dataset_name": p["dataset_name"], "resolution": p["resolution"], "num_channels": p["num_channels"],
            "unet": p["stage1_unet"], "stage1": p["stage1"], "scope": scope,
            "num_candidate_noises": p["num_candidate_noises"]}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    return f"{p['dataset_name']}-{p['resolution']}px-{scope}-{digest}"


def unet_num_parameters(unet_config, resolution, num_channels):
    """Parameter count of ``UNet2DModel(**unet_config)`` at this resolution and channel count."""
    from diffusers import UNet2DModel

    model = UNet2DModel(sample_size=resolution, in_channels=num_channels, out_channels=num_channels, **unet_config)
    return sum(q.numel() for q in model.parameters())
