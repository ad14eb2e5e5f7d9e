#!/usr/bin/env bash
# Install pycriu and crit into a venv from CRIU's own source tree (neither is on PyPI:
# PyPI's "crit" is an unrelated project).
#
#   pycriu-install.sh CRIU_TREE VENV
#
# CRIU's own Makefiles generate what the tree lacks: `make lib` writes lib/pycriu/rpc_pb2.py,
# lib/pycriu/version.py and lib/pycriu/images/{*_pb2.py,pb.py,magic.py} (protoc from
# images/*.proto, scripts/magic-gen.py from criu/include/magic.h); `make crit` writes
# crit/crit/version.py. Then pip installs both directories without any index.
set -euo pipefail

TREE=${1:?usage: pycriu-install.sh CRIU_TREE VENV}
VENV=${2:?usage: pycriu-install.sh CRIU_TREE VENV}
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

command -v protoc >/dev/null || die "protoc is missing (apt-get install protobuf-compiler)"
[[ -x $VENV/bin/pip ]] || die "$VENV has no pip; the venv step must run first"

log "pycriu: generating the Python bindings in $TREE (make lib crit)"
run_quiet "make lib crit" make -C "$TREE" -j"$(nproc)" lib crit PYTHON=/usr/bin/python3 \
    || die "CRIU's 'make lib crit' failed in $TREE"
for f in lib/pycriu/rpc_pb2.py lib/pycriu/version.py lib/pycriu/images/magic.py \
    lib/pycriu/images/pb.py lib/pycriu/images/stats_pb2.py crit/crit/version.py; do
    [[ -s $TREE/$f ]] || die "CRIU's make did not generate $TREE/$f"
done

# pycriu's one runtime dependency (its pyproject says "protobuf"), from PyPI.
if ! "$VENV/bin/python" -c 'import google.protobuf' 2>/dev/null; then
    log "pycriu: pip install protobuf (pycriu's dependency, from PyPI)"
    run_quiet "pip install protobuf" "$VENV/bin/pip" install --disable-pip-version-check -q protobuf \
        || die "pip install protobuf failed (is PyPI reachable?)"
fi
"$VENV/bin/python" -c 'import setuptools, wheel' 2>/dev/null \
    || die "setuptools/wheel are missing in $VENV (the venv step installs them)"

# Build in a scratch copy: pip would leave build/ and *.egg-info behind in the tree.
scratch=$(mktemp -d /tmp/ferry-pycriu.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
cp -a "$TREE/lib" "$TREE/crit" "$scratch/"
run_quiet "pip install pycriu crit" "$VENV/bin/pip" install --disable-pip-version-check -q \
    --no-index --no-build-isolation --force-reinstall --no-deps "$scratch/lib" "$scratch/crit" \
    || die "pip install --no-index of $TREE/lib and $TREE/crit failed"
