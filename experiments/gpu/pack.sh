#!/usr/bin/env bash
# What a GPU lease carries beside the tree. The lent GPU machine (Python 3.12, x86-64) has torch, numpy, scipy,
# scikit-image, matplotlib, tensorboard, aiohttp and grpcio, but not augsearch's other dependencies, nor Ray, nor Ray
# Serve's web stack, and it cannot download them. This writes:
# - .whl/: the wheels it lacks: augsearch's (higher, kornia, nibabel, pydantic and their own), Ray's (jsonschema's)
#   and Ray Serve's (fastapi, starlette, uvicorn, opentelemetry, grpcio-reflection), for experiments/gpu/site.sh;
# - .ray/ray.tar.xz: Ray itself. Its wheel (79 MB for 2.60.0) does not fit the 64 MiB that a call carries beside the
#   data and the other wheels, so it is packed without its Java jar (unused by augsearch) and with its three native
#   binaries stripped of symbols, xz-compressed (about 25 MB);
# - with --data DIR: .carry/msd_hippocampus_200, a copy of the 200 Hippocampus cases for experiments/gpu/hippocampus.sh.
# Usage: bash experiments/gpu/pack.sh [--data ../shared/data/msd_hippocampus_200]
#   (needs pip's access to PyPI, strip and xz; then carry .whl and .ray, and .carry for the Hippocampus runs)
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
mkdir -p .whl .ray
download .whl "higher==0.2.1" "kornia==0.9.0" "kornia_rs==0.2.0" "nibabel==5.4.2" "importlib_resources==7.1.0" \
    "pydantic==2.13.4" "pydantic_core==2.46.4" "annotated-types==0.7.0" "typing-inspection==0.4.2"
download .whl "jsonschema==4.26.0" "jsonschema-specifications==2025.9.1" "referencing==0.37.0" "rpds-py==0.30.0"
download .whl "fastapi==0.165.0" "starlette==1.10.0" "uvicorn==0.54.0" "grpcio-reflection==1.85.1" \
    "opentelemetry-api==1.45.2" "opentelemetry-sdk==1.45.2" "opentelemetry-semantic-conventions==0.66b2" \
    "opentelemetry-exporter-prometheus==0.66b2" "opentelemetry-proto==1.45.2" "importlib_metadata==10.2.0"
download "$work" "ray==$version"
mkdir "$work/site"
unzip -q "$work"/ray-*.whl -d "$work/site"  # unzip keeps the binaries' execute bits
rm -rf "$work/site/ray/jars"
for binary in "$work/site/ray/_raylet.so" "$work/site/ray/core/src/ray/gcs/gcs_server" \
        "$work/site/ray/core/src/ray/raylet/raylet"; do
    strip "$binary"
done
tar -C "$work/site" -cf - . | xz -9 -T1 > .ray/ray.tar.xz.part
mv .ray/ray.tar.xz.part .ray/ray.tar.xz
echo ".ray/ray.tar.xz: $(du -h .ray/ray.tar.xz | cut -f1) (Ray $version, Python 3.12); .whl/: $(du -sh .whl | cut -f1)"
if [ "${1:-}" = "--data" ]; then
    rm -rf .carry/msd_hippocampus_200 && mkdir -p .carry && cp -r "$2" .carry/msd_hippocampus_200
    echo ".carry/msd_hippocampus_200: $(du -sh .carry/msd_hippocampus_200 | cut -f1)"
fi
