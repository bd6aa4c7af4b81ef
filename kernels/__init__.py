"""Numeric building blocks shared by the runtime and the checks: numpy only, no torch."""

from diffscore.kernels.dsd import DEFAULT_DSD_PRESET, DSD_PRESETS, DsdPreset, dsd_pair_scores, dsd_preset
from diffscore.kernels.noise import add_noise, shared_noise
from diffscore.kernels.prediction import PREDICTION_TYPES, epsilon_from_output
from diffscore.kernels.reductions import LOSSES, denoising_error, pool_layer_scores
from diffscore.kernels.timesteps import dsd_timesteps, stage_timesteps, timestep_grid
from diffscore.kernels.pruning import StagedPruning
from diffscore.kernels.racing import (DEFAULT_STRATEGY, STRATEGIES, PairedRace, RaceConfig, new_run, race_plan,
                                     spread_order, timestep_profile)
from diffscore.kernels.ranking import class_ranking, confidence

__all__ = [
    "DEFAULT_DSD_PRESET",
    "DEFAULT_STRATEGY",
    "DSD_PRESETS",
    "DsdPreset",
    "LOSSES",
    "PREDICTION_TYPES",
    "STRATEGIES",
    "PairedRace",
    "RaceConfig",
    "StagedPruning",
    "class_ranking",
    "confidence",
    "new_run",
    "race_plan",
    "spread_order",
    "timestep_grid",
    "timestep_profile",
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
