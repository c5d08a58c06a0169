"""An Orchard fleet: the backend, its REST client, tunnel and owner judging (``fleet``), and the
OpenSSH ProxyCommand (``proxy``: ``python3 -m vmtasks.backends.orchard.proxy VM PORT``)."""
