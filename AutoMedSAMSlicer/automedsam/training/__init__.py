"""Training prompt networks from labelled volumes (see :mod:`automedsam.training.loop`)."""

from .data import AugmentConfig, Case, load_case, parse_class_mapping
from .loop import TrainConfig, TrainEvent, embedding_cache_dir, train

__all__ = ["AugmentConfig", "Case", "TrainConfig", "TrainEvent", "embedding_cache_dir", "load_case",
           "parse_class_mapping", "train"]
