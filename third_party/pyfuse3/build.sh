#!/usr/bin/env bash
# Build pyfuse3 from its PyPI sdist with the sdeefs patch into a virtualenv (README.md here;
# scripts/setup.sh calls it; idempotent: a patched pyfuse3 is left alone).
#   build.sh VENV     e.g. third_party/pyfuse3/build.sh .venv
set -euo pipefail
venv=$1
version=3.5.0
here=$(cd "$(dirname "$0")" && pwd)
patch_file=$here/pyfuse3-$version-sdeefs.patch
if "$venv/bin/python" -c 'import pyfuse3, sys; sys.exit(not hasattr(pyfuse3.Operations, "opendir_stateless"))' 2>/dev/null; then
  exit 0  # already the patched build
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$venv/bin/pip" download -q --no-deps --no-binary pyfuse3 "pyfuse3==$version" -d "$tmp"
tar xzf "$tmp/pyfuse3-$version.tar.gz" -C "$tmp"
# --forward: a patch that does not apply (another pyfuse3) stops here, loudly
patch -p1 --forward --quiet -d "$tmp/pyfuse3-$version" < "$patch_file"
# the sdist's pre-generated __init__.c is stale now: the build runs Cython on the .pyx
rm -f "$tmp/pyfuse3-$version/src/pyfuse3/__init__.c"
"$venv/bin/pip" install -q --no-deps --force-reinstall "$tmp/pyfuse3-$version"
"$venv/bin/python" -c 'import pyfuse3; assert pyfuse3.Operations.opendir_stateless is False'
