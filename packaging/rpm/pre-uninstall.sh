# device-worker-ng %preun ($1: 0 = erase, 1+ = upgrade). On erase: stop and disable the
# service, then stop the workloads it leaves running (systemd units of their own, or
# KillMode=process under the cgroupfs driver), since nothing would manage them any more.
# Upgrades do not stop anything.
if [ "$1" -eq 0 ]; then
    cg=
    if [ -d /run/systemd/system ]; then
        cg=$(/usr/bin/systemctl show --property=ControlGroup --value device-worker-ng.service 2>/dev/null || :)
    fi
    /usr/bin/systemctl --no-reload disable --now device-worker-ng.service >/dev/null 2>&1 || :
    if [ -d /run/systemd/system ]; then
        /usr/libexec/device-worker-ng/stop-workloads "${cg:-/system.slice/device-worker-ng.service}" || :
    fi
fi
