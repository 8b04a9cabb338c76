"""ambient_dist.cli: console scripts, launchers as thin wrappers, config overrides for sample and
evaluate, and one `error: ...` line with exit status 2 for a user error."""
from __future__ import annotations

import errno
import importlib
import importlib.metadata
import json
import tomllib
from pathlib import Path

import pytest
import torch

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


# --- errors from DataLoader workers and the operating system (issue 22, case 5) -------------

class _RaisesInWorker(torch.utils.data.Dataset):
    """A dataset whose every item raises what `make()` returns, in the worker process."""

    def __init__(self, make):
        self.make = make

    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise self.make()


def _chained_shard_error():
    from ambient_dist.data.shards import ShardError
    try:
        {}["000003.noisy.npy"]
    except KeyError as e:
        return _cause(ShardError("data/s/train-000000.tar, key 000003: no noisy copy"), e)


def _cause(error, cause):
    error.__cause__ = cause
    return error


def _raised_by_worker(make) -> BaseException:
    loader = torch.utils.data.DataLoader(_RaisesInWorker(make), batch_size=None, num_workers=1)
    with pytest.raises(BaseException) as e:
        next(iter(loader))
    assert str(e.value).startswith("Caught ") and "DataLoader worker process 0" in str(e.value)
    return e.value


def _shard_error(message):
    from ambient_dist.data.shards import ShardError
    return lambda: ShardError(message)


WORKER_CASES = [
    (_shard_error("data/s/train-000000.tar, key 000003: noisy copy holds 1 non-finite values"),
     "data/s/train-000000.tar, key 000003: noisy copy holds 1 non-finite values"),
    (_shard_error("two\nlines"), "two\nlines"),
    (_chained_shard_error, "data/s/train-000000.tar, key 000003: no noisy copy"),
    (lambda: FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/s/gone.tar"),
     "/data/s/gone.tar: No such file or directory"),
    (lambda: PermissionError(errno.EACCES, "Permission denied", "/data/s/train-000001.tar"),
     "/data/s/train-000001.tar: Permission denied"),
    (lambda: OSError(errno.ENOSPC, "No space left on device", "/runs/r/x"), "/runs/r/x: No space left on device"),
    (lambda: OSError(errno.EIO, "Input/output error", "/nfs/s.tar"), "/nfs/s.tar: Input/output error"),
    # bugs of ours keep their traceback
    (lambda: RuntimeError("index out of range"), None),
    (lambda: OSError(errno.EBADF, "Bad file descriptor"), None),
    (lambda: KeyError("clean"), None),
]


@pytest.mark.parametrize("make, message", WORKER_CASES)
def test_an_error_raised_in_a_dataloader_worker_is_shown_as_the_workers_own(make, message):
    from ambient_dist.errors import user_error_message
    assert user_error_message(_raised_by_worker(make)) == message
    assert user_error_message(make()) == message   # the same error raised in the main process


def test_every_command_shows_a_worker_or_os_error_as_one_line(capsys):
    from ambient_dist.cli import reports_user_errors
    for make, message in (WORKER_CASES[0], WORKER_CASES[3], WORKER_CASES[-3]):
        def main(argv=None):
            raise _raised_by_worker(make)
        if message is None:
            with pytest.raises(BaseException, match="^Caught "):
                reports_user_errors()(main)([])
            continue
        capsys.readouterr()
        assert reports_user_errors()(main)([]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
    # the decorator of every command is this one (ambient-train, -make-shards, -sample,
    # -evaluate, -study, -sample-text)
    for command in COMMANDS:
        source = (ROOT / "ambient_dist" / "cli" / f"{command}.py").read_text()
        assert "@reports_user_errors(" in source, command


def test_an_os_error_while_writing_names_the_file(tmp_path, capsys):
    from ambient_dist.fileio import atomic_path, atomic_write_bytes, replace_directory
    from ambient_dist.errors import user_error_message
    target = tmp_path / "run" / "report.json"
    target.parent.mkdir()
    with pytest.raises(OSError) as e:
        with atomic_path(target):
            raise OSError(errno.ENOSPC, "No space left on device")   # what write() says
    assert e.value.filename == str(target) and not list(target.parent.iterdir())
    assert user_error_message(e.value) == f"{target}: No space left on device"
    with pytest.raises(PermissionError) as e:
        with replace_directory(tmp_path / "export"):
            raise PermissionError(errno.EACCES, "Permission denied")
    assert user_error_message(e.value) == f"{tmp_path / 'export'}: Permission denied"
    # a missing directory: the file meant, not its temporary sibling
    with pytest.raises(FileNotFoundError) as e:
        atomic_write_bytes(tmp_path / "no" / "dir" / "x", b"")
    assert user_error_message(e.value) == f"{tmp_path / 'no' / 'dir' / 'x'}: No such file or directory"


def test_samples_json_keeps_the_notes_of_what_the_sampler_replaced(toy_run, tmp_path, monkeypatch, capsys):
    """Noise-only sampling stops at sigma_tn whatever sampling.sigma_min says: on screen once
    and in samples.json's notes, beside the provenance (issue 22, cases 6 and 7)."""
    from ambient_dist import progress
    monkeypatch.setattr(progress, "_SAID", set())
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "noise-only"
    argv = [str(toy_run), "--num", "2", "--batch", "2", "--quiet", "--out", str(out),
            "objective.method=noise_only", "objective.sigma_tn=0.5", "sampling.sigma_min=0.002"]
    assert sample_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("note: sampling.sigma_min 0.002 replaced by objective.sigma_tn = 0.5") == 1
    meta = json.loads((out / "samples.json").read_text())
    assert meta["sampler"]["sigma_min"] == 0.5 and "notes" not in meta["sampler"]
    assert len(meta["notes"]) == 1 and meta["notes"][0].startswith("sampling.sigma_min 0.002 replaced")
    assert meta["provenance"]["version"] == importlib.metadata.version("ambient_dist")
    # notes and provenance describe the set, they do not define it: a samples.json written
    # without them (before they were recorded) is the same sample set, topped up without refusal
    meta.pop("notes"), meta.pop("provenance")
    (out / "samples.json").write_text(json.dumps(meta))
    assert sample_cli.main([*argv[:2], "3", *argv[3:]]) == 0
    assert json.loads((out / "samples.json").read_text())["num"] == 3
