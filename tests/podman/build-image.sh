#!/bin/sh
# Builds the test image localhost/dwng-busybox:test from the host's static busybox
# (busybox-static): no registry is reachable on the test machines (TESTBED.md).
# Idempotent: does nothing when the image exists. PATH is set in the image: rootless `kube play`
# gives a container without one no default PATH. Usage: build-image.sh [podman args...]
# (e.g. run it as the rootless user for rootless tests).
set -eu
IMAGE=${IMAGE:-localhost/dwng-busybox:test}
BUSYBOX=${BUSYBOX:-/bin/busybox}
podman image exists "$IMAGE" && exit 0
file_is_static() { ! ldd "$1" >/dev/null 2>&1; }
file_is_static "$BUSYBOX" || { echo "build-image: $BUSYBOX is not static (install busybox-static)" >&2; exit 1; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/tmp" "$root/etc"
cp "$BUSYBOX" "$root/bin/busybox"
for applet in $("$BUSYBOX" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done
echo 'root:x:0:0:root:/:/bin/sh' > "$root/etc/passwd"
echo 'root:x:0:' > "$root/etc/group"
tar -C "$root" -cf "$root.tar" .
podman import --quiet --change 'CMD ["/bin/sh"]' --change 'ENV PATH=/bin' "$root.tar" "$IMAGE" >/dev/null
rm -f "$root.tar"
