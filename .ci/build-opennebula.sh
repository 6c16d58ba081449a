#!/bin/bash
# Build OpenNebula's frontend (oned, monitord, scheduler, hook manager, Ruby drivers) from
# upstream's unmodified source tarball and install it self-contained (ONE_LOCATION mode) in a
# cache outside the checkout, keyed by the tarball's sha256 and the build flags.  A second run with
# the same tarball and flags only re-checks the prerequisites (seconds); a fresh machine builds it
# (~10 min on 2 cores).  Idempotent; run as root on Debian 12.
#
#   bash .ci/build-opennebula.sh            # prints the install directory on its last line
#
# Env:
#   AIFACTORY_ONE_TARBALL  the source tarball (default ../shared/opennebula/src/one-release-7.0.2.tar.gz)
#   AIFACTORY_ONE_SHA256   its expected sha256 (default: the 7.0.2 release's)
#   AIFACTORY_ONE_CACHE    cache directory (default /var/cache/aifactory-opennebula)
#   SKIP_APT=1             do not install Debian packages
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=7.0.2
TARBALL=${AIFACTORY_ONE_TARBALL:-../shared/opennebula/src/one-release-$VERSION.tar.gz}
EXPECTED_SHA=${AIFACTORY_ONE_SHA256:-0449a94a02ddd8e6f9af5975313158073d7592d181bb8190cc1b536e9c5b2ebc}
CACHE=${AIFACTORY_ONE_CACHE:-/var/cache/aifactory-opennebula}
FLAGS=(mysql=no sqlite=yes systemd=yes svncterm=no "gitversion=release-$VERSION")
ONEADMIN_UID=9869  # the uid and gid OpenNebula's packages give oneadmin, where free
export DEBIAN_FRONTEND=noninteractive

die() { echo "build-opennebula: $*" >&2; exit 1; }
log() { echo "build-opennebula: $*" >&2; }

[ "$(id -u)" = 0 ] || die "must run as root (apt-get, the oneadmin user, $CACHE)"
[ -f "$TARBALL" ] || die "OpenNebula source tarball not found: $TARBALL (set AIFACTORY_ONE_TARBALL)"
SHA=$(sha256sum "$TARBALL" | cut -d' ' -f1)
[ "$SHA" = "$EXPECTED_SHA" ] || die "checksum mismatch for $TARBALL: $SHA, expected $EXPECTED_SHA"

if [ "${SKIP_APT:-0}" != 1 ]; then
    apt-get update -q >/dev/null || die "apt-get update failed"
    # Build dependencies, the Ruby gems the drivers and the hook manager load (all from Debian),
    # and what a KVM/QEMU node over SSH needs on this same machine.
    apt-get install -y -q --no-install-recommends -o Dpkg::Use-Pty=0 \
        scons g++ make pkg-config flex bison zlib1g-dev nlohmann-json3-dev libxmlrpc-c++8-dev \
        libsqlite3-dev libxml2-dev libssl-dev libcurl4-openssl-dev libzmq3-dev libsystemd-dev \
        ruby ruby-dev ruby-ffi-rzmq ruby-xmlrpc ruby-nokogiri ruby-sqlite3 ruby-sequel ruby-json \
        ruby-ox ruby-highline ruby-augeas ruby-treetop ruby-ipaddress ruby-parse-cron sqlite3 rsync \
        openssh-server openssh-client libvirt-daemon-system libvirt-clients qemu-system-x86 \
        qemu-utils genisoimage libxml2-utils jq sudo procps pciutils >/dev/null \
        || die "apt-get install of the build dependencies failed"
fi

# oneadmin: the owner of every OpenNebula process and file.
if ! getent passwd oneadmin >/dev/null; then
    if getent passwd "$ONEADMIN_UID" >/dev/null || getent group "$ONEADMIN_UID" >/dev/null; then
        groupadd -f oneadmin
        useradd -m -d /var/lib/one -s /bin/bash -g oneadmin oneadmin
    else
        groupadd -g "$ONEADMIN_UID" oneadmin
        useradd -m -d /var/lib/one -s /bin/bash -u "$ONEADMIN_UID" -g oneadmin oneadmin
    fi
fi
# No password, but not locked either: sshd (oned's drivers reach hosts over SSH) refuses a locked one.
if [ "$(passwd -S oneadmin | cut -d' ' -f2)" = L ]; then usermod -p '*' oneadmin; fi
for group in libvirt kvm; do
    if getent group "$group" >/dev/null; then usermod -a -G "$group" oneadmin; fi
done

# Upstream's Ruby scripts require 'load_opennebula_paths' before they add $ONE_LOCATION/lib/ruby to
# the load path, and the installed copy insists on a gems directory a source install does not have
# (OpenNebula/one#7608).  Ruby's site directory is searched first, so this one is found instead.
SITE=$(ruby -e 'print RbConfig::CONFIG["sitelibdir"]')
mkdir -p "$SITE"
cat > "$SITE/load_opennebula_paths.rb" <<'RUBY'
# Load paths for an OpenNebula installed from source (aifactory's CI): the Ruby library and gems
# directories follow ONE_LOCATION when it is set, else the packaged layout.
location = ENV['ONE_LOCATION']
ONE_LOCATION = location unless defined?(ONE_LOCATION)
base_lib = location ? File.join(location, 'lib', 'ruby') : '/usr/lib/one/ruby'
base_gems = location ? File.join(location, 'share', 'gems') : '/usr/share/one/gems'
RUBY_LIB_LOCATION = base_lib unless defined?(RUBY_LIB_LOCATION)
GEMS_LOCATION = base_gems unless defined?(GEMS_LOCATION)
require 'rubygems'
Gem.use_paths(File.realpath(GEMS_LOCATION)) if File.directory?(GEMS_LOCATION)
$LOAD_PATH << RUBY_LIB_LOCATION unless $LOAD_PATH.include?(RUBY_LIB_LOCATION)
RUBY

KEY=$(printf '%s\n%s\n' "$SHA" "${FLAGS[*]}" | sha256sum | cut -c1-16)
DEST=$CACHE/$KEY
if [ -f "$DEST/complete" ] && [ -x "$DEST/one/bin/oned" ]; then
    log "cached build $DEST (tarball $SHA, flags ${FLAGS[*]})"
else
    rm -rf "$DEST"
    mkdir -p "$CACHE"
    WORK=$(mktemp -d /var/tmp/aifactory-one-build.XXXXXX)
    trap 'rm -rf "$WORK"' EXIT
    t0=$(date +%s)
    tar -xzf "$TARBALL" -C "$WORK"
    SRC=$(find "$WORK" -mindepth 1 -maxdepth 1 -type d | head -1)
    log "building $SRC with scons -j$(nproc) ${FLAGS[*]}"
    (cd "$SRC" && scons -j"$(nproc)" "${FLAGS[@]}" > "$WORK/scons.log" 2>&1) \
        || { tail -40 "$WORK/scons.log" >&2; die "scons failed (log above)"; }
    t1=$(date +%s)
    mkdir -p "$DEST/one"
    # install.sh reports the man pages and optional components this build leaves out; its own
    # status is what counts.
    (cd "$SRC" && ./install.sh -u oneadmin -g oneadmin -d "$DEST/one" > "$WORK/install.log" 2>&1) \
        || { tail -40 "$WORK/install.log" >&2; die "OpenNebula's install.sh failed (log above)"; }
    [ -x "$DEST/one/bin/oned" ] || die "install finished without $DEST/one/bin/oned"
    printf 'tarball_sha256=%s\nflags=%s\nbuild_s=%s\ninstall_s=%s\n' \
        "$SHA" "${FLAGS[*]}" "$((t1 - t0))" "$(( $(date +%s) - t1 ))" > "$DEST/complete"
    log "built in $((t1 - t0)) s, installed in $(( $(date +%s) - t1 )) s"
fi
# The cache is root's: tests run its programs as root, and copy etc/ and var/ for oneadmin per session.
chown -R root:root "$DEST"
# Where the tests find it (tests/realone.py reads this file).
printf '%s\n' "$DEST/one" > "$CACHE/release-$VERSION.location"
echo "$DEST/one"
