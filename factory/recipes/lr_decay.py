"""The learning-rate schedule of pretraining (`pretrain.lr_decay_steps`, `pretrain.lr_restarts`):
constant, then a linear decay to zero over the run's last steps (the denoiser's, for diffusion; both
networks', for a GAN); with restarts, one such cycle per stretch of the run, the rate back at its
base value at each restart.

Until a decay starts, a run is step for step the constant-rate run, so a finished run is extended
by raising `pretrain.steps` and setting the decay: it resumes from its last checkpoint and only the
new steps decay. A run that finished its decay is extended by a new cycle: `lr_restarts` names the
step it finished at. A checkpoint records the windows it was trained under (`window`); resuming
onto a schedule that would have trained its steps differently is refused (`check_resume`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from factory.recipes.ray_train import TrainError

Windows = tuple[tuple[int, int], ...]


def window(total_steps: int, decay_steps: int, restarts: Sequence[int] = ()) -> Windows | None:
    """The decay windows (start, end): one per cycle, the cycles ending at each restart and at
    `total_steps`; a cycle's steps start .. end-1 train at (end - step) / (end - start) of the rate
    (`factor`), its window its last `decay_steps` (all of it when shorter). None for a constant rate."""
    if not decay_steps:
        return None
    starts, ends = [0, *restarts], [*restarts, total_steps]
    return tuple((max(begin, end - decay_steps), end) for begin, end in zip(starts, ends))


def factor(step: int, decay: Windows | None) -> float:
    """The share of the base learning rate at `step`: 1 outside every window, inside one (end - step)
    / length (1 at its first step, 1/length at its last)."""
    for start, end in decay or ():
        if start <= step < end:
            return (end - step) / (end - start)
    return 1.0


def apply(optimizers: list[tuple[torch.optim.Optimizer, float]], step: int, decay: Windows | None) -> None:
    """Set each (optimizer, base learning rate) to its rate at `step` (untouched without a decay, so a
    constant-rate run trains exactly as before the schedule existed)."""
    if decay is None:
        return
    scale = factor(step, decay)
    for optimizer, base in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = base * scale


def _windows(saved) -> Windows:
    """A checkpoint's recorded schedule as windows (checkpoints before restarts existed saved one
    (start, end) pair, or None)."""
    if not saved:
        return ()
    if isinstance(saved[0], int):
        return (tuple(saved),)
    return tuple(tuple(w) for w in saved)


def check_resume(saved, decay: Windows | None, step: int) -> None:
    """Refuse to continue a checkpoint at `step` trained under the windows `saved` (None: constant)
    with the windows `decay`, unless both gave every one of its steps the same rate: the same
    windows among those that start before `step`."""
    old, new = _windows(saved), _windows(decay)
    past_old, past_new = [w for w in old if w[0] < step], [w for w in new if w[0] < step]
    if past_old == past_new:
        return
    first = min(w[0] for w in set(past_old) ^ set(past_new))

    def say(windows: Windows) -> str:
        if not windows:
            return "a constant rate"
        spans = ", ".join(f"{a}-{b}" for a, b in windows)
        return f"a decay over steps {spans}" if len(windows) == 1 else f"decays over steps {spans}"

    hint = (f"; a run that finished its decay at step {step} continues with a new cycle: pretrain.lr_restarts=[{step}]"
            if old and old[-1][1] == step else "")
    raise TrainError(
        f"the checkpoint at step {step} was trained with {say(old)}, this config asks for "
        f"{say(new)} (pretrain.steps, pretrain.lr_decay_steps, pretrain.lr_restarts): its steps from {first} on "
        f"would differ; choose a new pretrain.run_name or the schedule it was trained with{hint}"
    )
