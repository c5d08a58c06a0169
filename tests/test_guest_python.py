"""What runs inside the guest must work on the macOS base image's Python 3.9."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GUEST_FILES = ["tasks.py", "vmtasks/__init__.py", "vmtasks/config.py", "vmtasks/errors.py",
               "vmtasks/inner.py", "vmtasks/atomic.py", "vmtasks/results/__init__.py",
               "vmtasks/results/model.py", "vmtasks/results/stream.py", "vmtasks/results/junit.py",
               "vmtasks/results/history.py", "vmtasks/results/rerun.py", "vmtasks/schedule.py",
               "vmtasks/visible.py", "vmtasks/evidence.py",
               "vmtasks/gotest.py"]  # gotest: results.model and schedule import it


def test_guest_side_needs_at_most_python_3_9():
    vermin = shutil.which("vermin")
    if vermin is None:
        pytest.fail("vermin is not installed (pip install vermin): it proves the guest-side minimum Python")
    result = subprocess.run([vermin, "--no-tips", "-t=3.9-", "--violations", "--eval-annotations",
                             *GUEST_FILES], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_guest_side_imports_without_host_packages(tmp_path):
    """tasks.py and the in-VM modules import with only Invoke: no fabric, rich or yaml."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('fabric', 'rich', 'yaml', 'paramiko', 'cryptography'):\n"
        "            raise ImportError('host-only package imported in the guest: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.path.insert(0, {!r})\n"
        "import tasks, vmtasks.inner, vmtasks.config, vmtasks.results, vmtasks.schedule, vmtasks.visible\n"
        "import vmtasks.evidence\n"
        "print('ok')\n"
    ).format(str(REPO))
    result = subprocess.run(["python3", "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.stdout.strip() == "ok", result.stderr
