"""Supervised fine-tuning of a pretrained encoder (recipes: docs/design.md, 'Fine-tuning recipes').

    from data2vec.finetune import finetune, finetune_preset
    cfg = finetune_preset("image_cls", epochs=10)
    result = finetune("runs/cifar", cfg, "train_images/", "test_images/", "runs/cifar-ft")
    result.best_metric, result.best_epoch

Tasks (`FinetuneConfig.task`):

- `image_cls`: mean over the patch tokens (CLS excluded) -> LayerNorm -> Linear, with
  layer-wise lr decay, drop-path, mixup/cutmix and label smoothing; metric: accuracy.
- `audio_cls`: mean over the valid frames -> LayerNorm -> Linear; metric: accuracy.
  (`head_norm="batch"`: BatchNorm without affine in place of the LayerNorm, both tasks.)
- `audio_ctc`: a Linear per frame over letters (`|` between words, blank = 0), CTC loss with
  the CNN frozen and time/channel masking kept on while training (v1 replaces masked frames
  by the learned mask vector, v2 by N(0, 0.01) noise); greedy decoding; metrics: CER (used to
  pick the best epoch) and WER. (`head_norm="batch"`: the valid frames pass a BatchNorm
  without affine before the letter layer.)
- `text_cls`: first token -> Linear(D, D) -> tanh -> Linear(D, classes) (RoBERTa head,
  dropout 0); metric: accuracy.
- `text_reg`: the same head with one output and a mean-squared-error loss (STS-style);
  metric: Pearson correlation.

Optimiser: AdamW with warm-up + cosine per step, no weight decay on 1-D parameters; every
parameter group carries a layer-wise lr scale (`layer_decay`; BEiT grouping: front-end and
prefix tokens are layer 0, block i is layer i, the head is layer L + 1). The model is
evaluated after every epoch; the best epoch by the eval metric is kept in `OUT/best/`
(`model.safetensors`, `config.json` = the pretrained RunConfig, `finetune.json` = this config,
the classes or letters and the metric), written atomically. `OUT/metrics.jsonl` holds a line
per logged step and one per epoch (`eval_<metric>`), `OUT/metrics.png` plots them.

Labelled data (see `read_labelled`, which reads it with `data2vec.data.labelled`):

- images: a folder with one subfolder per class, or tar shards with `<key>.cls` labels;
- audio: a folder with one subfolder per class, or a TSV manifest with a header line, a path
  column (`path`, `file`, `audio` or `id`; relative to the manifest's folder, a suffix-less id
  is looked up as `<id>.wav/.flac/.ogg` there or in `flac/`, `wav/`, `wavs/`) and a label
  column (`label`) or a transcript column (`transcript`, `text`, `sentence`);
- text: a TSV with a header line or a JSONL file, with a text column (`sentence` or `text` by
  default) and a `label` column (an integer or a class name; a number for `text_reg`).
"""

from data2vec.data.labelled import LabelledSet
from data2vec.finetune.config import FINETUNE_PRESETS, METRIC, TASK_MODALITY, TASKS, FinetuneConfig, finetune_preset
from data2vec.finetune.ctc import (
    BLANK,
    WORD_SEP,
    edit_distance,
    encode_letters,
    error_rates,
    greedy_decode,
    letter_vocab,
)
from data2vec.finetune.data import load_tokenizer, read_labelled
from data2vec.finetune.loop import (
    EvalResult,
    FinetuneResult,
    evaluate,
    finetune,
    mix_batch,
    plot_finetune,
    read_labelled_sets,
    smooth_one_hot,
)
from data2vec.finetune.model import (
    FinetuneModel,
    build_finetune_model,
    layer_id,
    load_finetuned,
    param_groups,
    save_finetuned,
)

__all__ = [
    "BLANK",
    "FINETUNE_PRESETS",
    "METRIC",
    "TASKS",
    "TASK_MODALITY",
    "WORD_SEP",
    "EvalResult",
    "FinetuneConfig",
    "FinetuneModel",
    "FinetuneResult",
    "LabelledSet",
    "build_finetune_model",
    "edit_distance",
    "encode_letters",
    "error_rates",
    "evaluate",
    "finetune",
    "finetune_preset",
    "greedy_decode",
    "layer_id",
    "letter_vocab",
    "load_finetuned",
    "load_tokenizer",
    "mix_batch",
    "param_groups",
    "plot_finetune",
    "read_labelled",
    "read_labelled_sets",
    "save_finetuned",
    "smooth_one_hot",
]
