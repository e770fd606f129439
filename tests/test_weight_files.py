"""Corrupt or mistyped weight files: each gives one line naming the file and the problem.

Broken safetensors headers (our folder, a transformers folder, a training checkpoint whose
manifest was rewritten to match), a `pytorch_model.bin` of random bytes or with a pickle the
safe reader refuses, and a transformers `config.json` whose values have the wrong type, read by
the loading chain and by the commands that use it (`extract`, `pretrain --init`, `convert`).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tests.conftest import make_tiny_config
from tests.helpers import tiny_audio_config, tiny_text_config

from data2vec.checkpoint import CheckpointError, list_checkpoints, safe_torch_load, save_checkpoint
from data2vec.cli import main
from data2vec.config import RunConfig
from data2vec.interop import InteropError, save_pretrained
from data2vec.interop.hf import save_hf
from data2vec.model import Data2Vec
from data2vec.pretrained import load_pretrained

TORCH_ADVICE = ("weights_only", "can still be loaded", "trust", "add_safe_globals", "file an issue")
"""Words of torch's hints on loading a refused file anyway, which no message may repeat."""


def tiny(cfg: RunConfig | None = None) -> Data2Vec:
    torch.manual_seed(0)
    return Data2Vec.from_config(cfg or make_tiny_config(1)).eval()


def one_line_error(capsys: pytest.CaptureFixture[str], code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("data2vec: error: "), err
    assert "Traceback" not in err
    return err.strip()


# ----------------------------------------------------------------------------- sources with a broken file

BROKEN_HEADERS = {
    "header length past the end": b"\xff" * 100,
    "invalid JSON header": b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage",
    "empty": b"",
}


def _ours(tmp: Path) -> tuple[Path, Path]:
    cfg = make_tiny_config(1)
    out = save_pretrained(tiny(cfg), tmp / "ours", config=cfg)
    return out, out / "model.safetensors"


def _transformers(tmp: Path) -> tuple[Path, Path]:
    out = save_hf(tiny(), tmp / "hf")
    return out, out / "model.safetensors"


def _checkpoint(tmp: Path) -> tuple[Path, Path]:
    """A training checkpoint; the test rewrites its manifest to match the broken file."""
    cfg = make_tiny_config(1)
    model = tiny(cfg)
    save_checkpoint(tmp / "run", 1, model.student_state_dict(), model.teacher_state_dict(), cfg.to_dict(), {}, 2)
    ckpt = list_checkpoints(tmp / "run")[-1]
    return ckpt, ckpt / "student.safetensors"


SOURCES: dict[str, Callable[[Path], tuple[Path, Path]]] = {
    "our folder": _ours,
    "transformers folder": _transformers,
    "checkpoint": _checkpoint,
}


def _match_manifest(ckpt: Path) -> None:
    manifest_path = ckpt / "manifest.json"
    if not manifest_path.is_file():
        return
    manifest = json.loads(manifest_path.read_text())
    for name in manifest["sha256"]:
        manifest["sha256"][name] = hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("header", list(BROKEN_HEADERS))
@pytest.mark.parametrize("source", list(SOURCES))
def test_broken_safetensors_is_one_error_naming_the_file(tmp_path: Path, source: str, header: str) -> None:
    folder, weights = SOURCES[source](tmp_path)
    weights.write_bytes(BROKEN_HEADERS[header])
    _match_manifest(folder)
    with pytest.raises((InteropError, CheckpointError)) as info:
        load_pretrained(folder)
    msg = str(info.value)
    assert msg.startswith(f"{weights}: not a readable safetensors file (") and "\n" not in msg, msg


@pytest.mark.parametrize("command", ["extract", "init", "convert"])
def test_commands_report_a_broken_safetensors_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    folder, weights = _transformers(tmp_path)
    weights.write_bytes(BROKEN_HEADERS["header length past the end"])
    (tmp_path / "imgs").mkdir()
    argv = {
        "extract": ["extract", "--checkpoint", str(folder), "--input", str(tmp_path / "imgs")],
        "init": ["pretrain", "--init", str(folder), "--data", "builtin:digits:train", "--no-progress"],
        "convert": ["convert", str(folder), str(tmp_path / "converted")],
    }[command]
    if command != "convert":
        argv += ["--out", str(tmp_path / ("f.npy" if command == "extract" else "run"))]
    err = one_line_error(capsys, main(argv))
    assert f"{weights}: not a readable safetensors file" in err
    assert not (tmp_path / "converted").exists() and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- pytorch_model.bin


def _bin_folder(tmp: Path, data: bytes | None = None, obj: object = None, legacy: bool = False) -> Path:
    folder = save_hf(tiny(), tmp / "hf")
    (folder / "model.safetensors").unlink()
    b = folder / "pytorch_model.bin"
    if data is not None:
        b.write_bytes(data)
    else:
        torch.save(obj, b, _use_new_zipfile_serialization=not legacy)
    return b


@pytest.mark.parametrize("seed", [0, 2, 20, 61, 195])
def test_random_bytes_pytorch_model_bin(tmp_path: Path, capsys: pytest.CaptureFixture[str], seed: int) -> None:
    """Seeds whose bytes made torch raise UnpicklingError (with advice to load unsafely),
    IndexError, KeyError and UnicodeDecodeError."""
    b = _bin_folder(tmp_path, random.Random(seed).randbytes(2000))
    with pytest.raises(InteropError) as info:
        load_pretrained(b.parent)
    assert str(info.value) == f"{b}: not a torch checkpoint file (neither a zip archive nor torch's legacy format)"
    err = one_line_error(capsys, main(["convert", str(b.parent), str(tmp_path / "out")]))
    assert str(b) in err and not any(w in err for w in TORCH_ADVICE)


def test_truncated_zip_pytorch_model_bin(tmp_path: Path) -> None:
    sd = tiny().student_state_dict()
    b = _bin_folder(tmp_path, obj=sd)
    data = b.read_bytes()
    b.write_bytes(data[: len(data) // 2] + data[-200:])  # the directory at the end, half the members gone
    with pytest.raises(InteropError) as info:
        load_pretrained(b.parent)
    msg = str(info.value)
    assert msg.startswith(f"{b}: ") and "\n" not in msg and not any(w in msg for w in TORCH_ADVICE), msg


class Custom:
    """A class the safe reader knows nothing about."""

    def __init__(self) -> None:
        self.x = 1


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_refused_pickle_says_what_it_found_and_nothing_else(tmp_path: Path, legacy: bool) -> None:
    """Item 18: torch's message invites loading the file with weights_only=False; ours names the
    global it refused."""
    b = _bin_folder(tmp_path, obj={"x": Custom()}, legacy=legacy)
    with pytest.raises(CheckpointError) as info:
        safe_torch_load(b)
    msg = str(info.value)
    assert msg == (
        f"{b}: refused to load: it pickles {__name__}.Custom; only tensors and plain containers are read, "
        "and nothing from the file was executed"
    )
    with pytest.raises(InteropError, match="refused to load: it pickles"):
        load_pretrained(b.parent)


def test_a_pickle_instruction_the_safe_reader_lacks(tmp_path: Path) -> None:
    """A zip file whose pickle (protocol 4) holds a set: refused without torch's advice."""
    b = tmp_path / "x.bin"
    torch.save({"x": {1, 2}}, b, pickle_protocol=4)
    with pytest.raises(CheckpointError) as info:
        safe_torch_load(b)
    msg = str(info.value)
    assert msg.startswith(f"{b}: refused to load: ") and "Unsupported operand" in msg, msg
    assert "\n" not in msg and not any(w in msg for w in TORCH_ADVICE), msg


# ----------------------------------------------------------------------------- config.json values

BAD_VALUES: list[tuple[str, str, object, str]] = [
    ("image", "hidden_size", [192], "an integer"),
    ("image", "hidden_size", "192", "an integer"),
    ("image", "hidden_size", 192.0, "an integer"),
    ("image", "hidden_size", True, "an integer"),
    ("image", "num_hidden_layers", 6.5, "an integer"),
    ("image", "hidden_dropout_prob", None, None),  # null means the transformers default: accepted
    ("image", "layer_norm_eps", "1e-5", "a number"),
    ("image", "use_mean_pooling", "false", "true or false"),
    ("image", "use_mean_pooling", 0, "true or false"),
    ("image", "hidden_act", ["gelu"], "a string"),
    ("image", "image_size", [32, "32"], "an integer or two"),
    ("audio", "conv_dim", ["32", 32, 32], "a list of integers"),
    ("audio", "conv_kernel", 3, "a list of integers"),
    ("audio", "conv_bias", "yes", "true or false"),
    ("text", "vocab_size", "300", "an integer"),
    ("text", "hidden_dropout_prob", [0.1], "a number"),
]


def _hf_folder(tmp: Path, modality: str) -> Path:
    cfg = {
        "image": lambda: make_tiny_config(1),
        "audio": lambda: tiny_audio_config(1, "model.audio.pos_conv_zero_padding=input"),
        "text": lambda: tiny_text_config(1, "model.text.vocab_size=300"),
    }[modality]()
    return save_hf(tiny(cfg), tmp / "hf")


@pytest.mark.parametrize(("modality", "key", "value", "expected"), BAD_VALUES, ids=lambda v: repr(v)[:20])
def test_config_json_values_of_the_wrong_type(
    tmp_path: Path, modality: str, key: str, value: object, expected: str | None
) -> None:
    folder = _hf_folder(tmp_path, modality)
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    if expected is None:
        assert load_pretrained(folder).config.model.modality == modality
        return
    with pytest.raises(InteropError) as info:
        load_pretrained(folder)
    assert str(info.value) == f"{folder / 'config.json'}: {key}: expected {expected}, got {value!r}"


def test_config_json_errors_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _hf_folder(tmp_path, "image")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, hidden_act="mish")))
    with pytest.raises(InteropError, match=rf"^{folder / 'config.json'}: hidden_act='mish' is not supported"):
        load_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(dict(config, id2label={"zero": "a"})))
    with pytest.raises(InteropError, match=rf"^{folder / 'config.json'}: id2label: expected"):
        load_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(dict(config, architectures="Data2VecVisionModel")))
    with pytest.raises(InteropError, match=rf"^{folder / 'config.json'}: architectures: expected"):
        load_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(dict(config, hidden_size=[192])))
    err = one_line_error(capsys, main(["convert", str(folder), str(tmp_path / "out")]))
    assert err == f"data2vec: error: {folder / 'config.json'}: hidden_size: expected an integer, got [192]"


@pytest.mark.parametrize("header", list(BROKEN_HEADERS))
def test_a_broken_checkpoint_file_read_without_checksums_names_the_file(tmp_path: Path, header: str) -> None:
    from data2vec.checkpoint import load_checkpoint

    ckpt, broken = _checkpoint(tmp_path)
    broken.write_bytes(BROKEN_HEADERS[header])
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match=r"student\.safetensors: not a readable safetensors file"):
        load_checkpoint(ckpt, verify=False)  # what --ignore-checksums does
