"""report.html of a real `--vms 2` run on the stand-in, checked in headless Chromium (the
rendered page, through the DOM): one lane per VM, one bar per test with its verdict, the
failure first, no console error, no request to any network address, and a test's hostile
output inert text. Unit tests of the builder: tests/test_html_report.py."""

from __future__ import annotations

import pytest

from .browser import chromium, missing
from .test_queue import suite_list, uneven_config, uneven_vms

pytestmark = pytest.mark.e2e

HOSTILE = "<script>window.pwned=1</script></textarea><a href=\"javascript:window.pwned=2\">click</a>"


@pytest.fixture(scope="module")
def browser_ready():
    why = missing()
    if why:
        pytest.skip(why)


def test_report_of_a_red_two_vm_run_in_a_real_browser(world, browser_ready):
    config = uneven_config(world, "0.1", UNEVEN_FAIL="TestMediumC", UNEVEN_FAIL_SAYS=HOSTILE)
    done = world.invoke("test-vm", "--vms", "2", config=config, timeout=300)
    assert done.code == 1, done.text
    record = world.latest_record()
    report = record / "report.html"
    lines = done.out.rstrip("\n").splitlines()
    assert lines[-2] == "report: {}".format(report), "the summary's last lines name the report"
    assert report.is_file()
    assert uneven_vms(world) == [] and world.leases() == []

    # vm-report regenerates it from the record alone and prints its path.
    report.unlink()
    again = world.invoke("vm-report", config=config)
    assert again.code == 0, again.text
    assert again.out.strip() == str(report) and report.is_file()
    unknown = world.invoke("vm-report", "--run", "no-such-run", config=config)
    assert unknown.code == 2 and record.name in unknown.err, unknown.text

    with chromium() as driver:
        driver.get(report.as_uri())
        lanes = driver.find_elements("css selector", ".lane.lane-vm")
        assert len(lanes) == 2, "one lane per VM"
        assert len(driver.find_elements("css selector", ".lane.lane-host")) == 1
        bars = {b.get_attribute("data-test"): b.get_attribute("data-verdict")
                for lane in lanes for b in lane.find_elements("css selector", ".bar")}
        names = suite_list()
        assert sorted(bars) == names, "one bar per test, each in its VM's lane"
        assert len(driver.find_elements("css selector", "#timeline .bar")) == len(names)
        assert bars.pop("TestMediumC") == "fail" and set(bars.values()) == {"pass"}
        assert all(lane.find_elements("css selector", ".bar") for lane in lanes), "both VMs ran tests"
        # The bar's colour is its verdict's (the stylesheet applied, not just a class name).
        failed = driver.find_element("css selector", '.bar[data-test="TestMediumC"]')
        assert failed.value_of_css_property("background-color") == "rgba(209, 52, 59, 1)"
        # Focusing a bar shows its details.
        tip = failed.find_element("css selector", ".tip")
        assert not tip.is_displayed()
        driver.execute_script("arguments[0].focus()", failed)
        assert tip.is_displayed() and "TestMediumC" in tip.text and "failed" in tip.text

        # Failures first: the failing test, with its output as text.
        problems = driver.find_elements("css selector", "#failures .problem")
        assert [p.find_element("css selector", ".test-name").text for p in problems] == ["TestMediumC"]
        output = problems[0].find_element("css selector", "pre.output").text
        assert "<script>window.pwned=1</script></textarea>" in output
        assert driver.execute_script("return typeof window.pwned") == "undefined"
        assert driver.find_elements("css selector", "script, textarea, iframe") == []
        hrefs = [a.get_attribute("href") for a in driver.find_elements("css selector", "a[href]")]
        assert hrefs and all(h.startswith("file://") for h in hrefs), hrefs
        vm_output = [a for a in problems[0].find_elements("css selector", "a.record-file")
                     if a.get_attribute("href").endswith("/suite-output.txt")]
        assert vm_output, "a link to the failing test's VM output in the record"

        # No console error; nothing fetched from any network address.
        errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert errors == [], errors
        urls = driver.execute_script(
            "return performance.getEntries().map(function (e) { return e.name; })")
        assert urls and all(u.startswith("file://") for u in urls if "://" in u), urls
