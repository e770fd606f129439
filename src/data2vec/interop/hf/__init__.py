"""Hugging Face transformers checkpoints of data2vec 1.0: Data2VecVision, Data2VecAudio, Data2VecText.

- `load_hf(path_or_hub_id)` reads a transformers folder (config.json + model.safetensors, sharded
  safetensors, or a `pytorch_model.bin` loaded with `weights_only=True`) into our RunConfig and
  our key names, with task-head weights kept apart (`HFHead`); `hf_import(config_dict,
  state_dict, source)` does the same for a checkpoint already in memory.
- `save_hf(model, out_dir)` writes a data2vec 1.0 model so that
  `transformers.Data2Vec{Vision,Audio,Text}Model.from_pretrained(out_dir)` loads it with no missing
  or unexpected weights and computes the same hidden states.
- `forward_like_hf(model, inputs)` runs our model and returns what transformers returns
  (`hidden_states` with the embedding output first, `last_hidden_state`, pooler output, head logits).

transformers itself is never imported: config.json is plain JSON and the weights are safetensors.
Only a hub id needs `huggingface_hub` (installed with transformers). The architecture notes
behind every mapping here are in docs/interop.md.

Modules: `files` (load_hf, save_hf), `config` (config.json <-> our config), `weights` (key names
both ways), `forward` (forward_like_hf), `head` (HFHead, HFImport), `tables` (the per-modality facts).
"""

from __future__ import annotations

from data2vec.interop.hf.config import exportable as exportable
from data2vec.interop.hf.config import hf_config as hf_config
from data2vec.interop.hf.files import hf_import as hf_import
from data2vec.interop.hf.files import load_hf as load_hf
from data2vec.interop.hf.files import save_hf as save_hf
from data2vec.interop.hf.forward import HFOutput as HFOutput
from data2vec.interop.hf.forward import forward_like_hf as forward_like_hf
from data2vec.interop.hf.forward import head_logits as head_logits
from data2vec.interop.hf.forward import pooled_output as pooled_output
from data2vec.interop.hf.head import HFHead as HFHead
from data2vec.interop.hf.head import HFImport as HFImport
from data2vec.interop.hf.tables import BARE as BARE
from data2vec.interop.hf.tables import BASE_PRESET as BASE_PRESET
from data2vec.interop.hf.tables import HEAD_KINDS as HEAD_KINDS
from data2vec.interop.hf.tables import MODEL_TYPE as MODEL_TYPE
from data2vec.interop.hf.tables import PREFIX as PREFIX
from data2vec.interop.hf.tables import TYPE_OF as TYPE_OF
