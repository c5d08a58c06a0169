"""Tests for vmtasks.guest.schedule: queue order, LPT partitions, shards (properties with fixed seeds)."""

from __future__ import annotations

import itertools
import random

import pytest

from vmtasks.guest.errors import ConfigError
from vmtasks.guest.gotest import TestId
from vmtasks.guest.gotest import parse_listing as _parse_listing
from vmtasks.guest.results import History, TestResult
from vmtasks.guest.schedule import longest_first, lower_bound, makespan, parse_shard, partition, shard


def parse_test_list(text, package=""):
    return _parse_listing(text, package).tests

A = "example.com/e2e/a"
B = "example.com/e2e/b"


def random_suite(rng: random.Random, size: int):
    tests = [TestId(rng.choice([A, B, ""]), "Test%d" % i) for i in range(size)]
    # uneven durations: a few long, many short, some ties and zeros
    weights = {t: rng.choice([0.0, 0.1, 1.0, 1.0, 2.5, rng.uniform(0, 5), rng.uniform(20, 200)]) for t in tests}
    return tests, weights


def test_test_id_sorts_and_prints():
    assert sorted([TestId(B, "TestA"), TestId(A, "TestB"), TestId(A, "TestA")]) == [
        TestId(A, "TestA"), TestId(A, "TestB"), TestId(B, "TestA")]
    assert str(TestId(A, "TestX")) == A + ".TestX" and str(TestId("", "TestX")) == "TestX"
    assert len({TestId(A, "TestX"), TestId(A, "TestX")}) == 1


def test_longest_first_with_ties_by_package_then_name():
    w = {TestId(B, "TestShort"): 1.0, TestId(A, "TestLong"): 30.0, TestId(B, "TestTie"): 5.0,
         TestId(A, "TestTie"): 5.0, TestId(A, "TestNaN"): float("nan")}
    order = longest_first(list(w) + [TestId(A, "TestLong")], w.get)
    assert order == [TestId(A, "TestLong"), TestId(A, "TestTie"), TestId(B, "TestTie"),
                     TestId(B, "TestShort"), TestId(A, "TestNaN")]
    assert longest_first(reversed(list(w)), w) == order  # a mapping works, input order does not matter


def test_estimates_from_a_history():
    history = History()
    history.record([TestResult(A, "TestSlow", "pass", 60.0), TestResult(A, "TestFast", "pass", 2.0),
                    TestResult(A, "TestMid", "pass", 10.0)])
    tests = [TestId(A, "TestFast"), TestId(A, "TestNew"), TestId(A, "TestSlow"), TestId(A, "TestMid")]
    # the unknown TestNew weighs the median (10 s) and sorts after TestMid by name
    assert longest_first(tests, history) == [TestId(A, "TestSlow"), TestId(A, "TestMid"),
                                             TestId(A, "TestNew"), TestId(A, "TestFast")]
    assert partition(tests, 2, history) == [[TestId(A, "TestSlow")],
                                            [TestId(A, "TestMid"), TestId(A, "TestNew"), TestId(A, "TestFast")]]


def test_partition_is_lpt_onto_the_least_loaded_bin():
    w = {TestId(A, "T%d" % i): s for i, s in enumerate([7, 6, 5, 4, 3, 2, 2, 1])}
    bins = partition(list(w), 3, w)
    # 7, 6, 5 open the bins; 4 and 3 go to the lightest; the 2s tie at 9/9/9 and take the
    # lowest-numbered bin first
    assert [[t.name for t in b] for b in bins] == [["T0", "T5", "T6"], ["T1", "T4", "T7"], ["T2", "T3"]]
    assert [sum(w[t] for t in b) for b in bins] == [11, 10, 9]
    assert partition([], 3, w) == [[], [], []]
    assert partition(list(w), 1, w) == [longest_first(list(w), w)]


@pytest.mark.parametrize("seed", range(300))
def test_shards_are_disjoint_cover_everything_and_agree(seed):
    rng = random.Random(seed)
    tests, w = random_suite(rng, rng.randint(0, 60))
    n = rng.randint(1, 8)
    shards = [shard(tests, k, n, w) for k in range(1, n + 1)]
    flat = [t for s in shards for t in s]
    assert sorted(flat) == sorted(set(tests)) and len(flat) == len(set(flat))
    shuffled = list(tests)
    rng.shuffle(shuffled)
    assert [shard(shuffled + shuffled[:3], k, n, dict(w)) for k in range(1, n + 1)] == shards  # another job agrees
    # list scheduling's bound: never worse than total / n + the longest test
    span = makespan(shards, w)
    assert span <= sum(w.values()) / n + max(w.values(), default=0) + 1e-9
    assert span >= lower_bound(w.values(), n) - 1e-9


def optimal_makespan(weights, n):
    best = float("inf")
    for assignment in itertools.product(range(n), repeat=len(weights)):
        if assignment and assignment[0] != 0:
            continue  # bins are interchangeable: fix the first job's bin
        loads = [0.0] * n
        for weight, b in zip(weights, assignment):
            loads[b] += weight
        best = min(best, max(loads))
    return best if weights else 0.0


@pytest.mark.parametrize("seed", range(150))
def test_lpt_is_within_four_thirds_of_optimal(seed):
    # Graham: LPT <= (4/3 - 1/(3n)) * OPT. Against max(longest, total/n) no such bound
    # holds (n + 1 equal tests on n runners need 2 units, the bound says (n+1)/n), so the
    # optimum is found by brute force on small suites.
    rng = random.Random(1000 + seed)
    n = rng.randint(2, 3)
    tests, w = random_suite(rng, rng.randint(1, 8))
    lpt = makespan(partition(tests, n, w), w)
    opt = optimal_makespan([w[t] for t in tests], n)
    assert lpt <= (4 / 3 - 1 / (3 * n)) * opt + 1e-9
    assert lower_bound(w.values(), n) <= opt + 1e-9


def test_lower_bound():
    assert lower_bound([10, 1, 1], 2) == 10
    assert lower_bound([4, 4, 4, 4], 2) == 8
    assert lower_bound([], 3) == 0.0
    with pytest.raises(ConfigError):
        lower_bound([1], 0)


@pytest.mark.parametrize("text,expected", [("2/3", (2, 3)), ("1/1", (1, 1)), (" 3 / 3 ", (3, 3))])
def test_parse_shard(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text", ["", "2", "2-3", "0/3", "4/3", "1/0", "-1/2", "a/b", "1/2/3", "1.5/2", None])
def test_parse_shard_refuses_with_a_hint(text):
    with pytest.raises(ConfigError) as err:
        parse_shard(text)
    assert "--shard" in err.value.message and "K/N" in err.value.render()


@pytest.mark.parametrize("k,n", [(0, 2), (3, 2), (1, 0), (True, 2), ("1", 2)])
def test_shard_checks_k_and_n(k, n):
    with pytest.raises(ConfigError):
        shard([TestId(A, "TestA")], k, n, lambda t: 1.0)


def test_more_shards_than_tests_builds_only_the_bins_it_needs():
    rng = random.Random(7)
    for size in (1, 3, 9):
        tests, w = random_suite(rng, size)
        for n in (size, size + 1, size + 5):
            full = partition(tests, n, w)
            assert [shard(tests, k, n, w) for k in range(1, n + 1)] == full
    tests, w = random_suite(rng, 12)
    # 10^9 shards: N bins would take gigabytes; only 12 are built
    assert shard(tests, 1, 10 ** 9, w) == [longest_first(tests, w)[0]]
    assert shard(tests, 13, 10 ** 9, w) == [] and shard(tests, 10 ** 9, 10 ** 9, w) == []


@pytest.mark.parametrize("text,words", [("", "empty"), ("  ", "empty"), ("1/10000000000", "more than"),
                                        ("1/" + "9" * 5000, "more than"), ("100001/100001", "more than")])
def test_parse_shard_refuses_empty_and_huge(text, words):
    with pytest.raises(ConfigError) as err:
        parse_shard(text)
    assert words in err.value.message and err.value.exit_code == 2 and len(err.value.message) < 200


LIST_TEXT = """?   \texample.com/e2e/empty\t[no test files]
TestO
BenchmarkO
FuzzO
ExampleO
ok  \texample.com/e2e/other\t0.007s
TestForger
TestÜber
TestForger
FAIL\texample.com/e2e/vm [build failed]
ok  \texample.com/e2e/vm\t0.004s
"""


def test_parse_go_test_list_text():
    other, vm = "example.com/e2e/other", "example.com/e2e/vm"
    assert parse_test_list(LIST_TEXT) == [TestId(other, "TestO"), TestId(other, "FuzzO"), TestId(other, "ExampleO"),
                                          TestId(vm, "TestForger"), TestId(vm, "TestÜber")]
    # a test binary's -test.list: no verdict line, the caller names the package
    assert parse_test_list("TestA\nBenchmarkB\nTestC\n", package=A) == [TestId(A, "TestA"), TestId(A, "TestC")]


def test_parse_go_test_list_json():
    import json

    lines = [{"Action": "output", "Package": B, "Output": "TestB\n"},
             {"Action": "output", "Package": B, "Output": "BenchmarkB\n"},
             {"Action": "output", "Package": B, "Output": "ok  \t%s\t0.01s\n" % B},
             {"Action": "pass", "Package": B, "Elapsed": 0.01},
             {"Action": "output", "Package": A, "Output": "TestA\n"},
             {"Action": "output", "Package": A, "Output": "ok  \t%s\t0.01s\n" % B}]  # forged verdict: ignored
    text = "\n".join(json.dumps(x) for x in lines) + "\nTestRawNoise with spaces\n"
    assert parse_test_list(text) == [TestId(B, "TestB"), TestId(A, "TestA")]


@pytest.mark.parametrize("json_flag", [True, False], ids=["json", "text"])
def test_parse_real_go_test_list(tmp_path, json_flag):
    import os
    import shutil
    import subprocess

    go = shutil.which("go")
    if go is None:
        pytest.skip("go not installed")
    (tmp_path / "go.mod").write_text("module example.com/l\n\ngo 1.19\n")
    for pkg, body in (("a", "func TestA1(t *testing.T) {}\nfunc TestA2(t *testing.T) {}\n"
                            "func BenchmarkA(b *testing.B) {}\n"),
                      ("b", "func TestB(t *testing.T) {}\nfunc FuzzB(f *testing.F) {}\n")):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "x_test.go").write_text("package %s\nimport \"testing\"\n%s" % (pkg, body))
    env = dict(os.environ, GOCACHE=str(tmp_path / ".cache"), GOPATH=str(tmp_path / ".path"), GOFLAGS="-mod=mod",
               GOPROXY="off", GOTOOLCHAIN="local", CGO_ENABLED="0")
    argv = [go, "test", "-list", "."] + (["-json"] if json_flag else []) + ["./..."]
    done = subprocess.run(argv, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(parse_test_list(done.stdout)) == [
        TestId("example.com/l/a", "TestA1"), TestId("example.com/l/a", "TestA2"),
        TestId("example.com/l/b", "FuzzB"), TestId("example.com/l/b", "TestB")]
