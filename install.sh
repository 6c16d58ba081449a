#!/bin/sh
# Install the aifactory suite on an OpenNebula frontend (docs/install.md).
#
#   ./install.sh [--prefix DIR] [--destdir DIR] [--dry-run] [--upgrade | --uninstall]
#                [--no-hooks] [--endpoint URL] [--no-venv] [--sync] [--enable-hook-server]
#                [--with-example-plugin]
#
# 1. Python environments (skipped when up to date, or with --no-venv):
#      PREFIX/venv                               the frontend's: CLI, hooks (default /opt/aifactory)
#      /var/lib/one/remotes/aifactory/venv       the hosts': `onehost sync` copies it to
#                                                /var/tmp/one/aifactory/venv on every host
#    With $ONE_LOCATION set (a self-contained OpenNebula), its remotes, etc and var directories
#    stand for /var/lib/one/remotes, /etc/one and /var/lib/one.
# 2. Files, state directory, sudoers snippet, config, and the hooks registered with oned: done by
#    `python -m aifactory_core.install.main` as one transaction, rolled back if any step fails.
# 3. With --sync, once everything is in place: `onehost sync --force` as oneadmin, which copies
#    /var/lib/one/remotes to /var/tmp/one on every host (not with DESTDIR: a staged tree is not
#    this frontend's remotes). If it fails the installation stays; run it again later.
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
enable_hook_server=0
endpoint=""
passthrough=""

usage_text() {
    echo "usage: $0 [--prefix DIR] [--destdir DIR] [--dry-run] [--upgrade | --uninstall] [--no-hooks]"
    echo "          [--endpoint URL] [--no-venv] [--sync] [--enable-hook-server] [--with-example-plugin]"
}
usage() { usage_text >&2; exit 2; }   # bad usage: on stderr, exit 2
die() { echo "install.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || usage; prefix=$2; shift 2 ;;
        --prefix=*) prefix=${1#--prefix=}; shift ;;
        --destdir) [ $# -ge 2 ] || usage; destdir=$2; shift 2 ;;
        --destdir=*) destdir=${1#--destdir=}; shift ;;
        --endpoint) [ $# -ge 2 ] || usage; endpoint=$2; shift 2 ;;
        --endpoint=*) endpoint=${1#--endpoint=}; shift ;;
        --dry-run) dry_run=1; passthrough="$passthrough --dry-run"; shift ;;
        --upgrade) mode=upgrade; shift ;;
        --uninstall) mode=uninstall; shift ;;
        --no-hooks) passthrough="$passthrough --no-hooks"; shift ;;
        --no-venv) with_venv=0; shift ;;
        --sync) sync=1; shift ;;
        --enable-hook-server) enable_hook_server=1; passthrough="$passthrough --enable-hook-server"; shift ;;
        --with-example-plugin) example=1; shift ;;
        -h|--help) usage_text; echo "See docs/install.md."; exit 0 ;;
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
if [ -n "$endpoint" ]; then
    case "$endpoint" in
        *[!][A-Za-z0-9:/.@_%+-]*) echo "install.sh: --endpoint: unexpected characters in $endpoint" >&2; exit 2 ;;
    esac
    passthrough="$passthrough --endpoint=$endpoint"
fi
if [ "$enable_hook_server" = 1 ] && [ "$mode" = uninstall ]; then
    echo "install.sh: --enable-hook-server cannot be combined with --uninstall (which stops and disables it)" >&2
    exit 2
fi

# --sync: checked before anything changes. OpenNebula's `onehost sync` refuses to run as root, so
# root runs it as oneadmin (runuser sets HOME, where the CLI finds ~/.one/one_auth); --force
# syncs every host that is not OFFLINE, whatever the VERSION recorded for it.
if [ "$sync" = 1 ]; then
    if [ -n "$destdir" ]; then
        echo "install.sh: --sync cannot be used with DESTDIR: a staged tree is not this frontend's remotes" >&2
        exit 2
    fi
    onehost=$(command -v onehost) || onehost=""
    case "$onehost" in
        /*) ;;
        *) echo "install.sh: --sync: onehost not found on PATH (OpenNebula's CLI, on the frontend)" >&2; exit 2 ;;
    esac
    set -- "$onehost" sync --force
    if [ -n "$endpoint" ]; then set -- env "ONE_XMLRPC=$endpoint" "$@"; fi
    if [ "$(id -u)" = 0 ]; then
        if ! id -u oneadmin >/dev/null 2>&1; then
            echo "install.sh: --sync: user oneadmin does not exist (is OpenNebula installed?)" >&2; exit 2
        fi
        runuser=$(command -v runuser) || die "--sync: runuser (util-linux) not found"
        set -- "$runuser" -u oneadmin -- "$@"
    elif [ "$(id -un)" != oneadmin ]; then
        echo "install.sh: --sync: run as root or as oneadmin" >&2; exit 2
    fi
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    die "needs Python >= 3.11 with venv (apt-get install python3-venv)"
fi

run() {
    echo "+ $*"
    if [ "$dry_run" = 0 ]; then "$@"; fi
}

# A self-contained OpenNebula (installed with its install.sh -d) is found through $ONE_LOCATION, as
# OpenNebula's own commands find it; its remotes are $ONE_LOCATION/var/remotes.
one_location=${ONE_LOCATION:-}
one_location=${one_location%/}
case "$one_location" in
    ""|/*) ;;
    *) echo "install.sh: ONE_LOCATION must be an absolute path" >&2; exit 2 ;;
esac
if [ -n "$one_location" ]; then remotes=$one_location/var/remotes; else remotes=/var/lib/one/remotes; fi
frontend_env=$prefix/venv
host_env=$remotes/aifactory/venv
host_python=/var/tmp/one/aifactory/venv/bin/python3
created_dirs=""
built_envs=""

# The digest of the suite's sources: an environment stamped with it is up to date.
source_digest() {
    (cd "$here" && find aifactory_core plugins/aifactory_plugins pyproject.toml install.sh -type f \
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

# The suite's requirements from pyproject.toml, less those only the frontend uses (pyone).
host_requirements() {
    "$python" -c 'import sys, tomllib
for requirement in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]:
    if not requirement.lower().startswith("pyone"):
        print(requirement)' "$here/pyproject.toml"
}
py_minor=$("$python" -c 'import sys; print(sys.version_info.minor)')

# The example plugin's sources (with --with-example-plugin): part of the stamp, so an environment
# built without the plugin is rebuilt with it, and one built with it is rebuilt without it.
example_digest() {
    (cd "$here/plugins/examples/aifactory-example-accel" && find pyproject.toml aifactory_example_accel -type f \
        ! -name '*.pyc' ! -path '*/__pycache__/*' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1)
}

# Build environment $1 (a target path) beside itself for role $3 (frontend or host), point its
# scripts at interpreter $2, then swap it in; the previous one is kept as $1.old until the whole
# run has succeeded.
build_env() {
    env=$destdir$1
    if [ "$mode" != upgrade ] && [ -f "$env/aifactory-source.sha256" ] \
        && [ "$(cat "$env/aifactory-source.sha256")" = "$digest" ]; then
        return 0
    fi
    make_dirs "$(dirname "$1")"
    run rm -rf "$env.new"
    run "$python" -m venv "$env.new"
    if [ "$3" = host ]; then
        # pyone talks to oned, which only the frontend does.
        # shellcheck disable=SC2046 # one requirement per word
        run "$env.new/bin/python3" -m pip install -q $(host_requirements)
        run "$env.new/bin/python3" -m pip install -q --no-deps "$here"
    else
        run "$env.new/bin/python3" -m pip install -q "$here"
    fi
    if [ "$example" = 1 ]; then
        run "$env.new/bin/python3" -m pip install -q --no-deps "$here/plugins/examples/aifactory-example-accel"
    fi
    if [ "$3" = host ]; then
        # oned copies the remotes to every host (scp -rp or rsync -L, on each sync and first
        # monitoring), links as copies: the hosts' environment keeps what runs there and nothing
        # else (no pip or setuptools, no lib64 link, one interpreter link).
        run "$env.new/bin/python3" -m pip uninstall -q -y pip setuptools
        # bin/python3 may be a link to one of the names removed here (venv links the others to the
        # name of the interpreter that made it): it is made a link to the interpreter itself first.
        if [ "$dry_run" = 0 ]; then
            interpreter=$(readlink -f "$env.new/bin/python3") || die "$env.new/bin/python3: no interpreter"
        else
            interpreter="<the interpreter $env.new/bin/python3 names>"
        fi
        run ln -sfn "$interpreter" "$env.new/bin/python3"
        run rm -f "$env.new/lib64" "$env.new/bin/python" "$env.new/bin/python3.${py_minor}" \
            "$env.new/bin/activate" "$env.new/bin/activate.csh" "$env.new/bin/activate.fish" "$env.new/bin/Activate.ps1"
        if [ "$dry_run" = 0 ] && [ ! -x "$env.new/bin/python3" ]; then die "$env.new/bin/python3: not executable"; fi
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
    if [ "$example" = 1 ]; then digest="$digest example:$(example_digest)"; fi
    build_env "$frontend_env" "$frontend_env/bin/python3" frontend
    build_env "$host_env" "$host_python" host
    if [ -x "$destdir$frontend_env/bin/python3" ]; then installer=$destdir$frontend_env/bin/python3; fi
    passthrough="$passthrough --environment=$frontend_env --environment=$host_env"
    if [ -n "$built_envs" ]; then passthrough="$passthrough --rebuilt-environment"; fi
elif [ -x "$destdir$frontend_env/bin/python3" ]; then
    # --no-venv or --uninstall: the frontend environment already there has what talks to oned (pyone).
    installer=$destdir$frontend_env/bin/python3
fi

set +e
# shellcheck disable=SC2086 # $passthrough and $created_dirs are lists of --option=value words
PYTHONPATH=$here${PYTHONPATH:+:$PYTHONPATH} "$installer" -m aifactory_core.install.main "$mode" \
    --source "$here" --destdir "${destdir:-/}" --prefix "$prefix" --one-location "$one_location" $passthrough $created_dirs
status=$?
set -e
if [ "$status" != 0 ]; then
    if [ "$dry_run" = 0 ]; then restore_envs; fi
    exit "$status"
fi
for env in $built_envs; do
    if [ -d "$env.old" ]; then rm -rf "$env.old"; fi
done

if [ "$mode" = uninstall ]; then done=uninstalled; else done=installed; fi
if [ "$sync" = 1 ]; then
    # The command is in "$@" (built above, before anything changed).
    if (cd / && run "$@"); then
        :
    else
        status=$?
        echo "install.sh: $done, but 'onehost sync --force' failed (exit $status): the hosts keep their" \
            "previous remotes until it succeeds; see onehost's output above, then run it again as oneadmin" >&2
        exit 1
    fi
elif [ "$mode" = uninstall ]; then
    echo "uninstalled; run 'onehost sync --force' as oneadmin to remove the suite from the hosts"
else
    echo "next: as oneadmin, run 'onehost sync --force' so every host gets the remotes and $host_python;"
fi
if [ "$mode" != uninstall ]; then
    echo "then, as root on every host: ${host_python%/python3}/aifactory host-setup (docs/host-setup.md)"
fi
