#!/usr/bin/env bash
# One-time, idempotent machine set-up for ftune: Debian packages and the pinned Python venv.
# The venv (~5 GB, LibTorch + test oracles) lives outside the clone, keyed by a hash of
# requirements.txt, so every clone on this machine (CI clones afresh) reuses it; `.venv` links to it.
# Override its location with FTUNE_VENV. Prints what it skips; exits non-zero on any failure.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

apt_pkgs=(cmake g++ make ninja-build ccache pkg-config libsentencepiece-dev libyaml-cpp-dev
          nlohmann-json3-dev libcli11-dev libgtest-dev libgmock-dev libbenchmark-dev libpcre2-dev libicu-dev
          clang libclang-rt-dev libgloo-dev)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "setup: Debian packages present"
fi

hash=$(cat requirements.txt requirements-nodeps.txt | sha256sum | cut -c1-12)
venv="${FTUNE_VENV:-$HOME/.cache/ftune/venv-$hash}"
if [ ! -f "$venv/.ftune-ready" ]; then
  echo "setup: creating venv $venv (one-time, several GB)"
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -r requirements.txt
  "$venv/bin/pip" install -q --no-deps -r requirements-nodeps.txt
  touch "$venv/.ftune-ready"
else
  echo "setup: venv ready at $venv"
fi
ln -sfn "$venv" .venv
