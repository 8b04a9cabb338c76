#!/usr/bin/env python3
"""`ambient-posthoc-ema` from a source checkout: see ambient_dist/cli/posthoc_ema.py (`ambient-posthoc-ema --help`)."""
import sys

from ambient_dist.cli.posthoc_ema import main

if __name__ == "__main__":
    sys.exit(main())
