#!/usr/bin/env bash
# Install Debian's chromium for the audit app's browser tests (tests/test_audit_browser.py).
# Idempotent: does nothing when /usr/bin/chromium exists. Always exits 0: when chromium cannot be
# installed the browser tests skip with a clear message, and this script says why.
# Playwright's own browser download is never used (no `playwright install`); the pip package
# `playwright` (extra `browser`, also in `test`) ships the driver and talks to this chromium.
set -u

if [ -x /usr/bin/chromium ]; then
    echo "install_browser: /usr/bin/chromium present ($(/usr/bin/chromium --version 2>/dev/null || echo unknown version))"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: apt-get not found; install a chromium at /usr/bin/chromium by hand (browser tests will skip)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo -n"
    else
        echo "install_browser: not root and no sudo; cannot install chromium (browser tests will skip)"
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get update -qq >/dev/null 2>&1; then
    echo "install_browser: apt-get update failed (no network or no rights); browser tests will skip"
    exit 0
fi
if ! $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null 2>&1; then
    echo "install_browser: apt-get install chromium failed; browser tests will skip"
    exit 0
fi
if [ -x /usr/bin/chromium ]; then
    echo "install_browser: installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
else
    echo "install_browser: chromium package installed but /usr/bin/chromium is missing; browser tests will skip"
fi
exit 0
