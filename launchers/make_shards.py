#!/usr/bin/env python3
"""`ambient-make-shards` from a source checkout: see ambient_dist/cli/make_shards.py (`ambient-make-shards --help`)."""
import sys

from ambient_dist.cli.make_shards import main

if __name__ == "__main__":
    sys.exit(main())
