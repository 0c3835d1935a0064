//! podman's test image: no registry is reachable on the test machines (TESTBED.md), so
//! tests/podman/build-image.sh builds it from the host's static busybox.

use std::path::PathBuf;
use std::process::Command;

/// The image every pod test runs.
pub const TEST_IMAGE: &str = "localhost/dwng-busybox:test";

/// tests/podman/build-image.sh (idempotent; run it as another user for that user's store).
pub fn build_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../podman/build-image.sh")
}

/// Builds [`TEST_IMAGE`] in root's image store unless it is there; `Err` says why not.
pub fn build_test_image() -> Result<(), String> {
    let out = Command::new("sh")
        .arg(build_script())
        .env("IMAGE", TEST_IMAGE)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", build_script().display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "building {TEST_IMAGE} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// An unprivileged user for rootless podman: created with subordinate ids if missing.
pub fn rootless_user() -> Result<(String, u32), String> {
    const USER: &str = "dwng-rootless";
    let id = || {
        Command::new("id")
            .args(["-u", USER])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<u32>()
                    .ok()
            })
    };
    if id().is_none() {
        let st = Command::new("useradd")
            .args(["-m", "-s", "/bin/sh", USER])
            .status()
            .map_err(|e| format!("useradd: {e}"))?;
        if !st.success() {
            return Err("useradd failed".into());
        }
    }
    let uid = id().ok_or("no uid")?;
    let subuid = std::fs::read_to_string("/etc/subuid").unwrap_or_default();
    if !subuid.lines().any(|l| l.starts_with(&format!("{USER}:"))) {
        let st = Command::new("usermod")
            .args([
                "--add-subuids",
                "400000-465535",
                "--add-subgids",
                "400000-465535",
                USER,
            ])
            .status()
            .map_err(|e| format!("usermod: {e}"))?;
        if !st.success() {
            return Err("usermod --add-subuids failed".into());
        }
    }
    // The test image for that user's own image store.
    let script = build_script();
    let run = format!("/run/user/{uid}");
    std::fs::create_dir_all(&run).map_err(|e| e.to_string())?;
    let _ = Command::new("chown")
        .args([&format!("{uid}:{uid}"), &run])
        .status();
    let _ = Command::new("chmod").args(["700", &run]).status();
    let st = Command::new("runuser")
        .args([
            "-u",
            USER,
            "--",
            "env",
            &format!("XDG_RUNTIME_DIR={run}"),
            &format!("HOME=/home/{USER}"),
            "sh",
        ])
        .arg(&script)
        .current_dir("/")
        .status()
        .map_err(|e| format!("runuser: {e}"))?;
    if !st.success() {
        return Err(format!("cannot build {TEST_IMAGE} for {USER}"));
    }
    Ok((USER.to_string(), uid))
}
