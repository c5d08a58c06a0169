"""Linux stand-in for the `tart` command (see scripts/README.md).

The entry point is the executable ``scripts/tart``; this package holds its
implementation. Python 3 standard library only.
"""

VERSION = "2.32.0-linux-standin"
