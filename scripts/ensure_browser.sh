#!/usr/bin/env bash
# Headless Chromium + its WebDriver for the browser test of the MLflow UI (Debian packages
# chromium and chromium-driver). Installs them with apt when missing; otherwise says what to do.
set -euo pipefail
have() { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }
have && exit 0
if command -v apt-get >/dev/null; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "Installing Debian packages chromium and chromium-driver (browser test of the MLflow UI)..."
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver >/dev/null
  have && exit 0
fi
cat >&2 <<MSG
chromium and chromedriver are missing (the browser test of the MLflow UI needs them).
- On Debian/Ubuntu: sudo apt-get install chromium chromium-driver
- Elsewhere: install Chromium and the matching ChromeDriver, put both on PATH,
  or skip that test with: make test PYTEST_ARGS='-m "not browser"'
MSG
exit 1
