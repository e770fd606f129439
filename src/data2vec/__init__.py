"""data2vec: self-supervised learning for images, speech and text (data2vec 1.0 and 2.0).

>>> from data2vec import preset, train
>>> cfg = preset("image-tiny", version=2)
"""

# Load the `data2vec.train` module (the old import path) before binding the name `train` to the
# function: importing the module later would otherwise rebind `data2vec.train` to the module.
import data2vec.train as _train_module  # noqa: F401
from data2vec.config import ConfigError, RunConfig, apply_overrides
from data2vec.model import Batch, Data2Vec, StepOutput
from data2vec.presets import PRESETS, preset
from data2vec.training import (
    JointTrainResult,
    TrainingInterrupted,
    TrainingStopped,
    TrainResult,
    resume,
    train,
    train_joint,
)

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "Batch",
    "ConfigError",
    "Data2Vec",
    "JointTrainResult",
    "RunConfig",
    "StepOutput",
    "TrainResult",
    "TrainingInterrupted",
    "TrainingStopped",
    "apply_overrides",
    "preset",
    "resume",
    "train",
    "train_joint",
]
