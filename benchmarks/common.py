"""Shared parts of the real-data benchmarks (cifar10.py, speech.py, sst2.py): a CPU-time
budgeted pretraining run, the pretrained-vs-scratch fine-tuning comparison, a linear probe
of frozen features, and the results table (markdown + JSON) and plot.

Not run in CI. Each script reads ../shared/data in place.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data2vec.config import RunConfig, apply_overrides
from data2vec.data.batch import EvalItem
from data2vec.extract import extract_items, num_layers
from data2vec.finetune import FinetuneConfig, LabelledSet, evaluate, finetune, load_finetuned
from data2vec.model import Data2Vec
from data2vec.pretrained import Pretrained, build_model, load_pretrained
from data2vec.probe import linear_probe
from data2vec.training import train

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_report(out: str | Path, text: str, data: Any) -> None:
    """A benchmark's report: print `text`, write it to OUT.md and `data` to OUT.json."""
    print(text)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".md").write_text(text + "\n")
    path.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}, torch {torch.__version__}"


def bench_parser(
    doc: str | None, name: str, budget: float, epochs: int, lr: float | None = None
) -> argparse.ArgumentParser:
    """The options every real-data script shares; each adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-minutes", type=float, default=budget, help="pretraining CPU budget")
    p.add_argument("--steps", type=int, help="pretrain exactly this many steps instead of calibrating a budget")
    p.add_argument("--finetune-epochs", type=int, default=epochs)
    if lr is not None:
        p.add_argument("--lr", type=float, default=lr, help="fine-tuning peak learning rate")
    p.add_argument("--version", type=int, choices=(1, 2), default=2, help="data2vec 1.0 or 2.0 preset")
    p.add_argument("--seeds", type=int, default=1, help="fine-tune each arm with this many seeds (mean reported)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--jobs", type=int, default=1, help="fine-tuning runs (arms x seeds) at once, one process each (--threads 1)"
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], help="pretraining config KEY=VALUE")
    p.add_argument(
        "--ft", dest="ft_overrides", action="append", default=[], help="fine-tuning config KEY=VALUE (both arms)"
    )
    p.add_argument("--pretrained", help="reuse this finished pretraining run instead of pretraining")
    p.add_argument("--out", default=f"benchmarks/results/{name}", help="results table, JSON and plot")
    p.add_argument("--work", default=f"/tmp/data2vec-bench/{name}", help="run directories (checkpoints)")
    return p


def start(args: argparse.Namespace) -> tuple[Path, Path, float]:
    """Threads set, work folder made: (out, work, start time)."""
    torch.set_num_threads(args.threads)
    out, work = Path(args.out), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    return out, work, time.perf_counter()


def pretrain_or_reuse(cfg: RunConfig, args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, Any]]:
    """`--pretrained RUN_DIR` or a new budgeted pretraining run in `work/pretrain`."""
    if args.pretrained:
        return reuse_pretrained(Path(args.pretrained))
    return pretrain_for(cfg, work / "pretrain", args.budget_minutes, steps=args.steps)


def footer(args: argparse.Namespace, t_all: float) -> dict[str, str]:
    """The last lines of every results table: run time, pretraining overrides, machine."""
    return {
        "total minutes": f"{(time.perf_counter() - t_all) / 60:.1f}",
        "pretraining overrides": (
            f"see {args.pretrained}/config.json (reused run)" if args.pretrained else " ".join(args.overrides) or "none"
        ),
        **({"fine-tuning runs at once": str(args.jobs)} if args.jobs > 1 else {}),
        "fine-tuning overrides": " ".join(args.ft_overrides) or "none",
        "machine": machine(),
    }


def algorithm(run_dir: Path) -> str:
    """'data2vec 1.0' or 'data2vec 2.0', from a pretraining run's saved config."""
    return f"data2vec {RunConfig.load(run_dir / 'config.json').model.version}.0"


def pretrain_for(
    cfg: RunConfig, run_dir: Path, minutes: float, calib_steps: int = 4, steps: int | None = None
) -> tuple[Path, dict[str, Any]]:
    """Pretrain with as many steps as fit in `minutes` (measured on a short calibration run),
    so the cosine schedule ends at the budget, or with exactly `steps` when given (calibration
    misjudges on a busy machine). Returns (run dir, info)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    per_step = float("nan")
    if steps is None:
        calib = run_dir.with_name(run_dir.name + "-calib")
        shutil.rmtree(calib, ignore_errors=True)
        ccfg = replace(cfg, train=replace(cfg.train, steps=calib_steps + 2, ckpt_every=10_000, log_every=1))
        t0 = time.perf_counter()
        res = train(ccfg, calib, progress=False, quiet=True)
        elapsed = time.perf_counter() - t0
        rates = [r["samples_per_sec"] for r in res.history[2:]]
        per_step = cfg.data.batch_size / float(np.mean(rates)) if rates else elapsed / (calib_steps + 2)
        shutil.rmtree(calib, ignore_errors=True)
        steps = max(10, int(minutes * 60 / per_step))
    warm = min(cfg.optim.warmup_steps, steps // 10)
    cfg = replace(
        cfg,
        train=replace(cfg.train, steps=steps, ckpt_every=max(steps // 2, 1), collapse_after=steps + 1),
        optim=replace(cfg.optim, warmup_steps=warm),
    )
    t0 = time.perf_counter()
    result = train(cfg, run_dir, progress=False, quiet=True)
    seconds = time.perf_counter() - t0
    last = result.history[-1] if result.history else {}
    info = {
        "steps": steps,
        "seconds": seconds,
        "seconds_per_step": per_step,
        "final_loss": last.get("loss"),
        "batch_size": cfg.data.batch_size,
    }
    print(f"pretrained {steps} steps in {seconds / 60:.1f} min (final loss {info['final_loss']})", flush=True)
    return run_dir, info


def reuse_pretrained(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """A finished pretraining run (`--pretrained RUN_DIR`) instead of a new one, and its info.
    A run that continued another (`data2vec pretrain --init RUN`, named in its init.json) counts
    the earlier run's steps and time too, back to the first run of the chain."""
    steps, seconds, chain, last = 0, 0.0, [], None
    run: Path | None = run_dir
    while run is not None:
        rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        last = last or rows[-1]
        steps += int(rows[-1]["step"])
        # config.json is written when the run starts, summary.json when it ends
        seconds += (run / "summary.json").stat().st_mtime - (run / "config.json").stat().st_mtime
        chain.append(f"{run} ({rows[-1]['step']} steps)")
        init = run / "init.json"
        parent = Path(json.loads(init.read_text())["init"]) if init.is_file() else None
        run = parent if parent is not None and (parent / "metrics.jsonl").is_file() else None
    assert last is not None
    info = {
        "steps": steps,
        "seconds": seconds,
        "final_loss": last["loss"],
        "batch_size": RunConfig.load(run_dir / "config.json").data.batch_size,
        "reused": " <- ".join(chain),
    }
    return run_dir, info


_JOBS: list[Callable[[], dict[str, Any]]] = []
"""Fine-tuning runs waiting for a worker; forked workers inherit them (datasets hold closures,
which cannot be pickled for a spawned process)."""


def _run_job(i: int) -> dict[str, Any]:
    return _JOBS[i]()


def compare_finetune(
    run_dir: Path,
    ft: FinetuneConfig,
    train_set: LabelledSet,
    eval_set: LabelledSet,
    out: Path,
    seeds: int = 1,
    changes: Sequence[str] = (),
    test_set: LabelledSet | None = None,
    jobs: int = 1,
) -> dict[str, dict[str, Any]]:
    """The same fine-tuning recipe from the pretrained weights and from a random init, with
    fine-tuning seeds 0..seeds-1 (the seed also draws the scratch arm's init). `best` is the
    mean over seeds of each run's best eval metric; `bests` lists them; curves are seed 0's.
    `changes` are FinetuneConfig KEY=VALUE overrides (`--ft`). With `test_set`, each run's
    best checkpoint (chosen on `eval_set`) is also scored there: `test` (mean) and `tests`.
    `jobs` > 1 runs that many fine-tuning runs at once in forked processes (one torch thread
    each, so that the fork is safe)."""
    ft = apply_overrides(ft, list(changes))
    pre = load_pretrained(run_dir)

    def job(name: str, source: Any, seed: int) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            tag = f"ft-{name}" if seeds == 1 else f"ft-{name}-seed{seed}"
            r = finetune(source, replace(ft, seed=seed), train_set, eval_set, out / tag, quiet=True)
            print(f"fine-tune {name} seed {seed}: best {r.metric} {r.best_metric:.4f} ({r.seconds / 60:.1f} min)")
            res = {"metric": r.metric, "best": float(r.best_metric), "best_epoch": r.best_epoch}
            res |= {"history": r.history, "seconds": r.seconds}
            if test_set is not None:
                model, rcfg, meta = load_finetuned(out / tag)
                score = evaluate(model, test_set, FinetuneConfig.from_dict(meta["config"]), rcfg).metrics[r.metric]
                res["test"] = float(score)
                print(f"  its best checkpoint on {test_set.name}: {r.metric} {score:.4f}", flush=True)
            return res

        return run

    arms = (("pretrained", pre), ("scratch", pre.config))
    _JOBS[:] = [job(name, source, seed) for name, source in arms for seed in range(seeds)]
    try:
        if jobs > 1:
            if torch.get_num_threads() != 1:
                raise ValueError("parallel fine-tuning (--jobs > 1) needs --threads 1")
            import multiprocessing

            with multiprocessing.get_context("fork").Pool(min(jobs, len(_JOBS)), maxtasksperchild=1) as pool:
                done = pool.map(_run_job, range(len(_JOBS)), chunksize=1)
        else:
            done = [run() for run in _JOBS]
    finally:
        _JOBS.clear()
    rows: dict[str, dict[str, Any]] = {}
    for k, (name, _) in enumerate(arms):
        runs = done[k * seeds : (k + 1) * seeds]
        bests = [r["best"] for r in runs]
        rows[name] = {
            "metric": runs[0]["metric"],
            "best": float(np.mean(bests)),
            "bests": bests,
            "std": float(np.std(bests)),
            "best_epoch": runs[0]["best_epoch"],
            "last": runs[0]["history"][-1][f"eval_{runs[0]['metric']}"],
            "seconds": sum(r["seconds"] for r in runs),
            "history": runs[0]["history"],
        }
        if test_set is not None:
            tests = [r["test"] for r in runs]
            rows[name] |= {"test": float(np.mean(tests)), "tests": tests, "test_std": float(np.std(tests))}
    return rows


def seeds_note(rows: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Info lines with each arm's per-seed results (nothing for a single seed)."""
    if len(rows["pretrained"]["bests"]) == 1:
        return {}
    out = {}
    for name, r in rows.items():
        out[f"per-seed best ({name})"] = (
            ", ".join(f"{b:.4f}" for b in r["bests"]) + f" (mean {r['best']:.4f}, std {r['std']:.4f})"
        )
        if "tests" in r:
            out[f"per-seed test ({name})"] = (
                ", ".join(f"{b:.4f}" for b in r["tests"]) + f" (mean {r['test']:.4f}, std {r['test_std']:.4f})"
            )
    return out


def arm_model(pre: Pretrained, arm: str) -> Data2Vec:
    """The frozen model of a probe arm (eval mode): "pretrained" = `pre`'s weights, "scratch" =
    the same architecture from the run's seeded random init."""
    if arm == "pretrained":
        return build_model(pre)
    torch.manual_seed(pre.config.train.seed)
    return Data2Vec.from_config(pre.config).eval()


def audio_items(data: LabelledSet) -> list[EvalItem]:
    """A labelled audio set's waveforms as lazily loaded extraction inputs."""

    def loader(i: int) -> Callable[[], torch.Tensor]:
        return lambda: torch.from_numpy(data.load(i))

    return [EvalItem(f"{data.name} {i}", len(data.load(i)), loader(i)) for i in range(len(data))]


def probe_compare(
    run_dir: Path,
    make_items: Callable[[LabelledSet], list[EvalItem]],
    train_set: LabelledSet,
    test_set: LabelledSet,
) -> dict[str, float]:
    """Linear probe (logistic regression) on mean-pooled last-layer features, pretrained vs random init."""
    pre = load_pretrained(run_dir)
    out: dict[str, float] = {}
    for name in ("pretrained", "scratch"):
        model = arm_model(pre, name)
        tr = extract_items(model, make_items(train_set), batch_size=64)
        te = extract_items(model, make_items(test_set), batch_size=64)
        layer = max(tr)
        out[name] = linear_probe(tr[layer], np.asarray(train_set.targets), te[layer], np.asarray(test_set.targets))
        print(f"linear probe {name}: {out[name]:.4f}", flush=True)
    return out


def ctc_probe_compare(
    run_dir: Path,
    train_set: LabelledSet,
    test_set: LabelledSet,
    steps: int = 3000,
    batch_size: int = 8,
    lr: float = 2e-3,
) -> dict[str, dict[int, dict[str, float]]]:
    """Frame-level linear CTC probe, pretrained vs random init: per-frame features of every layer
    (frozen, extracted once), standardised, and one linear layer to letters trained with CTC on
    `train_set`'s transcripts; greedy decoding on `test_set`. {arm: {layer: {"cer", "wer"}}}."""
    from data2vec.finetune import encode_letters, letter_vocab

    vocab = letter_vocab([str(t) for t in train_set.targets])
    targets = [torch.tensor(encode_letters(str(t), vocab), dtype=torch.long) for t in train_set.targets]
    refs = [str(t) for t in test_set.targets]

    pre = load_pretrained(run_dir)
    out: dict[str, dict[int, dict[str, float]]] = {}
    for name in ("pretrained", "scratch"):
        model = arm_model(pre, name)
        every = list(range(num_layers(model) + 1))
        tr = extract_items(model, audio_items(train_set), every, pool="none", batch_size=8)
        te = extract_items(model, audio_items(test_set), every, pool="none", batch_size=8)
        out[name] = {}
        for layer in sorted(tr):
            wer, cer = _ctc_probe(tr[layer], targets, te[layer], refs, vocab, steps, batch_size, lr)
            out[name][layer] = {"cer": cer, "wer": wer}
            print(f"CTC probe {name} layer {layer}: CER {cer:.4f} WER {wer:.4f}", flush=True)
    return out


def _ctc_probe(
    train_x: list[np.ndarray],
    targets: list[torch.Tensor],
    test_x: list[np.ndarray],
    refs: list[str],
    vocab: list[str],
    steps: int,
    batch_size: int,
    lr: float,
) -> tuple[float, float]:
    """(WER, CER) of a linear CTC layer trained on frozen frame features."""
    import torch.nn.functional as F
    from torch.nn.utils.rnn import pad_sequence

    from data2vec.finetune import error_rates, greedy_decode
    from data2vec.schedules import cosine_lr

    frames = np.concatenate(train_x)
    mean, std = frames.mean(0), frames.std(0) + 1e-5
    xs = [torch.from_numpy((x - mean) / std).float() for x in train_x]
    torch.manual_seed(0)
    head = torch.nn.Linear(frames.shape[1], len(vocab))
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, 0.0, steps // 20)
        idx = torch.randint(len(xs), (batch_size,), generator=gen).tolist()
        log_probs = head(pad_sequence([xs[i] for i in idx], batch_first=True)).log_softmax(-1)
        loss = F.ctc_loss(
            log_probs.transpose(0, 1),
            torch.cat([targets[i] for i in idx]),
            torch.tensor([len(xs[i]) for i in idx]),
            torch.tensor([len(targets[i]) for i in idx]),
            blank=0,
            zero_infinity=True,
        )
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        opt.step()
    with torch.no_grad():
        hyps = [greedy_decode(head(torch.from_numpy((x - mean) / std).float())[None], None, vocab)[0] for x in test_x]
    return error_rates(hyps, refs)


def write_results(
    out: Path, title: str, rows: Sequence[tuple[str, str, str]], info: dict[str, Any], curves: dict[str, Any]
) -> None:
    """Markdown table + JSON + a plot of the eval metric per fine-tuning epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    lines = [f"### {title}", "", "| model | metric | value |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", *(f"- {k}: {v}" for k, v in info.items() if not isinstance(v, (dict, list)))]
    md = "\n".join(lines) + "\n"
    print(md)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps({"rows": rows, "info": info, "curves": curves}, indent=2) + "\n")
    if not curves:  # no fine-tuning runs to plot
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, hist in curves.items():
        metric = next(k for k in hist[0] if k.startswith("eval_") and k not in ("eval_loss", "eval_wer"))
        ax.plot([h["epoch"] for h in hist], [h[metric] for h in hist], marker="o", label=name)
        ax.set_ylabel(metric)
    ax.set_xlabel("fine-tuning epoch")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=100)
    plt.close(fig)
