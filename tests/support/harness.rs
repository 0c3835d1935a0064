//! The integration tests' `main`: each test is registered with what it needs from the machine
//! (root, cgroups, tools, the qemu guest's kernel, podman's test image). A test whose needs
//! are unmet is not run and shows as `ignored (<reason>)`, counted in cargo's "N ignored",
//! instead of passing without having run. Command-line options are libtest's (name filters,
//! `--exact`, `--skip`, `--list`, `--test-threads`, `--nocapture`, `--ignored`,
//! `--include-ignored`), through libtest-mimic.
//!
//! Each `tests/<file>.rs` has a `[[test]]` entry with `harness = false` in Cargo.toml and a
//! `main` like this:
//!
//! ```text
//! fn main() {
//!     harness::main(&[
//!         test("cpu_hog_is_throttled", ROOT_CGROUPS, cpu_hog_is_throttled),
//!         test("version", &[], version),
//!     ])
//! }
//! ```
//!
//! Output is not captured (libtest-mimic cannot): tests put long diagnostics (a guest's
//! console, a linter's report) into their failure messages instead of printing them.

use std::path::Path;
use std::sync::OnceLock;

use libtest_mimic::{Arguments, Completion, Failed, Trial};

use crate::podman;

/// Something a test needs from the machine it runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Effective uid 0.
    Root,
    /// A cgroup hierarchy the agent can use (detected as the agent does).
    Cgroups,
    /// An executable on PATH, and where it comes from (a Debian package or an install command).
    Tool {
        name: &'static str,
        from: &'static str,
    },
    /// A file, and the Debian package it comes from.
    File {
        path: &'static str,
        from: &'static str,
    },
    /// A Debian kernel `/boot/vmlinuz-*-amd64` (with its initrd) for the qemu guests.
    GuestKernel,
    /// Booting qemu guests is allowed: a developer may turn them off with `DWNG_SKIP_VM=1`.
    QemuGuests,
    /// podman, and its test image [`podman::TEST_IMAGE`] (built once per test process).
    PodmanImage,
}

/// What one test needs: all of it, or it is ignored.
pub type Needs = &'static [Need];

/// The agent's integration tests: they run the real binary on this host's cgroups.
pub const ROOT_CGROUPS: Needs = &[Need::Root, Need::Cgroups];

/// Pods through real (rootful) podman under the agent's cgroups.
pub const PODMAN: Needs = &[Need::Root, Need::Cgroups, Need::PodmanImage];

impl Need {
    pub const fn tool(name: &'static str, from: &'static str) -> Need {
        Need::Tool { name, from }
    }

    pub const fn file(path: &'static str, from: &'static str) -> Need {
        Need::File { path, from }
    }

    /// Whether this machine provides it: `Err(Unmet::Missing)` makes the test ignored,
    /// `Err(Unmet::Broken)` (the tools are there but the set-up failed) makes it fail.
    fn check(self) -> Result<(), Unmet> {
        let missing = |what: String| Err(Unmet::Missing(what));
        match self {
            Need::Root => match nix::unistd::Uid::effective().as_raw() {
                0 => Ok(()),
                uid => missing(format!("root (uid {uid} here)")),
            },
            Need::Cgroups => device_worker_ng::cgroup::detect()
                .map(drop)
                .or_else(|e| missing(format!("a usable cgroup hierarchy ({e})"))),
            Need::Tool { name, from } => {
                if on_path(name) {
                    Ok(())
                } else {
                    missing(with_origin(name, from))
                }
            }
            Need::File { path, from } => {
                if Path::new(path).is_file() {
                    Ok(())
                } else {
                    missing(with_origin(path, from))
                }
            }
            Need::GuestKernel => {
                if guest_kernel_installed() {
                    Ok(())
                } else {
                    missing("a kernel /boot/vmlinuz-*-amd64 (linux-image-amd64)".into())
                }
            }
            Need::QemuGuests => {
                if std::env::var_os("DWNG_SKIP_VM").is_some_and(|v| v == "1") {
                    Err(Unmet::Declined("DWNG_SKIP_VM=1 is set".into()))
                } else {
                    Ok(())
                }
            }
            Need::PodmanImage => {
                Need::tool("podman", "podman").check()?;
                Need::file("/bin/busybox", "busybox-static").check()?;
                static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
                BUILT
                    .get_or_init(podman::build_test_image)
                    .clone()
                    .map_err(Unmet::Broken)
            }
        }
    }
}

enum Unmet {
    /// Not on this machine: CI installs it.
    Missing(String),
    /// Turned off by whoever runs the tests.
    Declined(String),
    /// There, but setting it up failed: a test failure, not a skip.
    Broken(String),
}

fn with_origin(what: &str, from: &str) -> String {
    if what == from {
        what.to_string()
    } else {
        format!("{what} ({from})")
    }
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

fn guest_kernel_installed() -> bool {
    std::fs::read_dir("/boot").is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("vmlinuz-") && name.ends_with("-amd64")
        })
    })
}

/// Why a test with these needs cannot run here (`Ok(None)`: it can), or why its set-up failed.
fn unmet(needs: Needs) -> Result<Option<String>, String> {
    let (mut missing, mut declined) = (Vec::new(), Vec::new());
    for &need in needs {
        // Set-up that runs things (podman builds an image) waits until the rest is there.
        if need == Need::PodmanImage && !(missing.is_empty() && declined.is_empty()) {
            continue;
        }
        match need.check() {
            Ok(()) => {}
            Err(Unmet::Missing(what)) => missing.push(what),
            Err(Unmet::Declined(why)) => declined.push(why),
            Err(Unmet::Broken(why)) => return Err(why),
        }
    }
    let mut reasons = declined;
    if !missing.is_empty() {
        reasons.push(format!("needs {}; see .ci/run", missing.join(", ")));
    }
    Ok((!reasons.is_empty()).then(|| reasons.join("; ")))
}

/// One registered test.
#[derive(Clone, Copy)]
pub struct Test {
    name: &'static str,
    needs: Needs,
    body: fn(),
}

/// Registers `body` as the test `name`, run only where `needs` are met.
pub fn test(name: &'static str, needs: Needs, body: fn()) -> Test {
    Test { name, needs, body }
}

/// Runs the tests selected by the command line and exits with libtest's status.
pub fn main(tests: &[Test]) -> ! {
    let mut args = Arguments::from_args();
    // libtest honours it; keeps `RUST_TEST_THREADS=1 cargo test` working.
    if args.test_threads.is_none() {
        args.test_threads = std::env::var("RUST_TEST_THREADS")
            .ok()
            .and_then(|n| n.parse().ok());
    }
    let trials = tests
        .iter()
        .map(|&Test { name, needs, body }| {
            Trial::ignorable_test(name, move || match unmet(needs) {
                Err(why) => Err(Failed::from(format!("set-up failed: {why}"))),
                Ok(Some(why)) => Ok(Completion::ignored_with(why)),
                Ok(None) => {
                    body();
                    Ok(Completion::Completed)
                }
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit()
}
