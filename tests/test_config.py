"""RunConfig validation, (de)serialisation and command-line overrides."""

from __future__ import annotations

import json

import pytest

from data2vec.config import (
    ConfigError,
    ImageConfig,
    MaskingConfig,
    RunConfig,
    apply_overrides,
    from_dict,
    parse_override,
    to_dict,
)

# ------------------------------------------------------------------ unknown keys


def test_from_dict_rejects_unknown_top_level_key() -> None:
    with pytest.raises(ConfigError, match=r"^bogus: unknown key"):
        RunConfig.from_dict({"bogus": 1})


def test_from_dict_rejects_unknown_nested_key_with_dotted_name() -> None:
    with pytest.raises(ConfigError, match=r"^model\.encoder\.widht: unknown key"):
        RunConfig.from_dict({"model": {"encoder": {"widht": 3}}})


def test_from_dict_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict({"optim": {"learning_rate": 1e-3}})
    msg = str(info.value)
    assert msg.startswith("optim.learning_rate")
    assert "lr" in msg and "weight_decay" in msg


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.encoder.widht=3", "model.encoder.widht"),
        ("optim.learning_rate=1e-3", "optim.learning_rate"),
        ("nope=1", "nope"),
        ("nope.deeper=1", "nope"),
        # `model.version` is a leaf, so going below it is an unknown key
        ("model.version.x=1", "model.version"),
    ],
)
def test_apply_overrides_rejects_unknown_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(RunConfig(), [override])
    msg = str(info.value)
    assert msg.split(":")[0] == key
    assert "unknown key" in msg


# ------------------------------------------------------------------ wrong types


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=abc", "optim.lr"),
        ("optim.lr=true", "optim.lr"),
        ("train.steps=1.5", "train.steps"),
        ("train.steps=true", "train.steps"),  # bool is not an int
        ("data.batch_size=false", "data.batch_size"),
        ("model.version=3", "model.version"),
        ("model.version=true", "model.version"),  # True == 1 but is not a valid version
        ("model.encoder.norm_order=middle", "model.encoder.norm_order"),
        ("model.encoder=5", "model.encoder"),
        ("data.hflip=1", "data.hflip"),  # int is not a bool
        ("train.device=7", "train.device"),
        ("model.image.image_size=[32]", "model.image.image_size"),
        ('model.image.image_size=[32, "a"]', "model.image.image_size[1]"),
        ("optim.betas=0.9", "optim.betas"),
    ],
)
def test_wrong_type_is_rejected_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(RunConfig(), [override])
    assert str(info.value).split(": ")[0] == key, str(info.value)


def test_from_dict_wrong_type_names_key() -> None:
    with pytest.raises(ConfigError, match=r"^train\.steps: expected an integer"):
        RunConfig.from_dict({"train": {"steps": 1.5}})
    with pytest.raises(ConfigError, match=r"^optim\.lr: expected a number"):
        RunConfig.from_dict({"optim": {"lr": "abc"}})


def test_int_is_accepted_for_float_and_converted() -> None:
    cfg = apply_overrides(RunConfig(), ["optim.lr=1"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


# ------------------------------------------------------------------ value checks


def test_patch_size_must_divide_image_size() -> None:
    with pytest.raises(ConfigError, match=r"^image\.patch_size: .*does not divide"):
        ImageConfig(image_size=(32, 30), patch_size=8).validate("image")
    with pytest.raises(ConfigError, match=r"^model\.image\.patch_size"):
        RunConfig.from_dict({"model": {"image": {"image_size": [32, 32], "patch_size": 5}}})
    with pytest.raises(ConfigError, match=r"^model\.image\.patch_size"):
        apply_overrides(RunConfig(), ["model.image.patch_size=15"])
    # a dividing patch is fine
    cfg = apply_overrides(RunConfig(), ["model.image.image_size=[32, 48]", "model.image.patch_size=8"])
    assert cfg.model.image.grid == (4, 6)


@pytest.mark.parametrize("p", [0.0, 1.0, 1.2, -0.1])
def test_mask_prob_outside_open_unit_interval_rejected(p: float) -> None:
    with pytest.raises(ConfigError, match=r"^masking\.mask_prob"):
        RunConfig.from_dict({"masking": {"mask_prob": p}})
    with pytest.raises(ConfigError, match=r"^m\.mask_prob"):
        MaskingConfig(mask_prob=p).validate("m")


def test_mask_prob_inside_interval_accepted() -> None:
    assert RunConfig.from_dict({"masking": {"mask_prob": 0.5}}).masking.mask_prob == 0.5


def test_top_k_larger_than_depth_rejected(tiny_config) -> None:
    with pytest.raises(ConfigError, match=r"^targets\.top_k"):
        tiny_config(2, targets__top_k=4)  # depth is 3
    assert tiny_config(2, targets__top_k=3).targets.top_k == 3
    with pytest.raises(ConfigError, match=r"^targets\.top_k"):
        apply_overrides(RunConfig(), ["model.encoder.depth=4"])  # default top_k is 8


def test_other_cross_field_checks(tiny_config) -> None:
    with pytest.raises(ConfigError, match=r"^masking\.num_masks"):
        tiny_config(1, masking__num_masks=2)
    with pytest.raises(ConfigError, match=r"^data\.mean"):
        tiny_config(2, model__image__channels=1)
    with pytest.raises(ConfigError, match=r"^model\.encoder\.num_heads"):
        tiny_config(2, model__encoder__num_heads=5)


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("version", [1, 2])
def test_round_trip_dict(tiny_config, version: int) -> None:
    cfg = tiny_config(version)
    data = cfg.to_dict()
    # tuples become JSON lists
    assert data["model"]["image"]["image_size"] == [32, 32]
    assert isinstance(data["optim"]["betas"], list)
    # through JSON text too
    back = RunConfig.from_dict(json.loads(json.dumps(data)))
    assert back == cfg
    assert isinstance(back.model.image.image_size, tuple)
    assert isinstance(back.optim.betas, tuple)
    assert isinstance(back.data.mean, tuple) and isinstance(back.data.crop_scale, tuple)
    assert from_dict(RunConfig, to_dict(RunConfig())) == RunConfig()


def test_round_trip_detects_a_change(tiny_config) -> None:
    cfg = tiny_config(2)
    data = cfg.to_dict()
    data["optim"]["betas"] = [0.9, 0.99]
    assert RunConfig.from_dict(data) != cfg


def test_save_load(tmp_path, tiny_config) -> None:
    cfg = tiny_config(1)
    path = tmp_path / "config.json"
    cfg.save(path)
    assert json.loads(path.read_text()) == cfg.to_dict()
    assert RunConfig.load(path) == cfg


def test_load_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        RunConfig.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        RunConfig.load(bad)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"train": {"stepz": 3}}))
    with pytest.raises(ConfigError, match=r"train\.stepz"):
        RunConfig.load(unknown)


# ------------------------------------------------------------------ overrides


def test_parse_override_json_and_plain_strings() -> None:
    assert parse_override("optim.lr=1e-3") == (["optim", "lr"], 1e-3)
    assert parse_override("train.steps=10") == (["train", "steps"], 10)
    assert parse_override("data.hflip=false") == (["data", "hflip"], False)
    assert parse_override("model.image.image_size=[64, 32]") == (["model", "image", "image_size"], [64, 32])
    assert parse_override("data.path=/tmp/x=y") == (["data", "path"], "/tmp/x=y")
    assert parse_override('preset="12"') == (["preset"], "12")
    assert parse_override("train.device=cuda:1") == (["train", "device"], "cuda:1")
    with pytest.raises(ConfigError):
        parse_override("no_equals_sign")
    with pytest.raises(ConfigError):
        parse_override("=3")


def test_apply_overrides_values() -> None:
    base = RunConfig()
    cfg = apply_overrides(
        base,
        [
            "optim.lr=2e-4",
            "train.steps=7",
            "data.hflip=false",
            "model.image.image_size=[64, 32]",
            "model.image.patch_size=16",
            "data.path=/data/imgs",
            "model.encoder.norm_order=pre",
            'preset="7"',
        ],
    )
    assert cfg.optim.lr == 2e-4
    assert cfg.train.steps == 7
    assert cfg.data.hflip is False
    assert cfg.model.image.image_size == (64, 32)
    assert cfg.data.path == "/data/imgs"
    assert cfg.model.encoder.norm_order == "pre"
    assert cfg.preset == "7"
    # the input is not modified (frozen, returns a copy)
    assert base == RunConfig()
    # later overrides win
    assert apply_overrides(base, ["train.steps=3", "train.steps=4"]).train.steps == 4


# ------------------------------------------------------------------ regressions (bugs found and fixed)


@pytest.mark.parametrize("value", ["1.0", "2.0", "true"])
def test_float_version_rejected(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^model\.version"):
        apply_overrides(RunConfig(), [f"model.version={value}"])


def test_v2_with_beit_block_masking_rejected(tiny_config) -> None:
    with pytest.raises(ConfigError):
        tiny_config(2, masking__kind="beit_block")


def test_optional_field_accepts_null_and_round_trips() -> None:
    cfg = apply_overrides(RunConfig(), ["teacher.anneal_steps=null"])
    assert cfg.teacher.anneal_steps is None
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert apply_overrides(cfg, ["teacher.anneal_steps=50"]).teacher.anneal_steps == 50
    with pytest.raises(ConfigError, match=r"^teacher\.anneal_steps"):
        apply_overrides(cfg, ["teacher.anneal_steps=abc"])
    with pytest.raises(ConfigError, match=r"^teacher\.anneal_steps"):
        apply_overrides(cfg, ["teacher.anneal_steps=-1"])
