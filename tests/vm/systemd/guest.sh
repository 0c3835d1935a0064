#!/bin/bash
# Boot a real Debian 12 + systemd 252 guest (pure cgroup v2) under qemu TCG, install the
# device-worker-ng .deb in it the way an operator would (dpkg -i on the running system) and
# run tests/vm/systemd/probe: service lifecycle, status, a workload's memory limit, restart,
# upgrade, a bad configuration, removal and purge.
#
#   tests/vm/systemd/guest.sh PATH/TO/device-worker-ng_*.deb
#
# Output: the guest's serial console on stdout, one "PASS <check>: ..." / "FAIL <check>: ..."
# line per check (see probe). The probe prints "PROBE-EXIT=<n>" (n = failed checks) and
# powers the guest off; this script exits with <n>, 124 on timeout, 125 if the marker never
# appeared.
#
# The guest root file system is debootstrapped once (minbase + systemd, dbus, podman with crun,
# ~450 MB) and cached in $CACHE (default /var/tmp/dwng-systemd-rootfs-<hash of the package
# list>, so a changed list gets its own cache); each run copies it, so the cache stays
# pristine. Delete the directory to rebuild it.
#
#   PAYLOAD=DIR tests/vm/systemd/guest.sh [DEB...]
# runs DIR/run (as root, cwd DIR, copied to /root/payload) instead of the package probe, for
# experiments against the real systemd; it must print PROBE-EXIT=<n> itself.
#
# Environment:
#   CACHE=/var/tmp/dwng-systemd-rootfs-*  debootstrap cache
#   MIRROR=...        Debian mirror (default: the one this machine's apt uses)
#   TIMEOUT=1200      seconds before qemu is killed
#   MEM=1024 SMP=2    guest memory (MiB) and vCPUs
#   KERNEL=...        kernel image (default: newest /boot/vmlinuz-*-amd64, with its initrd)
#   EXTRA_DROPIN=F    install F as a drop-in for device-worker-ng.service (experiments)
#   GUEST_DEBUG=1     keep the work dir and print its path
#
# Needs root (debootstrap, chroot, mkfs.ext4 -d of a root-owned tree) and
#   apt-get install -y qemu-system-x86 linux-image-amd64 debootstrap e2fsprogs gcc libc6-dev
# KVM guests hang on these machines: always TCG. Part of device-worker-ng's test harness;
# see tests/vm/systemd/README.md.
set -euo pipefail

die() { echo "systemd/guest.sh: $*" >&2; exit 125; }

[ $# -ge 1 ] || [ -n "${PAYLOAD:-}" ] || die "usage: $0 DEB... (or PAYLOAD=DIR $0)"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# jq: the probe reads `status --json`; procps: ps/pgrep for the checks. podman (with its
# network stack, crun, catatonit for the pod's infra container, uidmap and slirp4netns for
# rootless pods, dbus-user-session and libpam-systemd for the rootless user's own systemd
# instance) and busybox-static (the local test image: no registry is reachable) for pods;
# kmod and iptables for the kernel modules podman's network and storage load.
PACKAGES=systemd,systemd-sysv,dbus,procps,jq,podman,containernetworking-plugins,crun,catatonit,uidmap,slirp4netns,dbus-user-session,libpam-systemd,busybox-static,kmod,iptables
CACHE=${CACHE:-/var/tmp/dwng-systemd-rootfs-$(echo "$PACKAGES" | md5sum | cut -c1-8)}
TIMEOUT=${TIMEOUT:-1200}
MEM=${MEM:-1024}
SMP=${SMP:-2}
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot)"
for tool in qemu-system-x86_64 debootstrap mkfs.ext4 gcc timeout flock; do
    command -v "$tool" >/dev/null || die "$tool not found"
done
for deb in "$@"; do [ -f "$deb" ] || die "no such file: $deb"; done
if [ -z "${KERNEL:-}" ]; then
    KERNEL=$(ls /boot/vmlinuz-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
fi
[ -n "$KERNEL" ] && [ -r "$KERNEL" ] || die "no kernel /boot/vmlinuz-*-amd64 (apt-get install linux-image-amd64)"
INITRD=${INITRD:-/boot/initrd.img-${KERNEL#/boot/vmlinuz-}}
[ -r "$INITRD" ] || die "no initrd $INITRD (it loads virtio_blk and ext4 for the root disk)"

t0=$(date +%s%N)
ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

# ---- cached root file system -------------------------------------------------
# flock: two test runs must not debootstrap into the same directory at once.
exec 9>"$CACHE.lock"
flock 9
if [ ! -x "$CACHE/sbin/init" ] || [ ! -e "$CACHE/.dwng-complete" ]; then
    # the Debian mirror apt here uses (one-line "deb URL" or deb822 "URIs: URL"; no comments)
    MIRROR=${MIRROR:-$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | grep -E '^[[:space:]]*(deb|URIs:)[[:space:]]' | grep -oE 'https?://[^ ]+/debian/?' \
        | grep -v -e security -e nodesource | head -n 1 || true)}
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
    echo "systemd/guest.sh: debootstrap bookworm into $CACHE from $MIRROR (once, ~1 min)" >&2
    rm -rf "$CACHE.tmp"
    debootstrap --variant=minbase --include="$PACKAGES" \
        bookworm "$CACHE.tmp" "$MIRROR" >"$CACHE.debootstrap.log" 2>&1 \
        || { tail -n 20 "$CACHE.debootstrap.log" >&2; die "debootstrap failed (log: $CACHE.debootstrap.log)"; }
    rm -rf "$CACHE.tmp/var/cache/apt/archives/"*.deb
    touch "$CACHE.tmp/.dwng-complete"
    rm -rf "$CACHE"
    mv "$CACHE.tmp" "$CACHE"
    echo "systemd/guest.sh: rootfs cached after $(ms_since "$t0") ms" >&2
fi
flock -u 9

WORK=$(mktemp -d "${TMPDIR:-/tmp}/dwng-sdvm.XXXXXX")
QEMU_PID=
cleanup() {
    if [ -n "$QEMU_PID" ]; then kill "$QEMU_PID" 2>/dev/null || true; wait "$QEMU_PID" 2>/dev/null || true; fi
    if [ "${GUEST_DEBUG:-0}" = 1 ]; then echo "systemd/guest.sh: kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- this run's root file system ---------------------------------------------
R=$WORK/root
cp -a "$CACHE" "$R"
gcc -O2 -static -o "$R/usr/local/bin/hog" "$HERE/../hog.c" || die "cannot build hog.c (static libc: libc6-dev)"
# The kernel modules podman needs (overlay storage, bridge/veth networks, netfilter, tun for a
# rootless pod's slirp4netns), from the
# host's copy of the guest kernel's modules: the root file system has none of its own.
KVER=${KERNEL#/boot/vmlinuz-}
if [ -d "/lib/modules/$KVER/kernel" ]; then
    for m in kernel/net kernel/lib kernel/fs/overlayfs kernel/drivers/net/veth.ko kernel/drivers/net/tun.ko; do
        [ -e "/lib/modules/$KVER/$m" ] || continue
        mkdir -p "$R/lib/modules/$KVER/$(dirname "$m")"
        cp -a "/lib/modules/$KVER/$m" "$R/lib/modules/$KVER/$(dirname "$m")/"
    done
    cp -a "/lib/modules/$KVER"/modules.builtin* "/lib/modules/$KVER"/modules.order "$R/lib/modules/$KVER/" 2>/dev/null || true
    depmod -b "$R" "$KVER" 2>/dev/null || echo "systemd/guest.sh: depmod failed: pods may lack kernel modules" >&2
fi
mkdir -p "$R/root/debs" "$R/etc/dwng-probe"
for deb in "$@"; do cp "$deb" "$R/root/debs/"; done
install -m 755 "$HERE/../../podman/build-image.sh" "$R/usr/local/bin/dwng-build-image"
if [ -n "${PAYLOAD:-}" ]; then
    cp -a "$PAYLOAD" "$R/root/payload"
    printf '#!/bin/sh\ncd /root/payload && exec ./run\n' > "$R/usr/local/sbin/dwng-probe"
    chmod 755 "$R/usr/local/sbin/dwng-probe"
else
    install -m 755 "$HERE/probe" "$R/usr/local/sbin/dwng-probe"
fi
install -m 644 "$HERE/desired.yaml" "$R/etc/dwng-probe/desired.yaml"
# The agent gets the probe's desired state through the environment (EDGE_DEVICE_*) from a
# drop-in the probe puts in place after its configuration checks, so the packaged conffile
# stays untouched until the probe edits it on purpose.
cat > "$R/etc/dwng-probe/probe.conf" <<'EOF'
[Service]
Environment=EDGE_DEVICE_DESIRED_STATE=/etc/dwng-probe/desired.yaml
Environment=EDGE_DEVICE_ROOTLESS_USER=dwngrl
EOF
cat > "$R/etc/systemd/system/dwng-probe.service" <<'EOF'
[Unit]
Description=device-worker-ng package probe
After=multi-user.target
[Service]
Type=oneshot
# straight to the serial console: journal+console would prefix every line
StandardOutput=tty
StandardError=tty
TTYPath=/dev/console
TTYReset=no
TTYVHangup=no
TimeoutStartSec=infinity
ExecStart=/usr/local/sbin/dwng-probe
ExecStopPost=/usr/bin/systemctl --no-block poweroff
[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/dwng-probe.service "$R/etc/systemd/system/multi-user.target.wants/dwng-probe.service"
# EXTRA_DROPIN=FILE: an extra drop-in for device-worker-ng.service (experiments with the unit)
if [ -n "${EXTRA_DROPIN:-}" ]; then
    mkdir -p "$R/etc/systemd/system/device-worker-ng.service.d"
    cp "$EXTRA_DROPIN" "$R/etc/systemd/system/device-worker-ng.service.d/zz-extra.conf"
fi
# No udev in minbase: gettys would wait 90 s for their tty device.
ln -sf /dev/null "$R/etc/systemd/system/serial-getty@ttyS0.service"
ln -sf /dev/null "$R/etc/systemd/system/getty@tty1.service"
echo "/dev/vda / ext4 defaults 0 1" > "$R/etc/fstab"
echo dwng-sdvm > "$R/etc/hostname"
truncate -s 3G "$WORK/disk.img"
mkfs.ext4 -q -F -d "$R" "$WORK/disk.img"
rm -rf "$R"
echo "systemd/guest.sh: disk image built in $(ms_since "$t0") ms; kernel $KERNEL; mem ${MEM}M smp $SMP; timeout ${TIMEOUT}s" >&2

# ---- boot ----------------------------------------------------------------------
LOG=$WORK/console.log
t1=$(date +%s%N)
mkfifo "$WORK/console"
tr -d '\r' < "$WORK/console" | tee "$LOG" &
READER_PID=$!
timeout --kill-after=5 "$TIMEOUT" qemu-system-x86_64 \
    -accel tcg -nodefaults -no-user-config -no-reboot \
    -m "$MEM" -smp "$SMP" \
    -display none -monitor none -serial stdio \
    -kernel "$KERNEL" -initrd "$INITRD" \
    -drive "file=$WORK/disk.img,format=raw,if=virtio" \
    -append "console=ttyS0 root=/dev/vda rw quiet loglevel=3 panic=-1 systemd.unified_cgroup_hierarchy=1 systemd.show_status=0" \
    </dev/null > "$WORK/console" 2>&1 &
QEMU_PID=$!
qemu_rc=0
wait "$QEMU_PID" || qemu_rc=$?
QEMU_PID=
wait "$READER_PID" || true
elapsed=$(ms_since "$t1")

marker=$(grep -a -o 'PROBE-EXIT=[0-9]*' "$LOG" | tail -n 1 || true)
if [ -n "$marker" ]; then
    rc=${marker#PROBE-EXIT=}
    echo "systemd/guest.sh: probe exit $rc; guest ran ${elapsed} ms, total $(ms_since "$t0") ms" >&2
    exit "$rc"
fi
if [ "$qemu_rc" -eq 124 ] || [ "$qemu_rc" -eq 137 ]; then
    echo "systemd/guest.sh: TIMEOUT: no PROBE-EXIT marker after ${TIMEOUT}s (qemu killed)" >&2
    exit 124
fi
echo "systemd/guest.sh: guest stopped without a PROBE-EXIT marker (qemu exit $qemu_rc, ${elapsed} ms)" >&2
exit 125
