"""Which Orchard controller, and how to log in: the config's ``orchard.*`` keys, the environment
(``ORCHARD_URL``, the service account) and the ``orchard`` CLI's context file, resolved in one place.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

from vmtasks.guest.config import excerpt, orchard_url_problem
from vmtasks.guest.errors import ConfigError

ENV_URL = "ORCHARD_URL"
ENV_NAME = "ORCHARD_SERVICE_ACCOUNT_NAME"
ENV_TOKEN = "ORCHARD_SERVICE_ACCOUNT_TOKEN"
# For the ProxyCommand helper only: how to trust the controller's certificate.
ENV_CA_CERT = "VMTASKS_ORCHARD_CA_CERT"
ENV_PINNED_CERT = "VMTASKS_ORCHARD_PINNED_CERT"
CREDENTIALS_HINT = ("set {} and {} to a service account of this controller (or use the `orchard` "
                    "CLI's context file: orchard context create ...)".format(ENV_NAME, ENV_TOKEN))
# Images a probe VM has started on a controller, and when (in the state dir): a run skips the
# probe for an image seen within PROBE_TTL. Only successes are kept, so a missing image is
# always caught before any VM; one removed from the workers since fails at its VMs' start,
# with the same hint.
PROBE_CACHE = "orchard-images.json"


@dataclass(frozen=True)
class OrchardSettings:
    """Where the controller is and how to authenticate; ``source`` says where it came from."""

    url: str
    service_account: str = ""
    token: str = field(default="", repr=False)
    ca_cert: Optional[str] = None  # a CA bundle file to trust (hostname checked)
    pinned_cert: Optional[str] = field(default=None, repr=False)  # PEM from a context file
    source: str = "environment"

    @property
    def base(self) -> str:
        return self.url.rstrip("/")


def context_file_path(env=None) -> Path:
    """Where the `orchard` CLI keeps its contexts: ``$ORCHARD_HOME/.orchard/orchard.yml``,
    ORCHARD_HOME defaulting to the home directory (as in orchard's internal/orchardhome)."""
    env = os.environ if env is None else env
    home = env.get("ORCHARD_HOME") or env.get("HOME") or str(Path.home())
    return Path(home) / ".orchard" / "orchard.yml"


def load_settings(url: Optional[str] = None, ca_cert: Optional[str] = None, context: Optional[str] = None,
                  env=None, context_file: Optional[Path] = None) -> OrchardSettings:
    """Resolve the connection the way the `orchard` CLI does, lowest first: the context file's
    context (``context``, else its ``default-context``), then ``url`` (vm.yaml's
    ``orchard.url``), then ORCHARD_URL / ORCHARD_SERVICE_ACCOUNT_NAME / _TOKEN one by one."""
    env = os.environ if env is None else env
    path = context_file or context_file_path(env)
    found: Dict[str, str] = {}
    sources = []
    if path.is_file():
        import yaml

        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError("cannot read Orchard's context file {}: {}".format(path, exc),
                              "fix or remove it (orchard context list)") from None
        contexts = data.get("contexts") or {}
        wanted = context or data.get("default-context")
        if context and context not in contexts:
            raise ConfigError("Orchard context {!r} is not in {} (it has: {})".format(
                context, path, ", ".join(sorted(contexts)) or "none"),
                "create it with `orchard context create` or fix orchard.context in the config")
        if wanted in contexts:
            found = {k: str(v) for k, v in (contexts[wanted] or {}).items() if v is not None}
            sources.append("context {!r} of {}".format(wanted, path))
    elif context:
        raise ConfigError("orchard.context is {!r} but there is no context file at {}".format(context, path),
                          "create it with `orchard context create`, or set ORCHARD_URL and the service account")
    pinned = None
    if found.get("certificate"):
        try:
            pinned = base64.b64decode(found["certificate"]).decode()
        except (ValueError, UnicodeDecodeError):
            raise ConfigError("the certificate of Orchard context in {} is not base64 PEM".format(path),
                              "re-create the context (orchard context create --force ...)") from None
    final_url = found.get("url", "")
    if url:
        final_url, sources = url, sources + ["orchard.url"]
    name, token = found.get("serviceAccountName", ""), found.get("serviceAccountToken", "")
    if env.get(ENV_URL):
        final_url, sources = env[ENV_URL], sources + [ENV_URL]
    if ENV_NAME in env:
        name = env[ENV_NAME]
    if ENV_TOKEN in env:
        token = env[ENV_TOKEN]
    if not final_url:
        raise ConfigError("no Orchard controller URL: {} is not set, orchard.url is empty and there is no "
                          "context file at {}".format(ENV_URL, path),
                          "export {}=https://controller:6120 (and the service account variables)".format(ENV_URL))
    problem = orchard_url_problem(final_url)
    if problem:
        raise ConfigError("the Orchard URL from {} {}, got {}".format(
            sources[-1] if sources else "?", problem, excerpt(final_url)),
            "write the controller's base URL there, for example https://orchard.example.com:6120")
    if ca_cert and not Path(ca_cert).is_file():
        raise ConfigError("orchard.ca_cert {} does not exist".format(ca_cert),
                          "point it at the controller's CA certificate (PEM)")
    return OrchardSettings(final_url, name, token, ca_cert, pinned, ", ".join(sources) or "environment")


def settings_from_proxy_env(env=None) -> OrchardSettings:
    """The ProxyCommand helper's settings: only the environment (never argv)."""
    env = os.environ if env is None else env
    if not env.get(ENV_URL):
        raise ConfigError("{} is not set".format(ENV_URL), "the ProxyCommand needs the run's environment")
    problem = orchard_url_problem(env[ENV_URL])
    if problem:
        raise ConfigError("{} {}, got {}".format(ENV_URL, problem, excerpt(env[ENV_URL])),
                          "the ProxyCommand needs the run's environment")
    return OrchardSettings(env[ENV_URL], env.get(ENV_NAME, ""), env.get(ENV_TOKEN, ""),
                           env.get(ENV_CA_CERT) or None, env.get(ENV_PINNED_CERT) or None)
