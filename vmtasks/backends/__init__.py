"""The backends, one package each, behind ``vmtasks.lifecycle.backend``: ``tart`` (one Mac)
and ``orchard`` (a fleet). Nothing outside this folder names one (tests/test_boundary.py)."""
