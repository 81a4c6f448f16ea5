"""mlpmem.config: defaults, YAML + dotted overrides, type and range errors that name the flag."""

import dataclasses

from pathlib import Path

import pytest
import yaml

from mlpmem.config import Config, ConfigError, DataConfig, WindowConfig, iter_options, load_config, save_config


def test_defaults_are_valid_and_match_the_paper():
    cfg = Config()
    assert (cfg.window.context, cfg.window.stride) == (1024, 512)
    assert cfg.knn.k == 1024 and cfg.train.alpha == 0.5
    # not the paper's T = 16 (tuned on GPT-2's distance scale): chosen on validation, per model and corpus
    assert cfg.knn.temperature is None and cfg.knn.distances == "exact" and cfg.knn.store_ids is None
    assert load_config() == cfg


def test_yaml_then_overrides_precedence(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"out_dir": "runs/x", "knn": {"k": 64, "temperature": 8.0},
                                 "window": {"context": 128, "stride": 64}}))
    cfg = load_config(p, {"knn.k": "32", "window.stride": 100, "train.lr": "1e-3"})
    assert cfg.knn.k == 32            # flag beats YAML
    assert cfg.knn.temperature == 8.0  # YAML beats default
    assert cfg.window.context == 128 and cfg.window.stride == 100
    assert cfg.train.lr == 1e-3 and cfg.train.alpha == 0.5  # flag beats default; untouched default stays
    assert cfg.out_dir == "runs/x"


def test_save_config_round_trips(tmp_path):
    cfg = load_config(None, {"knn.k": 7, "eval.lambdas": "0.1,0.2", "data.max_eval_tokens": 100})
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("key,value,expected", [
    ("knn.k", "256", 256), ("knn.k", "1e3", 1000), ("knn.k", 64.0, 64), ("knn.k", "1_024", 1024),
    ("data.max_train_tokens", "12345678901234567891", 12345678901234567891),  # exact, not via float
    ("data.max_train_tokens", "none", None), ("data.max_train_tokens", None, None),
    ("eval.lam", "null", None), ("eval.lam", "0.3", 0.3),
    ("train.bf16", "false", False), ("train.bf16", "yes", True), ("force", True, True),
    ("eval.splits", "validation, test", ["validation", "test"]), ("eval.splits", "test", ["test"]),
    ("eval.lambdas", "[0, 0.5]", [0.0, 0.5]), ("eval.lambdas", [0, 1], [0.0, 1.0]),
    ("knn.teacher_dir", "runs/big", "runs/big"),
])
def test_coercion(key, value, expected):
    cfg = load_config(None, {key: value})
    got = cfg
    for part in key.split("."):
        got = getattr(got, part)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("key,value,match", [
    ("window.context", "abc", "expected an integer"),
    ("window.context", "12.5", "expected an integer"),
    ("window.context", True, "expected an integer"),
    ("train.lr", "fast", "expected a number"),
    ("train.lr", "nan", "finite"),
    ("knn.temperature", "inf", "finite"),
    ("train.bf16", "maybe", "true/false"),
    ("model.name", None, "null"),            # YAML `name: ~` used to become the string "None"
    ("model.name", ["a"], "expected a string"),
    ("eval.lambdas", 0.5, "expected a list"),
    ("eval.lambdas", "[0.1, oops", "cannot parse"),
    ("window.context", 1, "must be >= 2"),
    ("window.stride", 2000, "must be in \\[1, context"),
    ("window.batch_size", 0, "must be >= 1"),
    ("data.validation_fraction", 1.5, "must be in \\[0, 1\\)"),
    ("data.max_eval_tokens", 1, ">= 2"),
    ("model.dtype", "fp64", "must be one of auto, fp32, bf16, fp16"),
    ("model.device", "tpu", "use auto, cpu"),
    ("eval.splits", "dev", "unknown split"),
    ("eval.systems", "base,rag", "unknown system"),
    ("eval.lambdas", "0.5,1.5", "each must be in \\[0, 1\\]"),
    ("knn.k", 0, "must be >= 1"),
    ("knn.distances", "approx", "must be one of"),
    ("train.alpha", -0.1, "must be in \\[0, 1\\]"),
    ("generate.temperature", 0, "must be > 0"),
    ("threads", 0, ">= 1"),
])
def test_bad_values_name_the_flag(key, value, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, {key: value})
    assert str(e.value).startswith(f"--{key}:")


def test_fractions_must_leave_train():
    with pytest.raises(ConfigError, match="--data.test_fraction"):
        load_config(None, {"data.validation_fraction": 0.5, "data.test_fraction": 0.5})


def test_bad_values_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("window:\n  context: lots\n")
    with pytest.raises(ConfigError, match="^--window.context: expected an integer"):
        load_config(p)
    p.write_text("knn:\n  kk: 3\n")
    with pytest.raises(ConfigError, match="^--knn.kk: unknown option"):
        load_config(p)
    p.write_text("nosuch:\n  a: 1\n")
    with pytest.raises(ConfigError, match="^--nosuch: unknown option"):
        load_config(p)
    p.write_text("knn: 5\n")
    with pytest.raises(ConfigError, match="^--knn: expected a section"):
        load_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
    p.write_text("knn: {k: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_unknown_override():
    with pytest.raises(ConfigError, match="^--train.learning_rate: unknown option"):
        load_config(None, {"train.learning_rate": 1})
    with pytest.raises(ConfigError, match="^--seed.x: seed is not a section"):
        load_config(None, {"seed": 1, "seed.x": 2})


def test_constructing_with_bad_values_validates():
    with pytest.raises(ConfigError, match="--window.stride"):
        Config(window=WindowConfig(context=8, stride=9))
    with pytest.raises(ConfigError, match="--data.test_fraction"):
        Config(data=DataConfig(test_fraction=0.99, validation_fraction=0.5))


def test_every_option_has_help_and_a_valid_default():
    names = []
    for name, f, _tp in iter_options():
        assert f.metadata.get("help"), name
        names.append(name)
    assert len(names) == len(set(names))
    assert {"knn.k", "window.context", "data.source", "out_dir", "train.lr"} <= set(names)
    # each default survives a round trip through the string coercion the CLI uses
    d = Config().to_dict()
    for name, f, _tp in iter_options():
        node = d
        for part in name.split("."):
            node = node[part]
        if isinstance(node, list):
            value = ",".join(map(str, node))
        else:
            value = "none" if node is None else str(node)
        assert dataclasses.asdict(load_config(None, {name: value})) == d, name


@pytest.mark.parametrize("preset", sorted(p.stem for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_presets_load(preset):
    """Every shipped preset is valid against the current options (a renamed option would break it)."""
    cfg = load_config(Path(__file__).parents[1] / "configs" / f"{preset}.yaml")
    assert cfg.out_dir.startswith("runs/")


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_resolves_to_what_the_device_computes_natively(monkeypatch, native, caplog):
    """'auto' dtype and train.bf16 null become concrete values at load (so fingerprints and results record what
    ran): bf16 only where the hardware has it; an explicit choice is kept, with a warning when bf16 is emulated."""
    import mlpmem.runtime as rt

    monkeypatch.setattr(rt, "native_bf16", lambda device="auto": native)
    cfg = load_config(None, {})
    assert cfg.model.dtype == ("bf16" if native else "fp32") and cfg.train.bf16 is native
    assert load_config(None, {"train.bf16": "null"}).train.bf16 is native
    with caplog.at_level("WARNING"):
        kept = load_config(None, {"model.dtype": "bf16", "train.bf16": "true"})
    assert kept.model.dtype == "bf16" and kept.train.bf16 is True
    assert ("emulated" in caplog.text) is (not native)
    assert load_config(None, {"model.dtype": "fp16"}).model.dtype == "fp16"
    # a config built from a resolved one (a sweep point, a compare variant) keeps the concrete values
    again = load_config(None, {"model.dtype": cfg.model.dtype, "train.bf16": cfg.train.bf16})
    assert (again.model.dtype, again.train.bf16) == (cfg.model.dtype, cfg.train.bf16)
