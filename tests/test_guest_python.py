"""What runs inside the guest must work on the macOS base image's Python 3.9, with only Invoke.

The guest gets one folder of vmtasks, ``vmtasks/guest`` (the tool bundle ships nothing else):
these tests read that folder, not a list, so a module added there is checked the day it is
added, and a guest module that reaches outside the folder fails here, not in a VM.
"""

import ast
import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GUEST = REPO / "vmtasks" / "guest"
# The one import out of the folder: config's YAML reader, reached only when a host loads a
# .yaml file (the guest reads the resolved config.json).
OUTSIDE_ALLOWED = {("config.py", "vmtasks.settings")}


def guest_files():
    return sorted(GUEST.rglob("*.py"))


def test_the_guest_folder_is_what_the_bundle_ships():
    from vmtasks.guest.config import Config
    from vmtasks.lifecycle.vm import tool_bundle

    with tarfile.open(fileobj=io.BytesIO(tool_bundle(Config())), mode="r:gz") as tar:
        shipped = {n for n in tar.getnames() if n.startswith("vmtasks/")}
    expected = {"vmtasks/" + p.relative_to(REPO / "vmtasks").as_posix() for p in guest_files()}
    assert shipped == expected | {"vmtasks/__init__.py"}


def test_guest_side_needs_at_most_python_3_9():
    vermin = shutil.which("vermin")
    if vermin is None:
        pytest.fail("vermin is not installed (pip install vermin): it proves the guest-side minimum Python")
    result = subprocess.run([vermin, "--no-tips", "-t=3.9-", "--violations", "--eval-annotations",
                             "vmtasks/__init__.py", "vmtasks/guest"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # vermin read the folder: every file of it, not a list that can fall behind.
    listed = subprocess.run([vermin, "--no-tips", "-t=3.9-", "-vv", "vmtasks/guest"], cwd=REPO,
                            capture_output=True, text=True)
    for path in guest_files():
        assert str(path.relative_to(REPO)) in listed.stdout, path


def _imports(path: Path, package: str = ""):
    """(module, line) for every import of a vmtasks module in ``path``, relative ones resolved
    against its package (by default, where the file is in the checkout)."""
    package = package or ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                out.append((".".join(base + ([node.module] if node.module else [])), node.lineno))
            else:
                out.append((node.module or "", node.lineno))
    return [(m, line) for m, line in out if m == "vmtasks" or m.startswith("vmtasks.")]


def test_guest_modules_import_nothing_outside_their_folder():
    reaching = []
    for path in guest_files():
        for module, line in _imports(path):
            if module.startswith("vmtasks.guest") or module == "vmtasks":
                continue
            if (path.name, module) in OUTSIDE_ALLOWED:
                continue
            reaching.append("{}:{}: {}".format(path.relative_to(REPO), line, module))
    assert reaching == []


def test_the_check_sees_an_import_out_of_the_folder(tmp_path):
    """The import check can fail: a guest module reaching the host's reporter, relatively or
    not, is seen as such."""
    bad = tmp_path / "probe.py"
    bad.write_text("from ..ui.report import Reporter\nfrom . import gotest\nimport vmtasks.transport.ssh\n")
    assert [m for m, _ in _imports(bad, "vmtasks.guest")] == ["vmtasks.ui.report", "vmtasks.guest",
                                                               "vmtasks.transport.ssh"]


def test_the_unpacked_bundle_imports_without_host_packages(tmp_path):
    """The bundle as the guest unpacks it: its tasks.py and every guest module import with
    only the standard library and Invoke (no fabric, rich, yaml, paramiko, cryptography) and
    with no other copy of vmtasks on the path."""
    from vmtasks.guest.config import Config
    from vmtasks.lifecycle.vm import tool_bundle

    tool = tmp_path / "tool"
    with tarfile.open(fileobj=io.BytesIO(tool_bundle(Config())), mode="r:gz") as tar:
        tar.extractall(str(tool))
    modules = [".".join(p.relative_to(REPO).with_suffix("").parts).replace(".__init__", "")
               for p in guest_files()]
    code = (
        "import sys\n"
        "sys.path = [p for p in sys.path if p not in ('', {repo!r})]\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('fabric', 'rich', 'yaml', 'paramiko', 'cryptography'):\n"
        "            raise ImportError('host-only package imported in the guest: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.path.insert(0, {tool!r})\n"
        "import importlib, tasks, vmtasks\n"
        "assert vmtasks.__file__.startswith({tool!r}), vmtasks.__file__\n"
        "for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(t for t in tasks.ns.task_names))\n"
    ).format(repo=str(REPO), tool=str(tool), modules=modules)
    result = subprocess.run(["python3", "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['test-vm-inner', 'test-vm-inner-run']"
