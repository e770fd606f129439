"""What a transformers checkpoint holds in our terms: `HFHead`, the task head's architecture,
weights and the config keys our RunConfig does not carry, and `HFImport`, a whole imported
checkpoint (our RunConfig, backbone weights in our names, the head, the source config.json).
`data2vec.pretrained.from_hf` turns an `HFImport` into a `Pretrained` (and `build_model` into a model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from data2vec.config import RunConfig


@dataclass
class HFHead:
    """What a transformers checkpoint holds beyond the backbone.

    `weights` use transformers' names without the backbone prefix (`classifier.weight`,
    `pooler.layernorm.weight`, `lm_head.weight`, `classifier.out_proj.bias`, ...); `config` holds the
    source config.json keys our RunConfig does not carry (labels, CTC vocabulary and blank id,
    SpecAugment settings, segmentation settings, ...), written back on export."""

    architecture: str
    kind: str
    """image_classification | ctc | sequence_classification (runnable by `head_logits`), pooler (a bare
    model's pooler only), none (no head weights), other (kept and written back, not run)."""
    num_labels: int | None = None
    id2label: dict[int, str] = field(default_factory=dict)
    weights: dict[str, Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (without the weights)."""
        return {
            "architecture": self.architecture,
            "kind": self.kind,
            "num_labels": self.num_labels,
            "id2label": {str(k): v for k, v in self.id2label.items()},
            "weights": sorted(self.weights),
            "config": self.config,
        }

    @classmethod
    def from_description(cls, data: dict[str, Any], weights: dict[str, Tensor]) -> HFHead:
        id2label = data.get("id2label") or {}
        return cls(
            architecture=str(data["architecture"]),
            kind=str(data["kind"]),
            num_labels=data.get("num_labels"),
            id2label={int(k): str(v) for k, v in id2label.items()},
            weights=weights,
            config=dict(data.get("config") or {}),
        )


@dataclass
class HFImport:
    """A transformers checkpoint in our terms."""

    config: RunConfig
    state_dict: dict[str, Tensor]
    """Backbone weights in our key names (`frontend.*`, `encoder.*`)."""
    head: HFHead
    hf_config: dict[str, Any]
    """The source config.json as read."""
    path: str
