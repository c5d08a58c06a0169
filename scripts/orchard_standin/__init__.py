"""A stand-in for an Orchard controller (REST API + port-forward WebSocket) whose workers are
Tart stand-in hosts (scripts/tart, one TART_HOME each). See README.md next to this file."""

VERSION = "0.55.0-standin"
