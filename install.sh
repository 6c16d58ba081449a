#!/bin/sh
# Install the aifactory suite into a self-contained Python environment.
#
#   ./install.sh [--prefix DIR] [--dry-run] [--with-example-plugin]
#
# Creates DIR/venv (default DIR: /opt/aifactory) from this source tree and links the
# `aifactory` command into DIR/bin. Running it again upgrades the environment in place.
# The OpenNebula wiring (remotes, hooks, sudoers) is not done by this script yet.
set -eu

prefix=/opt/aifactory
dry_run=0
example=0
here=$(cd "$(dirname "$0")" && pwd)

usage() { echo "usage: $0 [--prefix DIR] [--dry-run] [--with-example-plugin]" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || usage; prefix=$2; shift 2 ;;
        --prefix=*) prefix=${1#--prefix=}; shift ;;
        --dry-run) dry_run=1; shift ;;
        --with-example-plugin) example=1; shift ;;
        -h|--help) usage ;;
        *) echo "install.sh: unknown option $1" >&2; usage ;;
    esac
done

case "$prefix" in
    /*) ;;
    *) echo "install.sh: --prefix must be an absolute path" >&2; exit 2 ;;
esac

run() {
    echo "+ $*"
    if [ "$dry_run" = 0 ]; then "$@"; fi
}

python=${PYTHON:-python3}
if ! "$python" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "install.sh: needs Python >= 3.11 with venv (apt-get install python3-venv)" >&2
    exit 1
fi

run mkdir -p "$prefix/bin"
if [ ! -x "$prefix/venv/bin/python" ]; then
    run "$python" -m venv "$prefix/venv"
fi
run "$prefix/venv/bin/pip" install -q "$here"
if [ "$example" = 1 ]; then
    run "$prefix/venv/bin/pip" install -q --no-deps "$here/plugins/examples/aifactory-example-accel"
fi
run ln -sf "$prefix/venv/bin/aifactory" "$prefix/bin/aifactory"
echo "installed: $prefix/bin/aifactory (try: $prefix/bin/aifactory doctor)"
