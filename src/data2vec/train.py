"""`data2vec.train`: the pretraining entry points under their original import path. The code
lives in the `data2vec.training` package; this module only re-exports it."""

from data2vec.training import (
    INIT_TRAINING_KEYS,
    TrainingStopped,
    TrainResult,
    autocast,
    build_optimizer,
    check_init_config,
    init_from,
    resolve_device,
    resume,
    train,
    train_joint,
)

__all__ = [
    "INIT_TRAINING_KEYS",
    "TrainResult",
    "TrainingStopped",
    "autocast",
    "build_optimizer",
    "check_init_config",
    "init_from",
    "resolve_device",
    "resume",
    "train",
    "train_joint",
]
