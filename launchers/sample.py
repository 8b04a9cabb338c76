#!/usr/bin/env python3
"""`ambient-sample` from a source checkout: see ambient_dist/cli/sample.py (`ambient-sample --help`)."""
import sys

from ambient_dist.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
