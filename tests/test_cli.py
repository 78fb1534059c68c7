"""The command-line contract: one ``tstl`` command, ``--help`` of every sub-command, the exit-code
convention of ``tstl.core.exitcodes`` (0 ok, 1 failed, 2 usage/config/input error with the fix on
stderr), the installed console scripts and the configs inside an installed wheel."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

import tstl
from tstl import cli
from tstl.core import exitcodes

ROOT = Path(__file__).resolve().parents[1]
BCAST = ["--config", str(ROOT / "configs/data/ucf101.yaml"),
         str(ROOT / "configs/model/bcast_vit_b16.yaml")]


def tstl_cli(*args: str) -> tuple[int, str, str]:
    """``tstl ARGS`` in-process: (exit code, stdout, stderr); argparse's SystemExit counts as the
    exit code."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture()
def shards_dir(tmp_path: Path) -> Path:
    """A data_dir whose ucf101 split-1 shard sets exist (an index only: enough for the preflight
    checks)."""
    for split in ("train_split1", "test_split1"):
        (tmp_path / "ucf101/shards" / split).mkdir(parents=True)
        (tmp_path / "ucf101/shards" / split / "shards.json").write_text("{}")
    return tmp_path


# --- version and help -----------------------------------------------------------------------------


def test_version_is_the_package_version() -> None:
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(),
                        re.MULTILINE)
    assert version and tstl.__version__ == version.group(1) == "0.2.0"
    assert tstl_cli("--version") == (0, f"tstl {tstl.__version__}\n", "")
    assert f"## {tstl.__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_top_level_help_is_fast_and_lists_every_command() -> None:
    # the sub-command modules are imported only when their command runs: no torch for `tstl --help`
    code = ("import sys, tstl.cli; rc = tstl.cli.main(['--help']); "
            "assert rc == 0 and 'torch' not in sys.modules and 'tstl.train' not in "
            "sys.modules, sorted(sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True,
                          check=False, text=True)
    assert proc.returncode == 0, proc.stderr
    for name in ("prepare-ssv2", "prepare-ucf101", "prepare-kinetics400", "finalize", "shards",
                 "train", "eval", "report", "print-config", "config", "groups", "train-tstl",
                 "eval-tstl", "synthetic"):
        assert re.search(rf"^  {name} ", proc.stdout, re.MULTILINE), name
    assert "exit codes: 0 done; 1 run failed; 2 usage" in proc.stdout


@pytest.mark.parametrize("words",
                         [[name] for name in cli._commands() if name not in ("shards", "config")]
                         + [["shards", s] for s in ("build", "verify", "ls", "inspect", "stats",
                                                    "subset")]
                         + [["shards"], ["config"], ["config", "keys"]], ids=" ".join)
def test_help_of_every_subcommand_names_the_tstl_command(words: list[str]) -> None:
    code, out, err = tstl_cli(*words, "--help")
    assert code == 0, err
    assert out.startswith(f"usage: tstl {' '.join(words)} "), out[:200]


def test_python_m_keeps_its_own_name() -> None:
    from pipeline.cli import build_parser as prepare_parser
    from shard_tools.cli import build_parser as shards_parser
    from tstl.train.cli import build_parser as train_parser
    from tstl.twostage.cli import build_parser as tstl_parser

    assert prepare_parser().format_usage().startswith("usage: python -m pipeline.cli ")
    assert shards_parser().format_usage().startswith("usage: python -m shard_tools.cli ")
    assert train_parser().format_usage().startswith("usage: python -m tstl.train.cli ")
    assert tstl_parser().format_usage().startswith("usage: python -m tstl.twostage.cli ")


def test_config_keys_and_print_config() -> None:
    code, out, _ = tstl_cli("config", "keys")
    assert (code == 0
            and re.search(r"^optim\.lr: float = 0\.001\n    Peak learning rate", out, re.MULTILINE))
    code, out, _ = tstl_cli("config", "keys", "--tstl")
    assert code == 0 and re.search(r"^tstl\.num_groups: int = 0", out, re.MULTILINE)
    code, out, _ = tstl_cli("train", "--help-config")
    assert code == 0 and "model.kwargs: mapping of any = {}" in out
    code, out, _ = tstl_cli("print-config", "ucf101", "timesformer_vit_b16", "optim.lr=0.5")
    assert code == 0 and "name: timesformer_vit_b16" in out and "lr: 0.5" in out
    code, out, _ = tstl_cli("print-config", "--list")
    assert code == 0 and "datasets: ek100, kinetics400, ssv2, ucf101" in out


# --- wrong invocations: exit code and the fix on stderr -------------------------------------------


def test_unknown_or_missing_command() -> None:
    code, _, err = tstl_cli()
    assert code == exitcodes.USAGE and "usage: tstl" in err
    code, _, err = tstl_cli("traon")
    assert code == exitcodes.USAGE and "did you mean 'train'?" in err


def test_finalize_mistyped_path_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    typo = tmp_path / "ssv"
    code, _, err = tstl_cli("finalize", str(typo))
    assert (code == exitcodes.USAGE and "no annotations/ folder" in err
            and "prepare-<dataset>" in err)
    assert not typo.exists()


def test_train_without_shards_names_make_shards(tmp_path: Path) -> None:
    code, _, err = tstl_cli("train", "--check", *BCAST, f"data_dir={tmp_path}")
    assert code == exitcodes.USAGE
    assert "train_split1 does not exist" in err and "make shards DATASET=ucf101" in err
    assert "Traceback" not in err


def test_train_unknown_dataset_config_lists_the_datasets(tmp_path: Path) -> None:
    code, _, err = tstl_cli("train", "--check", "--config",
                            str(ROOT / "configs/data/kinetics.yaml"),
                            str(ROOT / "configs/model/bcast_vit_b16.yaml"))
    assert code == exitcodes.USAGE and "kinetics.yaml" in err
    assert "ek100, kinetics400, ssv2, ucf101" in err


def test_model_name_and_kwargs_checked_before_launch(shards_dir: Path) -> None:
    code, _, err = tstl_cli("train", "--check", *BCAST, f"data_dir={shards_dir}",
                            "model.name=bcast_vit_l14")
    assert (code == exitcodes.USAGE and "unknown model 'bcast_vit_l14'" in err
            and "did you mean 'bcast_vit_b16'" in err)
    code, _, err = tstl_cli("train", "--check", *BCAST, f"data_dir={shards_dir}",
                            "model.kwargs.depthh=3")
    assert code == exitcodes.USAGE and "depthh" in err and "accepted: img_size" in err
    code, _, err = tstl_cli("train", "--check", *BCAST, f"data_dir={shards_dir}", "optim.lrr=1")
    assert (code == exitcodes.USAGE and "unknown key 'optim.lrr'" in err
            and "did you mean 'lr'" in err)
    code, out, err = tstl_cli("train", "--check", *BCAST, f"data_dir={shards_dir}")
    assert code == exitcodes.OK and out.startswith("ok: ucf101 bcast_vit_b16"), err


def test_eval_and_tstl_preflight(tmp_path: Path, shards_dir: Path) -> None:
    code, _, err = tstl_cli("eval", "--checkpoint", str(tmp_path / "nope.pt"))
    assert code == exitcodes.USAGE and "checkpoint not found" in err
    tstl_cfg = [*BCAST, str(ROOT / "configs/tstl/default.yaml"), f"data_dir={shards_dir}"]
    code, _, err = tstl_cli("train-tstl", "--check", *tstl_cfg,
                            f"tstl.groups={tmp_path / 'g.json'}")
    assert code == exitcodes.USAGE and "group file not found" in err and "tstl groups" in err
    code, _, err = tstl_cli("train-tstl", "--check", *tstl_cfg,
                            f"tstl.init=[{tmp_path / 'cast.pth'}]")
    assert (code == exitcodes.USAGE and "tstl.init: checkpoint not found" in err
            and "run folder" in err)
    code, _, err = tstl_cli("train", "--check", *BCAST, f"data_dir={shards_dir}",
                            f"model.init=[{tmp_path / 'x.pt'}]")
    assert code == exitcodes.USAGE and "model.init: checkpoint not found" in err
    code, _, err = tstl_cli("train-tstl", "--check", *tstl_cfg, "tstl.num_groups=2")
    assert (code == exitcodes.USAGE and "TSTL needs weights to start from" in err
            and "tstl.init=" in err)
    # the preflight opens tstl.init against the model (tests/models/test_init_preflight.py): a real,
    # tiny CAST
    from tstl.models import create_model

    torch.save({"model": create_model("bcast_test").state_dict()}, tmp_path / "cast.pth")
    code, out, err = tstl_cli("train-tstl", "--check", *tstl_cfg, "tstl.num_groups=2",
                              "model.name=bcast_test", f"tstl.init=[{tmp_path}/cast.pth]")
    assert code == exitcodes.OK and out.startswith("ok: TSTL ucf101"), err


def test_groups_usage_errors(tmp_path: Path) -> None:
    out = str(tmp_path / "g.json")
    code, _, err = tstl_cli("groups", "--num-groups", "4", "--out", out)
    assert code == exitcodes.USAGE and "--num-classes" in err
    code, _, err = tstl_cli("groups", "--method", "confusion", "--num-groups", "4", "--out", out)
    assert code == exitcodes.USAGE and "--confusion FILE.npy" in err
    missing = tmp_path / "confusion.npy"
    code, _, err = tstl_cli("groups", "--method", "confusion", "--num-groups", "4", "--confusion",
                            str(missing), "--out", out)
    assert code == exitcodes.USAGE and f"file not found: {missing}" in err and "Errno" not in err
    code, _, err = tstl_cli("groups", "--num-groups", "4", "--dataset", "ucf101", "--data-dir",
                            str(tmp_path), "--out", out)
    assert code == exitcodes.USAGE and "no shard set at" in err and "make shards" in err
    code, _, err = tstl_cli("groups", "--out", out)  # argparse: the missing --num-groups
    assert code == exitcodes.USAGE and "--num-groups" in err
    code, stdout, _ = tstl_cli("groups", "--num-groups", "2", "--num-classes", "4", "--out", out)
    assert code == exitcodes.OK and "group 1: [2, 3]" in stdout


def test_shards_usage_errors(tmp_path: Path) -> None:
    code, _, err = tstl_cli("shards", "subset", str(tmp_path), str(tmp_path / "o"), "--classes",
                            "1,x")
    assert (code == exitcodes.USAGE and "item 2 ('x') is not an integer" in err
            and "invalid literal" not in err)
    for words in (["ls", str(tmp_path / "nope")], ["stats", str(tmp_path / "nope")],
                  ["verify", str(tmp_path / "nope")], ["inspect", str(tmp_path / "nope")]):
        code, _, err = tstl_cli("shards", *words)
        assert code == exitcodes.USAGE and "not found" in err, words
    code, _, err = tstl_cli("shards", "build", "--dataset", "kinetics", "--data-dir", str(tmp_path))
    assert code == exitcodes.USAGE and "ssv2, ucf101, kinetics400" in err


def test_prepare_and_synthetic_usage_errors(tmp_path: Path) -> None:
    code, _, err = tstl_cli("prepare-ucf101", "--root", str(tmp_path / "nope"), "--data-dir",
                            str(tmp_path))
    assert code == exitcodes.USAGE and "nope" in err
    code, _, err = tstl_cli("synthetic", "--out", str(tmp_path), "--datasets", "ssv3")
    assert code == exitcodes.USAGE and "ssv3" in err and "ssv2,ucf101,kinetics400" in err
    code, _, err = tstl_cli("print-config", "kinetics")
    assert code == exitcodes.USAGE and "available datasets: ek100, kinetics400, ssv2, ucf101" in err


def test_make_fails_fast_on_an_unknown_dataset_and_groups_needs_k() -> None:
    known = "use one of: ek100 kinetics400 ssv2 ucf101"
    for args, hint in ((["train", "DATASET=kinetics"], known),
                       (["shards", "DATASET=kinetics"], known),
                       (["groups"], "make groups needs K=")):
        proc = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, check=False,
                              text=True, timeout=60)
        assert proc.returncode == 2 and hint in proc.stderr, (args, proc.stderr)
    dry = subprocess.run(["make", "-n", "train"], cwd=ROOT, capture_output=True, check=False,
                         text=True, timeout=60).stdout
    check, launch = (dry.index("-m tstl.cli train --check --config"),
                     dry.index("deepspeed --num_gpus"))
    assert check < launch  # the preflight runs before the launcher


# --- installed entry points -----------------------------------------------------------------------


def test_console_scripts_are_installed() -> None:
    """`make setup` (pip install -e .) installs `tstl` next to the interpreter; rerun it after
    pulling 0.2.0."""
    bindir = Path(sys.executable).parent
    found = {name: shutil.which(name, path=str(bindir))
             for name in ("tstl", "tstl-prepare", "shard-tools")}
    assert all(found.values()), (f"console scripts missing in {bindir}: {found}; "
                                 "run `make setup` (pip install -e .)")
    proc = subprocess.run([found["tstl"], "--version"], capture_output=True, check=False, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"tstl {tstl.__version__}", proc.stderr


@pytest.mark.slow
def test_installed_wheel_finds_its_recipes_outside_the_checkout(tmp_path: Path) -> None:
    """Build a wheel, install it into a fresh venv and run `tstl print-config` from a folder without
    configs/ (the dependencies come from this interpreter's site-packages through a .pth: only the
    wheel is installed)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "pipeline", "shard_tools", "tstl", "configs"):
        if (ROOT / name).is_dir():  # symlinks kept: the build must copy what tstl/configs points at
            shutil.copytree(ROOT / name, src / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "whl"), str(src)],
                   cwd=src, check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "whl").glob("tstl_video-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    subprocess.run([*pip, "--python", str(venv / "bin/python"), "install", "-q", "--no-deps",
                    str(wheel)],
                   check=True, capture_output=True, timeout=300)
    site = subprocess.run([str(venv / "bin/python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    code = "import yaml, os; print(os.path.dirname(os.path.dirname(yaml.__file__)))"
    deps = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()
    Path(site, "deps.pth").write_text(deps + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(venv / "bin/tstl"), "print-config", "ucf101", "bcast_vit_b16"],
                          cwd=elsewhere, env=env, capture_output=True, check=False, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dataset: ucf101" in proc.stdout and "name: bcast_vit_b16" in proc.stdout
    where = subprocess.run([str(venv / "bin/python"), "-c",
                            "import tstl.train.recipes as r; print(r.CONFIG_DIR)"],
                           cwd=elsewhere, env=env, capture_output=True, check=False,
                           text=True).stdout.strip()
    assert where == str(Path(site) / "tstl" / "configs") and not Path(where).is_symlink()
    assert (Path(where) / "launch/slurm_train.sbatch").is_file()
