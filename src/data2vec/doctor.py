"""`data2vec doctor`: what a bug report needs to know about this installation, then a short
self-test on a device.

The report: the versions of the package, Python, torch, CUDA and cuDNN, the optional extras
present, the devices, whether they multiply bf16 in hardware (AMX / AVX512-BF16 on a CPU) and
what `train.precision=auto` picks, and torch's thread count.

The self-test pretrains the smallest model of each modality (`data2vec.tiny`) for a few steps
with data2vec 1.0 and 2.0 through the public training API, on real inputs made on the spot (the
built-in digits, synthetic tones written as WAV files, a generated text corpus), and checks:
- the device in fp32 against the CPU in fp32, step by step (on the CPU itself: that two runs are
  bit-identical, i.e. reproducible);
- the device in bf16 autocast against the CPU in fp32 (within bf16's precision);
- the checkpoint the run wrote: it verifies and holds exactly the weights the run ended with.
Each check prints one line; the command exits 1 when any check fails.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from data2vec.checkpoint import list_checkpoints, load_checkpoint
from data2vec.tiny import tiny_config
from data2vec.training import train
from data2vec.training.devices import native_bf16, resolve_device, resolve_precision

EXTRAS = ("transformers", "pyarrow", "tensorboard", "safetensors", "tokenizers", "soundfile", "soxr", "scikit-learn")
"""Packages whose versions the report lists (the optional extras and the file-format libraries)."""
STEPS = 3
FP32_RTOL = 1e-2
"""fp32 on another device against the CPU: kernels differ (reduction order, TF32 convolutions)."""
BF16_RTOL = 0.03
"""bf16 autocast against fp32: 8 bits of mantissa, over a few steps of a randomly initialised model
(measured on a CPU: at most 1.3e-3)."""
MODALITIES = ("image", "audio", "text")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'}  {self.name}: {self.detail}"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cudnn() -> str:
    cudnn: Any = torch.backends.cudnn
    return str(cudnn.version()) if cudnn.is_available() else "not available"


def report() -> list[tuple[str, str]]:
    """(what, value) lines describing this installation."""
    cpu = torch.device("cpu")
    lines = [
        ("data2vec", _version("data2vec")),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", platform.platform()),
        ("torch", torch.__version__),
        ("cuda (torch built with)", str(torch.version.cuda)),
        ("cudnn", _cudnn()),
    ]
    lines += [(f"extra: {name}", _version(name)) for name in EXTRAS]
    lines += [
        ("cpu", f"{cpu_name()}, {torch.get_num_threads()} torch threads, {torch.backends.cpu.get_cpu_capability()}"),
        (
            "cpu bf16 matrix units",
            f"AMX {'yes' if torch.cpu._is_amx_tile_supported() else 'no'}, AVX512-BF16 "
            f"{'yes' if torch.cpu._is_avx512_bf16_supported() else 'no'}; precision=auto picks "
            f"{resolve_precision(cpu, 'auto')}",
        ),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(
                (
                    f"cuda:{i}",
                    f"{p.name}, {p.total_memory / 2**30:.0f} GiB, compute {p.major}.{p.minor}, bf16 "
                    f"{'yes' if native_bf16('cuda') else 'no'}",
                )
            )
    else:
        lines.append(("cuda", "no CUDA device"))
    return lines


def write_inputs(work: Path) -> dict[str, str]:
    """Real files of each modality: the built-in digits, six synthetic tones as 16 kHz WAV, a
    generated corpus."""
    wavs = work / "wavs"
    wavs.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        t = np.arange(8000 + 1000 * i) / 16_000
        wav = 0.5 * np.sin(2 * np.pi * (150 + 30 * i) * t) + 0.05 * rng.standard_normal(len(t))
        sf.write(wavs / f"tone{i}.wav", wav.astype(np.float32), 16_000)
    corpus = work / "corpus.txt"
    words = ["the", "model", "learns", "from", "masked", "views", "of", "its", "own", "teacher", "and", "data"]
    corpus.write_text(
        "".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(6 + i % 9)) + "\n" for i in range(150))
    )
    return {"image": "builtin:digits:train", "audio": str(wavs), "text": str(corpus)}


def run_overrides(modality: str, data: str) -> list[str]:
    """The self-test's run settings on `data` (a `write_inputs` entry): STEPS steps, a checkpoint
    at the end, every step logged, no collapse stop, a small batch and vocabulary."""
    run = [
        f"data.path={data}",
        f"train.steps={STEPS}",
        f"train.ckpt_every={STEPS}",
        "train.log_every=1",
        "train.min_target_std=0",
        "train.min_pred_std=0",
        "data.num_workers=0",
        "optim.warmup_steps=1",
    ]
    if modality == "text":
        run += ["data.text.vocab_size=300", "data.batch_size=4"]
    elif modality == "image":
        run += ["data.batch_size=8"]
    return run


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def max_rel(a: list[float], b: list[float]) -> float:
    """The largest relative difference of `a` from `b`, step by step (inf when their lengths
    differ or a value is not finite)."""
    if len(a) != len(b) or not all(math.isfinite(x) for x in [*a, *b]):
        return math.inf
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def self_test(
    device: str = "auto",
    work: Path | None = None,
    echo: Callable[[str], None] = print,
    modalities: tuple[str, ...] = MODALITIES,
) -> list[Check]:
    """The checks on `device` (auto: CUDA when there is one); each is echoed as it ends."""
    dev = resolve_device(device)
    checks: list[Check] = []

    def add(check: Check) -> None:
        checks.append(check)
        echo(check.line())

    with tempfile.TemporaryDirectory(prefix="data2vec-doctor-") as tmp:
        root = Path(work or tmp)
        data = write_inputs(root)
        for modality in modalities:
            for version in (1, 2):
                what = f"{modality} {version}.0"
                try:
                    _check_run(root, modality, version, data[modality], dev, add)
                except Exception as e:  # a check that crashes is a failed check, reported on its line
                    add(Check(what, False, f"{type(e).__name__}: {e}"))
    return checks


def _train(root: Path, modality: str, version: int, data: str, device: str, precision: str) -> tuple[Path, Any]:
    """A few steps of the tiny model; (its run directory, the model it ended with)."""
    cfg = tiny_config(
        modality, version, *run_overrides(modality, data), f"train.device={device}", f"train.precision={precision}"
    )
    out = root / f"{modality}-v{version}-{device.replace(':', '')}-{precision}-{len(list(root.iterdir()))}"
    return out, train(cfg, out, progress=False, quiet=True).model


def _check_run(
    root: Path, modality: str, version: int, data: str, dev: torch.device, add: Callable[[Check], None]
) -> None:
    """The checks of one modality and version."""
    what, t0 = f"{modality} {version}.0", time.perf_counter()
    ref_dir, ref_model = _train(root, modality, version, data, "cpu", "fp32")
    ref = _losses(ref_dir)
    if dev.type == "cpu":
        again = _losses(_train(root, modality, version, data, "cpu", "fp32")[0])
        same = "bit-identical" if again == ref else "DIFFERENT"
        add(Check(f"{what} cpu fp32", again == ref, f"two runs {same} over {STEPS} steps {fmt_losses(ref)}"))
    else:
        got = _losses(_train(root, modality, version, data, str(dev), "fp32")[0])
        add(_close(f"{what} {dev} fp32", got, ref, FP32_RTOL, ""))
    half = _losses(_train(root, modality, version, data, str(dev), "bf16")[0])
    emulated = "" if native_bf16(dev.type) else "; this device emulates bf16 (slow): auto picks fp32"
    add(_close(f"{what} {dev} bf16", half, ref, BF16_RTOL, emulated))
    add(_checkpoint_check(what, ref_dir, ref_model, time.perf_counter() - t0))


def _close(name: str, got: list[float], ref: list[float], rtol: float, note: str) -> Check:
    rel = max_rel(got, ref)
    detail = f"losses {fmt_losses(got)} vs cpu fp32 {fmt_losses(ref)}: max rel diff {rel:.1e} (limit {rtol:g}){note}"
    return Check(name, rel <= rtol, detail)


def _checkpoint_check(what: str, run_dir: Path, model: torch.nn.Module, seconds: float) -> Check:
    """The run's last checkpoint verifies and holds the weights the run ended with."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return Check(f"{what} checkpoint", False, f"no checkpoint in {run_dir}")
    ck = load_checkpoint(ckpts[-1])  # checks every file's SHA-256
    live = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    saved = {**ck.student, **ck.teacher}
    same = ck.step == STEPS and saved.keys() == live.keys() and all(torch.equal(saved[k], live[k]) for k in saved)
    return Check(
        f"{what} checkpoint",
        same,
        f"step {ck.step} verifies and {'holds' if same else 'does NOT hold'} the {len(saved)} tensors the run ended "
        f"with ({seconds:.1f} s for this modality and version)",
    )


def fmt_losses(losses: list[float]) -> str:
    """[0.1234, 0.1200, ...]"""
    return "[" + ", ".join(f"{x:.4f}" for x in losses) + "]"


def main(
    device: str = "auto",
    self_check: bool = True,
    echo: Callable[[str], None] = print,
    modalities: tuple[str, ...] = MODALITIES,
) -> int:
    """Print the report and run the self-test; 0 when every check passed, else 1."""
    for what, value in report():
        echo(f"{what:24s} {value}")
    if not self_check:
        return 0
    echo("")
    t0 = time.perf_counter()
    checks = self_test(device, echo=echo, modalities=modalities)
    failed = [c for c in checks if not c.ok]
    echo(
        f"\n{len(checks) - len(failed)} of {len(checks)} checks passed in {time.perf_counter() - t0:.0f} s"
        + (f"; FAILED: {', '.join(c.name for c in failed)}" if failed else "")
    )
    return 1 if failed else 0
