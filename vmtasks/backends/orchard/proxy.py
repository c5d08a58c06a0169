"""OpenSSH ProxyCommand for Orchard VMs: ``python3 -m vmtasks.backends.orchard.proxy VM PORT``.

Pumps stdin/stdout through the controller's port-forward WebSocket to the VM's PORT, so
``ssh``/``rsync`` reach a VM without a route to the workers. The controller URL and the
service account come from the environment (ORCHARD_URL, ORCHARD_SERVICE_ACCOUNT_NAME,
ORCHARD_SERVICE_ACCOUNT_TOKEN, and VMTASKS_ORCHARD_CA_CERT / VMTASKS_ORCHARD_PINNED_CERT for
TLS), never from argv, where any user on the host could read the token.
"""

from __future__ import annotations

import os
import sys
import threading

from vmtasks.guest.errors import VmtasksError

from .client import CLOSED_AT_ONCE, OrchardClient, send_until_eof
from .settings import settings_from_proxy_env


def main(argv) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python3 -m vmtasks.backends.orchard.proxy VM PORT", file=sys.stderr)
        return 2
    vm, port = argv[0], int(argv[1])
    try:
        client = OrchardClient(settings_from_proxy_env())
        ws = client.port_forward(vm, port, wait=10, open_timeout=10)
    except VmtasksError as exc:
        print("orchard_proxy: " + exc.render(), file=sys.stderr)
        return 1

    # stdin -> tunnel in a thread; tunnel -> stdout here. Either breaking ends the stream for ssh.
    threading.Thread(target=send_until_eof, args=(lambda: os.read(0, 65536), ws), daemon=True).start()
    received = False
    try:
        for message in ws:
            data = message if isinstance(message, bytes) else message.encode()
            received = received or bool(data)
            while data:
                data = data[os.write(1, data):]
    except Exception:
        pass
    if not received:  # not even sshd's banner: ssh alone would only say "Connection closed"
        print("orchard_proxy: " + CLOSED_AT_ONCE.format(port=port, vm=vm), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
