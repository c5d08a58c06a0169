"""The Orchard backend (one package): VMs from an Orchard controller's REST API (``<url>/v1``).

REST calls use ``urllib.request``; the port-forward tunnel (``/v1/vms/{name}/port-forward``)
uses the ``websockets`` package's sync client, so no WebSocket framing is written here. SSH
to a VM always goes through that tunnel: Paramiko gets one end of a ``socketpair`` whose other
end a thread pumps through the WebSocket, and OpenSSH (rsync) gets a ProxyCommand running
``python3 -m vmtasks.backends.orchard.proxy`` that does the same with its stdin/stdout. The client never
needs a route to the workers' VM network.

Where things live on the VM resource, and why:
- The run's public key and the owner (run id, host, user, PID and its start time) are in the
  ``startup_script``'s ``env``. Orchard's ``labels`` are *scheduling constraints* (a VM only
  goes to a worker that has every label), so owner data there would leave the VM pending
  forever; the script env is stored on the resource, returned by ``GET /v1/vms`` and harmless.
  The owner's state dir goes there too: a sweep from another state dir on the owner's host
  (``judge_unleased``, used by vmtasks/state/orphans.py) reads that VM's lease there to tell a kept
  VM from an orphan.
- The key goes in at creation (the startup script appends it to ``authorized_keys``), because
  Orchard runs the script itself as soon as the VM boots: no second round trip. Orchard's
  worker runs it over SSH with password authentication as the VM's ``username`` and
  ``password``, and substitutes admin/admin only when both are empty: so a VM carries
  ``vm.user`` *and* ``vm.password``, or neither (``OrchardBackend.credentials``). The exec
  endpoint would need the same login.
"""
