"""report.html (vmtasks/ui/html_report.py): built from a record's files only, everything from the
guest escaped, no script and no network, written at the end of every run without ever
failing it. The rendered page in a real browser: tests/e2e/test_report_html.py."""

from __future__ import annotations

import json
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from vmtasks.guest.errors import ConfigError
from vmtasks.guest.results.model import FAIL, INTERRUPTED, NOTRUN, PASS, SKIP, Summary, TestResult, merge
from vmtasks.state.records import RunRecord
from vmtasks.ui import html_report

HOSTILE_NAME = "TestX<script>window.pwned=1</script>"
HOSTILE_OUTPUT = "</textarea><script>window.pwned=1</script>\n<a href=\"javascript:alert(1)\">x</a>\n\x1b[2Jbye\n"


class Page(HTMLParser):
    """The elements, attributes and text of a page, as a browser's tokenizer sees them."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags = []
        self.text = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag, **attrs):
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]

    def with_class(self, word):
        return [(t, a) for t, a in self.tags if word in (a.get("class") or "").split()]


def make_record(root: Path, run_id: str, tests=(), stages=None, interrupted=False, exit_code=1,
                wall=10.0) -> RunRecord:
    record = RunRecord(root, run_id)
    record.create("{}")
    t0 = record.meta["started"]
    for name, start, seconds, status, vm in stages if stages is not None else [
            ("preflight", 0, 0.2, "ok", ""), ("clone", 0.3, 0.5, "ok", "vm-1"), ("boot", 0.8, 2.0, "ok", "vm-1"),
            ("tests", 3.0, 5.0, "ok", "vm-1"), ("clone", 0.3, 0.5, "ok", "vm-2"), ("boot", 0.8, 2.5, "ok", "vm-2"),
            ("tests", 3.3, 4.7, "ok", "vm-2"), ("teardown", 8.0, 0.4, "ok", "vm-1"),
            ("teardown", 8.0, 0.4, "ok", "vm-2")]:
        record.stage_done(name, t0 + start, seconds, status, vm=vm)
    summary = None
    if tests:
        parts = {}
        for vm, result in tests:
            if result.started is not None:
                result.started += t0
            parts.setdefault(vm, []).append(result)
        summary = merge([(vm, Summary(results=rs, failures=[r for r in rs if r.status == FAIL]))
                         for vm, rs in parts.items()])
    record.finish(exit_code=exit_code, interrupted=interrupted,
                  failed_tests=[r.name for r in summary.failures] if summary else [])
    record.meta["finished"] = t0 + wall
    record._write_json("result.json", record.meta)
    line = html_report.write_for_run(record, summary, "DONE the verdict line")
    assert line == "report: {}".format(record.dir / "report.html"), line
    return record


def page_of(record: RunRecord) -> Page:
    return Page((record.dir / "report.html").read_text())


def a_run(root: Path, run_id="20261205-100000-aaaa", **kwargs) -> RunRecord:
    tests = [("vm-1", TestResult("example.com/e2e", "TestLong", PASS, 3.0, started=3.1)),
             ("vm-1", TestResult("example.com/e2e", HOSTILE_NAME, FAIL, 1.0, output=HOSTILE_OUTPUT, started=6.5)),
             ("vm-2", TestResult("example.com/e2e", "TestSkip", SKIP, 0.1, started=3.4)),
             ("vm-2", TestResult("example.com/e2e", "TestShort", PASS, 1.0, started=4.0))]
    return make_record(root, run_id, tests=kwargs.pop("tests", tests), **kwargs)


def test_guest_text_is_escaped_and_the_page_has_no_script_and_no_network(tmp_path):
    record = a_run(tmp_path / "runs")
    # A file the run collected for the failing test, named like a link that would run code.
    art = record.dir / "vm-1" / "artifacts" / HOSTILE_NAME.replace("/", "_")
    art.mkdir(parents=True)
    (art / "javascript:alert(1)").write_text("x")
    html_report.write_report(record.dir)
    html = (record.dir / "report.html").read_text()
    page = Page(html)
    assert page.all("script") == [] and page.all("textarea") == [] and page.all("iframe") == []
    assert "<script>" not in html and "</textarea>" not in html
    assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in html
    # The hostile name and output are text of the page (control characters made visible).
    text = "".join(page.text)
    assert HOSTILE_NAME in text and "</textarea><script>window.pwned=1</script>" in text and "^[[2Jbye" in text
    assert "\x1b" not in html
    hrefs = [a["href"] for a in page.all("a") if "href" in a]
    assert hrefs and all(h.startswith(("./", "#")) for h in hrefs), hrefs
    assert "./vm-1/artifacts/TestX%3Cscript%3Ewindow.pwned%3D1%3C_script%3E/javascript%3Aalert%281%29" in hrefs
    # Nothing is fetched: no src anywhere, and a policy that forbids scripts and fetches.
    assert not [a for _, a in page.tags if "src" in a or "srcset" in a]
    (policy,) = [a["content"] for a in page.all("meta") if a.get("http-equiv") == "Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src" not in policy
    assert "http://" not in html and "https://" not in html


def test_one_lane_per_vm_one_bar_per_test_with_its_verdict(tmp_path):
    page = page_of(a_run(tmp_path / "runs"))
    lanes = [a for _, a in page.with_class("lane")]
    assert [a["data-vm"] for a in lanes] == ["host", "vm-1", "vm-2"]
    bars = {a["data-test"]: a["data-verdict"] for _, a in page.with_class("bar")}
    assert bars == {"TestLong": "pass", HOSTILE_NAME: "fail", "TestSkip": "skip", "TestShort": "pass"}
    # The failure is first, with a link from its bar.
    (failure,) = page.with_class("problem")
    assert failure[1]["data-verdict"] == "fail"
    bar = next(a for _, a in page.with_class("bar") if a["data-verdict"] == "fail")
    assert bar["href"] == "#" + failure[1]["id"]
    # Stage segments on each lane, an idle gap on vm-1 (TestLong ends at 6.1, the failure starts at 6.5: no;
    # TestShort on vm-2 starts 0.5 s after TestSkip ended: yes).
    assert {a["data-stage"] for _, a in page.with_class("seg")} == {"preflight", "clone", "boot", "tests", "teardown"}
    assert len(page.with_class("idle")) == 1


def test_a_record_with_no_tests(tmp_path):
    record = make_record(tmp_path / "runs", "20261205-100000-bbbb",
                         stages=[("preflight", 0, 0.1, "failed", "")], exit_code=2)
    page = page_of(record)
    assert page.with_class("bar") == [] and page.with_class("problem") == []
    assert [a["data-vm"] for _, a in page.with_class("lane")] == ["host"]
    assert any("No test failed" in t for t in page.text)
    assert json.loads((record.dir / "tests.json").read_text())["tests"] == []
    # No stage at all: still a page.
    empty = RunRecord(tmp_path / "runs", "20261205-100000-cccc")
    empty.create("{}")
    assert "No stage or test was recorded" in html_report.build_html(empty.dir)


def test_an_interrupted_run(tmp_path):
    tests = [("vm-1", TestResult("p", "TestDone", PASS, 1.0, started=3.1)),
             ("vm-1", TestResult("p", "TestStopped", INTERRUPTED, 2.0, output="stopped by Ctrl-C", started=4.2)),
             ("", TestResult("p", "TestNever", NOTRUN, output="listed, never reported"))]
    record = make_record(tmp_path / "runs", "20261205-100000-dddd", tests=tests, interrupted=True, exit_code=130,
                         stages=[("preflight", 0, 0.2, "ok", ""), ("tests", 3.0, 3.5, "interrupted", "vm-1")])
    page = page_of(record)
    assert [a["data-verdict"] for _, a in page.with_class("problem")] == ["interrupted", "notrun"]
    assert [a["class"] for _, a in page.with_class("seg")][-1].endswith("s-interrupted")
    untimed = [a for _, a in page.with_class("bar") if a.get("data-test") == "TestNever"]
    assert untimed and untimed[0]["data-verdict"] == "notrun"
    assert any("interrupted" in t for t in page.text)


def test_a_lost_vm_is_marked(tmp_path):
    lost = TestResult("p", "TestCut", FAIL, 1.0, output="[vmtasks] VM lost: the guest stopped\n", started=3.2,
                      unreported=True)
    record = a_run(tmp_path / "runs", tests=[("vm-1", lost), ("vm-2", TestResult("p", "TestOk", PASS, 1.0,
                                                                                  started=3.4))])
    page = page_of(record)
    assert [a["data-vm"] for _, a in page.with_class("lost") if "lane" in a["class"]] == ["vm-1"]
    assert [a["data-test"] for _, a in page.with_class("bar") if "lost" in a["class"].split()] == ["TestCut"]


def test_flaky_is_drawn_when_a_record_says_so(tmp_path):
    record = a_run(tmp_path / "runs")
    data = json.loads((record.dir / "tests.json").read_text())
    data["tests"][0].update(status="flaky", attempts=2, output="failed once, then passed")
    (record.dir / "tests.json").write_text(json.dumps(data))
    html_report.write_report(record.dir)
    page = page_of(record)
    flaky = [a for _, a in page.with_class("bar") if a["data-verdict"] == "flaky"]
    assert len(flaky) == 1 and "retried" in flaky[0]["class"]
    assert [a["data-verdict"] for _, a in page.with_class("problem")] == ["fail", "flaky"]


def test_where_the_time_went_against_earlier_records(tmp_path):
    root = tmp_path / "runs"
    for n in range(5):
        a_run(root, "20261205-09000{}-eeee".format(n), wall=9.0 + n)
    slow_boot = [("preflight", 0, 0.2, "ok", ""), ("boot", 0.8, 12.0, "ok", "vm-1"), ("boot", 0.8, 2.0, "ok", "vm-2")]
    record = a_run(root, stages=slow_boot, wall=20.0)
    page = page_of(record)
    html = (record.dir / "report.html").read_text()
    assert "5 earlier records" in html
    slow_cells = [a for _, a in page.tags if "slow" in (a.get("class") or "").split() and "num" in a.get("class")]
    assert len(slow_cells) == 1, "only vm-1's boot is slower than its p95"
    trend = [a for t, a in page.tags if t == "rect"]
    assert len(trend) == 6 and "current" in trend[-1]["class"]


def test_an_older_record_without_tests_json_draws_from_junit(tmp_path):
    record = a_run(tmp_path / "runs")
    from vmtasks.guest.results import write_junit

    summary = Summary(results=[TestResult("p", "TestOld", FAIL, 1.0, output="boom")], failures=[])
    write_junit(summary, record.dir / "junit.xml")
    (record.dir / "tests.json").unlink()
    html_report.write_report(record.dir)
    page = page_of(record)
    assert [(a["data-test"], a["data-verdict"]) for _, a in page.with_class("bar")] == [("TestOld", "fail")]
    assert any("made before tests.json" in t for t in page.text)


def test_find_run_latest_prefix_and_a_clear_error(tmp_path):
    root = tmp_path / "runs"
    with pytest.raises(ConfigError, match="no run recorded in"):
        html_report.find_run(root)
    first = a_run(root, "20261205-090000-aaaa")
    second = a_run(root, "20261205-100000-bbbb")
    assert html_report.find_run(root) == second.dir.resolve()
    assert html_report.find_run(root, "20261205-09") == first.dir
    assert html_report.find_run(root, str(first.dir)) == first.dir.resolve()
    with pytest.raises(ConfigError) as err:
        html_report.find_run(root, "nope")
    assert "20261205-090000-aaaa, 20261205-100000-bbbb" in err.value.message
    with pytest.raises(ConfigError, match="ambiguous"):
        html_report.find_run(root, "20261205")


def test_a_run_ends_with_the_report_named_and_a_broken_report_is_only_a_note(tmp_path, monkeypatch, capsys):
    from conftest import FakeRunner, fail
    from test_run import make_run

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    run = make_run(tmp_path / "a", FakeRunner({"clone": fail(1, "no space left on device")}))
    assert run.execute() == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == "report: {}".format(run.record.dir / "report.html")
    assert (run.record.dir / "report.html").is_file()

    def broken(view):
        raise RuntimeError("the template broke")

    monkeypatch.setattr(html_report, "render", broken)
    run = make_run(tmp_path / "b", FakeRunner({"clone": fail(1, "no space left on device")}))
    assert run.execute() == 1, "a report that cannot be drawn never changes the exit code"
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == "report not written: RuntimeError: the template broke"
    assert not (run.record.dir / "report.html").exists()


def test_a_large_run_stays_small(tmp_path):
    tests = [("vm-{}".format(i % 4 + 1), TestResult("p", "Test{:03d}".format(i), FAIL if i % 50 == 0 else PASS,
                                                    0.5, output="line\n" * 200, started=3 + (i // 4) * 0.6))
             for i in range(500)]
    start = time.monotonic()
    record = make_record(tmp_path / "runs", "20261205-100000-ffff", tests=tests, wall=320.0)
    assert time.monotonic() - start < 30
    assert (record.dir / "report.html").stat().st_size < 2 * 2 ** 20
    assert len(page_of(record).with_class("bar")) == 500


def test_vm_report_task_writes_prints_opens_and_names_the_runs_there_are(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    (tmp_path / "project").mkdir()
    (tmp_path / "vm.yaml").write_text("project_dir: project\n")
    record = a_run(tmp_path / ".vmtasks" / "runs", "20261205-110000-abcd")
    (record.dir / "report.html").unlink()
    opened = tmp_path / "opened.txt"
    browser = "{} -c \"import sys; open({!r}, 'w').write(sys.argv[1])\" %s".format(sys.executable, str(opened))

    def vm_report(*args):
        return subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(repo), "vm-report", *args,
                               "--config", str(tmp_path / "vm.yaml")], cwd=str(tmp_path), capture_output=True,
                              text=True, timeout=60, env=dict(__import__("os").environ, BROWSER=browser))

    done = vm_report("--open")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(record.dir / "report.html") and (record.dir / "report.html").is_file()
    assert opened.read_text() == (record.dir / "report.html").as_uri()
    done = vm_report("--run", "20250101")
    assert done.returncode == 2
    assert "no run '20250101' in {}; runs recorded: 20261205-110000-abcd".format(record.root) in done.stderr
