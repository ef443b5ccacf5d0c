"""Training and evaluation: recipes, the trainer (single process or torchrun/DDP), metrics."""

from .config import TrainConfig, resolve_config
from .evaluate import EvalResult, evaluate
from .recipes import RECIPES, Recipe, get_recipe
from .trainer import Trainer, TrainResult, train

__all__ = [
    "TrainConfig",
    "resolve_config",
    "EvalResult",
    "evaluate",
    "RECIPES",
    "Recipe",
    "get_recipe",
    "Trainer",
    "TrainResult",
    "train",
]
