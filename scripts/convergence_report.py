#!/usr/bin/env python
"""Convergence report of run folders; the same as `difftune report RUN [RUN ...] [--out DIR]`."""

import sys

from difftune_control.report import main

if __name__ == "__main__":
    sys.exit(main())
