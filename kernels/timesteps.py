"""Which timesteps each method evaluates (DESIGN.md §3): the one definition both paths use."""

from __future__ import annotations


def stage_timesteps(stages: list[tuple[int, int]], num_train_timesteps: int = 1000) -> list[list[int]]:
    """The new timesteps each Diffusion Classifier stage evaluates.

    With m = max n_samples, the grid is ``range(T//m//2, T, T//m)[:m]``; stage i takes n_i evenly
    spaced grid points and drops those an earlier stage already evaluated. Concatenated, the result is
    the global evaluation order that indexes the shared noise.
    """
    check_stages(stages)
    grid = timestep_grid(max(n for n, _ in stages), num_train_timesteps)
    done: set[int] = set()
    per_stage = []
    for n, _ in stages:
        step = len(grid) // n
        new = [t for t in grid[step // 2 :: step][:n] if t not in done]
        done.update(new)
        per_stage.append(new)
    return per_stage


def timestep_grid(m: int, num_train_timesteps: int = 1000) -> list[int]:
    """The Diffusion Classifier's m-point grid ``range(T//m//2, T, T//m)[:m]`` (fixed stages and the race)."""
    T = num_train_timesteps
    if m < 1 or m > T:
        raise ValueError(f"asked for {m} timesteps but the model has {T}; choose 1 to {T}")
    return list(range(T // m // 2, T, T // m))[:m]


def check_stages(stages: list[tuple[int, int]]) -> None:
    """Stages are (n_samples, keep) pairs with n_samples > 0 and keep non-increasing, ending at 1."""
    if not stages:
        raise ValueError("stages is empty; give at least one (n_samples, keep) pair, e.g. [(50, 5), (500, 1)]")
    for n, keep in stages:
        if n < 1 or keep < 1:
            raise ValueError(f"stage ({n}, {keep}): n_samples and keep must be ≥ 1")
    keeps = [k for _, k in stages]
    if any(b > a for a, b in zip(keeps, keeps[1:])):
        raise ValueError(f"stage keep counts {keeps} must not increase")


def dsd_timesteps(n_steps: int, num_train_timesteps: int = 1000, reverse: bool = False) -> list[int]:
    """DSD's evenly spaced timesteps: ``idx in range(10, 990, T//S)``, t = idx; with `reverse`,
    t = T − 1 − idx (Discffusion's indexing of the descending scheduler timesteps), ascending."""
    if n_steps < 1:
        raise ValueError(f"n_steps must be ≥ 1, got {n_steps}")
    T = num_train_timesteps
    idx = list(range(10 * T // 1000, 990 * T // 1000, max(1, T // n_steps)))[:n_steps]
    if len(idx) < n_steps:  # never fewer than asked, silently
        raise ValueError(f"asked for {n_steps} timesteps but DSD's range of this model ({10 * T // 1000} to "
                         f"{990 * T // 1000 - 1}) holds {len(idx)}; choose 1 to {len(idx)}")
    return sorted(T - 1 - i for i in idx) if reverse else idx
