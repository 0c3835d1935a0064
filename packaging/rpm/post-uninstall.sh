# device-worker-ng %postun ($1: 0 = erase, 1+ = upgrade). Runs from the old package after the
# new one's files are in place: an upgrade restarts a running agent on the new binary without
# stopping workloads. RPM has no purge: /var/lib/device-worker-ng (identity, workload
# records and logs) stays after erase; delete it by hand to forget the device.
if [ -d /run/systemd/system ]; then
    /usr/bin/systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        /usr/bin/systemctl try-restart device-worker-ng.service >/dev/null 2>&1 || :
    fi
fi
