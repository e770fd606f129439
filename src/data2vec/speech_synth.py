"""eSpeak NG synthesis for the speech demo, run as a script in a fresh process.

    python speech_synth.py DIR      # reads DIR/plan.json.in, writes the wav files under DIR

It imports only numpy, soundfile, soxr and espeakng-loader (no torch, nothing from this
package), so the subprocess starts quickly. Determinism: a fresh process, the jobs in their
fixed order, and `espeak_ng_SetRandSeed(job index)` before each utterance.
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16_000


class _Espeak:
    """The few eSpeak NG calls the demo needs, via ctypes on the library espeakng-loader ships."""

    SYNCHRONOUS = 2
    DONT_EXIT = 0x8000
    RATE, PITCH = 1, 3

    def __init__(self) -> None:
        import espeakng_loader

        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self.lib = lib
        self.rate = lib.espeak_Initialize(self.SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), self.DONT_EXIT)
        if self.rate <= 0:
            raise RuntimeError("eSpeak NG failed to initialise")
        self._chunks: list[np.ndarray] = []
        callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
        self._callback = callback_type(self._collect)  # keep a reference: the library calls it
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav: Any, n: int, events: Any) -> int:
        if n > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def speak(self, text: str, voice: str, variant: str, pitch: int, rate: int, seed: int) -> np.ndarray:
        """int16 samples at `self.rate` Hz."""
        name = f"{voice}+{variant}".encode()
        if self.lib.espeak_SetVoiceByName(name) != 0:
            raise RuntimeError(f"eSpeak NG has no voice {name.decode()!r}")
        self.lib.espeak_SetParameter(self.RATE, rate, 0)
        self.lib.espeak_SetParameter(self.PITCH, pitch, 0)
        self.lib.espeak_ng_SetRandSeed(seed)
        self._chunks = []
        data = text.encode() + b"\0"
        if self.lib.espeak_Synth(data, len(data), 0, 0, 0, 0, None, None) != 0:
            raise RuntimeError(f"eSpeak NG could not synthesise {text!r}")
        self.lib.espeak_Synchronize()
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.int16)


def _trim(wav: np.ndarray, rel: float = 0.02) -> np.ndarray:
    """Drop leading and trailing near-silence."""
    loud = np.flatnonzero(np.abs(wav) > rel * max(float(np.abs(wav).max()), 1e-9))
    return wav[loud[0] : loud[-1] + 1] if len(loud) else wav


def add_noise(wav: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """wav plus a random mix of white and brown noise at `snr_db` (relative to wav's mean power)."""
    n = len(wav)
    white = rng.standard_normal(n)
    brown = np.cumsum(rng.standard_normal(n))
    brown = (brown - brown.mean()) / (brown.std() + 1e-9)
    mix = rng.uniform(0, 1)
    noise = mix * white + (1 - mix) * brown
    power = float(np.mean(wav.astype(np.float64) ** 2)) + 1e-12
    noise *= np.sqrt(power / 10 ** (snr_db / 10) / np.mean(noise**2))
    out: np.ndarray = wav + noise
    return out


def _synthesize_all(plan: dict[str, Any], out: Path) -> None:
    """Runs in a fresh process: every job in order, each after SetRandSeed(its index)."""
    import soxr

    tts = _Espeak()
    for i, job in enumerate(plan["jobs"]):
        pcm = tts.speak(job["text"], job["voice"], job["variant"], job["pitch"], job["rate"], seed=i)
        wav = pcm.astype(np.float32) / 32768.0
        if job.get("trim"):
            wav = _trim(wav)
        wav = soxr.resample(wav, tts.rate, SAMPLE_RATE)
        if "snr" in job:
            wav = add_noise(wav, job["snr"], np.random.default_rng(i))
            wav = (0.5 * wav / max(float(np.abs(wav).max()), 1e-9)).astype(np.float32)
        path = out / job["file"]
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, wav, SAMPLE_RATE, subtype="PCM_16")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python speech_synth.py DIR", file=sys.stderr)
        return 2
    out = Path(args[0])
    _synthesize_all(json.loads((out / "plan.json.in").read_text()), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
