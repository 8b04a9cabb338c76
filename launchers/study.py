#!/usr/bin/env python3
"""`ambient-study` from a source checkout: see ambient_dist/cli/study.py (`ambient-study --help`)."""
import sys

from ambient_dist.cli.study import main

if __name__ == "__main__":
    sys.exit(main())
