#!/usr/bin/env python3
"""Train a diffusion model with the ambient objective.

    python launchers/train.py --config configs/fashion-mnist-300.yaml [section.key=value ...]
    python launchers/train.py --config configs/cifar10-ddpmpp.yaml --describe
    python launchers/train.py --resume runs/fashion-mnist-300        # continue a run
    python launchers/train.py --config FILE --resume auto             # continue if possible

The same command runs as a single process or under deepspeed / torchrun / mpirun.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

from ambient_dist.config import load_config  # noqa: E402
from ambient_dist.errors import UserError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="experiment YAML (default with --resume RUN_DIR: RUN_DIR/config.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.batch=128")
    parser.add_argument("--describe", action="store_true",
                        help="print the resolved config, parameter count and GFLOP/image, then exit")
    parser.add_argument("--resume", metavar="RUN_DIR|auto",
                        help="continue from the latest checkpoint of RUN_DIR, or of this run's own "
                             "directory if there is one ('auto')")
    parser.add_argument("--run-dir", help="output directory (default: <train.run_root>/<name>)")
    # The deepspeed launcher passes --local_rank; the environment (LOCAL_RANK) says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    config_path = args.config
    run_dir = args.run_dir
    if config_path is None:
        if args.resume in (None, "auto"):
            parser.error("--config is required (unless --resume names a run directory)")
        config_path = str(Path(args.resume) / "config.yaml")
        run_dir = run_dir or args.resume
    try:
        # --describe needs no data on disk, so it skips the existence checks of paths.
        cfg = load_config(config_path, args.overrides, check_paths=not args.describe)
        # Imported after the config is known good: this pulls in torch and the networks.
        from ambient_dist.engine.run import describe, run_training
        if args.describe:
            print(describe(cfg))
            return 0
        run_training(cfg, run_dir=run_dir, resume=args.resume)
    except UserError as e:   # bad config, data or files: one line, exit 2 (a traceback is a bug)
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
