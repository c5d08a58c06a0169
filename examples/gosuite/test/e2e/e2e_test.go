//go:build e2e && vm

// Destructive end-to-end tests: they change the machine they run on, so they skip unless
// OPENBOOT_IN_VM=1 says this is a throwaway VM (as openboot's requireEphemeralHost does).
package e2e

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"example.com/gosuite/internal/setup"
)

func requireEphemeralHost(t *testing.T) string {
	t.Helper()
	if os.Getenv("OPENBOOT_IN_VM") != "1" {
		t.Skip("destructive: set OPENBOOT_IN_VM=1 only inside a throwaway VM")
	}
	home, err := os.UserHomeDir()
	if err != nil {
		t.Fatal(err)
	}
	// Leave a trace of every test that really ran, for the host-side checks.
	marks := filepath.Join(home, ".gosuite-ran")
	if err := os.MkdirAll(marks, 0o755); err != nil {
		t.Fatal(err)
	}
	name := strings.NewReplacer("/", "_").Replace(t.Name())
	if err := os.WriteFile(filepath.Join(marks, name), []byte("OPENBOOT_IN_VM="+os.Getenv("OPENBOOT_IN_VM")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return home
}

func TestShellRC(t *testing.T) {
	home := requireEphemeralHost(t)
	line := `eval "$(/opt/homebrew/bin/brew shellenv)"`
	if err := setup.AppendShellRC(home, line); err != nil {
		t.Fatal(err)
	}
	if err := setup.AppendShellRC(home, line); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(home, ".zshrc"))
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(data), line); n != 1 {
		t.Fatalf("want the line once in .zshrc, found %d times", n)
	}
}

func TestDotfilesDirs(t *testing.T) {
	home := requireEphemeralHost(t)
	if err := setup.MakeDirs(home, ".dotfiles", ".config/openboot"); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{".dotfiles", ".config/openboot"} {
		if st, err := os.Stat(filepath.Join(home, d)); err != nil || !st.IsDir() {
			t.Fatalf("%s not created: %v", d, err)
		}
	}
}

func TestDefaultsWrite(t *testing.T) {
	home := requireEphemeralHost(t)
	path, err := setup.WriteDefault(home, "com.openboot.e2e", "AppleShowAllFiles", "true")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatal(err)
	}
}

// Subtest names with regex metacharacters: selecting one needs quoting through every shell
// layer, e.g. -run 'TestPackages/brew\|cask_\[x\]'.
func TestPackages(t *testing.T) {
	requireEphemeralHost(t)
	for _, name := range []string{"brew|cask [x]", "mise (go)"} {
		name := name
		t.Run(name, func(t *testing.T) {
			home, _ := os.UserHomeDir()
			if err := setup.MakeDirs(home, filepath.Join(".packages", strings.NewReplacer(" ", "_", "|", "_").Replace(name))); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestExampleFailure fails on request, so the host-side tests can check that a failing
// suite's exit code comes home.
func TestExampleFailure(t *testing.T) {
	requireEphemeralHost(t)
	if os.Getenv("GOSUITE_FAIL") == "1" {
		// What a failing openboot step leaves: its log, which the host copies out as evidence.
		home, _ := os.UserHomeDir()
		logs := filepath.Join(home, "Library", "Logs", "gosuite")
		if err := os.MkdirAll(logs, 0o755); err == nil {
			_ = os.WriteFile(filepath.Join(logs, "failure.log"), []byte("step 3: brew bundle exited 1\n"), 0o644)
		}
		t.Log("failing on purpose: GOSUITE_FAIL=1")
		t.Fatal("intentional failure")
	}
}

// TestSlow sleeps GOSUITE_SLEEP seconds (default 0), so the host-side tests can signal or
// crash a run while its suite is running.
func TestSlow(t *testing.T) {
	requireEphemeralHost(t)
	if s, err := strconv.Atoi(os.Getenv("GOSUITE_SLEEP")); err == nil && s > 0 {
		t.Logf("sleeping %ds", s)
		time.Sleep(time.Duration(s) * time.Second)
	}
}
