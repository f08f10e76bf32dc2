#!/usr/bin/env bash
# Run on the CPU machine, before a GPU session's device call: fills .gpu-deps/ (git-ignored, ~25
# MB) with what the GPU machine may lack and cannot download (it has no network), for
# scripts/gpu_check.sh to use only where the machine's own copy is missing:
#   debs/  the Debian -dev packages ftune builds against (`apt-get download`, no install):
#          sentencepiece, yaml-cpp, nlohmann-json, CLI11, GoogleTest, PCRE2, Gloo's headers and
#          pkg-config; gpu_check.sh unpacks them with `dpkg -x` into a private prefix, never /.
#   py/    bitsandbytes from the project venv (its Python files, the CPU and CUDA 13 libraries
#          and its dist-info; the other CUDA versions' libraries are left out), the peer and
#          oracle of the QLoRA checks; gpu_check.sh adds it to python's path with a .pth file.
# Name the folder in the device call: run(carry=[".gpu-deps"], ...). Idempotent; prints the size.
# Usage: scripts/gpu_deps.sh
set -euo pipefail
cd "$(dirname "$0")/.."
D=.gpu-deps
PKGS=(pkg-config pkgconf pkgconf-bin libpkgconf3 libsentencepiece-dev libsentencepiece0
      libyaml-cpp-dev libyaml-cpp0.7 nlohmann-json3-dev libcli11-dev libgtest-dev libgmock-dev
      googletest libpcre2-dev libpcre2-8-0 libgloo-dev)
mkdir -p "$D/debs" "$D/py"
if ! ls "$D"/debs/libyaml-cpp-dev_*.deb >/dev/null 2>&1; then
  (cd "$D/debs" && apt-get download "${PKGS[@]}" 2>&1 | grep -v "^Get:\|unsandboxed" || true)
fi
missing=()
for p in "${PKGS[@]}"; do ls "$D/debs/${p}_"*.deb >/dev/null 2>&1 || missing+=("$p"); done
((${#missing[@]} == 0)) || { echo "gpu_deps: could not download: ${missing[*]}" >&2; exit 1; }

site=$(.venv/bin/python -c 'import bitsandbytes, os; print(os.path.dirname(os.path.dirname(bitsandbytes.__file__)))')
if [ ! -f "$D/py/bitsandbytes/__init__.py" ]; then
  rm -rf "$D/py/bitsandbytes" "$D"/py/bitsandbytes-*.dist-info
  (cd "$site" && { find bitsandbytes -type f ! -name '*.so' ! -path '*__pycache__*'
                   ls bitsandbytes/libbitsandbytes_cpu.so bitsandbytes/libbitsandbytes_cuda13*.so
                   find bitsandbytes-*.dist-info -type f; } | tar -cf - -T -) | tar -xf - -C "$D/py"
fi
[ -f "$D/py/bitsandbytes/libbitsandbytes_cpu.so" ] && ls "$D"/py/bitsandbytes/libbitsandbytes_cuda13*.so >/dev/null ||
  { echo "gpu_deps: bitsandbytes in $site has no CUDA 13 library" >&2; exit 1; }
echo "gpu_deps: $D ready: $(du -sh "$D" | cut -f1) ($(ls "$D/debs" | wc -l) debs, bitsandbytes" \
     "$(grep -m1 '^Version:' "$D"/py/bitsandbytes-*.dist-info/METADATA | cut -d' ' -f2))"
