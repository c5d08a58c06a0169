"""vm.password and orchard.url at config load (vmtasks/guest/config.py), and the URL checks the
Orchard settings repeat for the URLs that do not come through the config (ORCHARD_URL,
Orchard's context file, the ProxyCommand's environment). Issues 17 (item 1) and 18."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vmtasks.backends.orchard.settings import load_settings, settings_from_proxy_env
from vmtasks.guest import config
from vmtasks.guest.errors import ConfigError

SECRET = "pa55-Secret-word"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vm.yaml"
    path.write_text(text)
    return path


def load_error(path: Path, environ=None) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        config.load(path, environ=environ or {}, cwd=path.parent)
    return err.value


def test_vm_password_defaults_to_admin_and_is_never_shown(tmp_path):
    assert config.load(None, environ={}, cwd=tmp_path).vm.password == "admin"
    cfg = config.load(write(tmp_path, "vm:\n  password: {}\n".format(SECRET)), environ={}, cwd=tmp_path)
    assert cfg.vm.password == SECRET
    # not in records, plans or the config shipped to the guest (all are to_json), nor in repr
    for text in (cfg.to_json(), repr(cfg), repr(cfg.vm), str(cfg.to_dict())):
        assert SECRET not in text and '"password"' not in text and "password=" not in text
    # what to_dict gives loads again (the guest's config): the password is the default there
    again = write(tmp_path, yaml.safe_dump(cfg.to_dict()))
    assert config.load(again, environ={}, cwd=tmp_path).vm.password == "admin"


@pytest.mark.parametrize("text,needle", [
    ("vm:\n  password: 12345678\n", "'vm.password' must be a string, got a int (not shown)"),
    ('vm:\n  password: "ab\\x07cd12345678"\n', "'vm.password' contains a control character (value not shown)"),
    ("backend: orchard\norchard:\n  url: https://o\nvm:\n  user: ci\n  password: ''\n",
     "'vm.password' is empty but 'vm.user' is 'ci'"),
])
def test_a_bad_vm_password_names_the_line_and_never_the_value(tmp_path, text, needle):
    err = load_error(write(tmp_path, text))
    assert needle in err.message and "vm.yaml:" in err.message, err.message
    assert "12345678" not in err.render()


def test_an_empty_password_is_fine_for_admin_and_for_the_tart_backend(tmp_path):
    cfg = config.load(write(tmp_path, "backend: orchard\norchard:\n  url: https://o\nvm:\n  password: ''\n"),
                      environ={}, cwd=tmp_path)
    assert cfg.vm.password == ""
    assert config.load(write(tmp_path, "vm:\n  user: ci\n  password: ''\n"), environ={}, cwd=tmp_path).vm.user == "ci"


@pytest.mark.parametrize("url,needle", [
    ("http://[::1", "is not a valid URL (Invalid IPv6 URL)"),
    ("http://orchard\x01.example", "contains whitespace or a control character"),
    ("http://orchard\x7f.example", "contains whitespace or a control character"),
    ("http://orchard.example:99999", "Port out of range"),
    ("http://orchard.example:port", "is not a valid URL"),
    ("https://", "has no host name"),
    ("https://ci:token@orchard.example", "must not carry credentials"),
    ("https://orchard.example/?x=1", "must not have a query"),
    ("ftp://orchard.example", "must start with http:// or https://"),
])
def test_orchard_url_is_validated_whole_at_load(tmp_path, url, needle):
    path = write(tmp_path, yaml.safe_dump({"backend": "orchard", "orchard": {"url": url}}))
    err = load_error(path)
    assert "vm.yaml:3: 'orchard.url' " in err.message, err.message
    assert needle in err.message and "fix 'orchard.url' at" in err.hint
    # the same URL from ORCHARD_URL names the variable
    err = load_error(write(tmp_path, "backend: orchard\n"), environ={"ORCHARD_URL": url})
    assert err.message.startswith("environment variable ORCHARD_URL: 'orchard.url' "), err.message
    # ...and from every place the Orchard settings read a URL, an error, never a traceback
    with pytest.raises(ConfigError, match="the Orchard URL from ORCHARD_URL"):
        load_settings(env={"ORCHARD_URL": url, "HOME": str(tmp_path)})
    with pytest.raises(ConfigError, match="ORCHARD_URL "):
        settings_from_proxy_env({"ORCHARD_URL": url})


def test_good_urls_pass(tmp_path):
    for url in ("https://orchard.example:6120", "http://[::1]:6120", "http://127.0.0.1:6120/api-prefix/"):
        assert config.orchard_url_problem(url) == ""
        assert load_settings(env={"ORCHARD_URL": url, "HOME": str(tmp_path)}).url == url


def test_a_bad_url_in_orchards_context_file_names_the_file(tmp_path):
    path = tmp_path / ".orchard" / "orchard.yml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({"default-context": "c", "contexts": {"c": {"url": "http://[::1"}}}))
    with pytest.raises(ConfigError) as err:
        load_settings(env={"HOME": str(tmp_path)})
    assert str(path) in err.value.message and "Invalid IPv6 URL" in err.value.message
