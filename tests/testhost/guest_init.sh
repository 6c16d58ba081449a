#!/bin/bash
# PID 1 of the test host, after switch_root onto the host's / (9p, read-only).
# Kernel command line (set by runner.py):
#   testhost.out=DIR        host dir shared read-write as 9p tag "out"; mounted at the same path.
#                           It holds job.sh (what to run); rc and the JUnit XML come back in it.
#   testhost.udev=off|pci|full   pci: modprobe every PCI modalias (2 s); full: systemd-udevd coldplug (17 s)
#   testhost.libvirt=1      start virtlogd + libvirtd in the background (ready ~25 s later under TCG)
# Prints TESTHOST-READY once the job can start, TESTHOST-RC=N at the end, TESTHOST-FAIL: why on
# a setup error; always powers off (never a shell: that would only sit until the host time-out).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb LANG=C.UTF-8

uptime_s() { cut -d' ' -f1 /proc/uptime; }
halt() { sync; /bin/busybox poweroff -f; echo o > /proc/sysrq-trigger; while :; do read -r -t 1 _ < /dev/null; done; }
fail() { echo "TESTHOST-FAIL: guest init: $*"; halt; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=755 tmpfs /run || fail "cannot mount /run"
mkdir -p /dev/pts /dev/shm /run/ovl /run/netns /run/lock
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null

# Copy-on-write tmpfs layers over the read-only host dirs that tools write to.
for d in /etc /var /tmp /root /home; do
    [ -d "$d" ] || continue
    mkdir -p "/run/ovl$d/u" "/run/ovl$d/w"
    mount -t overlay overlay -o "lowerdir=$d,upperdir=/run/ovl$d/u,workdir=/run/ovl$d/w" "$d" \
        || fail "cannot overlay $d"
done

OUT="" UDEV=pci LIBVIRT=0
read -r -a CMDLINE < /proc/cmdline
for arg in "${CMDLINE[@]}"; do
    case $arg in
        testhost.out=*) OUT=${arg#testhost.out=} ;;
        testhost.udev=*) UDEV=${arg#testhost.udev=} ;;
        testhost.libvirt=*) LIBVIRT=${arg#testhost.libvirt=} ;;
    esac
done
[ -n "$OUT" ] || fail "no testhost.out= on the kernel command line"
if ! { mkdir -p "$OUT" && mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out "$OUT"; }; then
    fail "cannot mount the out share at $OUT"
fi
[ -f "$OUT/job.sh" ] || fail "no $OUT/job.sh"

hostname testhost
ip link set lo up

case $UDEV in
    off) ;;
    pci)
        # One modalias per device; word splitting is what turns them into arguments.
        # shellcheck disable=SC2046
        modprobe -a -q $(cat /sys/bus/pci/devices/*/modalias) 2>/dev/null ;;
    full)
        /lib/systemd/systemd-udevd --daemon >/dev/null 2>&1 || fail "systemd-udevd did not start"
        udevadm trigger --type=subsystems --action=add >/dev/null 2>&1
        udevadm trigger --type=devices --action=add >/dev/null 2>&1
        udevadm settle --timeout=120 ;;
    *) fail "unknown testhost.udev=$UDEV" ;;
esac

if [ "$LIBVIRT" = 1 ]; then
    # vfio-pci first, or libvirt says "VFIO device assignment is currently not supported".
    # Started in the background: the daemons warm up while Python imports pytest.
    modprobe vfio-pci || fail "modprobe vfio-pci"
    ( /usr/sbin/virtlogd -d && /usr/sbin/libvirtd -d ) > "$OUT/libvirtd.log" 2>&1 &
fi

echo "TESTHOST-READY uptime=$(uptime_s)"
bash "$OUT/job.sh"
rc=$?
echo "$rc" > "$OUT/rc"
echo "TESTHOST-RC=$rc uptime=$(uptime_s)"
halt
