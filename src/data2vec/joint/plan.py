"""The step plan of a joint run: which modalities each optimizer step trains, and with which
loss weights, as a pure function of (seed, step), so that a resumed or rewound run replays it."""

from __future__ import annotations

from collections.abc import Sequence

from data2vec.joint.config import JointConfig

_MASK64 = (1 << 64) - 1


def _uniform(seed: int, step: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, step) (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 11) / float(1 << 53)


def modality_for_step(seed: int, step: int, modalities: Sequence[str], probabilities: Sequence[float]) -> str:
    """The modality trained at optimizer step `step` (0-based): a pure function of its arguments."""
    u, acc = _uniform(seed, step), 0.0
    for m, p in zip(modalities, probabilities, strict=True):
        acc += p
        if u < acc:
            return m
    return modalities[-1]


def step_weights(cfg: JointConfig, step: int) -> dict[str, float]:
    """The modalities trained at optimizer step `step`, each with the weight of its loss: the one
    `modality_for_step` draws, weight 1 (`step="one"`); or every modality, weighted by its share of
    the ratios (`step="mixed"`; the weights sum to 1)."""
    if cfg.step == "mixed":
        return dict(zip(cfg.modalities, cfg.probabilities(), strict=True))
    return {modality_for_step(cfg.train.seed, step, cfg.modalities, cfg.probabilities()): 1.0}


def step_plan(cfg: JointConfig, start: int, stop: int) -> list[str]:
    """Modalities of steps start..stop-1, as metrics.jsonl names them ("image+audio+text" for a mixed step)."""
    return ["+".join(step_weights(cfg, s)) for s in range(start, stop)]


def steps_per_modality(cfg: JointConfig, stop: int) -> dict[str, int]:
    """How many of the optimizer steps 0..stop-1 train each modality."""
    counts = dict.fromkeys(cfg.modalities, 0)
    for s in range(stop):
        for m in step_weights(cfg, s):
            counts[m] += 1
    return counts
