"""The backend boundary (issue 19): the core sees only ``Backend``/``Machine`` and the
optional interfaces in vmtasks/lifecycle/backend.py. No module outside the backends' folders
(vmtasks/backends/tart, vmtasks/backends/orchard) names one (in code or in a message: comments
and docstrings may cite the real tools), and none imports one; ``--dry-run`` shows the
configured backend's own plan."""

from __future__ import annotations

import ast
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "vmtasks"

# The backends: Tart (driver, machine, prepared images and slot copies on Tart, its host
# checks and doctor) and Orchard (client, machine, owner judging, the ProxyCommand).
BACKEND_DIRS = ("backends/tart/", "backends/orchard/")
# The config defines the `backend` choices and the `orchard:` section (config.BACKEND_MODULES).
ALLOWED = {"guest/config.py"}
# A word, or the head of an identifier (TartError, tart_images, TART_HOME), not "start".
NAMES = re.compile(r"(?<![A-Za-z])(tart|Tart|TART|orchard|Orchard|ORCHARD)(?![a-z])")


def core_modules():
    return sorted(p for p in PACKAGE.rglob("*.py")
                  if not p.relative_to(PACKAGE).as_posix().startswith(BACKEND_DIRS)
                  and p.relative_to(PACKAGE).as_posix() not in ALLOWED)


def test_the_backends_are_where_the_check_looks():
    """The check's exclusions are real folders holding the backends (a renamed folder would
    otherwise silently widen the core)."""
    for folder in BACKEND_DIRS:
        assert list((PACKAGE / folder).glob("*.py")), folder
    core = {p.relative_to(PACKAGE).as_posix() for p in core_modules()}
    assert "lifecycle/run.py" in core and "backends/tart/cli.py" not in core


def docstring_lines(source: str):
    """The line ranges of every module, class and function docstring."""
    lines = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def backend_names(path: Path):
    """``file:line: token`` for every name or string (not a docstring) that names a backend."""
    source = path.read_text()
    docs = docstring_lines(source)
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in (tokenize.NAME, tokenize.STRING) or tok.start[0] in docs:
            continue
        if NAMES.search(tok.string):
            found.append("{}:{}: {}".format(path.name, tok.start[0], tok.string[:60]))
    return found


def test_no_core_module_names_a_backend():
    found = [hit for path in core_modules() for hit in backend_names(path)]
    assert found == [], "\n".join(found)


def test_no_core_module_imports_a_backend_module():
    found = []
    for path in core_modules():
        package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                base = (package.split(".")[:len(package.split(".")) - (node.level - 1)] if node.level
                        else [])
                module = ".".join(base + ([node.module] if node.module else []))
                names = [module] + [module + "." + a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            found += ["{}:{} imports {}".format(path.name, node.lineno, n) for n in names
                      if n.startswith("vmtasks.backends.")]
    assert found == [], found


def test_the_check_finds_a_backend_name(tmp_path):
    """The scan itself can fail: code and messages count, comments and docstrings do not."""
    sample = tmp_path / "sample.py"
    sample.write_text('"""Docs may say tart clone."""\n# so may comments: orchard\n'
                      'def start(backend):\n    """tart."""\n    return backend.name != "tart" or TartError\n')
    hits = [h.split(": ", 1)[1] for h in backend_names(sample)]
    assert hits == ['"tart"', "TartError"]


def dry_run(tmp_path: Path, config_text: str) -> subprocess.CompletedProcess:
    (tmp_path / "project").mkdir(exist_ok=True)
    (tmp_path / "vm.yaml").write_text("project_dir: project\n" + config_text)
    return subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(REPO), "test-vm", "--dry-run",
                           "--config", str(tmp_path / "vm.yaml")], cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CI": "true",
                               "VMTASKS_STATE_DIR": str(tmp_path / "state")})


def plan_part(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout.split("resolved config:")[0]


def test_dry_run_on_orchard_shows_orchards_plan_and_no_tart_command(tmp_path):
    plan = plan_part(dry_run(tmp_path, "backend: orchard\norchard:\n  url: http://127.0.0.1:9\n"))
    assert "POST http://127.0.0.1:9/v1/vms (image tahoe-base" in plan
    assert re.search(r"DELETE http://127.0.0.1:9/v1/vms/vmtasks-[0-9-a-f]+\n", plan), plan
    assert "ProxyCommand=" in plan and "vmtasks.backends.orchard.proxy" in plan  # rsync goes through the controller
    assert not re.search(r"\btart\b", plan), plan


@pytest.mark.parametrize("vms", ["1", "2"])
def test_dry_run_on_tart_shows_tarts_commands(tmp_path, vms):
    plan = plan_part(dry_run(tmp_path, "vms: {}\n".format(vms)))
    for command in ("tart clone tahoe-base vmtasks-", "tart run --no-graphics vmtasks-",
                    "tart exec vmtasks-", "tart stop vmtasks-"):
        assert command in plan, plan
    assert "/v1/vms" not in plan
