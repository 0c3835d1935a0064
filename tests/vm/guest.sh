#!/bin/bash
# Run a payload inside a qemu guest that has a pure cgroup v2 hierarchy.
#
#   tests/vm/guest.sh PAYLOAD_DIR
#
# PAYLOAD_DIR must contain an executable `run` (a /bin/sh script); the whole
# directory appears in the guest as /payload and `run` is started there with
# cwd /payload. Dynamically linked ELF files in PAYLOAD_DIR get their `ldd`
# libraries copied into the guest (and their copies stripped of debug info).
#
# The guest: Debian's newest /boot/vmlinuz-*-amd64 under qemu TCG, a
# busybox-static initramfs whose /init mounts proc, sys, dev, tmp, run and
# cgroup2 at /sys/fs/cgroup, enables "+memory +cpu +pids" in the root's
# cgroup.subtree_control, runs /payload/run and powers off. /bin also has the
# static helpers hog, spin and forker built from tests/vm/*.c.
#
# Output: the guest's serial console on stdout. The init prints
# "GUEST-PAYLOAD-EXIT=<n>" after the payload; this script exits with <n>.
# If the marker never shows up it exits non-zero: 124 on timeout, else 125.
#
# Environment:
#   TIMEOUT=240      seconds before qemu is killed
#   MEM=512          guest memory in MiB
#   SMP=1            guest vCPUs
#   KERNEL=...       kernel image (default: newest /boot/vmlinuz-*-amd64)
#   KLOGLEVEL=3      guest console loglevel (4 shows OOM-kill lines, which can
#                    interleave with payload output on the serial console)
#   PVH=1            boot the extracted uncompressed vmlinux (PVH entry, ~5 s
#                    faster under TCG); PVH=0 boots the bzImage as is
#   STRIP=1          strip debug info from the guest's copies of payload ELFs
#   GUEST_DEBUG=1    keep the work dir (initramfs) and print its path
#
# Needs root? No (qemu TCG runs unprivileged); needs qemu-system-x86_64,
# busybox-static (/bin/busybox), gcc (+ static libc), cpio, gzip, a kernel
# in /boot. Part of device-worker-ng's test harness; see tests/vm/README.md.
set -euo pipefail

die() { echo "guest.sh: $*" >&2; exit 125; }

[ $# -eq 1 ] || die "usage: $0 PAYLOAD_DIR"
PAYLOAD_DIR=$(cd "$1" 2>/dev/null && pwd) || die "no such directory: $1"
[ -f "$PAYLOAD_DIR/run" ] && [ -x "$PAYLOAD_DIR/run" ] || die "$PAYLOAD_DIR/run is missing or not executable"

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TIMEOUT=${TIMEOUT:-240}
MEM=${MEM:-512}
SMP=${SMP:-1}
KLOGLEVEL=${KLOGLEVEL:-3}
STRIP=${STRIP:-1}
BUSYBOX=${BUSYBOX:-/bin/busybox}
if [ -z "${KERNEL:-}" ]; then
    KERNEL=$(ls /boot/vmlinuz-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
fi
[ -n "$KERNEL" ] && [ -r "$KERNEL" ] || die "no readable kernel (/boot/vmlinuz-*-amd64); apt-get install linux-image-amd64"
for tool in qemu-system-x86_64 gcc cpio gzip timeout; do
    command -v "$tool" >/dev/null || die "$tool not found"
done
[ -x "$BUSYBOX" ] || die "$BUSYBOX not found; apt-get install busybox-static"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/dwng-guest.XXXXXX")
QEMU_PID=
cleanup() {
    if [ -n "$QEMU_PID" ]; then
        kill "$QEMU_PID" 2>/dev/null || true
        wait "$QEMU_PID" 2>/dev/null || true
    fi
    if [ "${GUEST_DEBUG:-0}" = 1 ]; then echo "guest.sh: kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

t0=$(date +%s%N)
ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

# ---- kernel -----------------------------------------------------------------
# Booting the compressed bzImage costs ~5 s of emulated decompression before
# the kernel prints anything. Debian's kernel has CONFIG_PVH, so qemu can boot
# the uncompressed ELF vmlinux directly: extract it (in the background, ~1 s
# on the host) and fall back to the bzImage if that does not work.
extract_vmlinux() {
    local magic tool off
    for pair in $'\xfd7zXZ:xz' $'\x28\xb5\x2f\xfd:zstd' $'\x1f\x8b\x08:gzip'; do
        magic=${pair%:*}; tool=${pair##*:}
        command -v "$tool" >/dev/null || continue
        for off in $(LC_ALL=C grep -a -b -o "$magic" "$KERNEL" 2>/dev/null | cut -d: -f1 | head -n 3); do
            tail -c +$((off + 1)) "$KERNEL" | "$tool" -dc > "$WORK/vmlinux" 2>/dev/null || true  # trailing data: non-zero
            [ "$(head -c 4 "$WORK/vmlinux" | od -An -c | tr -d ' ')" = '177ELF' ] && return 0
        done
    done
    rm -f "$WORK/vmlinux"; return 1
}
if [ "${PVH:-1}" = 1 ]; then extract_vmlinux & EXTRACT_PID=$!; else EXTRACT_PID=; fi

# ---- guest root file system -------------------------------------------------
R=$WORK/root
mkdir -p "$R"/{bin,sbin,etc,proc,sys,dev,tmp,run,root,var/tmp,payload}
cp "$BUSYBOX" "$R/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    [ -e "$R/bin/$applet" ] || ln -s busybox "$R/bin/$applet"
done
for helper in hog spin forker; do
    gcc -O2 -static -o "$R/bin/$helper" "$HERE/$helper.c" || die "cannot build $helper.c (static libc needed: libc6-dev)"
done
cat > "$R/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat > "$R/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
printf 'passwd: files\ngroup: files\n' > "$R/etc/nsswitch.conf"
echo dwng-guest > "$R/etc/hostname"

# payload, plus shared libraries of its dynamically linked ELF files
cp -aL "$PAYLOAD_DIR/." "$R/payload/"   # -L: symlinked binaries are copied in
while IFS= read -r -d '' f; do
    [ "$(head -c 4 "$f" | od -An -c | tr -d ' ')" = '177ELF' ] || continue
    if [ "$STRIP" = 1 ] && command -v strip >/dev/null; then
        strip --strip-debug "$f" 2>/dev/null || true
    fi
    for lib in $(ldd "$f" 2>/dev/null | grep -o '/[^ ]*' || true); do
        [ -e "$R$lib" ] && continue
        mkdir -p "$R$(dirname "$lib")"
        cp -L "$lib" "$R$lib"
    done
done < <(find "$R/payload" -type f -print0)

# ---- /init (PID 1 in the guest) ---------------------------------------------
cat > "$R/init" <<'EOF'
#!/bin/sh
export PATH=/bin:/sbin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
hostname -F /etc/hostname
ip link set lo up 2>/dev/null
echo "GUEST-UP uptime=$(cut -d' ' -f1 /proc/uptime)s kernel=$(uname -r) cpus=$(nproc) mem=$(awk '/MemTotal/{print $2 "kB"}' /proc/meminfo)"
if mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup &&
   echo "+memory +cpu +pids" > /sys/fs/cgroup/cgroup.subtree_control; then
    echo "GUEST-CGROUP2 controllers=\"$(cat /sys/fs/cgroup/cgroup.controllers)\" subtree_control=\"$(cat /sys/fs/cgroup/cgroup.subtree_control)\""
else
    echo "GUEST-CGROUP2-SETUP-FAILED"
fi
cd /payload
/payload/run
rc=$?
echo "GUEST-PAYLOAD-DONE uptime=$(cut -d' ' -f1 /proc/uptime)s"
if [ "$rc" -ne 0 ]; then
    echo "---- guest kernel messages since /init started (last 40; payload failed) ----"
    dmesg | sed '1,/Run \/init as init process/d' | grep -v '^\[[ 0-9.]*\]   ' | tail -n 40
    echo "---- end of dmesg ----"
fi
echo "GUEST-PAYLOAD-EXIT=$rc"
sync
poweroff -f
EOF
chmod 755 "$R/init"

(cd "$R" && find . -print0 | cpio -o -0 -H newc -R 0:0 --quiet | gzip -1) > "$WORK/initrd.gz"
BOOT_KERNEL=$KERNEL
if [ -n "$EXTRACT_PID" ] && wait "$EXTRACT_PID" && [ -s "$WORK/vmlinux" ]; then
    BOOT_KERNEL=$WORK/vmlinux
fi
echo "guest.sh: initramfs $(( $(stat -c %s "$WORK/initrd.gz") / 1024 )) KiB built in $(ms_since "$t0") ms; kernel $BOOT_KERNEL; mem ${MEM}M smp $SMP; timeout ${TIMEOUT}s" >&2

# ---- boot -------------------------------------------------------------------
# KVM guests hang on these machines: always TCG.
LOG=$WORK/console.log
t1=$(date +%s%N)
# qemu runs in the background so that INT/TERM reach the traps at once (and
# cleanup stops it: timeout passes the signal on to qemu).
mkfifo "$WORK/console"
tr -d '\r' < "$WORK/console" | tee "$LOG" &
READER_PID=$!
timeout --kill-after=5 "$TIMEOUT" qemu-system-x86_64 \
    -accel tcg -nodefaults -no-user-config -no-reboot \
    -m "$MEM" -smp "$SMP" \
    -display none -monitor none -serial stdio \
    -kernel "$BOOT_KERNEL" -initrd "$WORK/initrd.gz" \
    -append "console=ttyS0 panic=-1 loglevel=$KLOGLEVEL rdinit=/init" \
    </dev/null > "$WORK/console" 2>&1 &
QEMU_PID=$!
qemu_rc=0
wait "$QEMU_PID" || qemu_rc=$?
QEMU_PID=
wait "$READER_PID" || true
elapsed=$(ms_since "$t1")

marker=$(grep -a -o '^GUEST-PAYLOAD-EXIT=[0-9]*$' "$LOG" | tail -n 1 || true)
if [ -n "$marker" ]; then
    rc=${marker#GUEST-PAYLOAD-EXIT=}
    echo "guest.sh: payload exit $rc; guest ran ${elapsed} ms, total $(ms_since "$t0") ms" >&2
    exit "$rc"
fi
if [ "$qemu_rc" -eq 124 ] || [ "$qemu_rc" -eq 137 ]; then
    echo "guest.sh: TIMEOUT: no GUEST-PAYLOAD-EXIT marker after ${TIMEOUT}s (qemu killed)" >&2
    exit 124
fi
echo "guest.sh: guest stopped without a GUEST-PAYLOAD-EXIT marker (qemu exit $qemu_rc, ${elapsed} ms)" >&2
exit 125
