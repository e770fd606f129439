"""Letters for CTC speech recognition: the vocabulary, encoding, greedy decoding, WER/CER."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

BLANK = "<blank>"
WORD_SEP = "|"


def letter_vocab(transcripts: Sequence[str]) -> list[str]:
    """Blank, the word separator and every other character seen (lower-cased), sorted."""
    chars = sorted({c for t in transcripts for c in t.lower() if not c.isspace()} - {WORD_SEP})
    return [BLANK, WORD_SEP, *chars]


def encode_letters(text: str, vocab: Sequence[str]) -> list[int]:
    """Lower-cased letters -> ids, words separated by `|`; unknown characters are dropped."""
    index = {c: i for i, c in enumerate(vocab)}
    words = [[index[c] for c in w if c in index] for w in text.lower().split()]
    out: list[int] = []
    for w in words:
        if w:
            if out:
                out.append(index[WORD_SEP])
            out.extend(w)
    return out


def greedy_decode(log_probs: Tensor, lengths: Tensor | None, vocab: Sequence[str]) -> list[str]:
    """(B, T, V) frame scores -> text: best class per frame, repeats merged, blanks removed,
    `|` read as a space."""
    best = log_probs.argmax(-1).cpu()
    out = []
    for b in range(best.shape[0]):
        n = int(lengths[b]) if lengths is not None else best.shape[1]
        prev = -1
        chars: list[str] = []
        for k in best[b, :n].tolist():
            if k != prev and k != 0:
                chars.append(" " if vocab[k] == WORD_SEP else vocab[k])
            prev = k
        out.append(" ".join("".join(chars).split()))
    return out


def edit_distance(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        cur = [i]
        for j, y in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def error_rates(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, float]:
    """(WER, CER) over a corpus: total edits / total reference words (characters)."""
    w_err = w_tot = c_err = c_tot = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        h, r = hyp.lower().split(), ref.lower().split()
        w_err += edit_distance(h, r)
        w_tot += len(r)
        hc, rc = " ".join(h), " ".join(r)
        c_err += edit_distance(hc, rc)
        c_tot += len(rc)
    return w_err / max(w_tot, 1), c_err / max(c_tot, 1)
