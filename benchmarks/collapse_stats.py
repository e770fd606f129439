"""What the collapse monitor sees on healthy runs: target_std, pred_std and local_std of every
tiny preset (1.0 and 2.0) pretrained on real data with its own recipe, and of the base presets over
their first steps. The presets' collapse thresholds (train.min_target_std, min_pred_std) are set
from these numbers (docs/design.md, "Presets and their numbers").

    taskset -c 1 python benchmarks/collapse_stats.py --steps 600 --base-steps 30

Writes benchmarks/results/collapse/results.{md,json}. Not run in CI. Reads ../shared/data in place.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from data2vec.config import apply_overrides  # noqa: E402
from data2vec.presets import preset  # noqa: E402
from data2vec.training import train  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "collapse"
PRECISION = "bf16"


def data_overrides(name: str, work: Path) -> list[str]:
    d = common.DATA
    if name.startswith("image"):
        return [f"data.path={d / 'cifar10' / 'train-*.tar'}"]
    if name.startswith("digits"):
        return ["data.path=builtin:digits:train"]
    if name.startswith("audio"):
        manifest = work / "fsdd.tsv"
        files = sorted((d / "fsdd" / "recordings").glob("*.wav"))
        manifest.write_text("".join(f"{f}\n" for f in files if f.stem.split("_")[1] not in ("george", "lucas")))
        return [f"data.path={manifest}"]
    return [f"data.path={d / 'sst2' / 'train.tsv'}", "data.text.tsv_column=sentence"]


def measure(name: str, version: int, steps: int, work: Path, extra: list[str]) -> dict[str, Any]:
    base = preset(name, version)
    cfg = apply_overrides(
        base,
        [
            *data_overrides(name, work),
            f"train.steps={steps}",
            f"optim.warmup_steps={min(base.optim.warmup_steps, max(1, steps // 10))}",
            "train.min_target_std=0",
            "train.min_pred_std=0",
            "train.log_every=1",
            f"train.ckpt_every={steps}",
            f"train.precision={PRECISION}",
            "data.num_workers=0",
            *extra,
        ],
    )
    run = work / f"{name}-v{version}"
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    train(cfg, run, progress=False, quiet=True)
    seconds = time.perf_counter() - t0
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    after = rows[len(rows) // 5 :]  # past the first fifth: warm-up and the teacher's first moves
    out: dict[str, Any] = {"preset": name, "version": version, "steps": steps, "minutes": seconds / 60}
    for key in ("target_std", "pred_std", "local_std"):
        vals = [r[key] for r in after if key in r]
        if not vals:
            continue
        out[key] = {
            "init": rows[0].get(key),
            "min": min(vals),
            "median": statistics.median(vals),
            "final": vals[-1],
        }
    out["loss_final"] = rows[-1]["loss"]
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    return out


def _cell(r: dict[str, Any], key: str) -> str:
    s = r.get(key)
    return "-" if s is None else f"{s['init']:.3f} / {s['min']:.3f} / {s['median']:.3f} / {s['final']:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="steps per tiny preset")
    p.add_argument("--base-steps", type=int, default=30, help="steps per base preset (0: skip them)")
    p.add_argument("--only", default="", help="comma-separated preset names")
    p.add_argument("--versions", default="1,2", help="comma-separated data2vec versions")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--work", default="/tmp/collapse-stats")
    p.add_argument("--out", default=str(OUT), help="results folder")
    p.add_argument(
        "--merge", nargs="+", default=[], metavar="JSON", help="only write one table from earlier results.json files"
    )
    args = p.parse_args()
    if args.merge:
        merged = [r for f in args.merge for r in json.loads(Path(f).read_text())]
        write_tables(merged, Path(args.out), "the runs listed below, merged")
        return
    global PRECISION
    PRECISION = args.precision
    torch.set_num_threads(1)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    plan: list[tuple[str, int, int, list[str]]] = []
    for name in ("digits-tiny", "image-tiny", "audio-tiny", "text-tiny"):
        for v in (1, 2):
            plan.append((name, v, args.steps, []))
    if args.base_steps:
        small = ["data.batch_size=4", "data.audio.batch_seconds=20"]
        for name, versions in (("image-base", (1, 2)), ("audio-base", (1, 2)), ("text-base", (1, 2))):
            for v in versions:
                extra = [s for s in small if not (s.startswith("data.audio") and not name.startswith("audio"))]
                plan.append((name, v, args.base_steps, extra))
    if args.only:
        keep = set(args.only.split(","))
        plan = [x for x in plan if x[0] in keep]
    versions = {int(v) for v in args.versions.split(",")}
    plan = [x for x in plan if x[1] in versions]
    results = []
    for name, v, steps, extra in plan:
        r = measure(name, v, steps, work, extra)
        print(json.dumps(r), flush=True)
        results.append(r)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_tables(results, out, f"`python {' '.join(sys.argv)}`")


def write_tables(results: list[dict[str, Any]], out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Collapse-monitor statistics on healthy runs",
        "",
        f"Command: {command} (pinned to one core, 1 thread). Machine: {common.machine()}. {PRECISION}.",
        "Statistics over the steps after the first fifth of each run (warm-up excluded); `init` is step 1.",
        "",
        "| preset | version | steps | minutes | target_std init / min / median / final "
        "| pred_std init / min / median / final | local_std min |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        local = r.get("local_std")
        local_min = "-" if local is None else f"{local['min']:.3f}"
        lines.append(
            f"| {r['preset']} | {r['version']}.0 | {r['steps']} | {r['minutes']:.1f} | {_cell(r, 'target_std')} | "
            f"{_cell(r, 'pred_std')} | {local_min} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
