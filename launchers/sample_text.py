#!/usr/bin/env python3
"""`ambient-sample-text` from a source checkout: see ambient_dist/cli/sample_text.py (`ambient-sample-text --help`)."""
import sys

from ambient_dist.cli.sample_text import main

if __name__ == "__main__":
    sys.exit(main())
