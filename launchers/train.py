#!/usr/bin/env python3
"""`ambient-train` from a source checkout: see ambient_dist/cli/train.py (`ambient-train --help`)."""
import sys

from ambient_dist.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
