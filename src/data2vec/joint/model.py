"""The joint model: per-modality front-ends and decoders around ONE shared encoder, with ONE
EMA teacher (data2vec 2.0's multimodal layout; see docs/joint.md)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from data2vec.config import ConfigError
from data2vec.joint.config import JointConfig
from data2vec.modalities import build_frontend
from data2vec.model import Batch, Data2Vec, StepOutput, build_head
from data2vec.nn.transformer import Encoder, compile_blocks
from data2vec.teacher import EMATeacher


class JointData2Vec(nn.Module):
    """Per-modality front-ends and decoders around one encoder, with one EMA teacher."""

    def __init__(self, cfg: JointConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.frontends = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        views: dict[str, Data2Vec] = {}
        placeholder = EMATeacher.wrap({})
        for i, m in enumerate(cfg.modalities):
            member = cfg.member(m)
            # Built and initialised in Data2Vec's order, so that a one-modality joint model starts
            # from exactly the weights `Data2Vec.from_config(member)` does (same seed).
            frontend = build_frontend(member.model)
            self.frontends[m] = frontend
            if i == 0:
                self.encoder = Encoder(cfg.encoder)
            self.heads[m] = build_head(member.model, frontend)
            views[m] = Data2Vec.from_parts(member, frontend, self.encoder, self.heads[m], placeholder)
            views[m]._init_weights(encoder=i == 0)
        self._views = views  # plain dict: views are not submodules (no duplicate state_dict keys)
        self.teacher = EMATeacher(self.student_parts())
        for m, view in views.items():
            own = {"encoder": self.teacher["encoder"]}
            if m in self.teacher:
                own.update(dict(self.teacher[m].named_children()))
            view.teacher = EMATeacher.wrap(own)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self._views)

    def member(self, modality: str) -> Data2Vec:
        """One modality as a `Data2Vec` (shared encoder, that modality's front-end, decoder and
        teacher parts): probes, `encode` and feature extraction work on it unchanged."""
        if modality not in self._views:
            raise ConfigError(f"modality: {modality!r} is not in this joint model (it has {', '.join(self._views)})")
        return self._views[modality]

    def train(self, mode: bool = True) -> JointData2Vec:
        super().train(mode)
        for view in self._views.values():
            view.training = mode  # the shared children already follow
        return self

    def student_parts(self) -> dict[str, nn.Module]:
        """The shared encoder, plus per modality a ModuleDict of the front-end stages its
        `teacher.ema_scope` puts in the teacher."""
        parts: dict[str, nn.Module] = {"encoder": self.encoder}
        for m, view in self._views.items():
            own = {k: v for k, v in view.student_parts().items() if k != "encoder"}
            if own:
                parts[m] = nn.ModuleDict(own)
        return parts

    def student_state_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def teacher_state_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith("teacher.")}

    def compile_blocks(self) -> None:
        """`train.compile`: torch.compile the shared encoder's blocks, in the student and the teacher."""
        compile_blocks(self.encoder, self.teacher["encoder"])

    @torch.no_grad()
    def update_teacher(self, decay: float) -> None:
        """One EMA step over the whole teacher (every modality's parts), after each optimizer step."""
        self.teacher.update(self.student_parts(), decay)

    def forward(self, batch: Batch, modality: str, generator: torch.Generator | None = None) -> StepOutput:
        """That modality's data2vec objective on `batch`."""
        out: StepOutput = self.member(modality)(batch, generator)
        return out


def member_weights(student: dict[str, Tensor], modality: str) -> dict[str, Tensor]:
    """A joint checkpoint's student weights -> one modality's `Data2Vec` key names."""
    out: dict[str, Tensor] = {}
    for k, v in student.items():
        if k.startswith("encoder."):
            out[k] = v
        elif k.startswith(f"frontends.{modality}."):
            out["frontend." + k[len(f"frontends.{modality}.") :]] = v
        elif k.startswith(f"heads.{modality}."):
            out["head." + k[len(f"heads.{modality}.") :]] = v
    return out


def initial_joint_model(cfg: JointConfig) -> JointData2Vec:
    """The exact weights a joint run with `cfg` starts from (the random-init baseline)."""
    torch.manual_seed(cfg.train.seed)
    return JointData2Vec(cfg)
