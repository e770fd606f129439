"""benchmarks/speed.py on the tiny image case: equal-precision ratios, per-dtype peaks, the targets
table, and (where the shared data is at hand) the real-data against synthetic rows. The numbers
mean nothing at this size; the test checks what the report holds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import speed  # noqa: E402

FAST = ["--sizes", "tiny", "--modalities", "image", "--no-compile", "--steps", "1", "--peak-n", "128", "--threads", "1"]


def test_every_ratio_compares_equal_precision_and_the_targets_table_ends_the_report(tmp_path: Path) -> None:
    speed.main([*FAST, "--no-data", "--profile", "--out", str(tmp_path / "speed")])
    result = json.loads((tmp_path / "speed.json").read_text())
    assert set(result["peak"]) == {"fp32", "bf16"} and all(v > 0 for v in result["peak"].values())
    # The peer runs in both precisions, and each row is set against its own dtype's peak.
    whos = {(r["who"], r["mode"], r["precision"]) for r in result["pretrain"]}
    assert {("peer", "1.0", "fp32"), ("peer", "1.0", "bf16")} <= whos
    for r in result["pretrain"]:
        assert r["peak_fraction"] == pytest.approx(r["flops_per_sec"] / result["peak"][r["precision"]])
    measures = {r["measure"] for r in result["ratios"] if r["case"] == "image tiny"}
    assert {f"ours {v}.0 {p} / peer 1.0 {p}" for v in (1, 2) for p in ("fp32", "bf16")} <= measures
    assert {f"extract {p} / transformers {p}" for p in ("fp32", "bf16")} <= measures
    for m in measures:  # never bf16 against fp32
        left, right = m.split(" / ")
        assert left.split()[-1] == right.split()[-1], m
    # Targets: the tiny image rows measured, the base rows (not selected) not.
    rows = {(r["case"], r["target"]): r for r in result["targets"]}
    tiny = [r for (case, _), r in rows.items() if case == "image tiny"]
    assert tiny and all(
        r["value"] is not None and r["met"] in (True, False) for r in tiny if "real-data" not in r["target"]
    )
    assert rows[("image tiny", "real-data / synthetic steps per second (2.0 bf16)")]["value"] is None
    base = rows[("image base", "ours 1.0 bf16 train step FLOP/s / bf16 peak")]
    assert base["value"] is None and base["met"] is None and base["goal"] == 0.5
    assert rows[("audio base", "ours 2.0 bf16 train step FLOP/s / bf16 peak")]["goal"] == 0.3
    assert rows[("text base", "ours 2.0 (mask 0.8) / peer 1.0, bf16")]["goal"] == 3.0
    text = (tmp_path / "speed.md").read_text()
    last = text.rstrip().split("Targets:")[-1]
    assert "| target | case | measured | goal | met |" in last and "| image base | not measured |" in last
    assert "Data pipeline rows: not measured (--no-data)" in text
    # --profile: one profiled step each of ours 1.0, the peer and ours 2.0, before the targets.
    assert [(r["who"], r["mode"]) for r in result["profile"]] == [("ours", "1.0"), ("peer", "1.0"), ("ours", "2.0")]
    assert text.index("| profile: phase, ms (share) |") < text.index("Targets:")


def test_profile_splits_each_step_by_phase_and_op_kind(tmp_path: Path) -> None:
    speed.main([*FAST, "--precisions", "fp32", "--profile-only", "--no-data", "--out", str(tmp_path / "p")])
    result = json.loads((tmp_path / "p.json").read_text())
    assert not result["pretrain"] and len(result["profile"]) == 3
    for r in result["profile"]:
        assert r["precision"] == "fp32" and set(r["phases_ms"]) == set(speed.PHASES)
        assert all(v > 0 for v in r["phases_ms"].values())
        assert sum(r["phases_ms"].values()) <= r["total_ms"] * 1.01
        assert r["kinds_ms"]["matmul"] > 0 and r["kinds_ms"]["optimizer and EMA kernels"] > 0
    text = (tmp_path / "p.md").read_text()
    assert "| profile: op self time, share |" in text and "| image tiny peer 1.0 fp32 |" in text


@pytest.mark.parametrize(
    ("op", "kind"),
    [
        ("aten::addmm", "matmul"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
        ("aten::convolution_backward", "convolution"),
        ("aten::copy_", "casts and copies"),
        ("aten::native_layer_norm_backward", "norms"),
        ("aten::_foreach_lerp_", "optimizer and EMA kernels"),
        ("aten::add", "other"),
    ],
)
def test_op_kinds(op: str, kind: str) -> None:
    assert speed.op_kind(op) == kind


DATA = speed.default_data_dir()


@pytest.mark.skipif(not list(DATA.glob(speed.DATA_PATHS["image"])), reason=f"CIFAR-10 shards not found under {DATA}")
def test_real_data_rows_time_the_loader_against_synthetic_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(speed.DATA_PATHS, "image", "cifar10/train-00.tar")  # one shard indexes faster than five
    rows = speed.data_rows("image", "tiny", 8, 0, 2, DATA)
    (row,) = rows
    assert row["case"] == "image tiny" and (row["mode"], row["precision"]) == ("2.0", "bf16")
    assert row["batch_shapes"] == ["[8, 1, 32, 32]"] and row["steps"] == 2
    assert row["real_steps_per_sec"] > 0 and row["synthetic_steps_per_sec"] > 0
    assert row["ratio"] == pytest.approx(row["real_steps_per_sec"] / row["synthetic_steps_per_sec"])


def test_precisions_fp32_times_only_fp32_and_the_bf16_targets_read_not_measured(tmp_path: Path) -> None:
    speed.main([*FAST, "--no-data", "--precisions", "fp32", "--out", str(tmp_path / "speed")])
    result = json.loads((tmp_path / "speed.json").read_text())
    assert result["precisions"] == ["fp32"] and set(result["peak"]) == {"fp32"}
    assert "--precisions fp32" in result["command"]
    assert result["pretrain"] and {r["precision"] for r in result["pretrain"]} == {"fp32"}
    assert {r["who"] for r in result["pretrain"]} == {"ours", "peer"}
    assert result["extract"] and {r["precision"] for r in result["extract"]} == {"fp32"}
    measures = {r["measure"] for r in result["ratios"]}
    assert measures and all("bf16" not in m for m in measures)
    assert measures == {f"ours {v}.0 fp32 / peer 1.0 fp32" for v in (1, 2)} | {"extract fp32 / transformers fp32"}
    rows = {(r["case"], r["target"]): r for r in result["targets"]}
    for target in (
        "ours 1.0 / peer 1.0, bf16",
        "ours 2.0 (mask 0.8) / peer 1.0, bf16",
        "extraction / transformers, bf16",
    ):
        r = rows[("image tiny", target)]
        assert r["value"] is None and r["met"] is None and r["not_measured"] == "bf16 not run"
    assert rows[("image base", "ours 1.0 bf16 train step FLOP/s / bf16 peak")]["not_measured"] == "bf16 not run"
    fp32 = rows[("image tiny", "extraction / transformers, fp32")]
    assert fp32["value"] is not None and fp32["met"] in (True, False) and "not_measured" not in fp32
    # The data target is labelled with the precision the data rows would run in: the first listed.
    assert ("image tiny", "real-data / synthetic steps per second (2.0 fp32)") in rows
    text = (tmp_path / "speed.md").read_text()
    assert text.startswith("Machine: ") and "precisions fp32" in text.splitlines()[0]
    assert "| ours 1.0 / peer 1.0, bf16 | image tiny | not measured (bf16 not run) | >= 1.50x | not measured |" in text
    assert "| bf16 |" not in text


@pytest.mark.parametrize("value", ["fp16", "", "fp32,bf8"])
def test_an_unknown_precision_is_one_argparse_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        speed.parse_args(["--precisions", value, "--no-data"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: --precisions" in err and "expected a comma list of fp32, bf16" in err
