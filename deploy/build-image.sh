#!/usr/bin/env bash
# Builds the kube-proxy-rs runtime image without a container engine, as an OCI image layout:
#
#   deploy/build-image.sh [OUT]        # default OUT: ${CARGO_TARGET_DIR:-target}/image
#
# Needs root and Debian's `mmdebstrap` and `umoci` (apt-get install mmdebstrap umoci).
# The same image as `docker build -f deploy/Dockerfile .`, read from the same places:
# the Debian suite from the Dockerfile's runtime FROM line, the packages from
# deploy/image-packages.txt, the entry point from its ENTRYPOINT line.
#
# Layers: 1. a minbase root file system of that suite with the packages, slimmed like
# debian:*-slim (cached in OUT/base-HASH.tar, rebuilt only when its inputs change);
# 2. the release binary at the entry point, with /usr/local/bin/kube-proxy linked to it.
# Writes OUT/oci (tag = the crate version) and OUT/sizes.txt (compressed layer sizes).
# To load it into an engine: `skopeo copy oci:OUT/oci:TAG docker-daemon:kube-proxy-rs:TAG`
# or `podman pull oci:OUT/oci:TAG`.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
out=${1:-$target/image}
dockerfile=$repo/deploy/Dockerfile
packages_file=$repo/deploy/image-packages.txt

die() { echo "build-image: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (mmdebstrap in root mode, umoci keeps file owners)"
for tool in mmdebstrap mmtarfilter umoci cargo; do
  command -v "$tool" >/dev/null || die "$tool not found: apt-get install mmdebstrap umoci"
done

# ---- what the Dockerfile says ----
suite=$(sed -n 's/^FROM debian:\([a-z]*\)-slim$/\1/p' "$dockerfile")
entrypoint=$(sed -n 's/^ENTRYPOINT \["\([^"]*\)"\]$/\1/p' "$dockerfile")
[ -n "$suite" ] || die "no 'FROM debian:SUITE-slim' line in $dockerfile"
[ -n "$entrypoint" ] || die "no 'ENTRYPOINT [\"PATH\"]' line in $dockerfile"
packages=$(sed 's/#.*//' "$packages_file" | xargs | tr ' ' ',')
[ -n "$packages" ] || die "no packages in $packages_file"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/Cargo.toml" | head -n1)

# ---- the release binary ----
cargo build --release --locked --bin kube-proxy-rs --manifest-path "$repo/Cargo.toml"
binary=$target/release/kube-proxy-rs

mkdir -p "$out"
# ---- layer 1: Debian root file system (cached by its inputs) ----
# What debian:*-slim leaves out (debuerreotype's slimify), kept out by dpkg from then on.
slim=(
  'path-exclude=/usr/share/doc/*' 'path-include=/usr/share/doc/*/copyright'
  'path-exclude=/usr/share/man/*' 'path-exclude=/usr/share/info/*'
  'path-exclude=/usr/share/locale/*' 'path-exclude=/usr/share/groff/*'
  'path-exclude=/usr/share/lintian/*' 'path-exclude=/usr/share/linda/*'
)
base_key=$(printf '%s\n' "$suite" "$packages" "${slim[@]}" | sha256sum | cut -c1-16)
base=$out/base-$base_key.tar
if [ ! -s "$base" ]; then
  rm -f "$out"/base-*.tar
  start=$(date +%s)
  dpkgopts=()
  for o in "${slim[@]}"; do dpkgopts+=("--dpkgopt=$o"); done
  # No mirror given: mmdebstrap uses Debian's, with the suite's updates and security.
  # merged-usr: symlinks and usr-is-merged as in Debian's images, not the usrmerge
  # package (which pulls in perl). /dev is left empty, as in any image: the runtime fills it.
  log=$out/mmdebstrap.log
  mmdebstrap --variant=minbase --include="$packages" "${dpkgopts[@]}" \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr "$suite" - 2>"$log" \
    | mmtarfilter --path-exclude='/dev/*' >"$base.tmp" \
    || { tail -n 40 "$log" >&2; die "mmdebstrap failed (log: $log)"; }
  mv "$base.tmp" "$base"
  echo "build-image: $suite root file system in $(($(date +%s) - start)) s" >&2
fi

# ---- layer 2: the binary ----
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
install -D -m 0755 "$binary" "$stage/root$entrypoint"
ln -s "$(basename "$entrypoint")" "$stage/root/usr/local/bin/kube-proxy"
tar --create --file="$stage/binary.tar" --directory="$stage/root" \
  --owner=0 --group=0 --numeric-owner --sort=name --mtime="@$(stat -c %Y "$binary")" .

# ---- the OCI image ----
oci=$out/oci
image=$oci:$version
rm -rf "$oci"
umoci init --layout "$oci"
umoci new --image "$image"
umoci raw add-layer --image "$image" --history.created_by "mmdebstrap $suite + $packages_file" "$base"
umoci raw add-layer --image "$image" --history.created_by "kube-proxy-rs $version (release)" "$stage/binary.tar"
umoci config --image "$image" --os linux --architecture amd64 \
  --config.entrypoint "$entrypoint" \
  --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.label "org.opencontainers.image.title=kube-proxy-rs" \
  --config.label "org.opencontainers.image.version=$version"
umoci gc --layout "$oci"

# ---- sizes: what a registry stores and a node pulls (gzip layers) ----
manifest=$(python3 - "$oci" <<'EOF'
import json, sys
oci = sys.argv[1]
index = json.load(open(f"{oci}/index.json"))
print(index["manifests"][0]["digest"].split(":")[1])
EOF
)
python3 - "$oci" "$manifest" "$binary" "$base" >"$out/sizes.txt" <<'EOF'
import json, os, sys
oci, manifest, binary, base = sys.argv[1:]
m = json.load(open(f"{oci}/blobs/sha256/{manifest}"))
layers = [l["size"] for l in m["layers"]]
mb = lambda n: f"{n / 1e6:.1f} MB"
print(f"image compressed (gzip layers): {mb(sum(layers))} (root file system {mb(layers[0])}, binary {mb(layers[1])})")
print(f"root file system uncompressed: {mb(os.path.getsize(base))}")
print(f"binary: {mb(os.path.getsize(binary))}")
EOF
cat "$out/sizes.txt" >&2
echo "build-image: $image" >&2
