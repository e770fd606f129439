"""FSDD spoken digits: data2vec 2.0 speech pretraining for a CPU budget on the recordings of
the four training speakers (no labels), then utterance classification (mean-pooled head,
CNN frozen) on the same speakers, against the same architecture from a random init under
the same recipe and epochs; accuracy on speakers george and lucas, held out entirely.
Baselines: a linear probe of frozen features and a spectrogram logistic regression.

    python benchmarks/speech.py --budget-minutes 5 --finetune-epochs 3 --threads 1 \\
        --out benchmarks/results/speech [--work /tmp/data2vec-bench/speech]
"""

from __future__ import annotations

from pathlib import Path

import common
import numpy as np
import soundfile as sf
from scipy.signal import stft
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from data2vec.config import RunConfig, apply_overrides
from data2vec.data.audio import load_audio, normalize_waveform
from data2vec.finetune import LabelledSet, finetune_preset
from data2vec.presets import preset

HELD_OUT = ("george", "lucas")
ACC = "accuracy (held-out speakers)"


def spectrogram(path: Path) -> np.ndarray:
    """Log-magnitude STFT of the first second at 8 kHz, pooled to 33 bands x 16 time bins."""
    wav, sr = sf.read(str(path), dtype="float32")
    wav = np.pad(wav[:sr], (0, max(0, sr - len(wav))))
    _, _, z = stft(wav, fs=sr, nperseg=256)
    mag = np.log1p(np.abs(z))[:128]
    t = mag.shape[1] // 16 * 16
    return mag[:, :t].reshape(32, 4, 16, t // 16).mean(axis=(1, 3)).reshape(-1)


def synthetic_speech(sentences: int, work: Path) -> list[Path]:
    """`sentences` eSpeak NG sentences read by many voices, resampled to 8 kHz like FSDD."""
    if sentences <= 0:
        return []
    import soxr

    from data2vec.demo_audio import SynthSpec, synthesize

    corpus = synthesize(SynthSpec(sentences=sentences, train_voices=1, test_voices=0, seed=1), root=work / "espeak")
    out = work / f"espeak-8k-{corpus.name}"
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for src in sorted((corpus / "pretrain").glob("*.wav")):
        dst = out / src.name
        if not dst.is_file():
            wav, sr = sf.read(str(src), dtype="float32")
            sf.write(str(dst), soxr.resample(wav, sr, 8_000), 8_000)
        files.append(dst)
    print(f"{len(files)} synthetic sentences from {corpus}", flush=True)
    return files


def main() -> None:
    p = common.bench_parser(__doc__, "speech", budget=5.0, epochs=3, lr=2e-4)
    p.add_argument("--every", type=int, default=1, help="use every N-th clip (a quick smoke run)")
    p.add_argument(
        "--synthetic",
        type=int,
        default=0,
        help="also pretrain on this many eSpeak NG sentences, many voices (the audio demo's synthesiser; "
        "needs the speech extra), band-limited to FSDD's 8 kHz",
    )
    args = p.parse_args()
    out, work, t_all = common.start(args)
    files = sorted((common.DATA / "fsdd" / "recordings").glob("*.wav"))[:: args.every]
    train_files = [f for f in files if f.stem.split("_")[1] not in HELD_OUT]
    test_files = [f for f in files if f.stem.split("_")[1] in HELD_OUT]
    unlabelled = train_files + synthetic_speech(args.synthetic, work)
    manifest = work / "pretrain.tsv"
    manifest.write_text("".join(f"{f}\n" for f in unlabelled))
    cfg = apply_overrides(
        preset("audio-tiny", args.version),
        [f"data.path={manifest}", "data.num_workers=0", "train.precision=bf16", "train.log_every=10", *args.overrides],
    )
    run_dir, pinfo = common.pretrain_or_reuse(cfg, args, work)
    algo = common.algorithm(run_dir)
    pretrain_clips = len(Path(RunConfig.load(run_dir / "config.json").data.path).read_text().splitlines())

    def labelled(fs: list[Path], name: str) -> LabelledSet:
        wavs = [normalize_waveform(load_audio(f, 16_000)) for f in fs]
        return LabelledSet(
            lambda i: wavs[i], [int(f.stem.split("_")[0]) for f in fs], [str(d) for d in range(10)], name
        )

    train_set = labelled(train_files, "fsdd train speakers")
    test_set = labelled(test_files, "fsdd george+lucas")
    ft = finetune_preset(
        "audio_cls", epochs=args.finetune_epochs, lr=args.lr, batch_size=32, log_every=10, precision="bf16"
    )
    rows = common.compare_finetune(
        run_dir, ft, train_set, test_set, work, args.seeds, args.ft_overrides, jobs=args.jobs
    )

    probe = common.probe_compare(run_dir, common.audio_items, train_set, test_set)

    sc = StandardScaler().fit(np.stack([spectrogram(f) for f in train_files]))
    x_tr = sc.transform(np.stack([spectrogram(f) for f in train_files]))
    x_te = sc.transform(np.stack([spectrogram(f) for f in test_files]))
    clf = LogisticRegression(max_iter=2000, C=0.1).fit(x_tr, train_set.targets)
    spec = float(clf.score(x_te, test_set.targets))
    print(f"spectrogram logistic regression: {spec:.4f}")

    table = [
        (f"{algo} pretrained, fine-tuned", ACC, f"{rows['pretrained']['best']:.4f}"),
        (
            "same architecture from scratch, fine-tuned",
            ACC,
            f"{rows['scratch']['best']:.4f}",
        ),
        (f"{algo} pretrained, linear probe", ACC, f"{probe['pretrained']:.4f}"),
        ("random init, linear probe", ACC, f"{probe['scratch']:.4f}"),
        ("spectrogram logistic regression", ACC, f"{spec:.4f}"),
    ]
    ft_min = {k: f"{v['seconds'] / 60:.1f}" for k, v in rows.items()}
    info = {
        "pretraining": f"{pinfo['steps']} steps on {pretrain_clips} clips in {pinfo['seconds'] / 60:.1f} min",
        "fine-tuning": f"{args.finetune_epochs} epochs, lr {args.lr}, on {len(train_set)} clips, "
        f"{ft_min['pretrained']} min (pretrained) / {ft_min['scratch']} min (scratch)",
        "test clips": len(test_set),
        "margin (fine-tuned, pretrained - scratch)": f"{rows['pretrained']['best'] - rows['scratch']['best']:+.4f}",
        "margin (linear probe)": f"{probe['pretrained'] - probe['scratch']:+.4f}",
        **common.seeds_note(rows),
        **common.footer(args, t_all),
    }
    curves = {k: v["history"] for k, v in rows.items()}
    title = f"FSDD digits, speakers george and lucas held out (audio-tiny, {algo})"
    common.write_results(out, title, table, info, curves)


if __name__ == "__main__":
    main()
