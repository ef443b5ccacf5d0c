"""Training and evaluation: recipes, the trainer (single process or torchrun/DDP), metrics, CLI."""

from .config import TrainConfig, resolve_config
from .evaluate import EvalResult, evaluate
from .recipes import RECIPES, Recipe, get_recipe
from .trainer import TrainResult, train

__all__ = [
    "TrainConfig",
    "resolve_config",
    "EvalResult",
    "evaluate",
    "RECIPES",
    "Recipe",
    "get_recipe",
    "TrainResult",
    "train",
]
