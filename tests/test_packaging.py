"""vmtasks as a reusable Invoke collection (issue 9, "Done when"): installed with a plain
``pip install <checkout>`` into a fresh virtualenv, adopted by a repository with a two-line
``tasks.py`` and a config, and nothing from this checkout on the path.

The virtualenv is a plain one (no system site-packages), so the install also proves the
runtime dependencies are declared: ``invoke test-vm --dry-run`` imports the host modules
(fabric, rich, yaml) from what pip installed and nothing else. It needs a package index
(or pip's configured local one); if the plain install cannot reach one, the fixture says so
and retries with ``--system-site-packages`` so the rest is still checked.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Dict, List

import pytest

REPO = Path(__file__).resolve().parent.parent
TWO_LINES = '"""This repository\'s tasks: the vmtasks collection."""\nfrom vmtasks.tasks import ns  # noqa: F401\n'
TASKS = {"test-vm", "test-vm-run", "test-vm-inner", "test-vm-inner-run", "cleanup-orphans", "build",
         "vm-doctor", "vm-list", "vm-login", "vm-prepare", "vm-report", "vm-init", "vm-changes"}


def _clean_env(**extra: str) -> Dict[str, str]:
    """The test's environment without anything that would put this checkout on the path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSAFEPATH") and not k.startswith("INVOKE_")}
    env.update(extra)
    return env


def _tracked_copy(dest: Path) -> Path:
    """This checkout's tracked files (as a fresh clone has them) in a git repository of its
    own, so building it leaves nothing in the real worktree and its .gitignore can be judged."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, timeout=60)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: " + listed.stderr.decode(errors="replace"))
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = REPO / name
        if not source.is_file():
            continue  # deleted in the worktree but not yet committed
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(str(source), str(target))
    git = ["git", "-C", str(dest), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    for argv in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "checkout"]):
        subprocess.run(git + argv, check=True, capture_output=True, timeout=60)
    return dest


class Installed:
    def __init__(self, venv: Path, checkout: Path, isolated: bool, log: str) -> None:
        self.venv = venv
        self.checkout = checkout
        self.isolated = isolated  # a plain venv (True) or --system-site-packages
        self.log = log

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def invoke_bin(self) -> Path:
        return self.venv / "bin" / "invoke"

    def invoke(self, cwd: Path, *args: str, env=None) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.invoke_bin), *args], cwd=str(cwd), env=_clean_env(**(env or {})),
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)

    def py(self, cwd: Path, code: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.python), "-c", code], cwd=str(cwd), env=_clean_env(),
                              capture_output=True, text=True, timeout=120)


def _make_venv(path: Path, system_site: bool) -> None:
    argv = [sys.executable, "-m", "venv", str(path)] + (["--system-site-packages"] if system_site else [])
    subprocess.run(argv, check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    root = tmp_path_factory.mktemp("packaging")
    checkout = _tracked_copy(root / "checkout")
    venv = root / "venv"
    _make_venv(venv, system_site=False)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    done = subprocess.run(pip + [str(checkout)], capture_output=True, text=True, timeout=600, env=_clean_env(),
                          cwd=str(root))
    isolated = done.returncode == 0
    log = done.stdout + done.stderr
    if not isolated:
        # No package index reachable: the collection can still be checked, with the
        # system's dependencies (the declared-dependency check is then weaker).
        shutil.rmtree(str(venv))
        _make_venv(venv, system_site=True)
        again = subprocess.run(pip + ["--no-build-isolation", "--no-deps", str(checkout)], capture_output=True,
                               text=True, timeout=600, env=_clean_env(), cwd=str(root))
        assert again.returncode == 0, log + again.stdout + again.stderr
        log += "\n(retried with --system-site-packages)\n" + again.stdout + again.stderr
    print("packaging: {} virtualenv".format("plain" if isolated else "--system-site-packages"))
    return Installed(venv, checkout, isolated, log)


def _listed_tasks(stdout: str) -> List[str]:
    lines = stdout.split("Available tasks:", 1)[1].splitlines()
    return [line.split()[0] for line in lines if line.startswith("  ") and not line.startswith("   ")]


def _plan_field(stdout: str, name: str) -> str:
    for line in stdout.splitlines():
        if line.strip().startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError("no '{}:' line in the plan:\n{}".format(name, stdout))


def _resolved(stdout: str) -> dict:
    return json.loads(stdout.split("resolved config:", 1)[1])


def _adopting_repo(root: Path, layout: str) -> Path:
    """A new repository adopting vmtasks: two-line tasks.py plus vm.yaml (``layout`` "flat")
    or config/vm.yaml (``layout`` "config", project_dir ..)."""
    root.mkdir(parents=True)
    (root / "tasks.py").write_text(TWO_LINES)
    (root / "go.mod").write_text("module example.com/adopter\n")
    if layout == "flat":
        (root / "vm.yaml").write_text("project_dir: .\nvm:\n  name_prefix: adopter-flat\n")
    else:
        (root / "config").mkdir()
        (root / "config" / "vm.yaml").write_text("project_dir: ..\nvm:\n  name_prefix: adopter-cfg\n")
    return root


def test_the_checkout_is_not_what_gets_imported(installed, tmp_path):
    """Every later check means something only if vmtasks comes from the venv's site-packages."""
    done = installed.py(tmp_path, "import vmtasks, invoke, sys; print(vmtasks.__file__); print(sys.prefix)")
    assert done.returncode == 0, done.stderr
    where, prefix = done.stdout.split()
    assert Path(where).resolve().is_relative_to(installed.venv.resolve()), where
    assert "site-packages" in where
    assert not Path(where).resolve().is_relative_to(REPO.resolve())
    assert not Path(where).resolve().is_relative_to(installed.checkout.resolve())


def test_plain_install_declares_its_dependencies(installed, tmp_path):
    if not installed.isolated:
        pytest.skip("no package index for a plain virtualenv; installed with --system-site-packages")
    check = subprocess.run([str(installed.python), "-m", "pip", "check"], capture_output=True, text=True,
                           timeout=120, env=_clean_env())
    assert check.returncode == 0, check.stdout + check.stderr
    # Every host module the tasks import is there (nothing comes from the system).
    done = installed.py(tmp_path, "import vmtasks.tasks, vmtasks.lifecycle.run, vmtasks.ui.report, "
                                  "vmtasks.transport.ssh, vmtasks.guest.config, vmtasks.settings.yamlsafe, "
                                  "vmtasks.backends.orchard.backend, vmtasks.backends.tart.machine, "
                                  "vmtasks.guest.results")
    assert done.returncode == 0, done.stderr
    # The report's template is installed with the package (package data) and Jinja2 with it.
    done = installed.py(tmp_path, "import vmtasks.ui.html_report as h; h._environment().get_template('report.html.j2')")
    assert done.returncode == 0, done.stderr
    # Test tools are a separate group: `pip install .[test]`, not runtime requirements.
    meta = installed.py(tmp_path, "import importlib.metadata as m, json; print(json.dumps(m.requires('vmtasks')))")
    requires = json.loads(meta.stdout)
    runtime = [r for r in requires if "extra ==" not in r]
    test_extra = [r for r in requires if 'extra == "test"' in r]
    assert not any(r.startswith(("pytest", "pexpect", "vermin")) for r in runtime), runtime
    assert {r.split(">")[0].split(";")[0].strip() for r in test_extra} >= {"pytest", "pexpect", "vermin"}


@pytest.mark.parametrize("layout", ["flat", "config"])
def test_new_repository_lists_tasks_and_plans_for_itself(installed, tmp_path, layout):
    repo = _adopting_repo(tmp_path / "adopter", layout)
    listed = installed.invoke(repo, "--list")
    assert listed.returncode == 0, listed.stderr
    assert set(_listed_tasks(listed.stdout)) == TASKS, listed.stdout

    plan = installed.invoke(repo, "test-vm", "--dry-run")
    assert plan.returncode == 0, plan.stdout + plan.stderr
    config = repo / ("vm.yaml" if layout == "flat" else "config/vm.yaml")
    assert Path(_plan_field(plan.stdout, "config")).resolve() == config.resolve()
    assert Path(_plan_field(plan.stdout, "project")).resolve() == repo.resolve()
    resolved = _resolved(plan.stdout)
    assert resolved["vm"]["name_prefix"] == "adopter-" + layout.replace("config", "cfg")
    # Its records and durations belong to this repository, not to the checkout or the venv.
    assert Path(resolved["records"]["dir"]).resolve().is_relative_to(repo.resolve())
    assert Path(resolved["suite"]["durations"]).resolve().is_relative_to(repo.resolve())
    # The sync ships this repository's tree.
    assert "{}/ ".format(repo) in plan.stdout
    assert str(REPO) not in plan.stdout and str(installed.checkout) not in plan.stdout


def test_from_a_subdirectory_the_repository_config_is_used(installed, tmp_path):
    repo = _adopting_repo(tmp_path / "adopter", "config")
    deeper = repo / "internal" / "pkg"
    deeper.mkdir(parents=True)
    for args in (["test-vm", "--dry-run"], ["--search-root", str(repo), "test-vm", "--dry-run"]):
        plan = installed.invoke(deeper, *args)
        assert plan.returncode == 0, plan.stdout + plan.stderr
        assert Path(_plan_field(plan.stdout, "config")).resolve() == (repo / "config" / "vm.yaml").resolve(), args
        assert Path(_plan_field(plan.stdout, "project")).resolve() == repo.resolve(), args


def test_guest_bundle_is_built_from_the_installed_package(installed, tmp_path):
    code = (
        "import base64, sys, vmtasks.lifecycle.vm as vm, vmtasks.guest.config as c\n"
        "cfg = c.load(None, environ={}, cwd=__import__('pathlib').Path('.'))\n"
        "sys.stdout.write(str(vm.PACKAGE_DIR) + '\\n' + base64.b64encode(vm.tool_bundle(cfg)).decode())\n"
    )
    done = installed.py(tmp_path, code)
    assert done.returncode == 0, done.stderr
    package_dir, blob = done.stdout.split("\n", 1)
    package_dir = Path(package_dir)
    assert package_dir.resolve().is_relative_to(installed.venv.resolve()), package_dir
    import base64

    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(blob)), mode="r:gz") as tar:
        names = set(tar.getnames())
        unpacked = tmp_path / "tool"
        tar.extractall(str(unpacked))
    guest_py = {"vmtasks/" + p.relative_to(package_dir).as_posix() for p in (package_dir / "guest").rglob("*.py")}
    assert {"vmtasks/guest/tasks.py", "vmtasks/guest/results/__init__.py", "vmtasks/guest/results/stream.py",
            "vmtasks/guest/results/junit.py"} <= guest_py
    # The guest gets the guest-safe folder (and the package's __init__), nothing else of vmtasks.
    assert {n for n in names if n.startswith("vmtasks/")} == guest_py | {"vmtasks/__init__.py"}, sorted(names)
    assert {"tasks.py", "config.json"} <= names
    # Byte for byte what pip installed.
    for name in ("vmtasks/guest/tasks.py", "vmtasks/guest/results/model.py"):
        assert (unpacked / name).read_bytes() == (package_dir / name[len("vmtasks/"):]).read_bytes(), name
    assert "from vmtasks.guest.tasks import ns" in (unpacked / "tasks.py").read_text()

    # The unpacked bundle is a working collection on its own: a Python with Invoke but no
    # vmtasks installed (the guest's) lists the in-VM tasks from it and imports the bundle.
    bare = tmp_path / "bare-venv"
    _make_venv(bare, system_site=True)  # the system's Invoke; vmtasks is not installed there
    probe = subprocess.run([str(bare / "bin" / "python"), "-c", "import vmtasks"], capture_output=True,
                           text=True, timeout=60, cwd=str(tmp_path), env=_clean_env())
    if probe.returncode == 0:
        pytest.skip("vmtasks is installed system-wide: cannot tell the bundle's copy from it")
    listed = subprocess.run([str(bare / "bin" / "python"), "-m", "invoke", "--search-root", str(unpacked), "--list"],
                            capture_output=True, text=True, timeout=60, cwd=str(tmp_path), env=_clean_env())
    assert listed.returncode == 0, listed.stderr
    assert {"test-vm-inner", "test-vm-inner-run"} <= set(_listed_tasks(listed.stdout))
    refused = subprocess.run([str(bare / "bin" / "python"), "-m", "invoke", "--search-root", str(unpacked),
                              "test-vm-inner"], capture_output=True, text=True, timeout=60, cwd=str(tmp_path),
                             env=_clean_env(OPENBOOT_VM_CONFIG=str(unpacked / "config.json")))
    assert refused.returncode != 0 and "OPENBOOT_IN_VM" in refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr


def test_building_from_a_clone_leaves_nothing_untracked(installed):
    """`pip install <checkout>` builds in the tree (build/, *.egg-info): a fresh clone's
    .gitignore must cover what that leaves behind."""
    status = subprocess.run(["git", "-C", str(installed.checkout), "status", "--porcelain", "--untracked-files=normal"],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    left = [line for line in status.stdout.splitlines() if line.strip()]
    assert left == [], "pip install left untracked files in the checkout:\n" + "\n".join(left[:20])


def test_wheel_holds_the_package_and_nothing_else(installed, tmp_path):
    """`pip install vmtasks` from a wheel gets the same package: every module (results/
    included) and no tests, scripts or examples."""
    import zipfile

    out = tmp_path / "dist"
    built = subprocess.run([str(installed.python), "-m", "pip", "wheel", "--quiet", "--no-deps",
                            "--disable-pip-version-check", "-w", str(out), str(installed.checkout)],
                           capture_output=True, text=True, timeout=600, env=_clean_env(), cwd=str(tmp_path))
    if built.returncode != 0 and not installed.isolated:
        pytest.skip("no package index to build a wheel with: " + built.stderr[-300:])
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = out.glob("vmtasks-*.whl")
    names = set(zipfile.ZipFile(str(wheel)).namelist())
    source = {"vmtasks/" + p.relative_to(installed.checkout / "vmtasks").as_posix()
              for p in (installed.checkout / "vmtasks").rglob("*.py")}
    assert source <= names, sorted(source - names)
    assert "vmtasks/ui/templates/report.html.j2" in names, "the report's template is package data"
    top = {n.split("/")[0] for n in names}
    assert not top & {"tests", "scripts", "examples", "config"}, sorted(top)


def test_the_package_version_is_pyprojects():
    import re

    import vmtasks

    declared = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert vmtasks.__version__ == declared
