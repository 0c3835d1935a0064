# device-worker-ng %post ($1: 1 = install, 2+ = upgrade). The `dwng` workload user and the
# directories come from sysusers.d/tmpfiles.d. On a fresh install the service is enabled and
# started; upgrades are restarted by the old package's %postun (try-restart), which is safe
# for workloads (KillMode=process, the new agent adopts them).
if [ -x /usr/bin/systemd-sysusers ]; then
    /usr/bin/systemd-sysusers /usr/lib/sysusers.d/device-worker-ng.conf || :
elif ! getent passwd dwng >/dev/null; then
    useradd --system --home-dir /var/lib/dwng --shell /sbin/nologin \
        --comment "device-worker-ng workloads" dwng || :
fi
/usr/bin/systemd-tmpfiles --create /usr/lib/tmpfiles.d/device-worker-ng.conf >/dev/null 2>&1 || :
if [ "$1" -eq 1 ]; then
    /usr/bin/systemctl --no-reload enable device-worker-ng.service >/dev/null 2>&1 || :
    if [ -d /run/systemd/system ]; then
        /usr/bin/systemctl daemon-reload >/dev/null 2>&1 || :
        /usr/bin/systemctl start device-worker-ng.service || :
    fi
fi
