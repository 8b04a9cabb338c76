"""The command-line programs, one module per command, each with `main(argv=None) -> int`.

    ambient-train         train.py         train, resume or --describe a run
    ambient-make-shards   make_shards.py   image collection -> training shards (pixels or latents)
    ambient-sample        sample.py        images from a trained run's EMA weights
    ambient-evaluate      evaluate.py      FID / KID, memorization, CLIP score -> report
    ambient-study         study.py         a whole memorization study from one study file
    ambient-sample-text   sample_text.py   a (fine-tuned) Stable Diffusion model's images
    ambient-posthoc-ema   posthoc_ema.py   EMAs of other lengths from a power-EMA run's snapshots

pyproject.toml installs them as console scripts; launchers/*.py are the same commands for a
source checkout, and `python -m ambient_dist.cli.<command>` works too. Exit status: 0 done,
2 a user error (bad config, flag, data or file, or the operating system refusing a path: one
`error: ...` line on stderr, no traceback, whichever process raised it), 1 from ambient-study
when it ran but some runs failed (named in one `error: ...` line), anything else is a bug.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from ambient_dist.errors import user_error_message

Main = Callable[[Optional[Sequence[str]]], int]

# Exit status of a user error (argparse uses the same for a bad command line).
USAGE_ERROR = 2


def fail(message: object) -> int:
    """Print `error: message` on stderr (one line) and return the user-error exit status."""
    print(f"error: {message}", file=sys.stderr)
    return USAGE_ERROR


def reports_user_errors(*also: type[BaseException]) -> Callable[[Main], Main]:
    """Decorate a command's `main`: a user error becomes `error: ...` and exit status 2.

    A user error is a UserError, one of `also` (the exceptions the library under that
    command raises for bad input), or an OSError about the user's files and disks, also when
    a DataLoader worker raised it (errors.user_error_message decides and recovers the
    worker's own message); any other exception is a bug and keeps its traceback."""
    def wrap(main: Main) -> Main:
        @functools.wraps(main)
        def run(argv: Optional[Sequence[str]] = None) -> int:
            try:
                return main(argv)
            except Exception as e:
                message = user_error_message(e, also)
                if message is None:
                    raise
                return fail(message)
        return run
    return wrap


class SetsOverride(argparse.Action):
    """A flag kept as a short name for one config override: `--steps 40` is the same as the
    positional `sampling.steps=40` (positional overrides given too are applied after it).

    The overrides collect in `namespace.flag_overrides` (a list of "section.key=value")."""

    def __init__(self, option_strings, dest, key: str, **kwargs):
        kwargs.pop("default", None)
        if "choices" not in kwargs:
            kwargs.setdefault("metavar", key.rsplit(".", 1)[-1].upper())
        super().__init__(option_strings, dest="flag_overrides", default=[], **kwargs)
        self.key = key

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.flag_overrides = [*(namespace.flag_overrides or []), f"{self.key}={value}"]


def add_overrides(parser: argparse.ArgumentParser, what: str) -> None:
    """The positional `section.key=value ...` arguments (`what`: the config they change)."""
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help=f"overrides over {what}, as ambient-train takes them "
                             "(e.g. sampling.steps=40 sampling.S_churn=40)")


def add_run_arguments(parser: argparse.ArgumentParser, run_help: str, what: str) -> None:
    """The optional positional RUN_DIR (also as --run RUN_DIR) and the overrides over `what`
    (the commands that work on a training run: ambient-sample, ambient-evaluate)."""
    parser.add_argument("run_dir", nargs="?", help=run_help)
    add_overrides(parser, what)
    parser.add_argument("--run", dest="run_flag", metavar="RUN_DIR", help="the same as the positional RUN_DIR")


def overrides_of(args: argparse.Namespace, positional: Optional[list[str]] = None) -> list[str]:
    """The short flags' overrides, then the positional ones (`positional`, default
    args.overrides), so that a positional override wins over its short flag."""
    return [*getattr(args, "flag_overrides", []), *(args.overrides if positional is None else positional)]


def run_and_overrides(args: argparse.Namespace) -> tuple[Optional[str], list[str]]:
    """(run directory, every override) of a command built with `add_run_arguments`."""
    run_dir, positional = split_run_and_overrides(args.run_dir or args.run_flag, args.overrides)
    return run_dir, overrides_of(args, positional)


def split_run_and_overrides(run_dir: Optional[str], overrides: list[str]
                            ) -> tuple[Optional[str], list[str]]:
    """argparse gives the first positional to the optional RUN_DIR even when it is an override
    (`ambient-sample --config C --checkpoint W sampling.steps=4`): hand it back."""
    if run_dir and "=" in run_dir and not Path(run_dir).exists():
        return None, [run_dir, *overrides]
    return run_dir, overrides
