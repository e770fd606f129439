"""LJ Speech subset: data2vec 2.0 speech pretraining for a CPU budget on the audio of the
training utterances (no transcripts), then CTC letter recognition (CNN frozen, time and
channel masks on; `audio_ctc` recipe) from the pretrained weights and from a random init
under the same recipe and epochs. The last 20 utterances of transcripts.tsv are held out
entirely (not pretrained on either); metric: CER (and WER) with greedy decoding.

    python benchmarks/ljspeech.py --budget-minutes 10 --finetune-epochs 30 --threads 1 \\
        --out benchmarks/results/ljspeech [--work /tmp/data2vec-bench/ljspeech]
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import common
import numpy as np
import soxr

from data2vec.config import apply_overrides
from data2vec.data.audio import load_audio, normalize_waveform
from data2vec.finetune import LabelledSet, finetune_preset
from data2vec.presets import preset

HELD_OUT = 20


def letters_only(text: str) -> str:
    """Lower case, letters and apostrophes, single spaces: what the CTC head spells."""
    return " ".join(re.sub(r"[^a-z' ]+", " ", text.lower()).split())


def chance_transcripts(train_texts: list[str], references: list[str]) -> dict[str, tuple[float, float]]:
    """(WER, CER) of transcripts that know nothing of the audio, only each reference's length:
    what a model scores before it has learned to spell. Empty output scores CER 1; guesses of
    the right length score lower, so a CER below 1 alone does not show learning."""
    from collections import Counter

    from data2vec.finetune import error_rates

    word = Counter(w for t in train_texts for w in t.split()).most_common(1)[0][0]
    chars = Counter("".join(train_texts))
    rng = random.Random(0)
    letters, weights = list(chars), list(chars.values())
    return {
        f"'{word}' once per reference word": error_rates(
            [" ".join([word] * len(r.split())) for r in references], references
        ),
        "random letters (training frequencies), reference length": error_rates(
            ["".join(rng.choices(letters, weights, k=len(r))) for r in references], references
        ),
        "empty transcript": error_rates(["" for _ in references], references),
    }


def main() -> None:
    p = common.bench_parser(__doc__, "ljspeech", budget=10.0, epochs=30, lr=5e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--ctc-probe-steps",
        type=int,
        default=3000,
        help="also train a linear CTC probe on each layer's frozen frame features for this many steps (0 = no probe)",
    )
    p.add_argument(
        "--band-limit",
        type=int,
        default=0,
        help="fine-tune and test on the utterances band-limited to this many Hz (read at twice the rate, then "
        "resampled to 16 kHz): telephone-band speech, or the band of a model pretrained on 8 kHz audio; "
        "0 = full band",
    )
    args = p.parse_args()
    out, work, t_all = common.start(args)
    root = common.DATA / "ljspeech-subset"
    rows = [ln.split("\t") for ln in (root / "transcripts.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    utts = [(root / "flac" / f"{uid}.flac", letters_only(text)) for uid, text in rows]
    train_utts, test_utts = utts[:-HELD_OUT], utts[-HELD_OUT:]
    manifest = work / "pretrain.tsv"
    manifest.write_text("".join(f"{f}\n" for f, _ in train_utts))
    cfg = apply_overrides(
        preset("audio-tiny", args.version),
        [f"data.path={manifest}", "data.num_workers=0", "train.precision=bf16", "train.log_every=10", *args.overrides],
    )
    run_dir, pinfo = common.pretrain_or_reuse(cfg, args, work)
    algo = common.algorithm(run_dir)

    def read(path: Path) -> np.ndarray:
        if not args.band_limit:
            return load_audio(path, 16_000)
        rate = 2 * args.band_limit
        return np.asarray(soxr.resample(load_audio(path, rate), rate, 16_000), dtype=np.float32)

    def labelled(pairs: list[tuple[Path, str]], name: str) -> LabelledSet:
        wavs = [normalize_waveform(read(f)) for f, _ in pairs]
        return LabelledSet(lambda i: wavs[i], [t for _, t in pairs], [], name)

    train_set = labelled(train_utts, "ljspeech train")
    test_set = labelled(test_utts, f"ljspeech last {HELD_OUT}")
    table: list[tuple[str, str, str]] = []
    info: dict[str, object] = {}
    curves: dict[str, object] = {}
    audio_min = sum(len(train_set.load(i)) for i in range(len(train_set))) / 16_000 / 60
    info["pretraining"] = f"{pinfo['steps']} steps in {pinfo['seconds'] / 60:.1f} min on " + (
        f"the reused run's audio ({pinfo['reused']})"
        if args.pretrained
        else f"{len(train_utts)} utterances ({audio_min:.1f} min of audio)"
    )
    info["held-out utterances"] = len(test_set)
    info["audio band"] = f"0-{args.band_limit} Hz (band-limited)" if args.band_limit else "full (0-8 kHz)"
    if args.finetune_epochs > 0:
        ft = finetune_preset(
            "audio_ctc",
            epochs=args.finetune_epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            log_every=10,
            precision="bf16",
        )
        results = common.compare_finetune(
            run_dir, ft, train_set, test_set, work, args.seeds, args.ft_overrides, jobs=args.jobs
        )

        def wer(name: str) -> str:
            best = results[name]["best_epoch"]
            row = next(h for h in results[name]["history"] if h["epoch"] == best)
            return f"{row['eval_wer']:.4f}"

        table += [
            (f"{algo} pretrained, CTC fine-tuned", "CER (held-out)", f"{results['pretrained']['best']:.4f}"),
            ("same architecture from scratch, CTC fine-tuned", "CER (held-out)", f"{results['scratch']['best']:.4f}"),
            (f"{algo} pretrained, CTC fine-tuned", "WER at the best-CER epoch", wer("pretrained")),
            ("same architecture from scratch, CTC fine-tuned", "WER at the best-CER epoch", wer("scratch")),
        ]
        ft_min = {k: f"{v['seconds'] / 60:.1f}" for k, v in results.items()}
        info["fine-tuning"] = (
            f"{args.finetune_epochs} epochs, lr {args.lr}, batch {args.batch_size}, on {len(train_set)} "
            f"utterances, {ft_min['pretrained']} min (pretrained) / {ft_min['scratch']} min (scratch)"
        )
        info["margin (CER, scratch - pretrained; positive = pretraining helps)"] = (
            f"{results['scratch']['best'] - results['pretrained']['best']:+.4f}"
        )
        info |= common.seeds_note(results)
        curves = {k: v["history"] for k, v in results.items()}
    if args.ctc_probe_steps > 0:
        probe = common.ctc_probe_compare(run_dir, train_set, test_set, steps=args.ctc_probe_steps)
        last = max(probe["pretrained"])
        for layer in sorted(probe["pretrained"]):
            for name, label in (("pretrained", f"{algo} pretrained"), ("scratch", "random init")):
                r = probe[name][layer]
                metric = f"CER (WER {r['wer']:.3f}), layer {layer}" + (" (last)" if layer == last else "")
                table.append((f"{label}, frozen, linear CTC probe", metric, f"{r['cer']:.4f}"))
        info["CTC probe"] = (
            f"one linear layer on standardised frozen frame features, {args.ctc_probe_steps} Adam steps of "
            "8 utterances, lr 2e-3 cosine, greedy decoding"
        )
        info["margin (probe CER at the last layer, random - pretrained)"] = (
            f"{probe['scratch'][last]['cer'] - probe['pretrained'][last]['cer']:+.4f}"
        )
    for name, (w, c) in chance_transcripts([t for _, t in train_utts], [t for _, t in test_utts]).items():
        table.append((f"chance: {name}", f"CER (WER {w:.3f})", f"{c:.4f}"))
    info |= common.footer(args, t_all)
    common.write_results(
        out, f"LJ Speech subset, CTC on letters, last 20 utterances held out (audio-tiny, {algo})", table, info, curves
    )


if __name__ == "__main__":
    main()
