"""`data2vec demo --modality joint`: one tiny model pretrained on the three demo corpora at once
(digits images, synthetic speech, Python's docstrings), then each modality's demo probe.

The corpora and probes are those of the single-modality demos (demo.py, demo_audio.py,
demo_text.py); only the model differs: one shared 4-block width-192 encoder with the three
front-ends and decoders, trained by `joint.train_joint` with one modality per step.
`probe_joint` scores any joint run directory the same way (benchmarks/joint.py uses it to
compare a joint run with single-modality runs of the same encoder).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from data2vec import demo, demo_audio, demo_text
from data2vec.config import EncoderConfig, TeacherConfig, TrainConfig, apply_overrides
from data2vec.joint import JointConfig, JointData2Vec, initial_joint_model, joint_config
from data2vec.probe import pooled_features, probe_accuracies
from data2vec.tokenizer import TextTokenizer
from data2vec.training import train_joint

DEMO_STEPS_PER_MODALITY = 300
ENCODER = EncoderConfig(dim=192, depth=4, num_heads=4, norm_eps=1e-5, input_norm=True)
"""Shared by the three modalities: post-LN, an input LayerNorm (images and speech need it), no dropout."""


@dataclass
class Corpora:
    audio: Path
    """The synthetic speech corpus (demo_audio.synthesize)."""
    text: Path
    """The docstring JSONL corpus (demo_text.write_corpus), probe modules held out."""
    text_probe: demo_text.ProbeSet


def corpora(out: Path, quiet: bool = False) -> Corpora:
    speech = demo_audio.synthesize(demo_audio.SynthSpec(), quiet=quiet)
    docs = demo_text.collect_docstrings()
    probe = demo_text.probe_set(docs)
    held_out = {probe.modules[i] for i in probe.test}
    text = out / "corpus" / "stdlib_docs.jsonl"
    if not text.is_file():
        demo_text.write_corpus(text, docs, demo_text.topic_paragraphs(), held_out)
    return Corpora(speech, text, probe)


def demo_config(
    data: Corpora,
    modalities: tuple[str, ...] = ("image", "audio", "text"),
    steps: int | None = None,
    overrides: list[str] | None = None,
    version: int = 2,
) -> JointConfig:
    """The three demo configs around one shared encoder; `steps` in total (default 300 per modality)."""
    n = len(modalities)
    total = steps or DEMO_STEPS_PER_MODALITY * n
    per = max(1, total // n)
    members = {
        "image": demo.demo_config(version, per, ["data.num_workers=0"]),
        "audio": demo_audio.demo_config(data.audio, version, per),
        "text": replace(
            demo_text.demo_config(version, per),
            data=replace(demo_text.demo_config(version, per).data, path=str(data.text)),
        ),
    }
    cfg = joint_config(
        {m: members[m] for m in modalities},
        encoder=ENCODER,
        # The speech demo's quicker teacher: short runs need it to start tracking the student early.
        teacher=TeacherConfig(decay=0.99, end_decay=0.999),
        optim=replace(members["audio"].optim, lr=1e-3, warmup_steps=min(100, total // 10), clip_grad=1.0),
        train=TrainConfig(steps=total, ckpt_every=max(1, total // 2), log_every=1, collapse_after=total),
        preset=f"joint-demo@v{version}",
    )
    return apply_overrides(cfg, overrides or [])


def probe_joint(model: JointData2Vec, random_model: JointData2Vec, run_dir: Path, data: Corpora) -> dict[str, Any]:
    """Each modality's demo probe on the pretrained and the random-init model: {modality: {...}}."""
    cfg = model.cfg
    out: dict[str, Any] = {}
    for m in cfg.modalities:
        view, rand = model.member(m).cpu().float().eval(), random_model.member(m).eval()
        member = cfg.member(m)
        if m == "image":
            x, labels, tr, te = demo._digits_tensors(member)
            k = member.targets.top_k
            feats = {
                "pretrained": pooled_features(view, x, layers=k),
                "random_init": pooled_features(rand, x, layers=k),
            }
            feats["raw pixels"] = x.flatten(1).numpy()
            acc = probe_accuracies(feats, labels, tr, te)
        elif m == "audio":
            wav, labels, is_train = demo_audio.probe_set(data.audio, seed=member.train.seed)
            tr, te = np.flatnonzero(is_train), np.flatnonzero(~is_train)
            k = min(demo_audio.DEMO_LAYERS, member.model.encoder.depth)
            feats = {
                "pretrained": demo_audio.layer_features(view, wav)[:, -k:].mean(1),
                "random_init": demo_audio.layer_features(rand, wav)[:, -k:].mean(1),
                "log-mel": demo_audio.log_mel(wav).mean(1),
            }
            acc = probe_accuracies(feats, labels, tr, te)
        else:
            p = data.text_probe
            tok = TextTokenizer.load(run_dir / "tokenizer.json")
            k = member.targets.top_k
            feats = {
                "pretrained": demo_text.text_features(view, tok, p.texts, k),
                "random_init": demo_text.text_features(rand, tok, p.texts, k),
            }
            acc = {**probe_accuracies(feats, p.labels, p.train, p.test)}
            acc["TF-IDF words"] = demo_text.tfidf_probe(p.texts, p.labels, p.train, p.test)
        out[m] = {k2: round(v, 4) for k2, v in acc.items()}
    return out


_TASKS = {
    "image": "digits (train 1000 / test 797)",
    "audio": "35 spoken words in noise, held-out voices",
    "text": "stdlib docstring -> module family, held-out modules",
}


@dataclass
class JointDemoResult:
    out_dir: Path
    steps: int
    steps_per_modality: dict[str, int]
    probes: dict[str, dict[str, float]]
    seconds: float = 0.0

    def report(self, version: int) -> str:
        counts = ", ".join(f"{m} {n}" for m, n in self.steps_per_modality.items())
        lines = [
            f"joint: one data2vec {version}.0 encoder for {', '.join(self.probes)}; {self.steps} pretraining steps "
            f"({counts}) in {self.seconds / 60:.1f} min. Linear probes:"
        ]
        for m, acc in self.probes.items():
            lines.append(f"  {m} ({_TASKS[m]}):")
            lines.extend(f"    {name:<14}: {value:.3f}" for name, value in acc.items())
        lines.append(f"  outputs in {self.out_dir}")
        return "\n".join(lines)


def run_demo(
    out_dir: str | Path = "data2vec-demo",
    version: int = 2,
    steps: int | None = None,
    overrides: list[str] | None = None,
    progress: bool = True,
    quiet: bool = False,
) -> JointDemoResult:
    """Pretrain the joint demo model (`steps` in total) and probe every modality."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = corpora(out, quiet=quiet)
    cfg = demo_config(data, steps=steps, overrides=overrides, version=version)
    result = train_joint(cfg, out, progress=progress, quiet=quiet)
    run_cfg = JointConfig.load(out / "config.json")
    probes = probe_joint(result.model, initial_joint_model(run_cfg), out, data)
    report = {"probes": probes, "steps": result.step, "steps_per_modality": result.steps_per_modality}
    seconds = time.perf_counter() - t0
    (out / "probe.json").write_text(json.dumps({**report, "seconds": round(seconds, 1)}, indent=2) + "\n")
    return JointDemoResult(out, result.step, result.steps_per_modality, probes, seconds)
