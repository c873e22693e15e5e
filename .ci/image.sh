#!/usr/bin/env bash
# Builds the portcullis OCI image from the release binary, with no base image
# and no registry: a rootfs holding exactly what the binary and
# `portcullis init` run (nft, iptables-nft, iptables-legacy, the shared
# libraries `ldd` names, the xtables modules) plus /etc files for UID/GID 1500
# and name resolution, committed by buildah onto `scratch`.
#
# Writes target/image/portcullis-<version>.oci.tar, an OCI image layout
# archive named ghcr.io/portcullis/portcullis:<version> (the chart's default
# image) that `podman load`, `docker load`, `ctr images import` and
# `kind load image-archive` accept, and prints its path.
#
#   bash .ci/image.sh [BINARY]     (default: $CARGO_TARGET_DIR/release/portcullis)
#
# buildah comes from Debian (installed here when missing and running as
# root). Its storage lives under target/image/storage (vfs driver), so the
# build neither needs nor touches the machine's container storage.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

target=${CARGO_TARGET_DIR:-target}
bin=${1:-$target/release/portcullis}
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
repository=ghcr.io/portcullis/portcullis
image="$repository:$version"
out=$target/image
archive="$out/portcullis-$version.oci.tar"

say() { echo "make image: $*" >&2; }
die() { say "$*"; exit 1; }

[ -x "$bin" ] || die "$bin is missing: run make build (or pass the binary)"

# --- tools: buildah, and the programs whose files go into the image
need=()
command -v buildah >/dev/null 2>&1 || need+=(buildah)
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v xtables-nft-multi >/dev/null 2>&1 || need+=(iptables)
command -v xtables-legacy-multi >/dev/null 2>&1 || need+=(iptables)
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || die "missing Debian packages ${need[*]}: run as root: apt-get install -y --no-install-recommends ${need[*]}"
  say "installing Debian packages: ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

# --- the rootfs (the same script the Dockerfile runs)
rootfs="$out/rootfs"
bash .ci/image-rootfs.sh "$bin" "$rootfs"

# One layer: a tarball with root ownership and fixed times (reproducible).
layer="$out/rootfs.tar"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 \
  -C "$rootfs" -cf "$layer" .

# --- the image
# XTABLES_LOCKFILE: iptables-legacy takes a lock file, by default in /run,
# which a read-only root filesystem (as the injected init container has)
# refuses; /dev/shm is a writable tmpfs in every container, shared by the
# containers of a pod, which are the only ones changing the pod's rules.
store=(--root "$out/storage/root" --runroot "$out/storage/run" --storage-driver vfs)
rm -rf "$out/storage"
ctr=$(buildah "${store[@]}" from scratch)
trap 'buildah "${store[@]}" rm "$ctr" >/dev/null 2>&1 || true' EXIT
buildah "${store[@]}" add "$ctr" "$layer" / >/dev/null
buildah "${store[@]}" config \
  --user 1500:1500 \
  --env PATH=/usr/local/bin:/usr/sbin:/usr/bin \
  --env XTABLES_LOCKFILE=/dev/shm/xtables.lock \
  --entrypoint '["/usr/local/bin/portcullis"]' \
  --cmd '["--help"]' \
  --port 15001 --port 15006 --port 15008 --port 15012 --port 15020 --port 8443 \
  --label org.opencontainers.image.title=portcullis \
  --label org.opencontainers.image.version="$version" \
  --label org.opencontainers.image.source=https://github.com/portcullis/portcullis \
  --label org.opencontainers.image.licenses=Apache-2.0 \
  --os linux --arch "$(dpkg --print-architecture 2>/dev/null || echo amd64)" \
  "$ctr"
buildah "${store[@]}" commit --quiet --rm "$ctr" "$image" >/dev/null
trap - EXIT

# OCI archive (gzip layers), then what loaders read the name from besides
# the OCI tag: the io.containerd.image.name annotation (containerd, kind)
# and a docker manifest.json (docker load).
rm -f "$archive"
buildah "${store[@]}" push --quiet "$image" "oci-archive:$archive:$image" >&2
python3 - "$archive" "$image" <<'PY'
import hashlib, io, json, sys, tarfile
path, image = sys.argv[1], sys.argv[2]
with tarfile.open(path) as t:
    members = {m.name.lstrip("./"): (m, t.extractfile(m).read() if m.isfile() else None) for m in t.getmembers()}
index = json.loads(members["index.json"][1])
desc = index["manifests"][0]
desc.setdefault("annotations", {})["io.containerd.image.name"] = image
desc["annotations"]["org.opencontainers.image.ref.name"] = image.rsplit(":", 1)[1]
def blob(d):
    return "blobs/" + d["digest"].replace(":", "/")
manifest = json.loads(members[blob(desc)][1])
docker = [{
    "Config": blob(manifest["config"]),
    "RepoTags": [image],
    "Layers": [blob(l) for l in manifest["layers"]],
}]
files = {"index.json": json.dumps(index).encode(), "manifest.json": json.dumps(docker).encode()}
with tarfile.open(path + ".tmp", "w", format=tarfile.PAX_FORMAT) as t:
    names = sorted(n for n in members if n and members[n][1] is not None and n not in files)
    for name in ["oci-layout"] + [n for n in names if n != "oci-layout"] + sorted(files):
        data = files.get(name, members[name][1] if name in members else None)
        if data is None:
            continue
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        t.addfile(info, io.BytesIO(data))
PY
mv "$archive.tmp" "$archive"
rm -rf "$layer" "$out/storage"

size=$(du -k --apparent-size "$archive" | cut -f1)
unpacked=$(du -sk --apparent-size "$rootfs" | cut -f1)
say "built $image from $bin: $archive is $((size / 1024)) MiB, $((unpacked / 1024)) MiB unpacked ($(find "$rootfs" -type f | wc -l) files)"
echo "$archive"
