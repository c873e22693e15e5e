#!/usr/bin/env bash
# Assembles the portcullis image's root filesystem in OUTDIR: the binary at
# /usr/local/bin/portcullis, what `portcullis init` runs (nft,
# iptables-nft, iptables-legacy, as the iptables package links them), every
# shared library `ldd` names for them and the xtables modules, and /etc
# files for UID/GID 1500 and name resolution. Nothing else: no shell, no
# package manager. Used by .ci/image.sh (`make image`) and the Dockerfile.
#
#   bash .ci/image-rootfs.sh BINARY OUTDIR
#
# Needs nft, xtables-nft-multi and xtables-legacy-multi on this machine
# (Debian's nftables and iptables packages) and ldd.
set -euo pipefail
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
bin=$1
rootfs=$2
die() { echo "image rootfs: $*" >&2; exit 1; }
[ -x "$bin" ] || die "$bin is not an executable"

rm -rf "$rootfs"
mkdir -p "$rootfs"/{usr/local/bin,usr/sbin,usr/lib,usr/lib64,etc,tmp,run}
chmod 1777 "$rootfs/tmp"
# Debian's merged /usr: /lib, /lib64, /sbin and /bin point into /usr.
for d in lib lib64 sbin bin; do ln -s "usr/$d" "$rootfs/$d"; done
mkdir -p "$rootfs/usr/bin"

install -m 0755 "$bin" "$rootfs/usr/local/bin/portcullis"
# Symbols only serve debuggers; the image is 3 MB smaller without them.
if command -v strip >/dev/null 2>&1; then strip "$rootfs/usr/local/bin/portcullis"; fi

# Copies a file to the same path under the rootfs (symlinks followed: the
# copy is a plain file), with /lib* paths moved under /usr.
copy_file() {
  local src=$1 dst=$1
  case "$dst" in
    /lib/* | /lib64/* | /bin/* | /sbin/*) dst="/usr$dst" ;;
  esac
  mkdir -p "$rootfs$(dirname "$dst")"
  cp -L "$src" "$rootfs$dst"
}

programs=(/usr/sbin/nft /usr/sbin/xtables-nft-multi /usr/sbin/xtables-legacy-multi)
for p in "${programs[@]}"; do
  [ -x "$p" ] || die "$p is missing"
  copy_file "$p"
done
# The xtables modules (matches and targets) live next to libxtables.
libxtables=$(ldd /usr/sbin/xtables-nft-multi | awk '/libxtables/ {print $3}')
[ -n "$libxtables" ] || die "xtables-nft-multi does not load libxtables"
moddir="/usr/lib/$(basename "$(dirname "$(readlink -f "$libxtables")")")/xtables"
modules=("$moddir"/*.so)
[ -e "${modules[0]}" ] || die "no xtables modules in $moddir"
for m in "${modules[@]}"; do copy_file "$m"; done

# Every shared library the binaries and modules load, with the loader.
libs=$(ldd "$bin" "${programs[@]}" "${modules[@]}" 2>/dev/null \
  | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// && $2 ~ /^\(/ {print $1}' | sort -u)
for l in $libs; do copy_file "$l"; done

# The names `portcullis init` and people call, as the iptables package links them.
for flavour in nft legacy; do
  for fam in iptables ip6tables; do
    for suffix in "" -save -restore; do
      ln -sf "xtables-$flavour-multi" "$rootfs/usr/sbin/$fam-$flavour$suffix"
    done
  done
done
for fam in iptables ip6tables; do
  for suffix in "" -save -restore; do
    ln -sf "$fam-nft$suffix" "$rootfs/usr/sbin/$fam$suffix"
  done
done

# Users and name resolution: root for the init container, 1500 for the rest.
# glibc (2.34 and later) has the files and dns lookups built in, so
# nsswitch.conf needs no libnss modules.
cat >"$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/usr/sbin/nologin
portcullis:x:1500:1500:portcullis:/nonexistent:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
EOF
cat >"$rootfs/etc/group" <<'EOF'
root:x:0:
portcullis:x:1500:
nogroup:x:65534:
EOF
cat >"$rootfs/etc/nsswitch.conf" <<'EOF'
passwd: files
group: files
hosts: files dns
networks: files
protocols: files
services: files
EOF
cp /etc/protocols "$rootfs/etc/protocols" 2>/dev/null || true
cp /etc/services "$rootfs/etc/services" 2>/dev/null || true
# The runtime mounts its own hosts and resolv.conf over these.
printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' >"$rootfs/etc/hosts"
: >"$rootfs/etc/resolv.conf"

