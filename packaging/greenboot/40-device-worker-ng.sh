#!/bin/sh
# greenboot health check (installed in /usr/lib/greenboot/check/required.d/): after an OS
# update, greenboot runs it at boot and, when it fails, retries the boot and then rolls the
# update back (RHEL for Edge, bootc).
#
# It fails when the agent does not come up on the new image: its configuration is refused
# (the unit failed with status 78), or no agent answers `device-worker-ng check` within
# DEVICE_WORKER_NG_GREENBOOT_WAIT seconds (default 300). A running agent whose device is
# degraded, over budget, not yet registered or disconnected passes: an unreachable server or
# a failing workload is not the update's fault, and rolling back would not fix it. The
# verdict and its reason go to the journal either way.
set -u
export PATH="/usr/sbin:/usr/bin:/sbin:/bin:$PATH"
wait=${DEVICE_WORKER_NG_GREENBOOT_WAIT:-300}
deadline=$(( $(date +%s) + wait ))
while :; do
    line=$(device-worker-ng check 2>&1)
    rc=$?
    case $rc in
        0)
            echo "device-worker-ng: $line"
            exit 0 ;;
        4|5|6|7)
            echo "device-worker-ng: $line (the agent runs: no reason to roll back)"
            exit 0 ;;
        78)
            echo "device-worker-ng: configuration error: $line" >&2
            exit 1 ;;
    esac
    if systemctl -q is-failed device-worker-ng.service 2>/dev/null; then
        echo "device-worker-ng: the service failed: $(systemctl show -p Result -p ExecMainStatus --value device-worker-ng.service 2>/dev/null | tr '\n' ' ')" >&2
        exit 1
    fi
    [ "$(date +%s)" -ge "$deadline" ] && break
    sleep 2
done
echo "device-worker-ng: no healthy agent after ${wait}s: $line" >&2
exit 1
