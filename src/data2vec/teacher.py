"""The EMA teacher (data2vec 1.0 section 3.3): an exponential moving average of the student.

It holds deep copies of the student parts it tracks, never gets gradients, always stays
in eval mode (no dropout, drop-path or layerdrop), and is updated explicitly, in fp32,
after each optimizer step. Parts it does not hold are shared: the model runs the
student's modules for them under `no_grad`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMATeacher(nn.Module):
    def __init__(self, parts: dict[str, nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict({k: copy.deepcopy(m) for k, m in parts.items()})
        self.parts.requires_grad_(False)
        self.parts.float()
        super().train(False)

    @classmethod
    def wrap(cls, parts: dict[str, nn.Module]) -> EMATeacher:
        """A teacher made of existing teacher modules, not copies: a view on (part of) another
        teacher, e.g. one modality's parts of a joint model's teacher."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.parts = nn.ModuleDict(parts)
        nn.Module.train(self, False)
        return self

    def train(self, mode: bool = True) -> EMATeacher:
        # The teacher never trains: keep dropout and friends off whatever the parent does.
        return super().train(False)

    def __contains__(self, name: str) -> bool:
        return name in self.parts

    def __getitem__(self, name: str) -> nn.Module:
        return self.parts[name]

    def part(self, name: str) -> nn.Module | None:
        """The teacher's copy of a student part, or None if that part is shared."""
        return self.parts[name] if name in self.parts else None  # noqa: SIM401 (ModuleDict has no .get)

    @torch.no_grad()
    def update(self, student: dict[str, nn.Module], decay: float) -> None:
        """teacher <- decay * teacher + (1 - decay) * student, for every floating parameter.

        Floating buffers are copied from the student; integer buffers (index tables) are
        left alone: averaging them in floating point corrupts them (docs/design.md, 'Departures
        from the official code'). At decay 1.0 the teacher is frozen and nothing happens.
        """
        if set(student) != set(self.parts):
            raise ValueError(f"student parts {sorted(student)} != teacher parts {sorted(self.parts)}")
        if decay >= 1.0:
            return
        t_params: list[torch.Tensor] = []
        s_params: list[torch.Tensor] = []
        for name, part in self.parts.items():
            s_named = dict(student[name].named_parameters())
            for pname, tp in part.named_parameters():
                sp = s_named[pname]
                t_params.append(tp)
                s_params.append(sp.detach().to(tp.dtype))
            s_bufs = dict(student[name].named_buffers())
            for bname, tb in part.named_buffers():
                if tb.is_floating_point():
                    tb.copy_(s_bufs[bname])
        if t_params:
            torch._foreach_lerp_(t_params, s_params, 1.0 - decay)
