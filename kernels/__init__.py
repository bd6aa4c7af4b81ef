"""Numeric building blocks shared by the runtime and the checks: numpy only, no torch."""

from diffscore.kernels.dsd import DEFAULT_DSD_PRESET, DSD_PRESETS, DsdPreset, dsd_pair_scores, dsd_preset
from diffscore.kernels.noise import add_noise, shared_noise
from diffscore.kernels.prediction import PREDICTION_TYPES, epsilon_from_output
from diffscore.kernels.reductions import LOSSES, denoising_error, pool_layer_scores
from diffscore.kernels.timesteps import dsd_timesteps, stage_timesteps
from diffscore.kernels.pruning import StagedPruning
from diffscore.kernels.ranking import class_ranking

__all__ = [
    "DEFAULT_DSD_PRESET",
    "DSD_PRESETS",
    "DsdPreset",
    "LOSSES",
    "PREDICTION_TYPES",
    "StagedPruning",
    "class_ranking",
    "add_noise",
    "denoising_error",
    "epsilon_from_output",
    "dsd_pair_scores",
    "dsd_preset",
    "dsd_timesteps",
    "pool_layer_scores",
    "shared_noise",
    "stage_timesteps",
]
