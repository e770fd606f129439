"""`convert`: read a model from any source `data2vec.pretrained` reads and write it as our
pretrained-model folder or as a transformers folder (what `data2vec convert` runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from data2vec.interop.common import save_pretrained
from data2vec.interop.hf import save_hf
from data2vec.pretrained import Pretrained, build_model, load_pretrained


def convert(
    src: str | Path, dst: str | Path, to: Literal["data2vec", "hf"] = "data2vec", modality: str | None = None
) -> tuple[Path, Pretrained]:
    """Read `src` and write it to `dst` in our format (`to="data2vec"`) or transformers' (`"hf"`);
    `modality` picks one member of a joint checkpoint. Returns (the folder written, what was read)."""
    pre = load_pretrained(src, modality)
    model = build_model(pre)
    if to == "hf":
        return save_hf(model, dst, pre.head), pre
    return save_pretrained(model, dst, pre.head, config=pre.config), pre
