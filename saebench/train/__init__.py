"""The reference trainer (Gao et al. 2024's TopK recipe and the ReLU + L1 baseline) and its presets."""

from .config import TrainConfig
from .geometric_median import geometric_median
from .trainer import StepStats, Trainer

__all__ = ["StepStats", "TrainConfig", "Trainer", "geometric_median"]
