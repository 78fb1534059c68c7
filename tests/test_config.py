"""Unit tests for the typed config loader."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from tstl.core.config import ConfigError, dump_yaml, load_config, parse_overrides, to_dict


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    name: Literal["adamw", "sgd"] = "adamw"

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class Top:
    epochs: int = 10
    out: Path = Path("runs")
    ckpt: str | None = None
    views: list[int] = field(default_factory=lambda: [2, 3])
    optim: Optim = field(default_factory=Optim)


def test_defaults_yaml_and_overrides_layer_in_order(tmp_path: Path) -> None:
    f = tmp_path / "a.yaml"
    f.write_text("epochs: 5\noptim:\n  lr: 0.1\n")
    cfg = load_config(Top, [f], ["optim.name=sgd", "views=[1, 1]", "out=/x"])
    assert cfg.epochs == 5 and cfg.optim.lr == 0.1 and cfg.optim.name == "sgd"
    assert cfg.views == [1, 1] and cfg.out == Path("/x") and cfg.optim.betas == (0.9, 0.999)


def test_int_is_accepted_for_float_but_not_the_reverse() -> None:
    assert load_config(Top, [], ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match="epochs: expected an integer"):
        load_config(Top, [], ["epochs=1.5"])


def test_exponent_without_a_dot_is_a_number(tmp_path: Path) -> None:
    # YAML 1.1 (PyYAML) reads 5e-4 as a string; a learning rate written that way must still work
    f = tmp_path / "a.yaml"
    f.write_text("optim:\n  lr: 2E-3\n")
    assert load_config(Top, [f]).optim.lr == 2e-3
    assert load_config(Top, [], ["optim.lr=5e-4"]).optim.lr == 5e-4
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(Top, [], ["optim.lr=fast"])


def test_unknown_key_names_source_and_suggests(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError,
                       match=r"bad.yaml: unknown key 'optim.lrr' \(did you mean 'lr'\?\)"):
        load_config(Top, [f])


def test_bad_values_and_validation_errors() -> None:
    with pytest.raises(ConfigError,
                       match="command line: optim.name: expected one of 'adamw', 'sgd'"):
        load_config(Top, [], ["optim.name=adam"])
    with pytest.raises(ConfigError, match="lr must be > 0"):
        load_config(Top, [], ["optim.lr=-1"])
    with pytest.raises(ConfigError, match="optim.betas: expected a list of 2 items"):
        load_config(Top, [], ["optim.betas=[0.9]"])
    with pytest.raises(ConfigError, match="not of the form"):
        parse_overrides(["epochs"])


def test_missing_or_malformed_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Top, [tmp_path / "none.yaml"])
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Top, [bad])


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(Top, [], ["ckpt=foo", "optim.lr=0.5"])
    dump_yaml(cfg, tmp_path / "resolved.yaml")
    again = load_config(Top, [tmp_path / "resolved.yaml"])
    assert to_dict(again) == to_dict(cfg)


def test_describe_keys_lists_every_nested_key_with_type_default_and_docstring():
    from tstl.core.config import describe_keys, format_keys
    from tstl.train.config import TrainConfig

    keys = {k.key: k for k in describe_keys(TrainConfig)}
    # every leaf of a default config is listed, nested sections as dotted keys
    def leaves(d, prefix=""):
        for k, v in d.items():
            # free-form mappings are one key
            if isinstance(v, dict) and k not in ("kwargs", "deepspeed"):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"
    from tstl.core.config import to_dict
    assert set(leaves(to_dict(TrainConfig()))) == set(keys)
    assert keys["data.sampling"].type == "segment|dense"
    assert (keys["data.test_views"].type == "[int, int]"
            and keys["data.test_views"].default == [2, 3])
    assert keys["data.num_frames"].doc == "Frames per clip (T)."
    text = format_keys(TrainConfig)
    assert "optim.lr: float = 0.001" in text and "    Peak learning rate" in text


@dataclass
class Checked(Top):
    """A top-level config with whole-config rules: ``check`` counts its calls."""

    calls: int = 0

    def check(self) -> None:
        object.__setattr__(self, "calls", self.calls + 1)
        if self.epochs > 100 and self.optim.lr > 0.1:
            raise ValueError("epochs > 100 needs optim.lr <= 0.1")


def test_the_whole_config_check_runs_once_after_the_last_layer(tmp_path: Path) -> None:
    # torchtitan's ConfigManager: parse and merge every layer, then validate once
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("epochs: 200\noptim:\n  lr: 0.5\n")  # breaks the whole-config rule on its own...
    b.write_text("optim:\n  lr: 0.01\n")  # ...which the next layer repairs
    cfg = load_config(Checked, [a, b], ["views=[1, 1]"])
    assert cfg.calls == 1 and cfg.optim.lr == 0.01
    message = r"a\.yaml \+ command line: epochs > 100 needs optim.lr <= 0.1"
    with pytest.raises(ConfigError, match=message):
        load_config(Checked, [a], ["views=[1, 1]"])


def test_choices_of_a_config_built_in_python_are_checked() -> None:
    from tstl.core.config import check_choices

    check_choices(Optim(name="sgd"), "optim")
    with pytest.raises(ValueError, match="optim.name must be adamw or sgd, got 'adam'"):
        check_choices(Optim(name="adam"), "optim")  # type: ignore[arg-type]
