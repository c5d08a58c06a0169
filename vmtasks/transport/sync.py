"""rsync of the working tree (and, for the test queue, the test binaries) into the guest,
over the run's pinned SSH settings."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import List, Optional, Sequence

from .ssh import RunKey, ssh_options


def rsync_argv(source: Path, user: str, host: str, dest: str, key: RunKey,
               excludes: Sequence[str], compress: bool = False, proxy_command: Optional[str] = None,
               delete: bool = True) -> List[str]:
    """``rsync -a --delete`` of ``source``'s contents to ``dest`` in the guest.

    Excludes are anchored rsync patterns (``/.git/objects``). The remote shell is ssh with
    only the run's key and the run's known_hosts (see ssh.ssh_options); ``proxy_command``
    carries it through a tunnel (Orchard's port-forward).
    """
    remote_shell = " ".join(shlex.quote(a) for a in ["ssh", *ssh_options(key, proxy_command=proxy_command)])
    argv = ["rsync", "-az" if compress else "-a"] + (["--delete"] if delete else []) + ["-e", remote_shell]
    for pattern in excludes:
        argv.append("--exclude=" + pattern)
    argv += [str(source).rstrip("/") + "/", "{}@{}:{}/".format(user, host, dest.rstrip("/"))]
    return argv
