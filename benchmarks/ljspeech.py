"""LJ Speech subset: data2vec 2.0 speech pretraining for a CPU budget on the audio of the
training utterances (no transcripts), then CTC letter recognition (CNN frozen, time and
channel masks on; `audio_ctc` recipe) from the pretrained weights and from a random init
under the same recipe and epochs. The last 20 utterances of transcripts.tsv are held out
entirely (not pretrained on either); metric: CER (and WER) with greedy decoding.

    python benchmarks/ljspeech.py --budget-minutes 10 --finetune-epochs 30 --threads 1 \\
        --out benchmarks/results/ljspeech [--work /tmp/data2vec-bench/ljspeech]
"""

from __future__ import annotations

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


def main() -> None:
    p = common.bench_parser(__doc__, "ljspeech", budget=10.0, epochs=30, lr=5e-4)
    p.add_argument("--batch-size", type=int, default=8)
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

    table = [
        (f"{algo} pretrained, CTC fine-tuned", "CER (held-out)", f"{results['pretrained']['best']:.4f}"),
        ("same architecture from scratch, CTC fine-tuned", "CER (held-out)", f"{results['scratch']['best']:.4f}"),
        (f"{algo} pretrained, CTC fine-tuned", "WER at the best-CER epoch", wer("pretrained")),
        ("same architecture from scratch, CTC fine-tuned", "WER at the best-CER epoch", wer("scratch")),
        ("empty transcript (every reference character an error)", "CER (held-out)", "1.0000"),
    ]
    audio_min = sum(len(train_set.load(i)) for i in range(len(train_set))) / 16_000 / 60
    ft_min = {k: f"{v['seconds'] / 60:.1f}" for k, v in results.items()}
    info = {
        "pretraining": (
            f"{pinfo['steps']} steps in {pinfo['seconds'] / 60:.1f} min on "
            + (
                f"the reused run's audio ({pinfo['reused']})"
                if args.pretrained
                else f"{len(train_utts)} utterances ({audio_min:.1f} min of audio)"
            )
        ),
        "fine-tuning": f"{args.finetune_epochs} epochs, lr {args.lr}, batch {args.batch_size}, on {len(train_set)} "
        f"utterances, {ft_min['pretrained']} min (pretrained) / {ft_min['scratch']} min (scratch)",
        "held-out utterances": len(test_set),
        "audio band": f"0-{args.band_limit} Hz (band-limited)" if args.band_limit else "full (0-8 kHz)",
        "margin (CER, scratch - pretrained; positive = pretraining helps)": (
            f"{results['scratch']['best'] - results['pretrained']['best']:+.4f}"
        ),
        **common.seeds_note(results),
        **common.footer(args, t_all),
    }
    curves = {k: v["history"] for k, v in results.items()}
    common.write_results(
        out, f"LJ Speech subset, CTC on letters, last 20 utterances held out (audio-tiny, {algo})", table, info, curves
    )


if __name__ == "__main__":
    main()
