"""The `data2vec` command: a thin layer over the library API.

    data2vec pretrain --modality image --data PATH --preset image-tiny --version 2 \\
        [--set optim.lr=5e-4 ...] [--on-bad-input skip] [--on-nan skip] [--on-collapse rewind] --out RUN_DIR
    data2vec pretrain --resume RUN_DIR
    data2vec pretrain --init CHECKPOINT --data PATH [--set ...] --out RUN_DIR
    data2vec extract --checkpoint CHECKPOINT --input PATH --layers 6,12 --pool mean --out features.npy
    data2vec demo [--out DIR]
    data2vec presets
    data2vec convert SRC DST [--to hf] [--modality image]
    data2vec finetune --checkpoint RUN_DIR --task image_cls --train DIR --eval DIR --out FT_DIR [--set ...]

Errors the library reports about what it was given (ConfigError, BadInputError, CheckpointError,
InteropError, ...) are printed as one line (exit status 2); a training stop (collapse, non-finite
loss) exits with 1; SIGTERM or SIGINT during pretraining checkpoints and exits with 75 (requeue);
anything else is a bug and shows its traceback. `data2vec --debug COMMAND ...` shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from data2vec.checkpoint import CheckpointError
from data2vec.config import MODALITIES, ConfigError, RunConfig, apply_overrides
from data2vec.data.errors import BadInputError
from data2vec.demo import DEMOS
from data2vec.interop.common import InteropError
from data2vec.interop.fairseq import FairseqImportError
from data2vec.joint import is_joint
from data2vec.presets import PRESETS, preset
from data2vec.pretrained import ModalityRequired, build_model, load_pretrained
from data2vec.tokenizer import TokenizerError
from data2vec.training import EXIT_INTERRUPTED, TrainingInterrupted, TrainingStopped
from data2vec.writes import WriteFailed

T = TypeVar("T")


class DataError(ValueError):
    """The data named on the command line cannot be used (raised around the commands' data checks)."""


USER_ERRORS: tuple[type[Exception], ...] = (
    BadInputError,
    CheckpointError,
    DataError,
    FairseqImportError,
    FileExistsError,
    FileNotFoundError,
    InteropError,
    ModalityRequired,
    TokenizerError,
    WriteFailed,
)
"""Errors about what the command was given, printed as one line (as ConfigError is); any other
exception is a bug and propagates with its traceback."""


def _checking_data(read: Callable[[], T]) -> T:
    """`read()`, a check or read of the user's data. The data loaders still report some unusable
    data (an empty folder, a manifest that is not text, ...) as a plain ValueError; raised here,
    such an error is about the data given, so it becomes a DataError (one line)."""
    try:
        return read()
    except ValueError as e:
        if isinstance(e, (ConfigError, *USER_ERRORS)):
            raise
        raise DataError(str(e)) from e


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="data2vec", description="data2vec 1.0 / 2.0 self-supervised pretraining")
    p.add_argument("--debug", action="store_true", help="show the full traceback of any error")
    sub = p.add_subparsers(dest="command", required=True)

    pre = sub.add_parser("pretrain", help="pretrain on your own data, or resume a run")
    pre.add_argument(
        "--modality",
        help="input modality: image, audio or text (must match the preset); several, comma-separated "
        "(image,audio,text), pretrain one shared model on all of them (docs/joint.md)",
    )
    pre.add_argument(
        "--data",
        nargs="+",
        help="images: folder, tar shard(s) (file, folder or glob) or builtin:digits; "
        "audio: folder of wav/flac/ogg or a manifest TSV; "
        "text: .txt/.jsonl/.tsv file or a folder of them; joint runs: MODALITY=PATH per modality",
    )
    pre.add_argument(
        "--on-bad-input",
        choices=["skip", "fail"],
        help="a bad data file (unreadable, empty, not UTF-8, ...): stop with a message naming it (fail) "
        "or skip it and count it in the run's summary (skip); sets data.on_bad_input (default fail)",
    )
    pre.add_argument(
        "--on-nan",
        choices=["stop", "skip"],
        help="a non-finite loss or gradient: stop with the last checkpoint intact (stop) or skip that "
        "step and count it (skip); sets train.on_nan (default stop)",
    )
    pre.add_argument(
        "--on-collapse",
        choices=["stop", "rewind"],
        help="representation collapse: stop (stop) or rewind to the last checkpoint with a lower learning "
        "rate (rewind); sets train.on_collapse (default stop)",
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
    pre.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its newest checkpoint that verifies (refused when none does)",
    )
    pre.add_argument(
        "--resume-from",
        metavar="STEP_DIR",
        help="continue from this checkpoint folder (RUN_DIR/checkpoints/step_N, or one in checkpoints/set-aside/); "
        "newer checkpoints are set aside, never deleted",
    )
    pre.add_argument(
        "--ignore-checksums",
        action="store_true",
        help="with --resume: when no checkpoint verifies, load the newest one as it is (nothing is deleted)",
    )
    pre.add_argument(
        "--force-fresh",
        action="store_true",
        help="with --resume: when there is no checkpoint that verifies, start from step 0 (checkpoints that do "
        "not verify are kept in checkpoints/set-aside/); safe for job scripts that always pass --resume",
    )
    pre.add_argument(
        "--stop-after",
        type=int,
        metavar="STEP",
        help="checkpoint and exit after this step (resume later with --resume)",
    )
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")
    pre.add_argument(
        "--init",
        metavar="CHECKPOINT",
        help="continue pretraining a pretrained model (run directory, checkpoint, pretrained folder, "
        "transformers or fairseq checkpoint): modality, architecture and preset come from it, the teacher "
        "starts as a copy of it and the head/decoder is fresh; --set still changes training settings. A joint "
        "checkpoint: name the member with --modality M. Joint runs (--modality image,audio,...): each member "
        "the source holds is loaded (a joint source, or a one-modality model for its modality)",
    )

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

    doc = sub.add_parser(
        "doctor", help="print what a bug report needs (versions, devices, bf16 support), then run a short self-test"
    )
    doc.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu or cuda[:N]")
    doc.add_argument("--no-self-test", action="store_true", help="only print the report")

    sub.add_parser("presets", help="list the presets")

    ext = sub.add_parser("extract", help="per-layer features of a pretrained encoder for a file or folder")
    ext.add_argument(
        "--checkpoint",
        required=True,
        help="a run directory, checkpoint folder, pretrained folder, transformers folder or fairseq checkpoint",
    )
    ext.add_argument(
        "--input",
        required=True,
        help="a file or folder of images, audio files or text files, or parquet/arrow files (as for --data)",
    )
    ext.add_argument(
        "--layers", default="", help="comma-separated layers: 0 = encoder input, 1..L = blocks, -1 = last (default)"
    )
    ext.add_argument(
        "--pool", choices=["mean", "none"], default="mean", help="mean over tokens (default) or every token"
    )
    ext.add_argument(
        "--out",
        required=True,
        help="features.npy (mean: one (layers, N, D) array; none: an .npz beside it), .npz or .parquet; "
        "<stem>.files.txt lists the inputs in order (one line each; data2vec.extract.read_names reads it)",
    )
    ext.add_argument("--batch-size", type=int, default=16, help="inputs per batch (default 16)")
    ext.add_argument(
        "--max-tokens", type=int, default=None, help="padded samples/tokens per batch (default: per modality)"
    )
    ext.add_argument("--tokenizer", help="text: tokenizer.json or folder (default: the model's own)")
    ext.add_argument("--column", default="", help="parquet/arrow input: the column holding the inputs (default: found)")
    ext.add_argument(
        "--window",
        type=float,
        default=None,
        help="longer inputs run in overlapping windows of this length: seconds for speech (default 30), "
        "tokens for text (default and at most the model's positions); 0: run inputs whole (text: cut)",
    )
    ext.add_argument(
        "--overlap",
        type=float,
        default=None,
        help="overlap of consecutive windows, same unit (default: a sixth of the window for speech, "
        "a quarter for text)",
    )
    ext.add_argument("--modality", help="which modality of a joint checkpoint (image, audio or text)")
    ext.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:N]")
    ext.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ext.add_argument("--no-progress", action="store_true", help="no progress bar")

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
    conv.add_argument("--modality", help="which modality of a joint checkpoint (image, audio or text)")
    _add_finetune_parser(sub)
    return p


def _add_finetune_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from data2vec.finetune import TASKS

    ft = sub.add_parser("finetune", help="fine-tune a pretrained encoder on labelled data (docs/finetune.md)")
    ft.add_argument(
        "--checkpoint",
        required=True,
        help="a run directory, checkpoint folder, pretrained folder, transformers folder or fairseq checkpoint",
    )
    ft.add_argument("--task", required=True, choices=list(TASKS), help="what to fine-tune for")
    ft.add_argument("--train", required=True, help="labelled training data (class folders, tars, TSV/JSONL, manifest)")
    ft.add_argument("--eval", required=True, help="labelled eval data, same formats")
    ft.add_argument("--out", required=True, help="output folder (best/, metrics.jsonl, metrics.png)")
    ft.add_argument("--epochs", type=int, help="epochs (default: the task's preset)")
    ft.add_argument("--batch-size", type=int, help="examples per step")
    ft.add_argument("--lr", type=float, help="peak learning rate")
    ft.add_argument("--scratch", action="store_true", help="same architecture, random init (a baseline)")
    ft.add_argument("--tokenizer", help="text: tokenizer.json or folder (default: the model's own)")
    ft.add_argument("--modality", help="which modality of a joint checkpoint (default: the task's)")
    ft.add_argument("--device", help="auto (default), cpu or cuda[:N]")
    ft.add_argument("--precision", choices=["fp32", "bf16"], help="bf16 autocast or fp32 (default)")
    ft.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="e.g. --set layer_decay=0.75"
    )
    ft.add_argument("--no-progress", action="store_true", help="no progress bar")


def _finetune(args: argparse.Namespace) -> int:
    from data2vec.finetune import finetune, finetune_preset, read_labelled_sets

    sugar = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "tokenizer": args.tokenizer}
    sugar.update(device=args.device, precision=args.precision)
    flags = [f"{k}={v}" for k, v in sugar.items() if v is not None]
    cfg = apply_overrides(finetune_preset(args.task), [*args.overrides, *flags])
    try:
        pre = load_pretrained(args.checkpoint, args.modality)
    except ModalityRequired:  # a joint checkpoint: the task's modality
        pre = load_pretrained(args.checkpoint, cfg.modality)
    train, evaluation = _checking_data(lambda: read_labelled_sets(cfg, pre.config, args.train, args.eval))
    result = finetune(
        pre.config if args.scratch else pre, cfg, train, evaluation, args.out, progress=not args.no_progress
    )
    best = Path(args.out) / "best"
    print(f"best {result.metric} {result.best_metric:.4f} at epoch {result.best_epoch}; model in {best}")
    return 0


FLAG_KEYS = {"on_bad_input": "data.on_bad_input", "on_nan": "train.on_nan", "on_collapse": "train.on_collapse"}
"""`pretrain` flags that are sugar for `--set KEY=VALUE`, applied after the --set options (so they win)."""


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    return [f"{key}={getattr(args, name)}" for name, key in FLAG_KEYS.items() if getattr(args, name) is not None]


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
        data = args.data
        if isinstance(data, list):  # `--data` takes several values for joint runs
            if len(data) != 1:
                raise ConfigError("data.path: one --data PATH for a single-modality run")
            data = data[0]
        cfg = replace(cfg, data=replace(cfg.data, path=data))
    cfg = apply_overrides(cfg, [*args.overrides, *_flag_overrides(args)])
    if not cfg.data.path:
        raise ConfigError("data.path: no data given (pass --data PATH)")
    is_pattern = cfg.data.path.startswith("builtin:") or any(ch in cfg.data.path for ch in "*?[")
    if not is_pattern and not Path(cfg.data.path).exists():
        raise FileNotFoundError(f"{cfg.data.path}: no such file or folder")
    return cfg


def resolve_init_config(args: argparse.Namespace, source: RunConfig) -> RunConfig:
    """`pretrain --init`: the checkpoint's config with --data, --set and the --on-* flags applied; an
    override that would change the architecture is refused, naming the key."""
    from data2vec.training import check_init_config

    if args.modality and args.modality != source.model.modality:
        raise ConfigError(f"modality: --modality {args.modality} but the checkpoint is a {source.model.modality} model")
    cfg = replace(source, data=replace(source.data, path=args.data or ""))
    cfg = apply_overrides(cfg, [*args.overrides, *_flag_overrides(args)])
    check_init_config(source, cfg)
    if cfg.model.modality == "text" and not cfg.data.text.tokenizer:
        raise ConfigError(
            "data.text.tokenizer: the checkpoint names no tokenizer; --init with a text model needs the one its "
            "vocabulary came from (--set data.text.tokenizer=PATH)"
        )
    if not cfg.data.path:
        raise ConfigError("data.path: no data given (pass --data PATH)")
    is_pattern = cfg.data.path.startswith("builtin:") or any(ch in cfg.data.path for ch in "*?[")
    if not is_pattern and not Path(cfg.data.path).exists():
        raise FileNotFoundError(f"{cfg.data.path}: no such file or folder")
    return cfg


def _run_dir_of(step_dir: Path) -> Path:
    """The run directory holding checkpoint folder `step_dir` (checkpoints/step_N or
    checkpoints/set-aside/step_N)."""
    for parent in step_dir.resolve().parents:
        if (parent / "config.json").is_file() and (parent / "checkpoints").is_dir():
            return parent
    raise ConfigError(f"resume-from: {step_dir} is not inside a run directory; give the run with --resume RUN_DIR")


def _check_resume_args(args: argparse.Namespace) -> None:
    if args.preset or args.config or args.overrides or args.data or _flag_overrides(args) or args.init or args.out:
        raise ConfigError("resume: --resume takes the config saved in the run directory; drop other options")


def _resume_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "resume": True,
        "progress": not args.no_progress,
        "stop_after": args.stop_after,
        "resume_from": args.resume_from,
        "ignore_checksums": args.ignore_checksums,
        "force_fresh": args.force_fresh,
    }


def _pretrain(args: argparse.Namespace) -> int:
    from data2vec.training import train

    if args.resume_from and not args.resume:
        if not Path(args.resume_from).is_dir():
            raise FileNotFoundError(f"{args.resume_from}: no such checkpoint folder")
        args.resume = str(_run_dir_of(Path(args.resume_from)))
    if (args.ignore_checksums or args.force_fresh) and not args.resume:
        raise ConfigError("--ignore-checksums and --force-fresh go with --resume RUN_DIR")
    if _is_joint_pretrain(args):
        return _pretrain_joint(args)
    if args.modality and args.modality not in MODALITIES:
        raise ConfigError(f"modality: {args.modality!r} is not one of {', '.join(MODALITIES)}")
    if args.data is not None:
        if len(args.data) != 1:
            raise ConfigError("data: give one path (MODALITY=PATH pairs are for joint runs: --modality image,audio)")
        args.data = args.data[0]

    if args.resume:
        _check_resume_args(args)
        result = train(RunConfig(), Path(args.resume), **_resume_kwargs(args))
    else:
        if not args.out:
            raise ConfigError("out: give --out RUN_DIR")
        init = None
        if args.init:
            if args.preset or args.config:
                raise ConfigError(
                    "init: --init takes the preset and architecture from the checkpoint; drop --preset/--config"
                )
            # A joint source gives the member --modality names (ModalityRequired says so otherwise).
            init = load_pretrained(args.init, args.modality)
            cfg = resolve_init_config(args, init.config)
        else:
            cfg = resolve_pretrain_config(args)
        from data2vec.data.pipeline import pipeline_for

        _checking_data(lambda: pipeline_for(cfg).check(cfg))  # fail now, in one line, on missing or empty data
        result = train(cfg, Path(args.out), progress=not args.no_progress, stop_after=args.stop_after, init=init)
    from data2vec.distributed import finish, is_main_process

    main_process = is_main_process()
    finish()  # torchrun: leave the process group
    if not main_process:
        return 0
    print(f"finished at step {result.step}; checkpoints in {result.run_dir / 'checkpoints'}")
    for note in result.data_notes:
        print(note)
    if result.skipped_inputs:
        print(f"skipped {len(result.skipped_inputs)} bad input file(s); see {result.run_dir / 'train.log'}")
    return 0


def _is_joint_config(path: Path) -> bool:
    """Whether `path` is a joint run's config.json (False if it is missing; a file that is not JSON
    is left for the config loader to report)."""
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and is_joint(data)


def _is_joint_pretrain(args: argparse.Namespace) -> bool:
    if args.resume:
        return _is_joint_config(Path(args.resume) / "config.json")
    if args.config:
        return _is_joint_config(Path(args.config))
    return bool(args.modality and "," in args.modality) or (args.preset or "").startswith("joint")


def _pretrain_joint(args: argparse.Namespace) -> int:
    """`pretrain --modality image,audio,text --data image=PATH audio=PATH text=PATH` (data2vec.joint)."""
    from data2vec.joint import JointConfig, check_joint_data, joint_preset, with_data
    from data2vec.training import train_joint

    if args.resume:
        _check_resume_args(args)
        result = train_joint(None, Path(args.resume), **_resume_kwargs(args))
    else:
        if not args.out:
            raise ConfigError("out: give --out RUN_DIR")
        mods = [m.strip() for m in (args.modality or "").split(",") if m.strip()]
        for m in mods:
            if m not in MODALITIES:
                raise ConfigError(f"modality: {m!r} is not one of {', '.join(MODALITIES)}")
        if args.config:
            cfg = JointConfig.load(args.config)
        else:
            cfg = joint_preset(args.preset or "joint-tiny", mods or MODALITIES, args.version)
        if mods and set(mods) != set(cfg.modalities):
            raise ConfigError(f"modality: --modality {','.join(mods)} but the config has {','.join(cfg.modalities)}")
        paths: dict[str, str] = {}
        for item in args.data or []:
            m, sep, path = item.partition("=")
            if not sep or m not in cfg.modalities:
                names = ", ".join(cfg.modalities)
                raise ConfigError(f"data: {item!r} is not MODALITY=PATH with MODALITY one of {names}")
            paths[m] = path
        cfg = with_data(cfg, paths)
        flags = [
            f"{m}.{key}" if key.startswith("data.") else key
            for key in _flag_overrides(args)
            for m in (cfg.modalities if key.startswith("data.") else ("",))
        ]
        cfg = apply_overrides(cfg, [*args.overrides, *flags])
        for m in cfg.modalities:
            if not cfg.section(m).data.path:
                raise ConfigError(f"data: no data for {m} (pass --data {m}=PATH)")
        _checking_data(lambda: check_joint_data(cfg))  # fail now, in one line, on missing or empty data
        result = train_joint(
            cfg, Path(args.out), progress=not args.no_progress, stop_after=args.stop_after, init=args.init
        )
    counts = ", ".join(f"{m} {n}" for m, n in result.steps_per_modality.items())
    print(f"finished at step {result.step} ({counts}); checkpoints in {result.run_dir / 'checkpoints'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import importlib

    names = [n for n in DEMOS if n != "joint"] if args.modality == "all" else [args.modality]
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
    from data2vec.interop.conversion import convert

    out, source = convert(args.src, args.dst, to=args.to, modality=args.modality)
    m = source.config.model
    print(f"read {source.source}")
    print(f"  data2vec {m.version}.0 {m.modality} model, {m.encoder.depth} blocks, width {m.encoder.dim}")
    if source.head is not None and source.head.weights:
        head = source.head
        print(f"  task head kept: {head.architecture} ({head.kind}, {len(head.weights)} tensors)")
    print(f"wrote {out} ({'transformers' if args.to == 'hf' else 'data2vec'} format)")
    return 0


def _extract_window(cfg: RunConfig, window: float | None, overlap: float | None) -> tuple[int | None, int | None]:
    """--window / --overlap (seconds for speech, tokens for text) in the model's input units."""
    import math

    from data2vec.extract import DEFAULT_WINDOW_SECONDS

    modality = cfg.model.modality
    if modality == "image":
        if window is not None or overlap is not None:
            raise ConfigError("window: --window and --overlap apply to speech and text, not images")
        return None, None
    unit = "s" if modality == "audio" else "tokens"
    for key, value in (("window", window), ("overlap", overlap)):
        if value is not None and (value < 0 or not math.isfinite(value)):
            raise ConfigError(f"{key}: {value:g} {unit}: must be a number >= 0")
        if value is not None and modality == "text" and not value.is_integer():
            raise ConfigError(f"{key}: {value:g} tokens: must be a whole number of tokens")
    default = DEFAULT_WINDOW_SECONDS if modality == "audio" else cfg.model.text.max_positions
    size = default if window is None else window
    if size and overlap is not None and overlap >= size:
        raise ConfigError(f"overlap: {overlap:g} {unit} must be smaller than the window ({size:g} {unit})")
    if modality == "text":
        return (None if window is None else int(window)), (None if overlap is None else int(overlap))
    rate = cfg.data.audio.sample_rate
    return round(rate * size), (None if overlap is None else round(rate * overlap))


def _extract(args: argparse.Namespace) -> int:
    import torch

    from data2vec.extract import describe, extract_inputs, extract_items, window_settings, write_features
    from data2vec.training import resolve_device

    try:
        layers = [int(x) for x in args.layers.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"layers: {args.layers!r} is not a comma-separated list of integers") from None
    out = Path(args.out)
    if out.suffix.lower() not in (".npy", ".npz", ".parquet"):
        raise ConfigError(f"out: {out} must end in .npy, .npz or .parquet")
    if out.suffix.lower() == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            print(
                "data2vec: error: writing .parquet needs pyarrow (pip install 'data2vec[parquet]'); use .npy or .npz",
                file=sys.stderr,
            )
            return 2
    pre = load_pretrained(args.checkpoint, args.modality)
    model = build_model(pre).to(resolve_device(args.device))
    m = pre.config.model
    blocks = m.encoder.prenet_depth + m.encoder.depth
    print(f"model: data2vec {m.version}.0 {m.modality}, {blocks} blocks, width {m.encoder.dim} ({pre.source})")
    window, overlap = _extract_window(pre.config, args.window, args.overlap)
    window_settings(model, window, overlap)  # checked before any input is read
    cfg = replace(pre.config, data=replace(pre.config.data, column=args.column))
    items = _checking_data(lambda: extract_inputs(cfg, args.input, args.tokenizer))
    names = [it.name for it in items]
    with torch.inference_mode():
        feats = extract_items(
            model,
            items,
            layers,
            args.pool,
            batch_size=args.batch_size,
            max_tokens=args.max_tokens,
            progress=not args.no_progress,
            precision=args.precision,
            window=window,
            overlap=overlap,
        )
    written = write_features(out, names, feats, args.pool)
    print(f"wrote {', '.join(str(w) for w in written)}: {describe(names, feats, args.pool)}")
    return 0


DASH_VALUE_FLAGS = ("--layers",)
"""Options whose value may start with a dash (`--layers -4,-3,-2,-1`), which argparse would
otherwise read as an option."""


def _join_dash_values(argv: Sequence[str]) -> list[str]:
    """`--layers -4,-3` as `--layers=-4,-3`, so negative layer lists work as written."""
    out: list[str] = []
    args = iter(argv)
    for a in args:
        if a in DASH_VALUE_FLAGS:
            value = next(args, None)
            out.append(a if value is None else f"{a}={value}")
        else:
            out.append(a)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(_join_dash_values(sys.argv[1:] if argv is None else argv))
    try:
        return _run(args)
    except ConfigError as e:
        if args.debug:
            raise
        print(f"data2vec: config error: {e}", file=sys.stderr)
        return 2
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"data2vec: error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        if args.debug:
            raise
        print(f"data2vec: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TrainingStopped as e:
        if args.debug:
            raise
        print(f"data2vec: training stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("data2vec: interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.command == "pretrain":
        return _pretrain(args)
    if args.command == "demo":
        return _demo(args)
    if args.command == "doctor":
        from data2vec.doctor import main as doctor

        return doctor(args.device, self_check=not args.no_self_test)
    if args.command == "convert":
        return _convert(args)
    if args.command == "extract":
        return _extract(args)
    if args.command == "finetune":
        return _finetune(args)
    if args.command == "presets":
        for name in sorted(PRESETS):
            print(f"{name}: data2vec {' and '.join(f'{v}.0' for v in sorted(PRESETS[name]))}")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
