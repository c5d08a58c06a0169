"""Errors with Tart's messages and exit codes."""


class TartError(Exception):
    """Printed to stderr as-is, like Tart's RuntimeError (exit code 1 unless stated)."""

    exit_code = 1

    def __init__(self, message, exit_code=None):
        super().__init__(message)
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code

    def render(self):
        return self.message


RuntimeErr = TartError


class VMDoesNotExist(TartError):
    exit_code = 2

    def __init__(self, name):
        super().__init__('the specified VM "%s" does not exist' % name)


class VMNotRunning(TartError):
    exit_code = 2

    def __init__(self, name):
        super().__init__('VM "%s" is not running' % name)


class VMAlreadyRunning(TartError):
    exit_code = 2

    def __init__(self, name):
        super().__init__('VM "%s" is already running!' % name)


class VMIsRunning(TartError):
    exit_code = 1

    def __init__(self, name):
        super().__init__('VM "%s" is running' % name)


class GenericError(TartError):
    """Errors Tart reports through swift-argument-parser: "Error: " prefix, exit 1."""

    def render(self):
        return "Error: " + self.message


class UsageError(TartError):
    """Argument validation failure: "Error: <message>" plus usage, exit 64."""

    exit_code = 64

    def __init__(self, message, command=None):
        super().__init__(message)
        self.command = command

    def render(self):
        from .cli import usage_line  # late import: cli imports this module
        lines = ["Error: " + self.message, "Usage: " + usage_line(self.command)]
        if self.command:
            lines.append("  See 'tart %s --help' for more information." % self.command)
        else:
            lines.append("  See 'tart --help' for more information.")
        return "\n".join(lines)
