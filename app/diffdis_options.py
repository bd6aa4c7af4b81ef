"""`train-diffdis --unified`'s options, checked in one place (a usage mistake is one line, exit 2)."""

from __future__ import annotations

import math

from diffscore.errors import UsageMistake


def unified_options(unified: bool, generation_weight: float | None, text_weight: float | None,
                    unet_lr: float | None) -> dict:
    """The DiffDisTrainOptions fields the unified flags set (none without --unified)."""
    given = {"generation_weight": generation_weight, "text_weight": text_weight, "unet_lr": unet_lr}
    given = {k: v for k, v in given.items() if v is not None}
    if given and not unified:
        raise UsageMistake(f"{', '.join('--' + k.replace('_', '-') for k in given)} go with --unified "
                           "(they weigh and tune the UNet's training)")
    for k, v in given.items():
        if not math.isfinite(v) or v < 0 or (k == "unet_lr" and v == 0):
            bound = "> 0" if k == "unet_lr" else ">= 0"
            raise UsageMistake(f"--{k.replace('_', '-')} must be a finite number {bound}, got {v}")
    if given.get("generation_weight", 1.0) == 0 and given.get("text_weight", 1.0) == 0:
        raise UsageMistake("--generation-weight and --text-weight are both 0: nothing to train; give one a weight > 0")
    return given
