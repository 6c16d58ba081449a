#!/bin/bash
# Install what the real-kernel test host needs (QEMU/TCG + Debian's kernel + libvirt + tools)
# and build netdevsim.ko out of tree for that kernel.  Idempotent; run as root on Debian 12.
#
#   bash .ci/install-testhost.sh            # then: .venv/bin/pytest -m realkernel
#
# Env:
#   AIFACTORY_TESTHOST_KVER   guest kernel version (default: newest Debian kernel in /lib/modules)
#   AIFACTORY_TESTHOST_CACHE  where netdevsim-<kver>.ko goes (default /var/cache/aifactory-testhost)
#   SKIP_APT=1                only (re)build netdevsim
set -euo pipefail

CACHE=${AIFACTORY_TESTHOST_CACHE:-/var/cache/aifactory-testhost}
export DEBIAN_FRONTEND=noninteractive

die() { echo "install-testhost: $*" >&2; exit 1; }
log() { echo "install-testhost: $*" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

[ "$(id -u)" = 0 ] || die "must run as root (apt-get and /var/cache)"
command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian 12 only"

# Without systemd as PID 1, package postinsts must not try to start libvirtd/ovs on this host.
POLICY=/usr/sbin/policy-rc.d
POLICY_ADDED=0
cleanup() { if [ "$POLICY_ADDED" = 1 ]; then rm -f "$POLICY"; fi; }
trap cleanup EXIT
if [ "$(cat /proc/1/comm 2>/dev/null)" != systemd ] && [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$POLICY"
    chmod 755 "$POLICY"
    POLICY_ADDED=1
fi

apt_install() {
    apt-get install -y -q --no-install-recommends -o Dpkg::Use-Pty=0 "$@" >/dev/null \
        || die "apt-get install failed: $*"
}

pick_kver() {
    if [ -n "${AIFACTORY_TESTHOST_KVER:-}" ]; then echo "$AIFACTORY_TESTHOST_KVER"; return; fi
    local dir k kvers
    mapfile -t kvers < <(for dir in /lib/modules/*/; do basename "$dir"; done | sort -Vr)
    for k in "${kvers[@]}"; do
        if [ -f "/boot/vmlinuz-$k" ] && [ -f "/lib/modules/$k/modules.dep" ]; then echo "$k"; return; fi
    done
}

T0=$(now)
if [ "${SKIP_APT:-0}" != 1 ]; then
    t=$(now)
    apt-get update -q >/dev/null || die "apt-get update failed"
    apt_install qemu-system-x86 ipxe-qemu linux-image-amd64 busybox-static kmod cpio \
        libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients libxml2-utils \
        pciutils hwloc numactl openvswitch-switch iproute2 iputils-ping tcpdump \
        gcc make xz-utils driverctl sudo systemd
    KVER=$(pick_kver)
    [ -n "$KVER" ] || die "no Debian kernel found in /lib/modules after installing linux-image-amd64"
    SRC_PKG="linux-source-$(echo "$KVER" | cut -d. -f1-2)"
    apt_install "linux-headers-$KVER" "$SRC_PKG"
    log "apt packages ready in $(since "$t")s (kernel $KVER)"
fi

KVER=$(pick_kver)
[ -n "$KVER" ] || die "no Debian kernel in /lib/modules (install linux-image-amd64)"
KO="$CACHE/netdevsim-$KVER.ko"
if [ -s "$KO" ]; then
    log "netdevsim already built: $KO"
else
    t=$(now)
    SRC_TAR=$(for f in /usr/src/linux-source-*.tar.xz; do [ -f "$f" ] && echo "$f"; done | sort -V | tail -1)
    [ -n "$SRC_TAR" ] || die "no /usr/src/linux-source-*.tar.xz (install linux-source-X.Y)"
    [ -d "/lib/modules/$KVER/build" ] || die "no /lib/modules/$KVER/build (install linux-headers-$KVER)"
    # A fixed build path: the path ends up in the module, so a random one would change its bytes.
    W=/var/tmp/aifactory-netdevsim-build
    rm -rf "$W" && mkdir -p "$W"
    TOP=$(basename "$SRC_TAR" .tar.xz)
    tar -xJf "$SRC_TAR" -C "$W" --wildcards "$TOP/drivers/net/netdevsim/*" \
        || die "cannot extract drivers/net/netdevsim from $SRC_TAR"
    make -s -C "/lib/modules/$KVER/build" M="$W/$TOP/drivers/net/netdevsim" CONFIG_NETDEVSIM=m \
        KBUILD_BUILD_TIMESTAMP=0 modules >"$W/build.log" 2>&1 \
        || { tail -20 "$W/build.log" >&2; die "netdevsim build failed for $KVER"; }
    mkdir -p "$CACHE"
    install -m 644 "$W/$TOP/drivers/net/netdevsim/netdevsim.ko" "$KO.tmp"
    mv "$KO.tmp" "$KO"
    rm -rf "$W"
    log "netdevsim built in $(since "$t")s: $KO"
fi
log "done in $(since "$T0")s (guest kernel $KVER)"
