"""Training: options (`config`), data (`data`), the loop (`loop`), the run's files (`run`).

    from cnnlab.training import fit
    history = fit(model, "mnist-5k", epochs=5, out="runs/mine")
"""
from __future__ import annotations

from .config import (OPTIMIZERS, SCHEDULES, TrainConfig, TrainingError, TrainingInterrupted,
                     scheduled_lr)
from .loop import Trainer
from .run import CHECKPOINT, History, default_run_dir, fit, resume_run

__all__ = ["CHECKPOINT", "History", "OPTIMIZERS", "SCHEDULES", "TrainConfig", "Trainer", "TrainingError",
           "TrainingInterrupted", "default_run_dir", "fit", "resume_run", "scheduled_lr"]
