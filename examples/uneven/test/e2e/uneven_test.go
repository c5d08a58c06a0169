//go:build e2e && vm

// An uneven sample suite for the test queue and its benchmark: a few long tests and many
// short ones, the total several times the longest. Each test sleeps for its share of
// UNEVEN_SCALE seconds (default 1), leaves a mark in ~/.uneven-ran (so the host can check
// that every test ran exactly once), and refuses outside a throwaway VM. UNEVEN_FAIL=TestX
// makes that test fail, printing UNEVEN_FAIL_SAYS. UNEVEN_POLLUTER=TestX leaves
// ~/.uneven-polluted behind, and UNEVEN_POLLUTED=TestY fails when it finds that file: TestY
// fails only on a machine where TestX ran first (an order-dependent failure).
package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

func work(t *testing.T, units float64) {
	t.Helper()
	if os.Getenv("OPENBOOT_IN_VM") != "1" {
		t.Skip("destructive: set OPENBOOT_IN_VM=1 only inside a throwaway VM")
	}
	scale := 1.0
	if v := os.Getenv("UNEVEN_SCALE"); v != "" {
		s, err := strconv.ParseFloat(v, 64)
		if err != nil {
			t.Fatalf("UNEVEN_SCALE: %v", err)
		}
		scale = s
	}
	home, _ := os.UserHomeDir()
	marks := filepath.Join(home, ".uneven-ran")
	if err := os.MkdirAll(marks, 0o755); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(filepath.Join(marks, strings.ReplaceAll(t.Name(), "/", "_")), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintln(f, time.Now().Format(time.RFC3339Nano))
	f.Close()
	time.Sleep(time.Duration(units * scale * float64(time.Second)))
	polluted := filepath.Join(home, ".uneven-polluted")
	if os.Getenv("UNEVEN_POLLUTED") == t.Name() {
		if _, err := os.Stat(polluted); err == nil {
			t.Fatalf("found %s: a test that ran before this one on this machine left it", polluted)
		}
	}
	if os.Getenv("UNEVEN_POLLUTER") == t.Name() {
		if err := os.WriteFile(polluted, []byte(t.Name()+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if os.Getenv("UNEVEN_FAIL") == t.Name() {
		// UNEVEN_FAIL_SAYS: what the failing test prints (the report's hostile-output check).
		t.Fatalf("asked to fail (UNEVEN_FAIL=%s)%s", t.Name(), os.Getenv("UNEVEN_FAIL_SAYS"))
	}
}

func TestLongA(t *testing.T)   { work(t, 4) }
func TestLongB(t *testing.T)   { work(t, 3) }
func TestMediumC(t *testing.T) { work(t, 2) }
func TestMediumD(t *testing.T) { work(t, 2) }
func TestShort01(t *testing.T) { work(t, 0.5) }
func TestShort02(t *testing.T) { work(t, 0.5) }
func TestShort03(t *testing.T) { work(t, 0.5) }
func TestShort04(t *testing.T) { work(t, 0.5) }
func TestShort05(t *testing.T) { work(t, 0.5) }
func TestShort06(t *testing.T) { work(t, 0.5) }
func TestShort07(t *testing.T) { work(t, 0.5) }
func TestShort08(t *testing.T) { work(t, 0.5) }
func TestShort09(t *testing.T) { work(t, 0.5) }
func TestShort10(t *testing.T) { work(t, 0.5) }

func TestWithSubtests(t *testing.T) {
	for _, name := range []string{"one", "two", "three"} {
		t.Run(name, func(t *testing.T) { work(t, 0.25) })
	}
}
