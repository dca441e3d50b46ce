# Sourced by the GPU scripts from the repository root: installs the carried wheels (.whl/) and Ray, where
# pack.sh packed it (.ray/ray.tar.xz), into /tmp/site and puts that folder on PYTHONPATH.
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
if [ -f .ray/ray.tar.xz ]; then
    mkdir -p /tmp/site && tar -C /tmp/site -xJf .ray/ray.tar.xz && export PYTHONPATH=/tmp/site
fi
