#!/usr/bin/env python3
"""`ambient-evaluate` from a source checkout: see ambient_dist/cli/evaluate.py (`ambient-evaluate --help`)."""
import sys

from ambient_dist.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
