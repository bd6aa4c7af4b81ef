"""torch's threads for the commands that run torch (export, parity, calibrate, profile's reference, training).

torch starts one intra-op thread per core and its OpenMP threads spin while they wait; on a machine whose cores
are busy with other work they fight those jobs for every core, and a small model slows by an order of magnitude
(bench/threads.py: `train-prompts --demo` 3 steps, 1 thread against all, under load). So the default is the
cores idle right now: the core count minus the 1-minute load average, at least 1. On an idle machine that is
every core (torch's own default); `--threads N` says otherwise.
"""

from __future__ import annotations

import os

import typer

ThreadsOpt = typer.Option(None, "--threads", min=1, help="torch threads (default: the cores idle now: cores minus "
                          "the 1-minute load average, at least 1; docs/cli.md)")


def idle_cores() -> int:
    """Cores not busy with other work now: os.cpu_count() minus the 1-minute load average, at least 1."""
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:  # no load average on this platform: torch's own default
        return cores
    return max(1, min(cores, int(cores - busy + 0.5)))


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (`threads`, else idle_cores()); returns the count set."""
    import torch

    n = threads or idle_cores()
    torch.set_num_threads(n)
    return n
