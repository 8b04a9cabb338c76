"""ambient_dist.cli: console scripts, launchers as thin wrappers, config overrides for sample and
evaluate, and one `error: ...` line with exit status 2 for a user error."""
from __future__ import annotations

import importlib
import importlib.metadata
import json
import tomllib
from pathlib import Path

import pytest

from ambient_dist.cli import evaluate as evaluate_cli
from ambient_dist.cli import sample as sample_cli
from ambient_dist.cli import overrides_of, split_run_and_overrides
from ambient_dist.cli import train as train_cli
from ambient_dist.config import load_config
from ambient_dist.data import ShardOptions
from helpers import random_grey_shards, write_toy_run

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
COMMANDS = sorted(p.stem for p in (ROOT / "ambient_dist" / "cli").glob("*.py") if p.stem != "__init__")


def test_every_command_is_a_console_script_and_a_thin_launcher():
    assert sorted(SCRIPTS) == sorted("ambient-" + c.replace("_", "-") for c in COMMANDS)
    for command in COMMANDS:
        target = SCRIPTS["ambient-" + command.replace("_", "-")]
        module, func = target.split(":")
        assert module == f"ambient_dist.cli.{command}" and func == "main"
        assert callable(getattr(importlib.import_module(module), func))
        launcher = (ROOT / "launchers" / f"{command}.py").read_text()
        assert f"from ambient_dist.cli.{command} import main" in launcher
        assert "sys.path" not in launcher and len(launcher.splitlines()) <= 10


def test_installed_entry_points_are_the_declared_ones():
    """The environment's metadata (pip install -e ., scripts/setup.sh) matches pyproject.toml."""
    installed = {ep.name: ep for ep in importlib.metadata.entry_points(group="console_scripts")
                 if ep.name.startswith("ambient-")}
    assert {name: ep.value for name, ep in installed.items()} == SCRIPTS
    for ep in installed.values():
        assert callable(ep.load())


def test_flags_that_name_config_keys_become_overrides_in_order():
    args = sample_cli.build_parser().parse_intermixed_args(
        ["runs/x", "--steps", "4", "sampling.rho=5", "--num", "3", "sampling.seed=2", "--seed", "5",
         "--solver", "euler", "--churn", "40"])
    assert args.run_dir == "runs/x" and args.num == 3
    assert args.overrides == ["sampling.rho=5", "sampling.seed=2"]
    assert args.flag_overrides == ["sampling.steps=4", "sampling.seed=5", "sampling.solver=euler",
                                   "sampling.S_churn=40.0"]
    # without a run directory the first override is not mistaken for one
    args = sample_cli.build_parser().parse_intermixed_args(["--config", "c.yaml", "sampling.steps=4"])
    assert split_run_and_overrides(args.run_dir, args.overrides) == (None, ["sampling.steps=4"])
    args = train_cli.build_parser().parse_intermixed_args(["train.batch=8", "--describe", "name=x"])
    assert args.overrides == ["train.batch=8", "name=x"] and args.describe


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_user_errors_are_one_line_and_exit_status_2(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    assert train_cli.main(["--config", str(empty), "train.batch=-1", "--describe"]) == 2
    assert "train.batch" in one_error_line(capsys)
    assert sample_cli.main([str(tmp_path / "nowhere"), "--quiet"]) == 2
    assert "nowhere" in one_error_line(capsys)
    assert evaluate_cli.main(["--samples", str(tmp_path), "sampling.steps=4"]) == 2
    assert "sampling.steps=4" in one_error_line(capsys)
    (tmp_path / "notarun").mkdir()   # a directory that is not a training run: said as such
    assert evaluate_cli.main([str(tmp_path / "notarun")]) == 2
    assert "notarun/config.yaml: not found (give a training run directory" in one_error_line(capsys)
    with pytest.raises(SystemExit) as e:   # a malformed command line: argparse's usage error, 2
        sample_cli.main(["--steps", "many"])
    assert e.value.code == 2


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    shards = random_grey_shards(root, 20, 8, ShardOptions(resolution=8, channels=1, sigma_tn=0.5,
                                                          count=16, heldout=4, samples_per_shard=8))
    cfg = load_config(None, [f"data.shards={shards}", "data.resolution=8", "data.channels=1",
                             "network.model_channels=8", "network.channel_mult=[1,2]",
                             "network.num_blocks=1", "network.attn_resolutions=[]", "sampling.steps=2",
                             "evaluation.memorization_features=pixels", "evaluation.heldout_images=4"])
    return write_toy_run(cfg, root / "run", seed=0)


def sampler_of(samples: Path) -> dict:
    return json.loads((samples / "samples.json").read_text())["sampler"]


def test_sample_takes_the_sampler_from_the_config_and_its_overrides(toy_run, tmp_path, monkeypatch, capsys):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    base = [str(toy_run), "--num", "2", "--batch", "2", "--quiet", "--out"]
    assert sample_cli.main(base + [str(tmp_path / "a")]) == 0
    assert sampler_of(tmp_path / "a")["num_steps"] == 2 and sampler_of(tmp_path / "a")["solver"] == "heun"
    assert sample_cli.main(base + [str(tmp_path / "b"), "sampling.steps=3", "sampling.solver=euler",
                                   "sampling.S_churn=5"]) == 0
    b = sampler_of(tmp_path / "b")
    assert (b["num_steps"], b["solver"], b["S_churn"]) == (3, "euler", 5.0)
    # the short flag is the same override; a positional override given too wins
    assert sample_cli.main(base + [str(tmp_path / "c"), "--steps", "4"]) == 0
    assert sampler_of(tmp_path / "c")["num_steps"] == 4
    assert sample_cli.main(base + [str(tmp_path / "d"), "--steps", "4", "sampling.steps=1"]) == 0
    assert sampler_of(tmp_path / "d")["num_steps"] == 1
    capsys.readouterr()
    assert sample_cli.main(base + [str(tmp_path / "e"), "sampling.S_noise=0"]) == 2
    assert "sampling.S_noise" in one_error_line(capsys)


def test_evaluate_applies_overrides_to_the_run_config(toy_run, monkeypatch, capsys):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert evaluate_cli.main([str(toy_run), "--num", "2", "--batch", "2", "--no-fid", "--quiet",
                              "--device", "cpu", "sampling.steps=1", "evaluation.thresholds=[0.5]"]) == 0
    # the missing samples were made with the overridden sampler, measured at the overridden thresholds
    assert sampler_of(toy_run / "samples")["num_steps"] == 1
    report = json.loads((toy_run / "eval" / "report.json").read_text())
    assert report["memorization"]["thresholds"] == [0.5]


def test_short_flags_and_bare_model_overrides_are_read_by_type():
    """Flags become overrides, read by the config's typed parser: nothing after a value is
    dropped, and a number with trailing text is refused naming the key (issue 22, case 4)."""
    from ambient_dist.cli import sample_text
    from ambient_dist.config import ConfigError
    args = sample_text.build_parser().parse_intermixed_args(
        ["m", "--guidance", "3", "--seed", "010", "--sampler", "euler"])
    assert sample_text._bare_model_settings(overrides_of(args)) == {
        "guidance_scale": 3.0, "seed": 10, "sampler": "euler"}
    for flags, key in ((["--steps", "30 # fewer"], "text.sample_steps"),
                       (["--guidance", "7.5x"], "text.guidance_scale"),
                       (["--resolution", "0x100"], "data.resolution")):
        args = sample_text.build_parser().parse_intermixed_args(["m", *flags])
        with pytest.raises(ConfigError, match=f"^{key}: expected"):
            sample_text._bare_model_settings(overrides_of(args))
