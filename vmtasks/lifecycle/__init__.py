"""A run and its VMs: the run (``run``), one VM's stages (``vm``), the stage table and its
runner (``pipeline``), the test queue, finishing a run, prepared images, replay, and the
backend interface every VM goes through (``backend``)."""
