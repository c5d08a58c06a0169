import stat

from vmtasks.state.records import RunRecord
from vmtasks.transport import ssh


def test_run_key_is_private_and_outside_any_argv(tmp_path):
    key = ssh.generate_key(tmp_path / "keys" / "run-1", "vmtasks-run-1")
    assert stat.S_IMODE(key.dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(key.private.stat().st_mode) == 0o600
    assert key.public_line.startswith("ssh-ed25519 ") and key.public_line.endswith("vmtasks-run-1")
    assert b"OPENSSH PRIVATE KEY" in key.private.read_bytes()
    options = " ".join(ssh.ssh_options(key))
    assert "IdentitiesOnly=yes" in options and "IdentityAgent=none" in options
    assert "UserKnownHostsFile=" + str(key.known_hosts) in options and "-F /dev/null" in options
    assert "PRIVATE" not in options


def test_records_prune_and_latest(tmp_path):
    root = tmp_path / "runs"
    for i in range(5):
        record = RunRecord(root, "2026010{}-000000-abcd".format(i))
        record.create("{}")
        record.stage_done("clone", 0.0, 0.1, "ok")
        record.finish(exit_code=0)
        record.prune(3)
    kept = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink())
    assert kept == ["20260102-000000-abcd", "20260103-000000-abcd", "20260104-000000-abcd"]
    assert (root / "latest").resolve().name == "20260104-000000-abcd"
    assert (tmp_path / ".gitignore").read_text().strip().endswith("*")
