"""The speed levers of the equal-precision issue, each measured on its own at the base sizes:
what it would buy, whether the numbers stay the same, and so whether it is kept.

Each lever times the part of the step it changes (not the whole step), median of `--reps` after
two warm-up calls, one thread; the speed-up is old / new time of that part, the agreement the
relative difference of the outputs (or updated weights) between the two forms.

- `adamw`: the optimizer step over the base image model's parameters, PyTorch's per-parameter
  loop (what `torch.optim.AdamW` picks for CPU tensors) against `foreach=True` and `fused=True`.
- `teacher-bf16-copy`: the teacher's forward under bf16 autocast from its fp32 weights (autocast
  casts every weight on every call) against a bf16 copy of the weights refreshed once per step
  after the EMA (the refresh counted in), still under autocast so norms and softmax stay fp32.
- `extract-bf16-weights`: feature extraction under autocast against the model cast to bf16
  under `torch.inference_mode` (norms, softmax and GELU then run in bf16 too).
- `attention`: bf16 attention forward + backward at the shapes of the image 1.0 student (a
  learned bias that needs a gradient: SDPA can only take its math kernel), text base (512 tokens,
  flash) and image-tiny (65 tokens, where the library took the math kernel), against the same
  attention written out (scores, softmax, weighted sum: `written_out_attention`, what training
  on CPU in bf16 now uses).
- `extract-compile-freezing`: feature extraction in bf16, eager against `torch.compile` with
  inductor's freezing (weights folded in as constants: the inference form of compile).
- `cnn-bf16`: the speech CNN (the base preset's 7 layers over 10 s at 16 kHz), forward +
  backward, fp32 against bf16 autocast: how much of the audio step bf16 can speed up at all.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/levers.py --out benchmarks/results/levers
    python benchmarks/levers.py --size tiny --reps 1   # a smoke run (tests/test_levers.py)
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from common import write_report
from speed import case_config, make_input
from torch.nn.attention import SDPBackend, sdpa_kernel

from data2vec.doctor import cpu_name
from data2vec.modalities.audio import AudioLocal
from data2vec.model import Data2Vec
from data2vec.nn.transformer import written_out_attention
from data2vec.tiny import tiny_config

BF16 = torch.bfloat16


def timed(fn: Callable[[], Any], reps: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def model_for(modality: str, size: str, version: int = 1) -> Data2Vec:
    cfg = tiny_config(modality, version) if size == "tiny" else case_config(modality, size, version, True)
    torch.manual_seed(0)
    return Data2Vec.from_config(cfg)


def inputs(model: Data2Vec, size: str) -> torch.Tensor:
    modality = model.cfg.modality
    batch, length = {"image": (8, 0), "audio": (2, 160_000), "text": (4, 512)}[modality]
    if size == "tiny":
        batch, length = {"image": (4, 0), "audio": (2, 8_000), "text": (4, 30)}[modality]
    return make_input(SimpleNamespace(model=model.cfg), batch, length)  # type: ignore[arg-type]


def row(lever: str, case: str, old: str, new: str, t_old: float, t_new: float, agree: float) -> dict[str, Any]:
    r = {"lever": lever, "case": case, "old": old, "new": new, "old_ms": 1e3 * t_old, "new_ms": 1e3 * t_new}
    r |= {"speedup": t_old / t_new, "rel_diff": agree}
    print(f"  {lever} {case}: {old} {1e3 * t_old:.1f} ms, {new} {1e3 * t_new:.1f} ms ({t_old / t_new:.2f}x)")
    return r


def adamw(size: str, reps: int) -> list[dict[str, Any]]:
    """One AdamW step over the student's parameters with random gradients, three implementations."""
    base = model_for("image", size)
    params = [p for p in base.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=g) * 1e-3 for p in params]
    results = {}
    times = {}
    for name, kw in [("loop", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})]:
        ps = [p.detach().clone().requires_grad_() for p in params]
        for p, gr in zip(ps, grads, strict=True):
            p.grad = gr.clone()
        opt = torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.05, **kw)
        times[name] = timed(opt.step, reps)
        ref = [p.detach().clone().requires_grad_() for p in params]
        for p, gr in zip(ref, grads, strict=True):
            p.grad = gr.clone()
        once = torch.optim.AdamW(ref, lr=1e-3, weight_decay=0.05, **kw)
        once.step()
        results[name] = torch.cat([p.detach().flatten() for p in ref])
    case = f"image {size} ({sum(p.numel() for p in params) / 1e6:.1f}M parameters)"
    return [
        row("adamw", case, "loop", new, times["loop"], times[new], rel(results[new], results["loop"]))
        for new in ("foreach", "fused")
    ]


def teacher_copy(size: str, reps: int) -> list[dict[str, Any]]:
    out = []
    for modality in ("image", "text"):
        model = model_for(modality, size).eval()
        x = inputs(model, size)
        half = copy.deepcopy(model).to(BF16)
        pairs = [(h, p) for h, p in zip(half.parameters(), model.parameters(), strict=True)]

        def autocast_fp32(m: Data2Vec = model, x: torch.Tensor = x) -> torch.Tensor:
            with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
                return m.encode(x).x

        def refreshed_copy(m: Data2Vec = half, x: torch.Tensor = x, pairs: list[Any] = pairs) -> torch.Tensor:
            with torch.no_grad():
                torch._foreach_copy_([h for h, _ in pairs], [p for _, p in pairs])
                with torch.autocast("cpu", dtype=BF16):
                    return m.encode(x).x

        agree = rel(refreshed_copy(), autocast_fp32())
        out.append(
            row(
                "teacher-bf16-copy",
                f"{modality} {size}",
                "fp32 weights, autocast",
                "bf16 copy per step, autocast",
                timed(autocast_fp32, reps),
                timed(refreshed_copy, reps),
                agree,
            )
        )
    return out


def extract_bf16(size: str, reps: int) -> list[dict[str, Any]]:
    out = []
    for modality in ("image", "text", "audio"):
        model = model_for(modality, size).eval()
        x = inputs(model, size)
        half = copy.deepcopy(model).to(BF16)
        xh = x if modality == "text" else x.to(BF16)
        with torch.inference_mode():
            ref = model.encode(x).x

        def amp(m: Data2Vec = model, x: torch.Tensor = x) -> torch.Tensor:
            with torch.inference_mode(), torch.autocast("cpu", dtype=BF16):
                return m.encode(x).x

        def pure(m: Data2Vec = half, x: torch.Tensor = xh) -> torch.Tensor:
            with torch.inference_mode():
                return m.encode(x).x

        t_amp, t_pure = timed(amp, reps), timed(pure, reps)
        r = row("extract-bf16-weights", f"{modality} {size}", "autocast", "bf16 weights", t_amp, t_pure, 0.0)
        r["rel_diff"] = rel(pure(), ref)
        r["rel_diff_old"] = rel(amp(), ref)
        out.append(r)
    return out


def attention(size: str, reps: int) -> list[dict[str, Any]]:
    """bf16 attention forward + backward: the SDPA kernel the library used before (the math kernel
    for a bias that needs a gradient and for sequences of <= 128 tokens, flash otherwise) against
    `written_out_attention`."""
    if size == "base":  # image 1.0 student (BEiT bias), text base, image-tiny (65 tokens)
        cases = [((8, 12, 197, 64), True, SDPBackend.MATH), ((4, 12, 512, 64), False, SDPBackend.FLASH_ATTENTION)]
        cases += [((64, 6, 65, 32), False, SDPBackend.MATH)]
    else:
        cases = [((4, 2, 17, 16), True, SDPBackend.MATH), ((4, 2, 17, 16), False, SDPBackend.FLASH_ATTENTION)]
    out = []
    for (B, H, T, D), with_bias, backend in cases:
        g = torch.Generator().manual_seed(0)
        base = [torch.randn(B, H, T, D, generator=g) for _ in range(3)]
        bias = 0.1 * torch.randn(1, H, T, T, generator=g) if with_bias else None

        def leaves(base: list[torch.Tensor] = base, bias: torch.Tensor | None = bias) -> list[Any]:
            return [t.to(BF16).requires_grad_() for t in base] + [
                None if bias is None else bias.to(BF16).requires_grad_()
            ]

        def grads(o: torch.Tensor, ts: list[Any]) -> torch.Tensor:
            o.float().square().sum().backward()
            return torch.cat([o.detach().flatten()] + [t.grad.flatten() for t in ts if t is not None])

        def sdpa(backend: SDPBackend = backend) -> torch.Tensor:
            ts = leaves()
            with sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(ts[0], ts[1], ts[2], attn_mask=ts[3])
            return grads(o, ts)

        def written() -> torch.Tensor:
            ts = leaves()
            return grads(written_out_attention(ts[0], ts[1], ts[2], ts[3], 0.0), ts)

        kernel = "math" if backend == SDPBackend.MATH else "flash"
        case = f"({B}, {H}, {T}, {D}) bf16{' + bias' if with_bias else ''}, forward + backward"
        agree = rel(written(), sdpa())
        out.append(
            row(
                "attention",
                case,
                f"SDPA {kernel} kernel",
                "written out",
                timed(sdpa, reps),
                timed(written, reps),
                agree,
            )
        )
    return out


def cnn_bf16(size: str, reps: int) -> list[dict[str, Any]]:
    model = model_for("audio", size)
    local = model.frontend.local
    assert isinstance(local, AudioLocal)
    x = inputs(model, size)

    def run(precision: str) -> Callable[[], torch.Tensor]:
        def f() -> torch.Tensor:
            local.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=BF16, enabled=precision == "bf16"):
                y = local.cnn(x)
            y.float().square().mean().backward()
            return y.detach()

        return f

    agree = rel(run("bf16")(), run("fp32")())
    t32, t16 = timed(run("fp32"), reps), timed(run("bf16"), reps)
    return [row("cnn-bf16", f"audio {size} CNN, forward + backward", "fp32", "bf16 autocast", t32, t16, agree)]


class _Encode(torch.nn.Module):
    """`model.encode(x).x` as a module's forward, for torch.compile."""

    def __init__(self, model: Data2Vec) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x).x


def extract_compile_freezing(size: str, reps: int) -> list[dict[str, Any]]:
    """Extraction in bf16 autocast: eager against `torch.compile` with inductor's freezing (the
    weights folded into the graph as constants, for inference). The compile runs in the warm-up
    calls, outside the timing; its seconds are in the row's case."""
    import torch._inductor.config as inductor_config

    out = []
    for modality in ("image", "text"):
        model = model_for(modality, size).eval()
        x = inputs(model, size)
        eager = _Encode(model)
        frozen = copy.deepcopy(eager)

        def run(m: torch.nn.Module, x: torch.Tensor = x) -> torch.Tensor:
            with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
                return m(x)

        with inductor_config.patch(freezing=True):
            compiled = torch.compile(frozen)
            t0 = time.perf_counter()
            agree = rel(run(compiled), run(eager))
            compile_s = time.perf_counter() - t0
            t_new = timed(lambda c=compiled: run(c), reps)
        t_old = timed(lambda e=eager: run(e), reps)
        case = f"{modality} {size} extraction, bf16 (compile {compile_s:.0f} s)"
        out.append(row("extract-compile-freezing", case, "eager", "compiled, frozen", t_old, t_new, agree))
    return out


LEVERS: dict[str, Callable[[str, int], list[dict[str, Any]]]] = {
    "adamw": adamw,
    "teacher-bf16-copy": teacher_copy,
    "extract-bf16-weights": extract_bf16,
    "attention": attention,
    "cnn-bf16": cnn_bf16,
    "extract-compile-freezing": extract_compile_freezing,
}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Machine: {result['machine']}; 1 thread; torch {result['torch']}", "", f"Command: `{result['command']}`"]
    lines += [
        "",
        "| lever | case | old | new | old ms | new ms | speed-up | rel. diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        diff = f"{r['rel_diff']:.1e}"
        if "rel_diff_old" in r:
            diff = f"{r['rel_diff']:.1e} vs fp32 (autocast {r['rel_diff_old']:.1e})"
        lines.append(
            f"| {r['lever']} | {r['case']} | {r['old']} | {r['new']} | {r['old_ms']:.1f} | {r['new_ms']:.1f} | "
            f"{r['speedup']:.2f}x | {diff} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["base", "tiny"], default="base")
    ap.add_argument("--levers", default=",".join(LEVERS), help="comma-separated: " + ", ".join(LEVERS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/levers")
    args = ap.parse_args(argv)
    chosen = [name for name in args.levers.split(",") if name]
    unknown = [n for n in chosen if n not in LEVERS]
    if unknown:
        ap.error(f"--levers: unknown {', '.join(unknown)} (known: {', '.join(LEVERS)})")
    torch.set_num_threads(1)
    command = shlex.join(["python", "benchmarks/levers.py", *(sys.argv[1:] if argv is None else argv)])
    result: dict[str, Any] = {"machine": cpu_name(), "torch": torch.__version__, "command": command, "rows": []}
    for name in chosen:
        print(f"{name} ...", flush=True)
        result["rows"] += LEVERS[name](args.size, args.reps)
    write_report(args.out, markdown(result), result)


if __name__ == "__main__":
    main()
