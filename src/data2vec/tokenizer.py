"""Byte-level BPE tokenizers (RoBERTa's kind), through Hugging Face `tokenizers`.

`TextTokenizer` wraps a `tokenizers.Tokenizer` and knows the five special ids the model
needs. It is either trained on the user's corpus (`train`) with <s>=0, <pad>=1, </s>=2,
<unk>=3, <mask>=4, or loaded (`load`) from a `tokenizer.json`, a RoBERTa-style
`vocab.json` + `merges.txt` pair, or a folder holding either. Special-token names are
looked up RoBERTa-style first (<s>, <pad>, ...), then BERT-style ([CLS], [PAD], ...).

Text that happens to contain "<s>" or "<mask>" is encoded as plain text: special ids
only ever come from the data pipeline, never from the corpus.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
"""In id order for a trained tokenizer: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4."""

_NAMES: dict[str, tuple[str, ...]] = {
    "bos": ("<s>", "[CLS]"),
    "pad": ("<pad>", "[PAD]"),
    "eos": ("</s>", "[SEP]"),
    "unk": ("<unk>", "[UNK]"),
    "mask": ("<mask>", "[MASK]"),
}


class TokenizerError(ValueError):
    """A tokenizer file cannot be used; the message names the file."""


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, source: str = "") -> None:
        self.tok = tokenizer
        # Special tokens written in the text stay text (not serialised in tokenizer.json).
        self.tok.encode_special_tokens = True
        self.tok.no_truncation()
        self.tok.no_padding()
        ids: dict[str, int] = {}
        for role, names in _NAMES.items():
            found = next((i for i in (tokenizer.token_to_id(n) for n in names) if i is not None), None)
            if found is None:
                raise TokenizerError(f"{source or 'tokenizer'}: has no {role} token (looked for {', '.join(names)})")
            ids[role] = found
        self.bos_id, self.pad_id, self.eos_id = ids["bos"], ids["pad"], ids["eos"]
        self.unk_id, self.mask_id = ids["unk"], ids["mask"]

    @property
    def vocab_size(self) -> int:
        return int(self.tok.get_vocab_size(with_added_tokens=True))

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2, show_progress: bool = False
    ) -> TextTokenizer:
        """Byte-level BPE (GPT-2 pre-tokenisation, no prefix space) trained on `texts`."""
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok, "trained tokenizer")

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        """From tokenizer.json, vocab.json (+ merges.txt beside it), or a folder with either."""
        p = Path(path)
        if p.is_dir():
            if (p / "tokenizer.json").is_file():
                p = p / "tokenizer.json"
            elif (p / "vocab.json").is_file():
                p = p / "vocab.json"
            else:
                raise TokenizerError(f"{path}: holds neither tokenizer.json nor vocab.json + merges.txt")
        if not p.is_file():
            raise FileNotFoundError(f"{path}: no such tokenizer file or folder")
        if p.name == "vocab.json" or (p.suffix == ".json" and (p.parent / "merges.txt").is_file()):
            merges = p.parent / "merges.txt"
            if not merges.is_file():
                raise TokenizerError(f"{p}: a vocab.json needs merges.txt beside it ({merges} is missing)")
            try:
                bpe = models.BPE.from_file(str(p), str(merges))
            except Exception as e:  # the Rust side raises plain Exceptions
                raise TokenizerError(f"{p}: not a readable vocab.json + merges.txt pair ({e})") from None
            tok = Tokenizer(bpe)
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            present = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is not None]
            tok.add_special_tokens(present)  # already in the vocabulary: ids unchanged
            return cls(tok, str(p))
        try:
            tok = Tokenizer.from_file(str(p))
        except Exception as e:
            raise TokenizerError(f"{p}: not a readable tokenizer.json ({e})") from None
        return cls(tok, str(p))

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts at once (parallel in the Rust library)."""
        return [list(e.ids) for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens))
