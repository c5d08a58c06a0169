"""vmtasks: run a destructive end-to-end suite inside throwaway Tart VMs.

The package is plain Python; ``tasks.py`` is the thin Invoke layer on top. Modules that
run inside the guest (``config``, ``inner``, ``errors``, ``results``) must import on the
guest's Python 3.9 with only the standard library (and Invoke for ``tasks.py``).
"""

__version__ = "0.2.0"
