"""Joint multimodal pretraining: one Transformer for images, speech and text.

`JointData2Vec` (joint/model.py) holds one front-end and one decoder (or 1.0 head) per
modality around ONE shared encoder, and ONE EMA teacher that tracks the shared encoder plus,
per modality, whatever that modality's `teacher.ema_scope` names (the image front-end, the
speech positional stage, nothing for text). Each modality's objective is exactly the
single-modality `Data2Vec` objective: `member(m)` is a `Data2Vec` made of the shared parts
(`Data2Vec.from_parts`), and `forward(batch, m)` calls it.

A step trains what the step plan (joint/plan.py) says, by `JointConfig.step`: "one" trains one
modality per optimizer step, drawn with the configured ratios by a pure function of (seed,
step), as fairseq does; "mixed" takes one batch of EVERY modality and backpropagates the
ratio-weighted mean of their losses, then one optimizer step and one EMA update. Either way a
resumed or rewound run replays the same plan. The training itself is the one engine every run
uses (`data2vec.training.train_joint`).

A checkpoint holds every front-end, decoder and the shared encoder (keys `encoder.*`,
`frontends.<m>.*`, `heads.<m>.*`); `member_weights` turns it into an ordinary
single-modality model's weights for `extract`, `finetune`, probes and `pretrain --init`.
"""

from data2vec.joint.config import (
    JOINT_FSDP_REFUSAL,
    STEP_KINDS,
    JointConfig,
    Ratios,
    StepKind,
    check_joint_data,
    is_joint,
    joint_config,
    prepare_joint,
)
from data2vec.joint.model import JointData2Vec, initial_joint_model, member_weights
from data2vec.joint.plan import modality_for_step, step_plan, step_weights, steps_per_modality
from data2vec.joint.presets import JOINT_PRESETS, joint_base, joint_preset, joint_tiny, with_data

__all__ = [
    "JOINT_FSDP_REFUSAL",
    "JOINT_PRESETS",
    "STEP_KINDS",
    "JointConfig",
    "JointData2Vec",
    "Ratios",
    "StepKind",
    "check_joint_data",
    "initial_joint_model",
    "is_joint",
    "joint_base",
    "joint_config",
    "joint_preset",
    "joint_tiny",
    "member_weights",
    "modality_for_step",
    "prepare_joint",
    "step_plan",
    "step_weights",
    "steps_per_modality",
    "with_data",
]
