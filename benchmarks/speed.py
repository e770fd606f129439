r"""Pretraining and feature-extraction throughput: this library against the transformers peer.

The peer is the data2vec 1.0 step a user would write today on transformers' Data2Vec*Model: an EMA
teacher on the full input (top-K hidden states, instance-normed, averaged), the student with
`bool_masked_pos` (vision), `mask_time_indices` (audio) or masked input ids (text), a linear head,
smooth-L1 (vision) or L2 loss at masked positions, AdamW and a foreach EMA. Both start from
identical weights (`save_hf`) and use the same masks. Our steps: 1.0 and 2.0 (mask 0.8, one mask
per sample), eager and with `train.compile` (torch.compile of every Transformer block; the compile
runs in the warm-up steps, outside the timing). Every step, ours and the peer's, runs in fp32 and
in bf16 autocast (or in those of `--precisions`), and every ratio compares equal precision (ours
bf16 / peer bf16, ours fp32 / peer fp32). FLOPs are counted with torch's FlopCounterMode for one
eager step and divided by the median step time; each row's FLOP/s is given against the measured
matmul peak of its own dtype (a square matmul, 2048 on a CPU, 8192 on CUDA, timed in each precision
run, in the same run). On CUDA the steps are timed between `torch.cuda.synchronize` calls, the
batches are larger (a GPU-sized batch, not a CPU-sized one), and the bf16 FLOP/s are also given
against a nominal peak (`--peak-tflops`, default the H200's dense bf16 989 TFLOP/s), i.e. the MFU.

Data rows (unless `--no-data`): our 2.0 step, in the first of `--precisions` (bf16 by default), fed
by the library's own pretraining loaders (`build_pretrain_loader`, the preset's data workers) from
the real data in ../shared/data (CIFAR-10 tar shards, FSDD wav, SST-2 text), against the same step
on synthetic tensors of the same shapes with the same masks; the ratio is real / synthetic steps
per second, over `--data-steps` steps each (mean, so loader stalls count). A targets table ends the
report.

`--precisions` (default `bf16,fp32`) picks the precisions timed, for ours and the peer alike (train
steps, extraction, compiled rows, and the matmul peaks); the data rows run in the first one listed.
A target in a precision the run skipped reads "not measured (bf16 not run)". On a CPU without bf16
hardware (no AMX / AVX512-BF16; `data2vec doctor` reports it) bf16 matmuls are emulated, tens of
times slower than fp32, so run `--precisions fp32`, e.g.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/speed.py --sizes base --threads 1 --steps 5 \
        --data-steps 20 --precisions fp32 --no-compile --out benchmarks/results/speed

    python benchmarks/speed.py [--device cpu|cuda] [--quick | --sizes small,base] [--modalities image,audio,text]
        [--precisions bf16,fp32] [--no-compile] [--threads 2] [--steps 5] [--peak-tflops 989] [--no-data]
        [--data-steps 20] [--data-dir ../shared/data] [--out benchmarks/results/speed]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import write_report
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

from data2vec.config import RunConfig, apply_overrides
from data2vec.data.pipeline import build_pretrain_loader, pipeline_for
from data2vec.doctor import cpu_name
from data2vec.interop.hf import forward_like_hf, save_hf
from data2vec.modalities.audio import conv_output_length
from data2vec.model import Batch, Data2Vec
from data2vec.presets import preset
from data2vec.tiny import tiny_config
from data2vec.training import build_optimizer
from data2vec.training.objectives import next_batch, to_device

MODALITIES = ("image", "audio", "text")
PRECISIONS = ("fp32", "bf16")
"""Every precision the script can time, in the order its rows are listed."""
FLOP_GOALS = {"image": 0.50, "text": 0.50, "audio": 0.30}
"""Targets: achieved bf16 FLOP/s of our base train steps (1.0 and 2.0) over the measured bf16 peak."""
V1_GOAL = 1.5
"""Target: our 1.0 step over the peer's 1.0 step, both in bf16."""
V2_GOALS = {"image": 4.0, "text": 3.0, "audio": 2.5}
"""Targets: our 2.0 step (mask 0.8) over the peer's 1.0 step, both in bf16."""
EXTRACT_GOALS = {"bf16": 1.5, "fp32": 1.1}
"""Targets: our feature extraction over transformers' with the same weights, equal precision."""
DATA_GOAL = 0.95
"""Target: steps per second fed by the real loaders over steps per second on synthetic tensors."""
DATA_VERSION = 2
"""The step the data rows time: our fastest, so that a slow loader shows most (in the first of
`--precisions`)."""
H200_BF16_TFLOPS = 989.0
"""NVIDIA's dense bf16 tensor-core peak of the H200 (SXM), the default nominal peak on CUDA."""
CPU = torch.device("cpu")
PEAK_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
# (modality, size, batch, length): length = samples (audio) or tokens (text)
TINY_CASES = [("image", "tiny", 8, 0), ("audio", "tiny", 2, 8_000), ("text", "tiny", 4, 30)]
"""The smallest models (`data2vec.tiny`), to exercise the script in seconds (benchmarks/gpu_check.py's
CPU fallback), not to measure anything."""
CASES = {
    "cpu": {
        "tiny": TINY_CASES,
        "small": [("image", "small", 16, 0), ("audio", "small", 4, 16_000), ("text", "small", 8, 128)],
        "base": [("image", "base", 8, 0), ("audio", "base", 2, 160_000), ("text", "base", 4, 512)],
    },
    "cuda": {
        "tiny": TINY_CASES,
        "small": [("image", "small", 256, 0), ("audio", "small", 32, 16_000), ("text", "small", 64, 128)],
        "base": [("image", "base", 64, 0), ("audio", "base", 8, 160_000), ("text", "base", 32, 512)],
    },
}


def amp(precision: str, device: torch.device = CPU) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; a CPU needs no wait)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, device: torch.device = CPU, n: int | None = None, reps: int = 5) -> float:
    """FLOP/s of the fastest of `reps` timings of a square matmul (on CUDA, 10 back to back per timing)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    inner = 10 if device.type == "cuda" else 1
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync(device)
        times.append((time.perf_counter() - t0) / inner)
    return 2 * n**3 / min(times)


def timed(fn: Callable[[], None], steps: int, warmup: int = 2, device: torch.device = CPU) -> float:
    """Median seconds of `fn` over `steps` calls after `warmup` calls (which absorb any compile)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def count_flops(fn: Callable[[], None]) -> float:
    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


# ---------------------------------------------------------------------- cases


def case_config(modality: str, size: str, version: int, quick_dims: bool) -> RunConfig:
    """The preset of a case (size small: the -tiny presets, image 32x32; base: the -base presets;
    tiny: `data2vec.tiny`), dropout off; data2vec 2.0 with one mask per sample."""
    name = f"{modality}-{'tiny' if size == 'small' else 'base'}"
    sets = ["model.encoder.dropout=0.0", "model.encoder.attn_dropout=0.0", "model.encoder.activation_dropout=0.0"]
    sets += ["model.encoder.drop_path=0.0", "model.encoder.layerdrop=0.0"]
    if modality == "image" and size == "small":
        sets += ["model.image.image_size=[32,32]", "model.image.patch_size=4"]
    if version == 2:
        sets += ["masking.num_masks=1", "masking.mask_prob=0.8"]
    if modality == "text":
        sets += ["model.text.embed_dropout=0.0"]
    if size == "tiny":
        return tiny_config(modality, version, *sets)
    return apply_overrides(preset(name, version), sets)


def make_input(cfg: RunConfig, batch: int, length: int) -> torch.Tensor:
    m = cfg.model
    if m.modality == "image":
        h, w = m.image.image_size
        return torch.randn(batch, m.image.channels, h, w)
    if m.modality == "audio":
        return torch.randn(batch, length)
    ids = torch.randint(4, m.text.vocab_size - 1, (batch, length))
    ids[:, 0] = m.text.bos_id
    return ids


def our_batch(model: Data2Vec, x: torch.Tensor, g: torch.Generator) -> Batch:
    m = model.cfg
    if m.modality == "text":
        drawn = model.frontend.input_masks(x, model.masking, g)
        assert drawn is not None
        return Batch(x, drawn[0], None, drawn[1])
    if m.modality == "audio":
        frames = conv_output_length(x.shape[1], m.audio.conv_layers)
        return Batch(x, model.draw_masks(x.shape[0], g, (1, frames)))
    return Batch(x, model.draw_masks(x.shape[0], g))


def on(batch: Batch, device: torch.device) -> Batch:
    """The batch's tensors on `device`."""
    return Batch._make(None if t is None else t.to(device) for t in batch)


def our_step(model: Data2Vec, batch: Batch, precision: str) -> Callable[[], None]:
    """One training step of `model` on `batch`, called again and again."""
    step = our_step_on(model, precision, batch.inputs.device)
    return lambda: step(batch)


def our_step_on(model: Data2Vec, precision: str, device: torch.device) -> Callable[[Batch], None]:
    """Our training step (forward under autocast, backward, AdamW, EMA) on whatever batch it is given."""
    opt = build_optimizer(model, model_cfg_optim())

    def step(batch: Batch) -> None:
        with record_function("forward"), amp(precision, device):
            out = model(batch)
        with record_function("backward"):
            out.loss.backward()
        with record_function("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        with record_function("ema"):
            model.update_teacher(0.999)

    return step


def model_cfg_optim() -> Any:
    return RunConfig().optim


def hf_model(model: Data2Vec, folder: Path) -> torch.nn.Module:
    import transformers

    save_hf(model, folder)
    cls = {"image": "Data2VecVisionModel", "audio": "Data2VecAudioModel", "text": "Data2VecTextModel"}
    kwargs: dict[str, Any] = {"attn_implementation": "sdpa"}
    if model.cfg.modality == "image":
        kwargs["use_mask_token"] = True
    if model.cfg.modality == "audio":
        kwargs["mask_time_prob"] = 0.05  # so the model holds masked_spec_embed
    hf: torch.nn.Module = getattr(transformers, cls[model.cfg.modality]).from_pretrained(str(folder), **kwargs)
    return hf


def peer_step(hf: torch.nn.Module, model: Data2Vec, batch: Batch, precision: str, top_k: int) -> Callable[[], None]:
    """The data2vec 1.0 step on transformers' model."""
    device = batch.inputs.device
    student = hf.to(device).train()
    teacher = copy.deepcopy(hf).eval().requires_grad_(False)
    dim = model.cfg.encoder.dim
    head = torch.nn.Linear(dim, dim, device=device)
    params = [*student.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    modality = model.cfg.modality
    prefix = 1 if modality == "image" else 0
    mask = batch.mask
    assert mask is not None

    def run(module: torch.nn.Module, student_side: bool) -> Any:
        if modality == "image":
            return module(
                pixel_values=batch.inputs, bool_masked_pos=mask if student_side else None, output_hidden_states=True
            )
        if modality == "audio":
            return module(batch.inputs, mask_time_indices=mask if student_side else None, output_hidden_states=True)
        ids = batch.student_inputs if student_side else batch.inputs
        return module(input_ids=ids, output_hidden_states=True)

    def step() -> None:
        with record_function("forward"), amp(precision, device):
            with torch.no_grad():
                hs = run(teacher, False).hidden_states[-top_k:]
                layers = [F.instance_norm(h[:, prefix:].float().transpose(1, 2)).transpose(1, 2) for h in hs]
                y = sum(layers) / len(layers)
            out = run(student, True).last_hidden_state[:, prefix:]
            pred = head(out[mask]).float()
            target = y[mask]
            is_image = modality == "image"
            loss = F.smooth_l1_loss(pred, target, beta=2.0) if is_image else F.mse_loss(pred, target)
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        with record_function("ema"), torch.no_grad():
            t = list(teacher.parameters())
            torch._foreach_lerp_(t, [p.detach() for p in student.parameters()], 0.001)

    return step


def pretrain_rows(
    modality: str,
    size: str,
    batch: int,
    length: int,
    steps: int,
    compile_too: bool,
    device: torch.device = CPU,
    precisions: Sequence[str] = PRECISIONS,
) -> list[dict[str, Any]]:
    """Our 1.0 and 2.0 steps (eager and, with `compile_too`, compiled) and the peer's 1.0 step, each
    in every one of `precisions` (fp32, bf16 autocast), on the same batch and masks."""
    rows = []
    for version in (1, 2):
        cfg = case_config(modality, size, version, True)
        for precision in ordered(precisions):
            for compiled in (False, True) if compile_too else (False,):
                torch.manual_seed(0)
                model = Data2Vec.from_config(cfg).train()
                x = make_input(cfg, batch, length)
                b = on(our_batch(model, x, torch.Generator().manual_seed(0)), device)
                model.to(device)
                if compiled:  # counted on an eager copy: the counter cannot see inside a compiled graph
                    flops = count_flops(our_step(copy.deepcopy(model), b, precision))
                    model.compile_blocks()
                step = our_step(model, b, precision)
                sec = timed(step, steps, warmup=3 if compiled else 2, device=device)
                if not compiled:
                    flops = count_flops(step)
                who = "ours+compile" if compiled else "ours"
                rows.append(_row(who, version, precision, modality, size, batch, sec, flops))
                print(f"  {who} {version}.0 {precision}: {1000 * sec:.0f} ms/step", flush=True)
            if version == 1:  # the peer's 1.0 step on the same batch and masks, same precision
                with tempfile.TemporaryDirectory() as d:
                    torch.manual_seed(0)
                    fresh = Data2Vec.from_config(cfg)
                    hf = hf_model(fresh, Path(d))
                    pstep = peer_step(hf, fresh, b, precision, cfg.targets.top_k)
                    psec = timed(pstep, steps, device=device)
                    rows.append(_row("peer", 1, precision, modality, size, batch, psec, count_flops(pstep)))
                    print(f"  peer 1.0 {precision}: {1000 * psec:.0f} ms/step", flush=True)
                    del hf, pstep
    return rows


def _row(
    who: str, version: int, precision: str, modality: str, size: str, batch: int, sec: float, flops: float
) -> dict[str, Any]:
    return {
        "who": who,
        "mode": f"{version}.0",
        "precision": precision,
        "case": f"{modality} {size}",
        "batch": batch,
        "sec_per_step": sec,
        "samples_per_sec": batch / sec,
        "flops_per_step": flops,
        "flops_per_sec": flops / sec,
    }


def extract_rows(
    modality: str,
    size: str,
    batch: int,
    length: int,
    steps: int,
    compile_too: bool,
    device: torch.device = CPU,
    precisions: Sequence[str] = PRECISIONS,
) -> list[dict[str, Any]]:
    cfg = case_config(modality, size, 1, True)
    torch.manual_seed(0)
    model = Data2Vec.from_config(cfg).eval()
    compiled = copy.deepcopy(model).to(device) if compile_too else None
    if compiled is not None:
        compiled.compile_blocks()
    x = make_input(cfg, batch, length).to(device)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        hf = hf_model(model, Path(d)).to(device).eval()
        model.to(device)
        for precision in ordered(precisions):

            def ours(precision: str = precision, m: Data2Vec = model) -> None:
                with torch.inference_mode(), amp(precision, device):
                    m.encode(x)

            def theirs(precision: str = precision) -> None:
                with torch.inference_mode(), amp(precision, device):
                    hf(x, output_hidden_states=True)

            with torch.inference_mode(), amp(precision, device):
                a = forward_like_hf(model, x).last_hidden_state.float()
                b = hf(x).last_hidden_state.float()
            rel = float((a - b).norm() / b.norm())
            t_ours, t_theirs = timed(ours, steps, device=device), timed(theirs, steps, device=device)
            row = {
                "case": f"{modality} {size}",
                "precision": precision,
                "batch": batch,
                "ours_samples_per_sec": batch / t_ours,
                "transformers_samples_per_sec": batch / t_theirs,
                "ratio": t_theirs / t_ours,
                "rel_diff": rel,
            }
            if compiled is not None:
                with torch.inference_mode(), amp(precision, device):
                    c = compiled.encode(x).x.float()
                    e = model.encode(x).x.float()
                t_comp = timed(lambda p=precision, m=compiled: ours(p, m), steps, warmup=3, device=device)
                row |= {
                    "compiled_samples_per_sec": batch / t_comp,
                    "compiled_ratio": t_theirs / t_comp,
                    "compiled_rel_diff": float((c - e).norm() / e.norm()),
                }
            rows.append(row)
            print(f"  extract {precision}: {row}", flush=True)
    return rows


# ---------------------------------------------------------------------- data pipeline


def default_data_dir() -> Path:
    """The shared real data: $DATA2VEC_SHARED_DATA, else `shared/data` in the first folder above this
    script that has one (a checkout beside `shared/`), else /work/shared/data."""
    if os.environ.get("DATA2VEC_SHARED_DATA"):
        return Path(os.environ["DATA2VEC_SHARED_DATA"])
    for parent in Path(__file__).resolve().parents:
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    return Path("/work/shared/data")


DATA_PATHS = {"image": "cifar10/train-*.tar", "audio": "fsdd/recordings", "text": "sst2/train.tsv"}
"""Each modality's real pretraining data under the data folder."""


def data_config(modality: str, size: str, batch: int, length: int, data_dir: Path) -> RunConfig:
    """The case's 2.0 config reading real data with the preset's loader settings (data workers
    included): images from the CIFAR-10 shards, `batch` per step; speech from FSDD (clips of
    0.15-2.3 s, resampled to 16 kHz), batches of `batch` x `length` samples' worth of seconds,
    each cropped to its shortest clip as the preset does; text from SST-2's sentences, packed
    into `batch` blocks of `length` tokens by a tokenizer trained on them."""
    cfg = case_config(modality, size, DATA_VERSION, True)
    data = replace(cfg.data, path=str(data_dir / DATA_PATHS[modality]), batch_size=batch)
    if modality == "audio":
        seconds = batch * length / data.audio.sample_rate
        data = replace(data, audio=replace(data.audio, batch_seconds=seconds, min_sample_size=2_000, max_batch_size=0))
    if modality == "text":
        data = replace(data, text=replace(data.text, block_size=length, tsv_column="sentence"))
    return replace(cfg, data=data)


def synthetic(b: Batch, cfg: RunConfig, g: torch.Generator) -> Batch:
    """A batch of random inputs shaped like `b`, with its masks (so the step does the same work)."""
    if cfg.model.modality == "text":
        ids = torch.randint(4, cfg.model.text.vocab_size - 1, b.inputs.shape, generator=g)
        student = None if b.student_inputs is None else torch.where(b.student_inputs == b.inputs, ids, b.student_inputs)
        return Batch(ids, b.mask, b.padding_mask, student)
    return Batch(torch.randn(b.inputs.shape, generator=g), b.mask, b.padding_mask, b.student_inputs)


def data_rows(
    modality: str,
    size: str,
    batch: int,
    length: int,
    steps: int,
    data_dir: Path,
    device: torch.device = CPU,
    precision: str = "bf16",
) -> list[dict[str, Any]]:
    """Our 2.0 step in `precision` fed by the library's loader from real data (`steps` steps after one
    warm-up, which starts the workers), then the same step on synthetic copies of those batches
    (random inputs, same shapes, same masks, moved to the device each step as the loader's are)."""
    version = DATA_VERSION
    with tempfile.TemporaryDirectory(prefix="data2vec-speed-") as d:
        cfg = data_config(modality, size, batch, length, data_dir)
        cfg = pipeline_for(cfg).prepare(cfg, Path(d))  # text: the tokenizer and the tokenised corpus
        torch.manual_seed(0)
        model = Data2Vec.from_config(cfg).train().to(device)
        step = our_step_on(model, precision, device)
        loader, samples = build_pretrain_loader(cfg, 0)
        skipped: list[str] = []
        seen: list[Batch] = []
        shapes: list[tuple[int, ...]] = []

        def real() -> None:
            raw = next_batch(loader, skipped, cfg.data.on_bad_input)
            b = Batch(raw.inputs, raw.mask, raw.padding_mask, raw.student_inputs)
            seen.append(b)
            shapes.append(tuple(b.inputs.shape))
            step(to_device(raw, device))

        real()  # warm-up: the workers start and the first batch is built
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            real()
        sync(device)
        t_real = time.perf_counter() - t0
        loader = iter(())  # the workers go now, before the synthetic steps are timed
        g = torch.Generator().manual_seed(0)
        fake = [synthetic(b, cfg, g) for b in seen]
        step(on(fake[0], device))  # the same warm-up
        sync(device)
        t0 = time.perf_counter()
        for b in fake[1:]:
            step(on(b, device))
        sync(device)
        t_fake = time.perf_counter() - t0
    real_rate, fake_rate = steps / t_real, steps / t_fake
    row = {
        "case": f"{modality} {size}",
        "mode": f"{version}.0",
        "precision": precision,
        "data": cfg.data.path,
        "num_workers": cfg.data.num_workers,
        "dataset_samples": samples,
        "steps": steps,
        "batch_shapes": sorted({str(list(s)) for s in shapes}),
        "real_steps_per_sec": real_rate,
        "synthetic_steps_per_sec": fake_rate,
        "ratio": real_rate / fake_rate,
    }
    shown = f"{len(row['batch_shapes'])} shapes" if len(row["batch_shapes"]) > 3 else ", ".join(row["batch_shapes"])
    print(
        f"  data {version}.0 {precision}: real {real_rate:.3f} steps/s, synthetic {fake_rate:.3f} steps/s "
        f"({row['ratio']:.2f}x; {cfg.data.num_workers} workers; batches {shown})",
        flush=True,
    )
    return [row]


# ---------------------------------------------------------------------- report


# ---------------------------------------------------------------------- profiles

PHASES = ("forward", "backward", "optimizer", "ema")
"""The parts of a train step, each under a `record_function` of that name in both steps."""
OP_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation")),
    ("attention", ("attention", "aten::_softmax", "aten::_softmax_backward_data", "aten::isneginf")),
    ("convolution", ("convolution",)),
    ("casts and copies", ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous")),
    ("norms", ("layer_norm", "group_norm", "instance_norm", "batch_norm")),
    ("gelu", ("gelu",)),
    ("optimizer and EMA kernels", ("aten::_foreach", "aten::lerp", "aten::addcdiv", "aten::addcmul", "aten::sqrt")),
)
"""Self-time buckets of a profiled step, by aten op name (first match wins); the rest is 'other'
(elementwise arithmetic, indexing, reductions, the Python between ops)."""


def op_kind(name: str) -> str:
    for kind, parts in OP_KINDS:
        if any(p in name for p in parts):
            return kind
    return "other"


def profile_step(step: Callable[[], None], device: torch.device = CPU) -> dict[str, Any]:
    """One train step under torch.profiler after two warm-up steps: milliseconds per phase
    (`PHASES`, wall time of each `record_function`) and per op kind (self time of the aten ops,
    `op_kind`), with the step's total. CPU time on a CPU; on CUDA the kernels' device time."""
    step()
    step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        sync(device)
    total = time.perf_counter() - t0
    events = prof.key_averages()
    on_device = device.type == "cuda"
    phases = {e.key: e.cpu_time_total / 1e3 for e in events if e.key in PHASES}
    kinds: dict[str, float] = {}
    for e in events:
        if e.key.startswith("aten::"):
            us = e.self_device_time_total if on_device else e.self_cpu_time_total
            kinds[op_kind(e.key)] = kinds.get(op_kind(e.key), 0.0) + us / 1e3
    return {"total_ms": 1e3 * total, "phases_ms": phases, "kinds_ms": kinds}


def profile_rows(
    modality: str, size: str, batch: int, length: int, precision: str, device: torch.device = CPU
) -> list[dict[str, Any]]:
    """The profile of our 1.0 and 2.0 eager steps and the peer's 1.0 step in `precision`, on the
    same batch and masks as the timed rows (`--profile`)."""
    rows = []
    for version in (1, 2):
        cfg = case_config(modality, size, version, True)
        torch.manual_seed(0)
        model = Data2Vec.from_config(cfg).train()
        b = on(our_batch(model, make_input(cfg, batch, length), torch.Generator().manual_seed(0)), device)
        model.to(device)
        steps = [("ours", our_step(model, b, precision))]
        with tempfile.TemporaryDirectory() as d:
            if version == 1:
                torch.manual_seed(0)
                fresh = Data2Vec.from_config(cfg)
                steps.append(("peer", peer_step(hf_model(fresh, Path(d)), fresh, b, precision, cfg.targets.top_k)))
            for who, step in steps:
                p = profile_step(step, device)
                rows.append(
                    {"case": f"{modality} {size}", "who": who, "mode": f"{version}.0", "precision": precision, **p}
                )
                print(f"  profile {who} {version}.0 {precision}: {p['total_ms']:.0f} ms", flush=True)
    return rows


def profile_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """Two tables: where each profiled step's time goes by phase, and by op kind (share of the
    summed op self time)."""
    kinds = [k for k, _ in OP_KINDS] + ["other"]
    lines = ["", "| profile: phase, ms (share) | " + " | ".join(PHASES) + " | step |"]
    lines += ["|---|" + "---|" * (len(PHASES) + 1)]
    for r in rows:
        t = r["total_ms"]
        cells = [f"{r['phases_ms'].get(p, 0.0):.0f} ({r['phases_ms'].get(p, 0.0) / t:.0%})" for p in PHASES]
        lines.append(f"| {r['case']} {r['who']} {r['mode']} {r['precision']} | " + " | ".join(cells) + f" | {t:.0f} |")
    lines += ["", "| profile: op self time, share | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for r in rows:
        s = sum(r["kinds_ms"].values()) or 1.0
        cells = [f"{r['kinds_ms'].get(k, 0.0) / s:.0%}" for k in kinds]
        lines.append(f"| {r['case']} {r['who']} {r['mode']} {r['precision']} | " + " | ".join(cells) + " |")
    return lines


def ratios(pre: list[dict[str, Any]], ext: list[dict[str, Any]], dat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every ratio at equal precision: our 1.0 and 2.0 steps over the peer's 1.0 step, our
    extraction over transformers', and real-data over synthetic steps."""
    out = []
    for case in sorted({r["case"] for r in pre}):
        rs = {(r["who"], r["mode"], r["precision"]): r["samples_per_sec"] for r in pre if r["case"] == case}
        for precision in PRECISIONS:
            peer = rs.get(("peer", "1.0", precision))
            if peer is None:
                continue
            for mode in ("1.0", "2.0"):
                for who in ("ours", "ours+compile"):
                    if (who, mode, precision) in rs:
                        label = f"{who} {mode} {precision} / peer 1.0 {precision}"
                        out.append({"case": case, "measure": label, "ratio": rs[(who, mode, precision)] / peer})
    for r in ext:
        label = f"extract {r['precision']} / transformers {r['precision']}"
        out.append({"case": r["case"], "measure": label, "ratio": r["ratio"]})
        if "compiled_ratio" in r:
            shown = label.replace("extract", "extract+compile", 1)
            out.append({"case": r["case"], "measure": shown, "ratio": r["compiled_ratio"]})
    for r in dat:
        label = f"real data {r['mode']} {r['precision']} / synthetic {r['mode']} {r['precision']}"
        out.append({"case": r["case"], "measure": label, "ratio": r["ratio"]})
    return out


def targets(result: dict[str, Any], sizes: list[str]) -> list[dict[str, Any]]:
    """The issue's targets, one row per target and case: the base cases always (a case this run
    did not time is 'not measured'), and the ratio targets also for the other sizes timed. A target
    in a precision the run skipped (`--precisions`) is 'not measured (bf16 not run)'; the data
    target is in the precision the data rows ran in (the first of `--precisions`).
    Measured on our eager step ("ours"); the compiled rows are in the ratios table."""
    run = result.get("precisions", list(PRECISIONS))
    found = {(r["case"], r["measure"]): r["ratio"] for r in result["ratios"]}
    fraction = {
        (r["case"], r["mode"]): r["peak_fraction"]
        for r in result["pretrain"]
        if r["who"] == "ours" and r["precision"] == "bf16"
    }
    rows: list[dict[str, Any]] = []

    def add(case: str, target: str, value: float | None, goal: float, unit: str, precision: str) -> None:
        skipped = precision not in run
        if skipped:
            value = None
        met = None if value is None else value >= goal
        row = {"case": case, "target": target, "precision": precision, "value": value, "goal": goal, "unit": unit}
        row["met"] = met
        if skipped:
            row["not_measured"] = f"{precision} not run"
        rows.append(row)

    shown = [s for s in ("tiny", "small", "base") if s in sizes or s == "base"]
    for size in shown:
        for modality in MODALITIES:
            case = f"{modality} {size}"
            if size == "base":
                for mode in ("1.0", "2.0"):
                    add(
                        case,
                        f"ours {mode} bf16 train step FLOP/s / bf16 peak",
                        fraction.get((case, mode)),
                        FLOP_GOALS[modality],
                        "%",
                        "bf16",
                    )
            v1 = found.get((case, "ours 1.0 bf16 / peer 1.0 bf16"))
            add(case, "ours 1.0 / peer 1.0, bf16", v1, V1_GOAL, "x", "bf16")
            add(
                case,
                "ours 2.0 (mask 0.8) / peer 1.0, bf16",
                found.get((case, "ours 2.0 bf16 / peer 1.0 bf16")),
                V2_GOALS[modality],
                "x",
                "bf16",
            )
            for precision in ("bf16", "fp32"):
                label = f"extract {precision} / transformers {precision}"
                add(
                    case,
                    f"extraction / transformers, {precision}",
                    found.get((case, label)),
                    EXTRACT_GOALS[precision],
                    "x",
                    precision,
                )
            v, p = DATA_VERSION, data_precision(run)
            label = f"real data {v}.0 {p} / synthetic {v}.0 {p}"
            target = f"real-data / synthetic steps per second ({v}.0 {p})"
            add(case, target, found.get((case, label)), DATA_GOAL, "x", p)
    return rows


def mfu(result: dict[str, Any], row: dict[str, Any]) -> float | None:
    """A bf16 row's FLOP/s over the nominal bf16 peak (CUDA only; None elsewhere)."""
    nominal = result.get("nominal_bf16_peak")
    return row["flops_per_sec"] / nominal if nominal and row["precision"] == "bf16" else None


def fmt(value: float | None, unit: str, why: str | None = None) -> str:
    if value is None:
        return f"not measured ({why})" if why else "not measured"
    return f"{100 * value:.0f}%" if unit == "%" else f"{value:.2f}x"


def targets_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| target | case | measured | goal | met |", "|---|---|---|---|---|"]
    for r in rows:
        met = "not measured" if r["met"] is None else "met" if r["met"] else "**not met**"
        goal = f">= {fmt(r['goal'], r['unit'])}"
        value = fmt(r["value"], r["unit"], r.get("not_measured"))
        lines.append(f"| {r['target']} | {r['case']} | {value} | {goal} | {met} |")
    return "\n".join(lines) + "\n"


def markdown(result: dict[str, Any]) -> str:
    lines = [header(result)]
    if result.get("command"):
        lines += ["", f"Command: `{result['command']}`"]
    lines += [""]
    lines += ["| measured matmul peak | TFLOP/s |", "|---|---|"]
    lines += [f"| {k} | {v / 1e12:.2f} |" for k, v in result["peak"].items()]
    nominal = result.get("nominal_bf16_peak")
    if nominal:
        lines += [f"| nominal bf16 (MFU below) | {nominal / 1e12:g} |"]
    head = "| case | who | mode | precision | batch | ms/step | samples/s | GFLOP/step | % of its dtype's peak |"
    rule = "|---|---|---|---|---|---|---|---|---|"
    lines += ["", head + (" MFU |" if nominal else ""), rule + ("---|" if nominal else "")]
    for r in result["pretrain"]:
        used = mfu(result, r)
        lines.append(
            f"| {r['case']} | {r['who']} | {r['mode']} | {r['precision']} | {r['batch']} | "
            f"{1000 * r['sec_per_step']:.1f} | {r['samples_per_sec']:.1f} | {r['flops_per_step'] / 1e9:.1f} | "
            f"{100 * r['peak_fraction']:.0f}% |"
            + ("" if not nominal else " - |" if used is None else f" {100 * used:.1f}% |")
        )
    lines += [
        "",
        "| feature extraction | precision | batch | ours samples/s | transformers samples/s | ratio | rel. diff |",
    ]
    lines += ["|---|---|---|---|---|---|---|"]
    for r in result["extract"]:
        lines.append(
            f"| {r['case']} | {r['precision']} | {r['batch']} | {r['ours_samples_per_sec']:.1f} | "
            f"{r['transformers_samples_per_sec']:.1f} | {r['ratio']:.2f}x | {r['rel_diff']:.1e} |"
        )
    if result["data"]:
        lines += [
            "",
            "| data pipeline | step | workers | steps | batch shapes | real steps/s | synthetic steps/s | ratio |",
        ]
        lines += ["|---|---|---|---|---|---|---|---|"]
        for r in result["data"]:
            shapes = r["batch_shapes"]
            shown = f"{len(shapes)} shapes" if len(shapes) > 3 else ", ".join(shapes)
            lines.append(
                f"| {r['case']} | {r['mode']} {r['precision']} | {r['num_workers']} | {r['steps']} | {shown} | "
                f"{r['real_steps_per_sec']:.3f} | {r['synthetic_steps_per_sec']:.3f} | {r['ratio']:.2f}x |"
            )
    elif result.get("data_skipped"):
        lines += ["", f"Data pipeline rows: not measured ({result['data_skipped']})."]
    lines += ["", "| case | measure (equal precision) | ratio |", "|---|---|---|"]
    lines += [f"| {r['case']} | {r['measure']} | {r['ratio']:.2f}x |" for r in result["ratios"]]
    if result.get("profile"):
        lines += profile_markdown(result["profile"])
    lines += ["", "Targets:", "", targets_markdown(result["targets"])]
    return "\n".join(lines)


def header(result: dict[str, Any]) -> str:
    """The report's first line: the machine, threads, torch and the precisions timed."""
    shown = ",".join(result.get("precisions", PRECISIONS))
    return f"Machine: {result['machine']}; {result['threads']} threads; torch {result['torch']}; precisions {shown}"


def ordered(precisions: Sequence[str]) -> list[str]:
    """`precisions` in the order the report lists them (fp32, then bf16)."""
    return [p for p in PRECISIONS if p in precisions]


def data_precision(precisions: Sequence[str]) -> str:
    """The precision the data rows time our 2.0 step in: the first of `--precisions`."""
    return precisions[0]


def parse_precisions(text: str) -> list[str]:
    """`--precisions`' comma list, in its order, once each; ValueError on an unknown or empty list."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in PRECISIONS]
    if unknown or not names:
        raise ValueError(f"--precisions {text!r}: expected a comma list of {', '.join(PRECISIONS)}")
    return list(dict.fromkeys(names))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--quick", action="store_true", help="small cases only (image 32/4, audio 1 s, text 128)")
    ap.add_argument(
        "--sizes",
        default="small,base",
        help="comma-separated case sizes: small (as --quick), base (224/16, 10 s, 512), tiny (width 32, a smoke test)",
    )
    ap.add_argument("--modalities", default="image,audio,text", help="comma-separated modalities to time")
    ap.add_argument(
        "--precisions",
        default="bf16,fp32",
        help="comma-separated precisions timed for ours and the peer: bf16 (autocast), fp32; the data rows "
        "use the first. On a CPU without bf16 hardware (no AMX / AVX512-BF16, see `data2vec doctor`) use fp32",
    )
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per measurement (median)")
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=H200_BF16_TFLOPS,
        help="CUDA: the nominal dense bf16 peak the MFU divides by (default the H200's 989)",
    )
    ap.add_argument(
        "--peak-n", type=int, default=None, help="side of the peak matmul (default 2048 on a CPU, 8192 on CUDA)"
    )
    ap.add_argument(
        "--no-data",
        action="store_true",
        help="skip the data pipeline rows (real loaders vs synthetic tensors), e.g. where the data is absent",
    )
    ap.add_argument(
        "--data-steps", type=int, default=20, help="data rows: timed steps on real data, and as many on synthetic"
    )
    ap.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder holding cifar10/, fsdd/ and sst2/ (default: $DATA2VEC_SHARED_DATA, else ../shared/data)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also profile one step of ours 1.0, 2.0 and the peer per case, in the first of --precisions: "
        "time per phase (forward, backward, optimizer, EMA) and per op kind",
    )
    ap.add_argument(
        "--profile-only",
        action="store_true",
        help="only the profiles (as --profile), no timed rows: for the cases of a run already made",
    )
    ap.add_argument("--out", default="benchmarks/results/speed")
    args = ap.parse_args(argv)
    sizes = ["small"] if args.quick else [s for s in args.sizes.split(",") if s]
    args.size_names = sizes
    modalities = [m for m in args.modalities.split(",") if m]
    if not set(sizes) <= {"tiny", "small", "base"} or not set(modalities) <= {"image", "audio", "text"}:
        ap.error(f"--sizes {args.sizes!r} / --modalities {args.modalities!r}: unknown name")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available")
    try:
        args.precision_names = parse_precisions(args.precisions)
    except ValueError as e:
        ap.error(str(e))
    args.cases = [c for size in sizes for c in CASES[args.device][size] if c[0] in modalities]
    if args.data_steps < 1:
        ap.error("--data-steps must be >= 1")
    args.data_dir = args.data_dir or default_data_dir()
    if not args.no_data:
        missing = sorted({DATA_PATHS[m] for m in modalities if not list(args.data_dir.glob(DATA_PATHS[m]))})
        if missing:
            ap.error(
                f"--data-dir {args.data_dir}: {', '.join(missing)} not found (pass --no-data to skip the data rows)"
            )
    return args


def machine(device: torch.device) -> str:
    """The device timed: the GPU's name on CUDA, else the CPU's model name."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    steps = args.steps or (3 if args.quick else 5)
    precisions = args.precision_names
    command = shlex.join(["python", "benchmarks/speed.py", *(sys.argv[1:] if argv is None else argv)])
    result: dict[str, Any] = {
        "machine": machine(device),
        "device": args.device,
        "threads": args.threads,
        "torch": torch.__version__,
        "command": command,
        "precisions": precisions,
        "data_precision": None if args.no_data else data_precision(precisions),
    }
    print(header(result), flush=True)
    print(f"Command: {command}", flush=True)
    result |= {
        "peak": {dt: matmul_peak(getattr(torch, PEAK_DTYPES[dt]), device, args.peak_n) for dt in ordered(precisions)},
        "nominal_bf16_peak": args.peak_tflops * 1e12 if device.type == "cuda" else None,
        "pretrain": [],
        "extract": [],
        "data": [],
        "data_skipped": "--no-data" if args.no_data else None,
        "profile": [],
    }
    if args.profile_only:
        for modality, size, batch, length in args.cases:
            result["profile"] += profile_rows(modality, size, batch, length, precisions[0], device)
        write(result, ["", f"Command: `{command}`", *profile_markdown(result["profile"])], Path(args.out))
        return
    for modality, size, batch, length in args.cases:
        print(f"pretrain {modality} {size} ...", flush=True)
        compile_too = not args.no_compile
        result["pretrain"] += pretrain_rows(modality, size, batch, length, steps, compile_too, device, precisions)
        print(f"extract {modality} {size} ...", flush=True)
        result["extract"] += extract_rows(modality, size, batch, length, steps, compile_too, device, precisions)
        if args.profile:
            print(f"profile {modality} {size} ...", flush=True)
            result["profile"] += profile_rows(modality, size, batch, length, precisions[0], device)
        if not args.no_data:
            print(f"data {modality} {size} ...", flush=True)
            dp = data_precision(precisions)
            result["data"] += data_rows(modality, size, batch, length, args.data_steps, args.data_dir, device, dp)
    for r in result["pretrain"]:  # against the matmul peak of the row's own dtype
        r["peak_fraction"] = r["flops_per_sec"] / result["peak"][r["precision"]]
    result["ratios"] = ratios(result["pretrain"], result["extract"], result["data"])
    result["targets"] = targets(result, args.size_names)
    write(result, markdown(result).splitlines()[1:], Path(args.out))


def write(result: dict[str, Any], lines: list[str], out: Path) -> None:
    """Print the report (the header line, then `lines`) and write it to OUT.md, the result to OUT.json."""
    write_report(out, "\n".join([header(result), *lines]), result)


if __name__ == "__main__":
    main()
