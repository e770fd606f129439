"""Telling fairseq data2vec checkpoints apart without unpickling them.

`SIGNATURES` are the key patterns of the four checkpoint kinds, in the order `load` tries them
(data2vec_multi, data2vec_text, data2vec_audio, data2vec_vision/BEiT); `is_fairseq_checkpoint`
matches them against the strings of a torch checkpoint's pickle (zip or legacy format).
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from data2vec.checkpoint import torch_file_format

SIGNATURES: dict[str, Callable[[set[str]], bool]] = {
    "data2vec_multi": lambda s: any(k.startswith("modality_encoders.") for k in s),
    "data2vec_text": lambda s: any(k.startswith(("encoder.sentence_encoder.", "decoder.sentence_encoder.")) for k in s),
    "data2vec_audio": lambda s: (
        any(k.endswith("post_extract_proj.weight") for k in s) and any(".pos_conv." in k for k in s)
    ),
    "data2vec_vision": lambda s: "patch_embed.proj.weight" in s and any(k.startswith("blocks.0.attn.") for k in s),
}
"""Which checkpoint kind a set of (prefix-free) model keys is, tried in this order."""


def _strings(ops: Iterator[tuple[object, object, object]]) -> set[str]:
    return {arg for _, arg, _ in ops if isinstance(arg, str)}


def _pickle_strings(path: Path) -> set[str] | None:
    """The strings in a torch checkpoint's pickle (its dict keys among them), read without
    unpickling; None if the file is not a torch checkpoint (zip or legacy format)."""
    fmt = torch_file_format(path)
    if fmt == "zip":
        try:
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
                if not names:
                    return None
                data = zf.read(names[0])
            return _strings(pickletools.genops(io.BytesIO(data)))
        except Exception:
            return None
    if fmt is None:
        return None
    try:  # legacy: the pickled magic number, protocol version and system info, then the object
        with open(path, "rb") as f:
            for _ in range(3):
                for _ in pickletools.genops(f):
                    pass
            return _strings(pickletools.genops(f))
    except Exception:
        return None


def is_fairseq_checkpoint(path: Path) -> bool:
    """True if `path` is a torch checkpoint laid out like a fairseq / data2vec_vision data2vec
    model. Reads only the pickle's strings; nothing is unpickled."""
    path = Path(path)
    if not path.is_file():
        return False
    strings = _pickle_strings(path)
    if strings is None:
        return False
    keys = {s.removeprefix("w2v_encoder.w2v_model.").removeprefix("module.") for s in strings}
    return "model" in strings and any(sig(keys) for sig in SIGNATURES.values())
