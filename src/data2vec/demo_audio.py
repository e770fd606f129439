"""`data2vec demo --modality audio`: pretrain a tiny speech model on synthetic speech, then probe it.

Speech is synthesised offline on first use with eSpeak NG, through the `espeakng-loader`
package (its bundled library, called with ctypes; install it with the `speech` extra).
Synthesis runs in a fresh subprocess, in a fixed order, with `espeak_ng_SetRandSeed`
before each utterance, so the same package version always yields the same audio. The
result is cached under the user cache folder ($XDG_CACHE_HOME or ~/.cache,
`data2vec/speech-demo-v1`).

- Pretraining data: sentences of English words read by many voices (eSpeak NG voices x
  variants x pitch x rate), written as 16 kHz wav files and read by the normal audio
  pipeline (labels unused).
- Probe: the 35 Speech Commands words, each spoken by every probe voice, placed at a random
  offset in a 1 s clip of noise. The probe's test voices use voice variants that appear
  neither in its training set nor in pretraining. A logistic-regression probe on frozen,
  mean-pooled features is trained and scored for the pretrained encoder, the same encoder
  at its random initialisation, and log-mel features (80 bands, averaged over time).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from data2vec import speech_synth
from data2vec.config import RunConfig, apply_overrides
from data2vec.data.audio import normalize_waveform
from data2vec.demo import DemoResult
from data2vec.model import Data2Vec
from data2vec.presets import preset
from data2vec.probe import initial_model, probe_accuracies
from data2vec.speech_synth import add_noise
from data2vec.training import train

CACHE_NAME = "speech-demo-v1"
SAMPLE_RATE = 16_000
CLIP_SAMPLES = SAMPLE_RATE  # 1 s probe clips

COMMANDS = (
    "backward bed bird cat dog down eight five follow forward four go happy house learn left marvin nine no "
    "off on one right seven sheila six stop three tree two up visual wow yes zero"
).split()

# Everyday English words for the pretraining sentences (the command words are added below).
_EVERYDAY = (
    "the a an and or but if then because when where while after before about above across again against all "
    "almost along also always among another any around away back be been being below between both bring "
    "build call came can carry change children city close cold come could country cover cut dark day did "
    "different do does done door draw dream drink drive during each early earth eat end enough even evening "
    "every example eye face fall family far farm fast father feel few field fight find fine fire first fish "
    "five fly food foot for found friend from full game garden gave get girl give glass good great green "
    "ground group grow half hand hard has have he head hear heart heavy help her here high hill him his hold "
    "home horse hot hour how idea important inside into island it just keep kind king knew know land large "
    "last late laugh lay leave letter life light like line list listen little live long look love low made "
    "make man many map mark may me mean measure men might mile mind minute miss money month moon more morning "
    "most mother mountain move much music must my name near need never new next night north nothing notice "
    "now number ocean often old once only open other our out over own page paper part pass people picture "
    "piece place plan plant play point poor power press pull put question quick quiet rain ran reach read "
    "ready real red remember rest river road rock room round run said same saw say school sea second see "
    "seem sentence set shall she ship short should show side simple since sing sister sit size sleep slow "
    "small snow so some song soon sound south space speak special spring stand star start stay step still "
    "story street strong study such summer sun sure table take talk teacher tell than that their them there "
    "these they thing think this those though thought through time today together told too took top toward "
    "town travel true try turn under until upon us use very voice wait walk wall want warm was watch water "
    "way we weather week well went were what wheel white who whole why wind window winter with without woman "
    "wonder wood word work world would write year young"
).split()
VOCABULARY = sorted(set(_EVERYDAY) | set(COMMANDS))

BASE_VOICES = ("en", "en-us", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc")
# eSpeak NG voice variants (formant and pitch sets). The probe's test voices use the last ones only.
TRAIN_VARIANTS = (
    "m1 m2 m3 m4 m5 m6 m7 f1 f2 f3 f4 klatt klatt2 Alex Andy Annie ed john linda max steph robert shelby "
    "quincy travis iven michel norbert rob paul adam david edward benjamin belinda caleb aunty boris"
).split()
TEST_VARIANTS = "m8 f5 klatt3 klatt4 Mike Lee Mario Hugo Denis pablo victor zac".split()


@dataclass(frozen=True)
class SynthSpec:
    """What to synthesise; its hash names the cache entry."""

    sentences: int = 500
    train_voices: int = 72
    test_voices: int = 24
    snr_db: tuple[float, float] = (0.0, 20.0)
    """Background noise in the pretraining sentences (the probe adds its own)."""
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha1(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()[:12]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "data2vec" / CACHE_NAME


def _voice(rng: np.random.Generator, variants: list[str] | tuple[str, ...]) -> dict[str, Any]:
    return {
        "voice": str(rng.choice(BASE_VOICES)),
        "variant": str(rng.choice(variants)),
        "pitch": int(rng.integers(25, 76)),
        "rate": int(rng.integers(130, 211)),
    }


def plan_synthesis(spec: SynthSpec) -> dict[str, Any]:
    """The ordered list of utterances to synthesise (a pure function of the spec)."""
    rng = np.random.default_rng(spec.seed)
    jobs: list[dict[str, Any]] = []
    for i in range(spec.sentences):
        words = rng.choice(VOCABULARY, size=int(rng.integers(6, 15)))
        voice = _voice(rng, TRAIN_VARIANTS)
        snr = float(rng.uniform(*spec.snr_db))
        jobs.append({"file": f"pretrain/s{i:05d}.wav", "text": " ".join(words), "snr": snr, **voice})
    voices = []
    for split, n, variants in (("train", spec.train_voices, TRAIN_VARIANTS), ("test", spec.test_voices, TEST_VARIANTS)):
        for _ in range(n):
            voices.append({"split": split, **_voice(rng, variants)})
    for v, voice in enumerate(voices):
        for w, word in enumerate(COMMANDS):
            cfg = {k: voice[k] for k in ("voice", "variant", "pitch", "rate")}
            jobs.append({"file": f"words/v{v:03d}_w{w:02d}.wav", "text": word, "trim": True, **cfg})
    return {"jobs": jobs, "voices": voices, "words": list(COMMANDS)}


def synthesize(spec: SynthSpec, root: Path | None = None, quiet: bool = False) -> Path:
    """The cached synthetic corpus for `spec`, synthesising it first if needed."""
    root = root or cache_root()
    out = root / spec.key()
    if (out / "plan.json").is_file():
        return out
    try:
        import espeakng_loader  # noqa: F401
    except ImportError:
        raise ImportError(
            "the audio demo synthesises its speech with eSpeak NG: install it with  pip install 'data2vec[speech]'"
        ) from None
    plan = plan_synthesis(spec)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
    try:
        (tmp / "plan.json.in").write_text(json.dumps(plan))
        if not quiet:
            print(f"synthesising {len(plan['jobs'])} utterances with eSpeak NG into {out} (once) ...", flush=True)
        # A fresh interpreter running the synthesis file on its own (it imports no torch).
        script = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
        subprocess.run([sys.executable, "-c", script, str(Path(speech_synth.__file__)), str(tmp)], check=True)
        (tmp / "plan.json.in").rename(tmp / "plan.json")  # marks the entry complete
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------------- probe data and features


def probe_set(corpus: Path, seed: int = 0, snr_db: tuple[float, float] = (10.0, 25.0)) -> tuple[np.ndarray, ...]:
    """1 s clips (N, 16000) with one command word at a random offset in noise, normalised per clip;
    labels (N,) and the train/test split (N,) bool (True = probe training set)."""
    plan = json.loads((corpus / "plan.json").read_text())
    rng = np.random.default_rng(seed)
    clips, labels, is_train = [], [], []
    for v, voice in enumerate(plan["voices"]):
        for w in range(len(plan["words"])):
            word, _ = sf.read(corpus / f"words/v{v:03d}_w{w:02d}.wav", dtype="float32")
            if len(word) > CLIP_SAMPLES:
                cut = (len(word) - CLIP_SAMPLES) // 2
                word = word[cut : cut + CLIP_SAMPLES]
            start = int(rng.integers(0, CLIP_SAMPLES - len(word) + 1))
            placed = np.zeros(CLIP_SAMPLES, dtype=np.float32)
            placed[start : start + len(word)] = word
            # the SNR is relative to the word's own power, not the (mostly empty) clip's
            snr = float(rng.uniform(*snr_db)) - 10 * np.log10(CLIP_SAMPLES / len(word))
            clip = add_noise(placed, snr, rng)
            clips.append(normalize_waveform(clip.astype(np.float32)))
            labels.append(w)
            is_train.append(voice["split"] == "train")
    return np.stack(clips), np.array(labels), np.array(is_train)


def log_mel(wav: np.ndarray, n_mels: int = 80, n_fft: int = 400, hop: int = 160) -> np.ndarray:
    """(N, L) waveforms -> (N, frames, n_mels) log-mel energies (25 ms Hann windows, 10 ms hop)."""
    x = torch.from_numpy(wav).float()
    spec = torch.stft(x, n_fft, hop, window=torch.hann_window(n_fft), return_complex=True).abs() ** 2
    mel = torch.from_numpy(mel_filterbank(n_mels, n_fft, SAMPLE_RATE)).float()
    return torch.log(mel @ spec + 1e-6).transpose(1, 2).numpy()


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters on the HTK mel scale."""

    def to_mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def to_hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = to_hz(np.linspace(to_mel(np.array(0.0)), to_mel(np.array(sample_rate / 2)), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None, :] - lo) / (mid - lo)
    down = (hi - freqs[None, :]) / (hi - mid)
    out: np.ndarray = np.maximum(0.0, np.minimum(up, down))
    return out


@torch.no_grad()
def layer_features(model: Data2Vec, wav: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """(N, L) waveforms -> (N, blocks, D): each block's output, averaged over frames."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(wav), batch_size):
        x = torch.from_numpy(wav[i : i + batch_size])
        enc = model.encode(x)
        out.append(torch.stack([o.x.float().mean(dim=1) for o in enc.layers], dim=1))
    model.train(was_training)
    return torch.cat(out).numpy()


# ---------------------------------------------------------------------- the demo


DEMO_LAYERS = 2
"""The probe reads the average of the last DEMO_LAYERS blocks (the same rule for every encoder)."""


DEMO_STEPS = 800
DEMO_CONV = ((64, 10, 5),) + ((64, 3, 2),) * 4 + ((64, 2, 2),) * 2
"""audio-tiny's CNN at half width: the CNN is most of a CPU step, and more steps pay off more."""


def demo_config(
    corpus: Path, version: int = 2, steps: int = DEMO_STEPS, overrides: list[str] | None = None
) -> RunConfig:
    cfg = preset("audio-tiny", version)
    cfg = replace(
        cfg,
        model=replace(cfg.model, audio=replace(cfg.model.audio, conv_layers=DEMO_CONV)),
        # A quicker teacher for a short run: it starts tracking the student within ~100 steps.
        teacher=replace(cfg.teacher, decay=0.99, end_decay=0.999),
        data=replace(cfg.data, path=str(corpus / "pretrain"), num_workers=0),
        train=replace(cfg.train, steps=steps, ckpt_every=max(1, steps // 2), log_every=1),
        optim=replace(cfg.optim, warmup_steps=min(cfg.optim.warmup_steps, steps // 10)),
        preset=f"speech-demo@v{version}",
    )
    return apply_overrides(cfg, overrides or [])


def run_demo(
    out_dir: str | Path = "data2vec-demo",
    version: int = 2,
    steps: int | None = None,
    overrides: list[str] | None = None,
    progress: bool = True,
    quiet: bool = False,
    spec: SynthSpec | None = None,
    cache_dir: Path | None = None,
) -> DemoResult:
    t0 = time.perf_counter()
    out = Path(out_dir)
    spec = spec or SynthSpec()
    corpus = synthesize(spec, cache_dir, quiet=quiet)
    t_synth = time.perf_counter() - t0
    cfg = demo_config(corpus, version, steps or DEMO_STEPS, overrides)

    random_model = initial_model(cfg)
    result = train(cfg, out, progress=progress, quiet=quiet)
    model = result.model.cpu().float()

    wav, labels, is_train = probe_set(corpus, seed=cfg.train.seed)
    tr, te = np.flatnonzero(is_train), np.flatnonzero(~is_train)
    layers = min(DEMO_LAYERS, cfg.model.encoder.depth)
    features = {
        "pretrained": layer_features(model, wav)[:, -layers:].mean(1),
        "random_init": layer_features(random_model, wav)[:, -layers:].mean(1),
        "log_mel": log_mel(wav).mean(1),
    }
    acc = probe_accuracies(features, labels, tr, te)
    seconds = time.perf_counter() - t0
    report = {
        **{k: round(v, 4) for k, v in acc.items()},
        "steps": result.step,
        "probe_train_clips": len(tr),
        "probe_test_clips": len(te),
        "words": len(COMMANDS),
        "pooled_layers": layers,
        "corpus": str(corpus),
        "synthesis_seconds": round(t_synth, 1),
        "total_seconds": round(seconds, 1),
    }
    (out / "probe.json").write_text(json.dumps(report, indent=2) + "\n")
    return DemoResult(
        "audio",
        acc["pretrained"],
        acc["random_init"],
        acc["log_mel"],
        "log-mel (80 bands, time average)",
        f"{len(COMMANDS)} spoken words in noise, held-out voices (train {len(tr)} / test {len(te)})",
        result.step,
        out,
        seconds,
    )
