"""Getting weights in and out: our pretrained-model folder, transformers and fairseq checkpoints.

Our pretrained-model folder (`save_pretrained`; `data2vec convert`):

    config.json          the fully resolved RunConfig (what `RunConfig.load` reads)
    model.safetensors    the student's weights in this library's names (front-end, encoder, head)
    hf_head.safetensors  optional: a task head that came with a transformers checkpoint
    hf_head.json         optional: its description (kind, architecture, labels, config keys)

It is self-describing (the config says which model to build) and loads without unpickling.
The teacher is not stored: a loaded model's teacher starts as a copy of the student, as a
freshly built model's does.

Reading goes through `data2vec.pretrained` (`load_pretrained`, `load_model`), which reads such a
folder, a training checkpoint or run directory (joint ones too, one modality at a time), a
transformers folder or hub id (`data2vec.interop.hf`) and a fairseq checkpoint
(`data2vec.interop.fairseq`). `data2vec.interop.conversion.convert` reads any of them and writes
our folder or a transformers one.

The shared pieces live in `data2vec.interop.common` and are re-exported here.
"""

from __future__ import annotations

from data2vec.interop.common import CONFIG as CONFIG
from data2vec.interop.common import HEAD_JSON as HEAD_JSON
from data2vec.interop.common import HEAD_WEIGHTS as HEAD_WEIGHTS
from data2vec.interop.common import WEIGHTS as WEIGHTS
from data2vec.interop.common import InteropError as InteropError
from data2vec.interop.common import model_run_config as model_run_config
from data2vec.interop.common import save_pretrained as save_pretrained
from data2vec.interop.common import tensors_for_saving as tensors_for_saving
from data2vec.interop.common import write_folder as write_folder
