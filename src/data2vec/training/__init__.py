"""Pretraining: one engine for every run (docs/design.md#the-training-engine).

run.py         train(), train_joint(), resume(): set a run up and hand it to the engine
engine.py      Engine: the loop, one optimizer step at a time
objectives.py  SingleObjective, JointObjective: forward and backward of a step
hooks.py       metrics log, progress bar, local-std warning, collapse guard, stop signals,
               checkpointer, online probe, summary; built in order by build_hooks()
tensorboard.py TensorBoardLog (train.loggers=[tensorboard]): the metrics rows and the masked-inputs
               picture as TensorBoard event files
state.py       RunState (counters saved with every checkpoint), Learner (snapshot/restore)
init.py        --init: continue from a pretrained model
lock.py        one writer per run directory
optim.py, devices.py, log.py, plots.py
"""

from data2vec.training.devices import autocast, resolve_device
from data2vec.training.hooks import LOCAL_STD_WARN, local_std_warning, low_local_std
from data2vec.training.init import INIT_TRAINING_KEYS, check_init_config, init_from
from data2vec.training.optim import build_optimizer
from data2vec.training.plots import plot_loss_curve
from data2vec.training.run import JointTrainResult, TrainResult, resume, train, train_joint
from data2vec.training.state import EXIT_INTERRUPTED, RunState, TrainingInterrupted, TrainingStopped

__all__ = [
    "EXIT_INTERRUPTED",
    "INIT_TRAINING_KEYS",
    "LOCAL_STD_WARN",
    "JointTrainResult",
    "RunState",
    "TrainResult",
    "TrainingInterrupted",
    "TrainingStopped",
    "autocast",
    "build_optimizer",
    "check_init_config",
    "init_from",
    "local_std_warning",
    "low_local_std",
    "plot_loss_curve",
    "resolve_device",
    "resume",
    "train",
    "train_joint",
]
