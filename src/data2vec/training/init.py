"""Continued pretraining (`--init`): start the student from a pretrained model.

The front-end and encoder are loaded (from any source `data2vec.pretrained` reads: a run, a
checkpoint, a converted folder, a joint run's member, transformers, fairseq); the pretraining
head or decoder stays freshly initialised and the teacher starts as a copy of the loaded
student. The source is recorded in RUN_DIR/init.json, so a run resumed before its first
checkpoint starts from it again. A joint run loads every one of its modalities the source has
(a joint source: each member; a single-modality source: that modality and the shared encoder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data2vec.config import ConfigError, RunConfig, to_dict
from data2vec.joint import JointConfig, JointData2Vec
from data2vec.model import Data2Vec
from data2vec.pretrained import Pretrained, load_encoder_weights, load_pretrained
from data2vec.tokenizer import TextTokenizer
from data2vec.writes import write_text_atomic

INIT_RECORD = "init.json"

INIT_TRAINING_KEYS = (
    "model.encoder.dropout",
    "model.encoder.attn_dropout",
    "model.encoder.activation_dropout",
    "model.encoder.drop_path",
    "model.encoder.layerdrop",
    "model.text.embed_dropout",
    "model.audio.pos_conv_zero_padding",
    "model.head_layers",
    "model.decoder",
)
"""Model settings an override may change under `--init`: regularisation, and the head/decoder (fresh anyway)."""


def check_init_config(source: RunConfig, cfg: RunConfig) -> None:
    """Refuse a config whose architecture differs from the pretrained model's, naming the key."""

    def diff(a: Any, b: Any, key: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            return [k for name in a for k in diff(a[name], b.get(name), f"{key}.{name}")]
        return [] if a == b else [key]

    changed = [
        k
        for k in diff(to_dict(source.model), to_dict(cfg.model), "model")
        if not any(k == t or k.startswith(t + ".") for t in INIT_TRAINING_KEYS)
    ]
    if changed:
        raise ConfigError(
            f"{changed[0]}: --init takes the architecture from the checkpoint; this override would change it "
            f"(changed: {', '.join(changed)})"
        )


def init_from(
    model: Data2Vec, source: str | Path | Pretrained, modality: str | None = None
) -> tuple[Pretrained, list[str]]:
    """Load a pretrained model's front-end and encoder into the student; the pretraining head or
    decoder stays freshly initialised and the teacher becomes a copy of the loaded student.
    `modality` picks a joint source's member (default: the model's own modality).

    Returns (the pretrained model read, the student keys that were not loaded: the fresh ones)."""
    pre = source if isinstance(source, Pretrained) else load_pretrained(source, modality or model.cfg.modality)
    return pre, load_encoder_weights(model, pre)


def check_same_tokenizer(pre: Pretrained, cfg: RunConfig) -> None:
    """Refuse a text source whose tokenizer's vocabulary differs from the run's: its token
    embeddings would be read with the wrong ids."""
    theirs, ours = pre.config.data.text.tokenizer, cfg.data.text.tokenizer
    if not (theirs and ours and Path(theirs).exists()):
        return
    if TextTokenizer.load(theirs).tok.get_vocab(True) != TextTokenizer.load(ours).tok.get_vocab(True):
        raise ConfigError(
            f"text.data.text.tokenizer: --init source {pre.source} was trained with {theirs}, whose vocabulary "
            f"differs from this run's ({ours}); set text.data.text.tokenizer={theirs}"
        )


def init_joint(model: JointData2Vec, cfg: JointConfig, source: str | Path) -> list[tuple[Pretrained, list[str]]]:
    """`init_from` for each of the joint model's modalities that `source` holds (architecture
    checked per member); at least one must be there."""
    loaded, missing = [], []
    for m in model.modalities:
        try:
            pre = load_pretrained(source, m)
        except ConfigError as e:  # the source has no such member / is another modality's model
            missing.append(f"{m} ({e})")
            continue
        check_init_config(pre.config, cfg.member(m))
        if m == "text":
            check_same_tokenizer(pre, cfg.member(m))
        loaded.append(init_from(model.member(m), pre))
    if not loaded:
        raise ConfigError(f"init: {source} holds none of this run's modalities: {'; '.join(missing)}")
    return loaded


def apply_init(model: Data2Vec | JointData2Vec, cfg: RunConfig | JointConfig, init: Any, run_dir: Path) -> str:
    """`init_from` (or `init_joint`), recorded in RUN_DIR/init.json; returns the log line."""
    if isinstance(model, JointData2Vec):
        assert isinstance(cfg, JointConfig) and not isinstance(init, Pretrained)
        done = init_joint(model, cfg, init)
    else:
        done = [init_from(model, init)]
    record = {
        "init": done[0][0].path,
        "source": [pre.source for pre, _ in done] if len(done) > 1 else done[0][0].source,
        "modalities": [pre.config.model.modality for pre, _ in done],
        "fresh": sorted({k for _, fresh in done for k in fresh}),
    }
    write_text_atomic(run_dir / INIT_RECORD, json.dumps(record, indent=2) + "\n", "the --init record")
    fresh = ", ".join(record["fresh"]) or "nothing"
    joint = isinstance(model, JointData2Vec)
    sources = "; ".join(f"from {pre.source}" + (f" ({pre.config.model.modality})" if joint else "") for pre, _ in done)
    return (
        f"initialised {sources}: the student's front-end and encoder loaded, the teacher starts as "
        f"a copy of them; fresh: {fresh}"
    )


def recorded_init(run_dir: Path) -> str | None:
    """The --init source of a run resumed before its first checkpoint."""
    record = run_dir / INIT_RECORD
    if not record.is_file():
        return None
    value = json.loads(record.read_text()).get("init")
    return str(value) if value else None
