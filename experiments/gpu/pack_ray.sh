#!/usr/bin/env bash
# Ray for a GPU lease. The lent GPU machine (Python 3.12) has no Ray, and Ray's wheel (79 MB for 2.60.0) does not
# fit the 64 MiB that a call carries beside the data and the other wheels. This packs Ray for Python 3.12 without
# its Java jar (unused by augsearch) and with its three native binaries stripped of symbols, xz-compressed (about
# 22 MB), into .ray/ray.tar.xz, and puts the wheels of the dependencies that machine lacks (jsonschema and its own)
# into .whl/. hippocampus.sh and run.sh unpack .ray/ray.tar.xz into their site folder when it is there.
# Usage: bash experiments/gpu/pack_ray.sh   (needs pip's access to PyPI, strip and xz; then carry .whl and .ray)
set -euo pipefail
cd "$(dirname "$0")/../.."
version=${RAY_VERSION:-2.60.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
platforms=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
download() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$1" "${@:2}"
}
download "$work" "ray==$version"
mkdir -p .whl .ray
download .whl "jsonschema==4.26.0" "jsonschema-specifications==2025.9.1" "referencing==0.37.0" "rpds-py==0.30.0"
mkdir "$work/site"
unzip -q "$work"/ray-*.whl -d "$work/site"  # unzip keeps the binaries' execute bits
rm -rf "$work/site/ray/jars"
for binary in "$work/site/ray/_raylet.so" "$work/site/ray/core/src/ray/gcs/gcs_server" \
        "$work/site/ray/core/src/ray/raylet/raylet"; do
    strip "$binary"
done
tar -C "$work/site" -cf - . | xz -9 -T1 > .ray/ray.tar.xz.part
mv .ray/ray.tar.xz.part .ray/ray.tar.xz
echo ".ray/ray.tar.xz: $(du -h .ray/ray.tar.xz | cut -f1) (Ray $version, Python 3.12); dependencies in .whl/"
