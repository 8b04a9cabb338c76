"""Reconstruct EMAs of other lengths after training, from a power-EMA run's snapshots (EDM2).

    ambient-posthoc-ema runs/fmnist --sigma-rel 0.05 0.08 0.12
    ambient-posthoc-ema runs/fmnist --sigma-rel 0.08 --at-kimg 2000
    ambient-sample runs/fmnist --ema runs/fmnist/posthoc/ema-0.08.safetensors --out runs/fmnist/s-0.08

The run must have trained with ema.kind=power (it then holds RUN_DIR/ema-snapshots/). For each
--sigma-rel the command solves the least-squares fit of the snapshots' EMA profiles to the
requested one and writes RUN_DIR/posthoc/ema-<sigma_rel>.safetensors (the layout of
ema.safetensors: ambient-sample / ambient-evaluate take it with --ema) and ema-<sigma_rel>.json
beside it (fit error, coefficients). --at-kimg reconstructs the EMA at an earlier snapshot's
time (files ema-<sigma_rel>-at-<K>kimg.*). Snapshots written by several ZeRO ranks are
assembled here, in one process. docs/ema.md: how to choose sigma_rel.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ambient_dist.cli import reports_user_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ambient-posthoc-ema", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="training run with ema.kind=power")
    p.add_argument("--sigma-rel", type=float, nargs="+", required=True, metavar="S",
                   help="EMA widths to reconstruct, relative to the training time, each in (0, 0.2887)")
    p.add_argument("--at-kimg", type=float, metavar="K",
                   help="training time to reconstruct, a snapshot's (default: the last snapshot)")
    p.add_argument("--out", help="output directory (default: RUN_DIR/posthoc)")
    return p


@reports_user_errors()
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from ambient_dist.locking import lock_for_launch
    from ambient_dist.posthoc_ema import reconstruct
    # It reads the snapshots a trainer writes and writes posthoc/: one owner per directory.
    lock = lock_for_launch(args.run_dir, "run directory", create=False)
    try:
        results = reconstruct(args.run_dir, args.sigma_rel, at_kimg=args.at_kimg, out_dir=args.out)
    finally:
        lock.release()
    for sigma_rel, (path, fit_error) in results.items():
        print(f"sigma_rel {sigma_rel:g}: {path} (fit error {fit_error:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
