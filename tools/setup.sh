#!/usr/bin/env bash
# Create .venv from requirements.txt when it is missing or older than it, and
# with --latex make sure xelatex and pandoc (needed by nbconvert's PDF export)
# are installed. Debian/Ubuntu: apt-get (as root, or through sudo); macOS:
# Homebrew. Anything it cannot install is named with the command to run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "setup: need root to run: $*" >&2; exit 1; fi
}

apt_install() {
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@"
}

if [ ! -x .venv/bin/python ]; then
  if ! "$PYTHON" -m venv .venv 2>/dev/null; then
    rm -rf .venv
    if command -v apt-get >/dev/null; then apt_install python3-venv; "$PYTHON" -m venv .venv
    else echo "setup: '$PYTHON -m venv' failed; install Python 3.9+ with venv support" >&2; exit 1; fi
  fi
fi
if [ ! -f .venv/.installed ] || [ requirements.txt -nt .venv/.installed ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r requirements.txt
  touch .venv/.installed
fi

if [ "${1:-}" = "--latex" ]; then
  if ! command -v xelatex >/dev/null || ! command -v pandoc >/dev/null; then
    if command -v apt-get >/dev/null; then
      apt_install texlive-xetex texlive-fonts-recommended texlive-plain-generic lmodern pandoc
    elif command -v brew >/dev/null; then
      brew install pandoc && brew install --cask basictex
      echo "setup: BasicTeX installed; open a new shell (or add /Library/TeX/texbin to PATH) and rerun" >&2
    else
      echo "setup: install xelatex (TeX Live) and pandoc, then rerun" >&2; exit 1
    fi
  fi
fi
