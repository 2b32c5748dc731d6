#!/usr/bin/env bash
# Make sure the command-line tools the tests call are installed: promtool (Debian package
# `prometheus`) checks and unit-tests deploy/prometheus's rules (tests/unit/test_slo.py).
# Used by `make test`; installs only what is missing, non-interactively (the CI runs as root;
# elsewhere sudo is used when present).
set -euo pipefail

if command -v promtool >/dev/null 2>&1; then
  exit 0
fi

as_root=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    as_root=(sudo -n)
  else
    echo "promtool is missing: install the Debian package prometheus (as root)" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
echo "installing promtool (package prometheus)"
# A fresh image has no package lists yet; install fails without them.
if ! "${as_root[@]}" apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1; then
  "${as_root[@]}" apt-get update -q
  "${as_root[@]}" apt-get install -y -q --no-install-recommends prometheus
fi
command -v promtool >/dev/null 2>&1 || { echo "promtool is still missing" >&2; exit 1; }
echo "promtool: $(promtool --version 2>&1 | head -n1)"
