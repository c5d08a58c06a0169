"""Tart on one Mac: the CLI driver (``cli``), the backend and its machines (``machine``),
prepared images and suspended slot copies (``images``), and the host's checks (``hostchecks``)."""
