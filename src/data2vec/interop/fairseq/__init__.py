"""Import fairseq data2vec checkpoints into this library's model.

Supported checkpoint kinds (what `torch.save` wrote from the official code):

- fairseq `data2vec_audio` (data2vec 1.0 speech), also as the backbone of a fine-tuned
  `wav2vec_ctc` checkpoint (keys under `w2v_encoder.w2v_model.`);
- fairseq `data2vec_text` (data2vec 1.0 text, RoBERTa layout);
- fairseq `data2vec_multi` (data2vec 2.0) for images, speech or text;
- `data2vec_vision` (data2vec 1.0 images, the BEiT code base: `{"model": ..., "args": ...}`).

`load_fairseq(path)` returns a `RunConfig` (architecture read from the checkpoint's
`cfg`/`args` where present, else from tensor shapes; objective and optimiser numbers from
the checkpoint where it has them, else from the nearest official preset) and a state dict
in this library's key names. The teacher entries are copies of the student's (the teacher
starts as the student); the pretraining head/decoder is included when the checkpoint has
one (`final_proj`, `regression_head`, `lm_head`, a 2.0 decoder), else it is left out and
stays freshly initialised. Any checkpoint tensor that is neither mapped nor known to be
irrelevant (EMA copies, index buffers, fine-tuning heads) stops the import: a silently
ignored weight would give silently different features.

Loading never runs pickled code. The file is read with
`torch.load(weights_only=True)` and an explicit allow-list of the plain types fairseq
checkpoints hold (`argparse.Namespace`, numpy scalars and arrays). If the pickle names
another global, it is refused with that name, except for configuration classes that are
not importable here (omegaconf's `DictConfig`/`ListConfig` and their nodes, fairseq's and
the data2vec examples' config enums and dataclasses): those are read by a restricted
unpickler that turns each of them into an inert record (never calling the real class) and
then into plain dicts, lists and values.

Modules: `safety` (the safe load), `detect` (checkpoint kinds), `load` (the entry point),
`v1` (1.0 speech and text), `vision` (1.0 images), `multi` (2.0), `parts` (layer mappings and
objective fields they share), `common` (the error, config reading, the tensor source).
"""

from __future__ import annotations

from data2vec.interop.fairseq.common import FairseqImportError
from data2vec.interop.fairseq.detect import is_fairseq_checkpoint
from data2vec.interop.fairseq.load import load_fairseq
from data2vec.interop.fairseq.parts import parse_layer_spec as parse_layer_spec
from data2vec.interop.fairseq.safety import SAFE_GLOBALS as SAFE_GLOBALS

__all__ = ["FairseqImportError", "is_fairseq_checkpoint", "load_fairseq"]
