#!/usr/bin/env bash
# Installs the system tools the tests need, only those missing, from Debian
# packages. Extra TOOL=PKG[,PKG...] arguments add to the list (.ci/run uses
# this for make and a C compiler). Not root and something missing: prints the
# command to run and fails.
set -euo pipefail

# ip, iptables and nft live in sbin, which a non-root PATH often lacks.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

# Helm 3.17 for the chart tests, into .tools/bin (see .ci/helm.sh).
bash "$(dirname "$0")/helm.sh"

# tool=Debian package(s) providing it
needs=(
  promtool=prometheus
  prometheus=prometheus
  ip=iproute2
  iptables=iptables
  nft=nftables
  tcpdump=tcpdump
  curl=curl
  setpriv=util-linux
  "$@"
)

missing=()
for pair in "${needs[@]}"; do
  tool=${pair%%=*}
  pkgs=${pair#*=}
  if ! command -v "$tool" >/dev/null 2>&1; then
    IFS=, read -r -a list <<<"$pkgs"
    missing+=("${list[@]}")
  fi
done

# Python tools from PyPI: tool=pip package.
pip_needs=(
  kubernetes-validate=kubernetes-validate
)
for pair in "${pip_needs[@]}"; do
  tool=${pair%%=*}
  pkg=${pair#*=}
  if ! command -v "$tool" >/dev/null 2>&1; then
    if ! command -v pip3 >/dev/null 2>&1 && ! command -v pip >/dev/null 2>&1; then
      missing+=(python3-pip)
      continue
    fi
  fi
done

install_pip() {
  for pair in "${pip_needs[@]}"; do
    tool=${pair%%=*}
    pkg=${pair#*=}
    if ! command -v "$tool" >/dev/null 2>&1; then
      echo "make deps: installing the PyPI package $pkg (for $tool)"
      pip=$(command -v pip3 || command -v pip)
      "$pip" install -q "$pkg" 2>/dev/null || "$pip" install -q --break-system-packages "$pkg"
      # pyenv (as on the CI machines) exposes new scripts only after a rehash.
      if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
      hash -r
      command -v "$tool" >/dev/null 2>&1 || { echo "make deps: $tool still missing after pip install $pkg" >&2; exit 1; }
    fi
  done
}

if [ ${#missing[@]} -eq 0 ]; then
  install_pip
  echo "make deps: all needed tools are present"
  exit 0
fi

# Unique, in order.
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | awk '!seen[$0]++')

if [ "$(id -u)" -ne 0 ]; then
  echo "make deps: missing Debian packages: ${missing[*]}" >&2
  echo "make deps: run as root: apt-get update && apt-get install -y --no-install-recommends ${missing[*]}" >&2
  exit 1
fi

echo "make deps: installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"

# Check that each tool really arrived.
for pair in "${needs[@]}"; do
  tool=${pair%%=*}
  command -v "$tool" >/dev/null 2>&1 || { echo "make deps: $tool still missing after install" >&2; exit 1; }
done
install_pip
echo "make deps: done"
