"""Argument parsing (mimicking swift-argument-parser's messages) and dispatch."""

import datetime
import fcntl
import json
import os
import sys

from . import VERSION
from .errors import TartError, UsageError

# --- value types ---------------------------------------------------------------


def _uint(bits):
    limit = 2 ** bits - 1

    def parse(text):
        if not text.isdigit():
            raise ValueError(text)
        value = int(text)
        if value > limit:
            raise ValueError(text)
        return value
    return parse


def _choice(*values):
    def parse(text):
        if text not in values:
            raise ValueError(text)
        return text
    parse.choices = values
    return parse


# --- command specs -----------------------------------------------------------------
# positionals: list of (dest, title); a title ending in "..." is variadic (one or more).
# options: {"--name": (dest, type)}; flags: {"--name": dest}; aliases map short names.

COMMANDS = {
    "create": dict(
        usage="tart create <name> [--from-ipsw <path>] [--linux] [--disk-size <disk-size>] "
              "[--disk-format <disk-format>]",
        positionals=[("name", "<name>")],
        options={"--from-ipsw": ("from_ipsw", str), "--disk-size": ("disk_size", _uint(16)),
                 "--disk-format": ("disk_format", _choice("raw", "asif"))},
        flags={"--linux": "linux"},
    ),
    "clone": dict(
        usage="tart clone <source-name> <new-name> [--insecure] [--concurrency <concurrency>] "
              "[--prune-limit <n>]",
        positionals=[("source", "<source-name>"), ("new", "<new-name>")],
        options={"--concurrency": ("concurrency", _uint(64)), "--prune-limit": ("prune_limit", _uint(64))},
        flags={"--insecure": "insecure", "--deduplicate": "deduplicate"},
    ),
    "run": dict(
        usage="tart run <name> [--no-graphics] [--graphics] [--no-audio] [--no-clipboard] "
              "[--suspendable]",
        positionals=[("name", "<name>")],
        options={},
        flags={"--no-graphics": "no_graphics", "--graphics": "graphics", "--no-audio": "no_audio",
               "--no-clipboard": "no_clipboard", "--suspendable": "suspendable"},
    ),
    "suspend": dict(
        usage="tart suspend <name>",
        positionals=[("name", "<name>")],
        options={},
        flags={},
    ),
    "rename": dict(
        usage="tart rename <name> <new-name>",
        positionals=[("name", "<name>"), ("new", "<new-name>")],
        options={},
        flags={},
    ),
    "ip": dict(
        usage="tart ip <name> [--wait <wait>] [--resolver <resolver>]",
        positionals=[("name", "<name>")],
        options={"--wait": ("wait", _uint(16)), "--resolver": ("resolver", _choice("dhcp", "arp", "agent"))},
        flags={},
    ),
    "exec": dict(
        usage="tart exec [-i] [-t] <name> <command> ...",
        positionals=[("name", "<name>")],
        passthrough=("command", "<command> ..."),
        options={},
        flags={"-i": "interactive", "-t": "tty"},
    ),
    "stop": dict(
        usage="tart stop <name> [--timeout <timeout>]",
        positionals=[("name", "<name>")],
        options={"--timeout": ("timeout", _uint(64))},
        aliases={"-t": "--timeout"},
        flags={},
    ),
    "delete": dict(
        usage="tart delete <name> ...",
        positionals=[("names", "<name> ...")],
        options={},
        flags={},
    ),
    "list": dict(
        usage="tart list [--source <source>] [--format <format>] [--quiet]",
        positionals=[],
        options={"--source": ("source", str), "--format": ("format", _choice("text", "json"))},
        aliases={"-q": "--quiet"},
        flags={"--quiet": "quiet"},
    ),
    "get": dict(
        usage="tart get <name> [--format <format>]",
        positionals=[("name", "<name>")],
        options={"--format": ("format", _choice("text", "json"))},
        flags={},
    ),
    "set": dict(
        usage="tart set <name> [--cpu <cpu>] [--memory <memory>] [--display <display>] "
              "[--random-mac] [--random-serial] [--disk-size <disk-size>]",
        positionals=[("name", "<name>")],
        options={"--cpu": ("cpu", _uint(16)), "--memory": ("memory", _uint(64)),
                 "--display": ("display", str), "--disk-size": ("disk_size", _uint(16))},
        flags={"--random-mac": "random_mac", "--random-serial": "random_serial"},
    ),
}

# Real Tart subcommands the stand-in does not provide.
UNSUPPORTED = ("pull", "push", "login", "logout", "import", "export", "prune", "fqn")

ROOT_USAGE = "tart <subcommand>"


def usage_line(command):
    if command in COMMANDS:
        return COMMANDS[command]["usage"]
    return ROOT_USAGE


def help_text(command=None):
    if command:
        return "USAGE: %s\n\n(Linux stand-in for Tart; see scripts/README.md)\n" % usage_line(command)
    lines = ["OVERVIEW: Linux stand-in for Tart (see scripts/README.md)", "",
             "USAGE: tart <subcommand>", "", "SUBCOMMANDS:"]
    lines += ["  " + name for name in ("create", "clone", "run", "set", "get", "list", "rename",
                                        "ip", "exec", "stop", "delete", "suspend")]
    return "\n".join(lines) + "\n"


class Args:
    def __getattr__(self, name):  # unset options read as None
        return None


def parse(command, argv):
    """Parse the arguments of one subcommand. Raises UsageError (exit 64)."""
    spec = COMMANDS[command]
    options, flags = spec["options"], spec["flags"]
    aliases = spec.get("aliases", {})
    args = Args()
    for dest, _ in spec["positionals"]:
        setattr(args, dest, None)
    for dest in flags.values():
        setattr(args, dest, False)
    positionals = []
    passthrough = spec.get("passthrough")
    i = 0
    only_positionals = False

    def take_option(name, value, has_value):
        dest, kind = options[name]
        nonlocal i
        if not has_value:
            if i + 1 >= len(argv):
                raise UsageError("Missing value for '%s <%s>'" % (name, name[2:]), command)
            i += 1
            value = argv[i]
        try:
            setattr(args, dest, kind(value))
        except ValueError:
            msg = "The value '%s' is invalid for '%s <%s>'" % (value, name, name[2:])
            choices = getattr(kind, "choices", None)
            if choices:
                msg += ". Please provide one of %s." % ", ".join("'%s'" % c for c in choices)
            raise UsageError(msg, command) from None

    while i < len(argv):
        arg = argv[i]
        if passthrough and len(positionals) == len(spec["positionals"]):
            setattr(args, passthrough[0], argv[i:])
            break
        if only_positionals or arg == "-" or not arg.startswith("-"):
            positionals.append(arg)
        elif arg == "--":
            only_positionals = True
        elif arg in ("-h", "--help"):
            sys.stdout.write(help_text(command))
            raise SystemExit(0)
        elif arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if name in options:
                take_option(name, value, bool(eq))
            elif name in flags and not eq:
                setattr(args, flags[name], True)
            else:
                raise UsageError("Unknown option '%s'" % name, command)
        else:
            # short flags, possibly combined (-it); a short option alias takes a value
            letters = arg[1:]
            for pos, letter in enumerate(letters):
                short = "-" + letter
                target = aliases.get(short, short)
                if target in flags:
                    setattr(args, flags[target], True)
                elif target in options:
                    rest = letters[pos + 1:]
                    take_option(target, rest, bool(rest))
                    break
                else:
                    raise UsageError("Unknown option '%s'" % short, command)
        i += 1

    specs = spec["positionals"]
    for index, (dest, title) in enumerate(specs):
        if title.endswith("..."):
            rest = positionals[index:]
            if not rest:
                raise UsageError("Missing expected argument '%s'" % title, command)
            setattr(args, dest, rest)
            positionals = positionals[:index]
            break
        if index >= len(positionals):
            raise UsageError("Missing expected argument '%s'" % title, command)
        setattr(args, dest, positionals[index])
    else:
        if len(positionals) > len(specs):
            raise UsageError("Unexpected argument '%s'" % positionals[len(specs)], command)
    if passthrough and not getattr(args, passthrough[0]):
        raise UsageError("Missing expected argument '%s'" % passthrough[1], command)
    return args


# --- invocation log (TART_STANDIN_LOG) --------------------------------------------

class InvocationLog:
    """One JSON line per invocation; the exit code is filled in place when known."""

    PLACEHOLDER = b"null"

    def __init__(self, argv):
        self.path = os.environ.get("TART_STANDIN_LOG")
        self.offset = None
        self.done = False
        if not self.path:
            return
        try:
            record = {
                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
                "pid": os.getpid(),
                "ppid": os.getppid(),
                "argv": ["tart"] + list(argv),
            }
            line = json.dumps(record)[:-1].encode() + b', "exit": ' + self.PLACEHOLDER + b"}\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.write(fd, line)
                end = os.lseek(fd, 0, os.SEEK_CUR)
                self.offset = end - len(line) + line.rindex(self.PLACEHOLDER)
            finally:
                os.close(fd)
        except OSError:
            self.offset = None

    def finish(self, code):
        if self.offset is None or self.done:
            return
        self.done = True
        value = str(code).encode()[:len(self.PLACEHOLDER)].ljust(len(self.PLACEHOLDER))
        try:
            fd = os.open(self.path, os.O_WRONLY)
            try:
                os.pwrite(fd, value, self.offset)
            finally:
                os.close(fd)
        except OSError:
            pass


LOG = None


def failing_commands():
    raw = os.environ.get("TART_STANDIN_FAIL", "")
    return {part.strip() for part in raw.split(",") if part.strip()}


def dispatch(argv):
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(help_text())
        return 0
    if argv[0] == "--version":
        print(VERSION)
        return 0
    command, rest = argv[0], argv[1:]
    if command in UNSUPPORTED:
        raise TartError('"tart %s" is not available in the Linux stand-in for Tart '
                        "(see scripts/README.md)" % command)
    if command not in COMMANDS:
        raise UsageError("Unexpected argument '%s'" % command)
    args = parse(command, rest)

    if os.geteuid() != 0:
        raise TartError("tart (Linux stand-in): must run as root: it uses mount/PID/UTS "
                        "namespaces, bind mounts and binds port 22 on 127.x.y.z addresses "
                        "(run it with sudo, or as root in CI)")
    failing = failing_commands()
    if command in failing or "all" in failing:
        raise TartError("tart %s: simulated failure (TART_STANDIN_FAIL=%s)"
                        % (command, os.environ.get("TART_STANDIN_FAIL", "")))

    from . import storage
    if command != "clone":
        try:
            storage.gc_tmp()
        except OSError as exc:
            sys.stderr.write("Failed to perform garbage collection: %s\n" % exc)

    if command == "run":
        from . import guest
        return guest.cmd_run(args, LOG)
    if command == "exec":
        from . import execute
        return execute.cmd_exec(args)
    from . import commands
    return getattr(commands, "cmd_" + command)(args)


def main(argv):
    global LOG
    LOG = InvocationLog(argv)
    code = 1
    try:
        code = dispatch(argv)
    except TartError as exc:
        sys.stdout.flush()
        sys.stderr.write(exc.render() + "\n")
        code = exc.exit_code
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        code = 130
    finally:
        try:
            sys.stdout.flush()
        except OSError:
            pass
        LOG.finish(code)
    return code
