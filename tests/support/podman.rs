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
