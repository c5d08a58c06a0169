#!/usr/bin/env bash
# Install everything vmtasks and its tests need on a fresh Debian/Ubuntu machine (as root),
# or on a Mac (Homebrew). Idempotent: safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(uname -s)" = Darwin ]; then
  command -v tart >/dev/null || brew install cirruslabs/cli/tart
  command -v rsync >/dev/null || brew install rsync
else
  need=()
  for pair in sshd:openssh-server ssh:openssh-client rsync:rsync go:golang-go unshare:util-linux \
              nsenter:util-linux setpriv:util-linux ssh-keygen:openssh-client tmux:tmux; do
    cmd=${pair%%:*} pkg=${pair#*:}
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need+=("$pkg")
  done
  # The stand-in's guests run the in-VM task on the system python3 and install Invoke
  # there with pip, as the macOS base image does.
  /usr/bin/python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
  # The report's browser checks (tests/e2e/test_report_html.py, scripts/bench_report.py):
  # Debian's Chromium and its WebDriver, driven by Selenium (requirements.txt).
  [ -x /usr/bin/chromium ] || need+=(chromium)
  [ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
  if [ ${#need[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    # We need the sshd binary for the stand-in's guests, not a host sshd: a host sshd on
    # *:22 would take port 22 from every guest address. While we install, a policy-rc.d
    # stops Debian from starting the services it installs (a pre-existing one is kept).
    policy=/usr/sbin/policy-rc.d
    added_policy=""
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null && $SUDO chmod +x "$policy" && added_policy=1
    fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
      $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
    [ -z "$added_policy" ] || $SUDO rm -f "$policy"
  fi
fi
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -r requirements.txt
echo "vmtasks: set-up done ($(python3 --version), $(go version 2>/dev/null || echo 'no go'))"
