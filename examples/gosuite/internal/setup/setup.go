// Package setup is a tiny stand-in for openboot: it changes the machine it runs on
// (shell rc files, directories under the home, a preferences file).
package setup

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// AppendShellRC adds line to ~/.zshrc unless it is already there.
func AppendShellRC(home, line string) error {
	rc := filepath.Join(home, ".zshrc")
	data, err := os.ReadFile(rc)
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	if strings.Contains(string(data), line+"\n") {
		return nil
	}
	f, err := os.OpenFile(rc, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = fmt.Fprintln(f, line)
	return err
}

// MakeDirs creates the dotfiles layout under home.
func MakeDirs(home string, names ...string) error {
	for _, n := range names {
		if err := os.MkdirAll(filepath.Join(home, n), 0o755); err != nil {
			return err
		}
	}
	return nil
}

// WriteDefault mimics `defaults write DOMAIN KEY VALUE` with a file under ~/Library/Preferences.
func WriteDefault(home, domain, key, value string) (string, error) {
	dir := filepath.Join(home, "Library", "Preferences")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	path := filepath.Join(dir, domain+".plist")
	return path, os.WriteFile(path, []byte(key+"="+value+"\n"), 0o644)
}
