"""The learning-rate schedule of pretraining (`pretrain.lr_decay_steps`): constant, then a linear
decay to zero over the run's last steps (the denoiser's, for diffusion; both networks', for a GAN).

Until the decay starts, a run is step for step the constant-rate run, so a finished run is extended
by raising `pretrain.steps` and setting the decay: it resumes from its last checkpoint and only the
new steps decay. A checkpoint records the window it was trained under (`window`); resuming onto a
schedule that would have trained its steps differently is refused (`check_resume`)."""

from __future__ import annotations

import torch

from factory.recipes.ray_train import TrainError


def window(total_steps: int, decay_steps: int) -> tuple[int, int] | None:
    """(start, end) = (total_steps - decay_steps, total_steps): steps start .. end-1 train at
    (end - step) / decay_steps of the rate (`factor`); None for a constant rate."""
    return (total_steps - decay_steps, total_steps) if decay_steps else None


def factor(step: int, decay: tuple[int, int] | None) -> float:
    """The share of the base learning rate at `step`: 1 before the window, then (end - step) / length
    (1 at its first step, 1/length at the run's last)."""
    if decay is None or step < decay[0]:
        return 1.0
    return (decay[1] - step) / (decay[1] - decay[0])


def apply(optimizers: list[tuple[torch.optim.Optimizer, float]], step: int, decay: tuple[int, int] | None) -> None:
    """Set each (optimizer, base learning rate) to its rate at `step` (untouched without a decay, so a
    constant-rate run trains exactly as before the schedule existed)."""
    if decay is None:
        return
    scale = factor(step, decay)
    for optimizer, base in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = base * scale


def check_resume(saved: tuple[int, int] | None, decay: tuple[int, int] | None, step: int) -> None:
    """Refuse to continue a checkpoint at `step` trained under the window `saved` (None: constant)
    with the window `decay`, unless both gave every one of its steps the same rate."""
    if saved == decay:
        return
    first = min(w[0] for w in (saved, decay) if w is not None)
    if step > first:
        def say(w: tuple[int, int] | None) -> str:
            return "a constant rate" if w is None else f"a decay over steps {w[0]}-{w[1]}"

        raise TrainError(
            f"the checkpoint at step {step} was trained with {say(saved)}, this config asks for "
            f"{say(decay)} (pretrain.steps, pretrain.lr_decay_steps): its steps from {first} on would differ; "
            "choose a new pretrain.run_name or the schedule it was trained with"
        )
