"""NoiseRater: learned valuation of diffusion training noise, for diffusers."""

__version__ = "0.1.0"

from .modeling_noise_rater import NoiseRaterModel, NoiseRaterOutput
from .pipelines import ClassConditionalDDPMPipeline
from .sampling import (
    AssignmentNoiseSampler,
    KNNNoiseSampler,
    NoiseSelectingSampler,
    UniformNoiseSampler,
    build_noise_sampler,
)
from .valuation import OracleNoiseSelector, one_step_influence, valuation_accuracy
from .weighting import candidate_soft_weights, compute_snr, min_snr_weights, soft_weights

__all__ = [
    "ClassConditionalDDPMPipeline",
    "NoiseRaterModel",
    "NoiseRaterOutput",
    "NoiseSelectingSampler",
    "UniformNoiseSampler",
    "KNNNoiseSampler",
    "AssignmentNoiseSampler",
    "build_noise_sampler",
    "OracleNoiseSelector",
    "one_step_influence",
    "valuation_accuracy",
    "soft_weights",
    "candidate_soft_weights",
    "min_snr_weights",
    "compute_snr",
]
