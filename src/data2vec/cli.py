"""The `data2vec` command: a thin layer over the library API.

    data2vec pretrain --modality image --data PATH --preset image-tiny --version 2 \\
        [--set optim.lr=5e-4 ...] --out RUN_DIR
    data2vec pretrain --resume RUN_DIR
    data2vec demo [--out DIR]
    data2vec presets
    data2vec convert SRC DST [--to hf]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from data2vec.checkpoint import CheckpointError
from data2vec.config import MODALITIES, ConfigError, RunConfig, apply_overrides
from data2vec.data.images import BadInputError
from data2vec.demo import DEMOS
from data2vec.presets import PRESETS, preset
from data2vec.train import TrainingStopped


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="data2vec", description="data2vec 1.0 / 2.0 self-supervised pretraining")
    sub = p.add_subparsers(dest="command", required=True)

    pre = sub.add_parser("pretrain", help="pretrain on your own data, or resume a run")
    pre.add_argument("--modality", choices=list(MODALITIES), help="input modality (must match the preset)")
    pre.add_argument(
        "--data",
        help="images: folder, tar shard(s) (file, folder or glob) or builtin:digits; "
        "audio: folder of wav/flac/ogg or a manifest TSV; "
        "text: .txt/.jsonl/.tsv file or a folder of them",
    )
    pre.add_argument(
        "--on-bad-input",
        choices=["skip", "fail"],
        help="a bad data file (unreadable, empty, not UTF-8, ...): stop with a message naming it (fail) "
        "or skip it and count it in the run's summary (skip); sets data.on_bad_input (default fail)",
    )
    pre.add_argument("--preset", help=f"one of: {', '.join(sorted(PRESETS))}")
    pre.add_argument("--version", type=int, choices=[1, 2], default=2, help="data2vec 1.0 or 2.0 (default 2)")
    pre.add_argument("--config", help="a config.json to start from instead of a preset (e.g. RUN_DIR/config.json)")
    pre.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=5e-4 (repeatable)",
    )
    pre.add_argument("--out", help="run directory (checkpoints, metrics.jsonl, loss.png)")
    pre.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint")
    pre.add_argument(
        "--stop-after",
        type=int,
        metavar="STEP",
        help="checkpoint and exit after this step (resume later with --resume)",
    )
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")

    demo = sub.add_parser("demo", help="pretrain a tiny model on built-in data and probe it")
    demo.add_argument(
        "--modality",
        default="image",
        help="image (default), " + ", ".join(m for m in DEMOS if m != "image") + " or all",
    )
    demo.add_argument("--out", default="data2vec-demo", help="output folder (default ./data2vec-demo)")
    demo.add_argument("--version", type=int, choices=[1, 2], default=2)
    demo.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the demo's own)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    demo.add_argument("--no-progress", action="store_true")

    sub.add_parser("presets", help="list the presets")

    conv = sub.add_parser(
        "convert",
        help="convert a model: transformers folder or hub id, fairseq checkpoint, run or checkpoint -> folder",
    )
    conv.add_argument(
        "src",
        help="a transformers data2vec folder or hub id, a fairseq checkpoint, a run directory, a checkpoint "
        "folder, or a folder written by this command",
    )
    conv.add_argument("dst", help="output folder (new, or a previous output of this command)")
    conv.add_argument(
        "--to",
        choices=["data2vec", "hf"],
        default="data2vec",
        help="data2vec (default): this library's folder (config.json + model.safetensors); "
        "hf: a transformers Data2Vec{Vision,Audio,Text} folder (data2vec 1.0 models only)",
    )
    return p


def resolve_pretrain_config(args: argparse.Namespace) -> RunConfig:
    if args.config:
        cfg = RunConfig.load(args.config)
    elif args.preset:
        cfg = preset(args.preset, args.version)
    else:
        raise ConfigError("preset: give --preset NAME or --config FILE (see `data2vec presets`)")
    if args.modality and args.modality != cfg.model.modality:
        raise ConfigError(f"modality: --modality {args.modality} but the config is for {cfg.model.modality}")
    if args.data:
        cfg = replace(cfg, data=replace(cfg.data, path=args.data))
    if args.on_bad_input:
        cfg = replace(cfg, data=replace(cfg.data, on_bad_input=args.on_bad_input))
    cfg = apply_overrides(cfg, args.overrides)
    if not cfg.data.path:
        raise ConfigError("data.path: no data given (pass --data PATH)")
    is_pattern = cfg.data.path.startswith("builtin:") or any(ch in cfg.data.path for ch in "*?[")
    if not is_pattern and not Path(cfg.data.path).exists():
        raise FileNotFoundError(f"{cfg.data.path}: no such file or folder")
    return cfg


def _pretrain(args: argparse.Namespace) -> int:
    from data2vec.train import train

    if args.resume:
        if args.preset or args.config or args.overrides or args.data or args.on_bad_input:
            raise ConfigError("resume: --resume takes the config saved in the run directory; drop other options")
        result = train(
            RunConfig(), Path(args.resume), resume=True, progress=not args.no_progress, stop_after=args.stop_after
        )
    else:
        if not args.out:
            raise ConfigError("out: give --out RUN_DIR")
        cfg = resolve_pretrain_config(args)
        from data2vec.data.pipeline import pipeline_for

        pipeline_for(cfg).check(cfg)  # fail now, in one line, on missing or empty data
        result = train(cfg, Path(args.out), progress=not args.no_progress, stop_after=args.stop_after)
    print(f"finished at step {result.step}; checkpoints in {result.run_dir / 'checkpoints'}")
    for note in result.data_notes:
        print(note)
    if result.skipped_inputs:
        print(f"skipped {len(result.skipped_inputs)} bad input file(s); see {result.run_dir / 'train.log'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import importlib

    names = list(DEMOS) if args.modality == "all" else [args.modality]
    for name in names:
        if name not in DEMOS:
            raise ConfigError(f"modality: no demo for {name!r} (available: {', '.join(DEMOS)}, all)")
    reports = []
    for name in names:
        module, func = DEMOS[name].split(":")
        run = getattr(importlib.import_module(module), func)
        out = Path(args.out) / name if len(names) > 1 else Path(args.out)
        try:
            r = run(
                out, version=args.version, steps=args.steps, overrides=args.overrides, progress=not args.no_progress
            )
        except ImportError as e:  # a demo whose optional extra is not installed (e.g. speech)
            print(f"data2vec: {name} demo: {e}", file=sys.stderr)
            return 2
        reports.append(r.report(args.version))
    print()
    print("\n\n".join(reports))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from data2vec.interop import convert

    out, source = convert(args.src, args.dst, to=args.to)
    m = source.config.model
    print(f"read {source.kind}: {source.path}")
    print(f"  data2vec {m.version}.0 {m.modality} model, {m.encoder.depth} blocks, width {m.encoder.dim}")
    if source.head is not None and source.head.weights:
        head = source.head
        print(f"  task head kept: {head.architecture} ({head.kind}, {len(head.weights)} tensors)")
    print(f"wrote {out} ({'transformers' if args.to == 'hf' else 'data2vec'} format)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "pretrain":
            return _pretrain(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "convert":
            return _convert(args)
        if args.command == "presets":
            for name in sorted(PRESETS):
                print(f"{name}: data2vec {' and '.join(f'{v}.0' for v in sorted(PRESETS[name]))}")
            return 0
    except ConfigError as e:
        print(f"data2vec: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, BadInputError, CheckpointError) as e:
        print(f"data2vec: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"data2vec: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"data2vec: training stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("data2vec: interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
