"""Getting to processes and guests: local processes (``proc``), signals, SSH (``ssh``: the one
Fabric Connection factory and the run's key) and rsync (``sync``)."""
