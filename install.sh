#!/bin/sh
# Install the aifactory suite on an OpenNebula frontend (docs/install.md).
#
#   ./install.sh [--prefix DIR] [--destdir DIR] [--dry-run] [--upgrade | --uninstall]
#                [--no-hooks] [--endpoint URL] [--no-venv] [--sync] [--with-example-plugin]
#
# 1. Python environments (skipped when up to date, or with --no-venv):
#      PREFIX/venv                               the frontend's: CLI, hooks (default /opt/aifactory)
#      /var/lib/one/remotes/aifactory/venv       the hosts': `onehost sync` copies it to
#                                                /var/tmp/one/aifactory/venv on every host
# 2. Files, state directory, sudoers snippet, config, and the hooks registered with oned: done by
#    `python -m aifactory_core.install.main` as one transaction, rolled back if any step fails.
# DESTDIR (or --destdir) stages everything under another root, for packaging and tests.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
prefix=/opt/aifactory
destdir=${DESTDIR:-}
mode=install
dry_run=0
with_venv=1
example=0
sync=0
passthrough=""

usage() {
    echo "usage: $0 [--prefix DIR] [--destdir DIR] [--dry-run] [--upgrade | --uninstall] [--no-hooks]" >&2
    echo "          [--endpoint URL] [--no-venv] [--sync] [--with-example-plugin]" >&2
    exit 2
}
die() { echo "install.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || usage; prefix=$2; shift 2 ;;
        --prefix=*) prefix=${1#--prefix=}; shift ;;
        --destdir) [ $# -ge 2 ] || usage; destdir=$2; shift 2 ;;
        --destdir=*) destdir=${1#--destdir=}; shift ;;
        --endpoint) [ $# -ge 2 ] || usage; passthrough="$passthrough --endpoint=$2"; shift 2 ;;
        --endpoint=*) passthrough="$passthrough $1"; shift ;;
        --dry-run) dry_run=1; passthrough="$passthrough --dry-run"; shift ;;
        --upgrade) mode=upgrade; shift ;;
        --uninstall) mode=uninstall; shift ;;
        --no-hooks) passthrough="$passthrough --no-hooks"; shift ;;
        --no-venv) with_venv=0; shift ;;
        --sync) sync=1; shift ;;
        --with-example-plugin) example=1; shift ;;
        -h|--help) usage ;;
        *) echo "install.sh: unknown option $1" >&2; usage ;;
    esac
done

case "$prefix" in
    /*) ;;
    *) echo "install.sh: --prefix must be an absolute path" >&2; exit 2 ;;
esac
case "$destdir" in
    ""|/*) ;;
    *) echo "install.sh: DESTDIR must be an absolute path" >&2; exit 2 ;;
esac
destdir=${destdir%/}

python=${PYTHON:-python3}
if ! "$python" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    die "needs Python >= 3.11 with venv (apt-get install python3-venv)"
fi

run() {
    echo "+ $*"
    if [ "$dry_run" = 0 ]; then "$@"; fi
}

frontend_env=$prefix/venv
host_env=/var/lib/one/remotes/aifactory/venv
host_python=/var/tmp/one/aifactory/venv/bin/python3
created_dirs=""
built_envs=""

# The digest of the suite's sources: an environment stamped with it is up to date.
source_digest() {
    (cd "$here" && find aifactory_core plugins/aifactory_plugins pyproject.toml -type f \
        ! -name '*.pyc' ! -path '*/__pycache__/*' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1)
}

# mkdir -p under DESTDIR, remembering (as target paths) the directories that did not exist.
make_dirs() {
    missing=""
    dir=$1
    while [ "$dir" != / ] && [ ! -d "$destdir$dir" ]; do
        missing="$dir $missing"
        dir=$(dirname "$dir")
    done
    for dir in $missing; do
        created_dirs="$created_dirs --created-dir=$dir"
    done
    run mkdir -p "$destdir$1"
}

# Build environment $1 (a target path) beside itself, point its scripts at interpreter $2, then
# swap it in; the previous one is kept as $1.old until the whole run has succeeded.
build_env() {
    env=$destdir$1
    if [ "$mode" != upgrade ] && [ -f "$env/aifactory-source.sha256" ] \
        && [ "$(cat "$env/aifactory-source.sha256")" = "$digest" ]; then
        return 0
    fi
    make_dirs "$(dirname "$1")"
    run rm -rf "$env.new"
    run "$python" -m venv "$env.new"
    run "$env.new/bin/python3" -m pip install -q "$here"
    if [ "$example" = 1 ]; then
        run "$env.new/bin/python3" -m pip install -q --no-deps "$here/plugins/examples/aifactory-example-accel"
    fi
    echo "+ point the scripts in $env.new/bin at $2"
    if [ "$dry_run" = 0 ]; then
        for script in "$env.new"/bin/*; do
            if [ -f "$script" ] && [ ! -L "$script" ] && head -n 1 "$script" | grep -q "^#!$env.new/bin/python"; then
                sed -i "1s|^#!$env.new/bin/python[0-9.]*|#!$2|" "$script"
            fi
        done
        echo "$digest" > "$env.new/aifactory-source.sha256"
    fi
    if [ -d "$env" ]; then run mv "$env" "$env.old"; fi
    run mv "$env.new" "$env"
    built_envs="$built_envs $env"
}

# Undo build_env for every environment built in this run.
restore_envs() {
    for env in $built_envs; do
        rm -rf "$env"
        if [ -d "$env.old" ]; then mv "$env.old" "$env"; fi
    done
    for dir in $created_dirs; do
        rmdir "$destdir${dir#--created-dir=}" 2>/dev/null || true
    done
}

installer="$python"
if [ "$mode" != uninstall ] && [ "$with_venv" = 1 ]; then
    digest=$(source_digest)
    build_env "$frontend_env" "$frontend_env/bin/python3"
    build_env "$host_env" "$host_python"
    if [ -x "$destdir$frontend_env/bin/python3" ]; then installer=$destdir$frontend_env/bin/python3; fi
    passthrough="$passthrough --environment=$frontend_env --environment=$host_env"
elif [ "$mode" = uninstall ] && [ -x "$destdir$frontend_env/bin/python3" ] && [ "$with_venv" = 1 ]; then
    installer=$destdir$frontend_env/bin/python3
fi

set +e
# shellcheck disable=SC2086 # $passthrough and $created_dirs are lists of --option=value words
PYTHONPATH=$here${PYTHONPATH:+:$PYTHONPATH} "$installer" -m aifactory_core.install.main "$mode" \
    --source "$here" --destdir "${destdir:-/}" --prefix "$prefix" $passthrough $created_dirs
status=$?
set -e
if [ "$status" != 0 ]; then
    if [ "$dry_run" = 0 ]; then restore_envs; fi
    exit "$status"
fi
for env in $built_envs; do
    if [ -d "$env.old" ]; then rm -rf "$env.old"; fi
done

if [ "$mode" = uninstall ]; then
    echo "uninstalled; run 'onehost sync --force' as oneadmin to remove the suite from the hosts"
    exit 0
fi
if [ "$sync" = 1 ] && [ -z "$destdir" ]; then
    run su oneadmin -s /bin/sh -c 'onehost sync --force'
else
    echo "next: as oneadmin, run 'onehost sync --force' so every host gets the remotes and $host_python;"
    echo "      install $destdir/etc/sudoers.d/aifactory on every host (docs/install.md)"
fi
