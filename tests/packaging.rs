//! The packages: what packaging/ ships, checked the way a distribution would, and the .deb
//! installed in a real systemd guest.
//!
//! * `packaged_config_documents_every_key`, `unit_has_the_settings_the_agent_relies_on`:
//!   plain file checks (the packaged config lists every key of `config::KEYS` with its default
//!   and loads; the unit carries Type=notify, no Delegate=, KillMode=process, the config-error
//!   exit code in RestartPreventExitStatus=, ...).
//! * `systemd_analyze_verifies_the_unit`: `systemd-analyze verify` (works without systemd
//!   running as PID 1).
//! * `deb_package_passes_lintian`, `rpm_package_passes_rpmlint`: build the release binary
//!   (separate target dir `<target>/packaging`, so the nested cargo does not wait for the
//!   outer one's lock), `cargo deb` and `cargo generate-rpm`, then lintian / rpmlint: no
//!   errors (warnings are printed).
//! * `deb_installs_and_runs_in_systemd_guest`: `tests/vm/systemd/guest.sh` boots Debian 12 +
//!   systemd 252 (cgroup v2) under qemu TCG, installs the .deb with dpkg and runs
//!   `tests/vm/systemd/probe` (~2-3 min with a cached rootfs; DWNG_SKIP_VM=1 skips it).
//!
//! A test whose tools (or root) are missing shows as ignored, with what it needs (CI installs
//! it: .ci/run).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use device_worker_ng::config::{Inputs, Settings, EXIT_CONFIG, KEYS};
use dwng_test_support::guest::GuestRun;
use dwng_test_support::harness::{self, test, Need, Needs};

/// cargo-deb and cargo-generate-rpm build the packages.
const PACKAGERS: [Need; 2] = [
    Need::tool("cargo-deb", "cargo install --locked cargo-deb"),
    Need::tool(
        "cargo-generate-rpm",
        "cargo install --locked cargo-generate-rpm",
    ),
];
const SYSTEMD_ANALYZE: Needs = &[Need::tool("systemd-analyze", "systemd")];
const LINTIAN: Needs = &[
    PACKAGERS[0],
    PACKAGERS[1],
    Need::tool("lintian", "lintian"),
    Need::tool("dpkg-deb", "dpkg"),
];
const RPMLINT: Needs = &[
    PACKAGERS[0],
    PACKAGERS[1],
    Need::tool("rpmlint", "rpmlint"),
    Need::tool("rpm", "rpm"),
];
/// tests/vm/systemd/guest.sh: debootstrap and chroot need root.
const SYSTEMD_GUEST: Needs = &[
    Need::QemuGuests,
    Need::Root,
    PACKAGERS[0],
    PACKAGERS[1],
    Need::tool("qemu-system-x86_64", "qemu-system-x86"),
    Need::tool("debootstrap", "debootstrap"),
    Need::tool("mkfs.ext4", "e2fsprogs"),
    Need::tool("gcc", "gcc"),
    Need::tool("flock", "util-linux"),
    Need::GuestKernel,
];

fn main() {
    harness::main(&[
        test(
            "packaged_config_documents_every_key",
            &[],
            packaged_config_documents_every_key,
        ),
        test(
            "unit_has_the_settings_the_agent_relies_on",
            &[],
            unit_has_the_settings_the_agent_relies_on,
        ),
        test(
            "systemd_analyze_verifies_the_unit",
            SYSTEMD_ANALYZE,
            systemd_analyze_verifies_the_unit,
        ),
        test(
            "deb_package_passes_lintian",
            LINTIAN,
            deb_package_passes_lintian,
        ),
        test(
            "rpm_package_passes_rpmlint",
            RPMLINT,
            rpm_package_passes_rpmlint,
        ),
        test(
            "deb_installs_and_runs_in_systemd_guest",
            SYSTEMD_GUEST,
            deb_installs_and_runs_in_systemd_guest,
        ),
    ])
}

const UNIT: &str = "packaging/device-worker-ng.service";
const CONFIG: &str = "packaging/config.yaml";

/// PASS lines the systemd guest probe must print (prefixes; tests/vm/systemd/probe).
const GUEST_PASSES: &[&str] = &[
    "PASS install:",
    "PASS enabled:",
    "PASS active:",
    "PASS notify:",
    "PASS status:",
    "PASS health:",
    "PASS agent_cgroup:",
    "PASS user_and_state:",
    "PASS bad_config_no_restart:",
    "PASS recovered_after_fix:",
    "PASS ticker_running:",
    "PASS hog_oom_killed:",
    "PASS service_survives_oom:",
    "PASS restart_keeps_workload:",
    "PASS upgrade_keeps_workload:",
    "PASS conffile_kept:",
    "PASS remove:",
    "PASS purge:",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

// ---- plain file checks ----------------------------------------------------------------

/// `KEY: value` lines of the packaged config, commented (`#KEY: value`) or not.
fn config_entries(text: &str) -> BTreeMap<String, (bool, String)> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let (commented, rest) = match line.strip_prefix('#') {
            Some(r) => (true, r),
            None => (false, line),
        };
        let Some((key, value)) = rest.split_once(": ") else {
            continue;
        };
        if KEYS.iter().any(|k| k.name == key) {
            out.insert(key.to_string(), (commented, value.trim().to_string()));
        }
    }
    out
}

fn load(path: &Path) -> Result<Settings, String> {
    Settings::load(&Inputs {
        file: Some(path.to_path_buf()),
        env: Vec::new(),
        flags: Vec::new(),
    })
    .map_err(|e| e.to_string())
}

fn packaged_config_documents_every_key() {
    let path = repo().join(CONFIG);
    let text = fs::read_to_string(&path).expect("read packaging/config.yaml");
    let entries = config_entries(&text);
    for key in KEYS {
        let Some((commented, value)) = entries.get(key.name) else {
            panic!(
                "{CONFIG} does not mention {} ({}): add it as a commented line",
                key.name, key.doc
            );
        };
        // A commented-out key shows the default the agent really uses.
        if let (true, Some(default)) = (commented, key.default) {
            assert_eq!(
                value, default,
                "{CONFIG}: #{} shows '{value}' but the default is '{default}'",
                key.name
            );
        }
    }
    // The shipped file loads as is, and with every example uncommented.
    load(&path).unwrap_or_else(|e| panic!("{CONFIG} as shipped: {e}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let all = dir.path().join("all.yaml");
    let uncommented: String = text
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(r) if KEYS.iter().any(|k| r.starts_with(&format!("{}: ", k.name))) => r,
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    fs::write(&all, uncommented).expect("write");
    let s = load(&all).unwrap_or_else(|e| panic!("{CONFIG} with every key uncommented: {e}"));
    assert_eq!(
        s.workload_user.as_deref(),
        Some("dwng"),
        "the package's example workload user"
    );
}

/// `Key=value` settings of the unit (all values of repeated keys).
fn unit_settings() -> BTreeMap<String, Vec<String>> {
    let text = fs::read_to_string(repo().join(UNIT)).expect("read the unit");
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with(';') || line.starts_with('[') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.entry(k.trim().into())
                .or_default()
                .push(v.trim().into());
        }
    }
    out
}

fn unit_has_the_settings_the_agent_relies_on() {
    let s = unit_settings();
    let one = |k: &str| -> String {
        let v = s.get(k).unwrap_or_else(|| panic!("{UNIT}: no {k}="));
        assert_eq!(v.len(), 1, "{UNIT}: {k}= set {} times", v.len());
        v[0].clone()
    };
    assert_eq!(one("Type"), "notify");
    assert!(!one("WatchdogSec").is_empty());
    // No delegation: the workloads live in the agent's own top-level subtree (src/daemon.rs).
    assert!(
        !s.contains_key("Delegate"),
        "{UNIT}: Delegate= would break restarts"
    );
    assert_eq!(one("KillMode"), "process");
    assert_eq!(one("OOMPolicy"), "continue");
    assert_eq!(one("Restart"), "on-failure");
    // A crash loop backs off (systemd >= 254) from the fixed delay older ones keep.
    assert_eq!(one("RestartSec"), "5s");
    assert_eq!(one("RestartSteps"), "10");
    assert_eq!(one("RestartMaxDelaySec"), "5min");
    assert_eq!(one("StartLimitIntervalSec"), "0");
    // Not /usr/share/doc: minimal images often leave it out.
    assert_eq!(one("Documentation"), "man:device-worker-ng(8)");
    let prevent = one("RestartPreventExitStatus");
    assert!(
        prevent
            .split_whitespace()
            .any(|c| c == EXIT_CONFIG.to_string()),
        "{UNIT}: RestartPreventExitStatus={prevent} lacks the config-error exit code {EXIT_CONFIG}"
    );
    assert!(one("ExecStart")
        .starts_with("/usr/bin/device-worker-ng --config /etc/device-worker-ng/config.yaml run"));
    for (k, why) in [
        ("ProtectControlGroups", "the agent writes cgroupfs"),
        ("NoNewPrivileges", "workloads use setuid helpers"),
        (
            "ProtectSystem",
            "a private mount namespace hides podman's mounts",
        ),
        (
            "PrivateTmp",
            "a private mount namespace hides podman's mounts",
        ),
    ] {
        let on = s
            .get(k)
            .is_some_and(|v| v.iter().any(|x| x != "no" && x != "false"));
        assert!(!on, "{UNIT}: {k}= breaks the agent: {why}");
    }
}

fn systemd_analyze_verifies_the_unit() {
    // verify checks that ExecStart= exists: point it at this build's binary.
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = dir.path().join("device-worker-ng.service");
    let unit_text = fs::read_to_string(repo().join(UNIT)).expect("read the unit");
    fs::write(
        &unit,
        unit_text.replace(
            "/usr/bin/device-worker-ng",
            env!("CARGO_BIN_EXE_device-worker-ng"),
        ),
    )
    .expect("write");
    // --man=no: Documentation=man:device-worker-ng(8) is installed by the package, not here.
    let out = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .env("SYSTEMD_LOG_COLOR", "0"));
    let stderr = text(&out.stderr);
    // Complaints about the host's own units (no systemd running here) are not ours; nor is
    // systemd < 254 not knowing the crash-loop backoff keys (the unit explains).
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("device-worker-ng"))
        .filter(|l| {
            !(l.contains("Unknown key 'RestartSteps'")
                || l.contains("Unknown key 'RestartMaxDelaySec'"))
        })
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify {UNIT}: exit {:?}\n{}",
        out.status.code(),
        ours.join("\n")
    );
}

// ---- packages ---------------------------------------------------------------------------

struct Packages {
    deb: PathBuf,
    rpm: PathBuf,
}

/// Builds both packages once per test process (the tests using them need [`PACKAGERS`]).
fn packages() -> &'static Packages {
    static BUILT: OnceLock<Packages> = OnceLock::new();
    BUILT.get_or_init(build_packages)
}

fn build_packages() -> Packages {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"))
        .join("packaging");
    let outdir = target.join("packages");
    let _ = fs::remove_dir_all(&outdir);
    fs::create_dir_all(&outdir).unwrap_or_else(|e| panic!("create {}: {e}", outdir.display()));

    let build = run(Command::new(&cargo)
        .args(["build", "--release", "--bin", "device-worker-ng"])
        .current_dir(repo())
        .env("CARGO_TARGET_DIR", &target));
    assert!(
        build.status.success(),
        "cargo build --release failed:\n{}",
        text(&build.stderr)
    );
    let deb = run(Command::new(&cargo)
        .args(["deb", "--no-build", "--fast", "-o"])
        .arg(&outdir)
        .current_dir(repo())
        .env("CARGO_TARGET_DIR", &target));
    assert!(
        deb.status.success(),
        "cargo deb failed:\n{}{}",
        text(&deb.stdout),
        text(&deb.stderr)
    );
    // cargo-generate-rpm reads the binary from target/release/ relative to the crate unless told.
    let rpm = run(Command::new(&cargo)
        .args(["generate-rpm", "--target-dir"])
        .arg(&target)
        .arg("-o")
        .arg(&outdir)
        .current_dir(repo()));
    assert!(
        rpm.status.success(),
        "cargo generate-rpm failed:\n{}{}",
        text(&rpm.stdout),
        text(&rpm.stderr)
    );
    let find = |ext: &str| -> PathBuf {
        fs::read_dir(&outdir)
            .expect("read the package dir")
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == ext))
            .unwrap_or_else(|| panic!("no .{ext} in {}", outdir.display()))
    };
    Packages {
        deb: find("deb"),
        rpm: find("rpm"),
    }
}

/// Lines of a linter's output that are errors (`E:` in lintian's and rpmlint's formats).
fn error_lines(output: &str) -> Vec<String> {
    output
        .lines()
        .filter(|l| l.starts_with("E: ") || l.contains(": E: "))
        .map(str::to_string)
        .collect()
}

fn deb_package_passes_lintian() {
    let pkgs = packages();
    let listing = run(Command::new("dpkg-deb").arg("--contents").arg(&pkgs.deb));
    let listing = text(&listing.stdout);
    for want in [
        "./usr/bin/device-worker-ng",
        "./usr/lib/systemd/system/device-worker-ng.service",
        "./etc/device-worker-ng/config.yaml",
        "./usr/lib/tmpfiles.d/device-worker-ng.conf",
        "./usr/lib/sysusers.d/device-worker-ng.conf",
        "./usr/libexec/device-worker-ng/stop-workloads",
        "./usr/share/doc/device-worker-ng/README.md",
        "./usr/share/man/man8/device-worker-ng.8.gz",
        "./usr/share/bash-completion/completions/device-worker-ng",
        "./usr/share/zsh/vendor-completions/_device-worker-ng",
        "./usr/share/fish/vendor_completions.d/device-worker-ng.fish",
        "./usr/lib/greenboot/check/required.d/40-device-worker-ng.sh",
    ] {
        assert!(listing.contains(want), "the .deb lacks {want}:\n{listing}");
    }
    let recommends = run(Command::new("dpkg-deb")
        .args(["--field"])
        .arg(&pkgs.deb)
        .arg("Recommends"));
    assert!(
        text(&recommends.stdout).contains("podman"),
        "the .deb does not recommend podman"
    );
    man_page_documents_every_key();
    let ctl = tempfile::tempdir().expect("tempdir");
    let ok = run(Command::new("dpkg-deb")
        .arg("--control")
        .arg(&pkgs.deb)
        .arg(ctl.path()));
    assert!(ok.status.success());
    let conffiles = fs::read_to_string(ctl.path().join("conffiles")).unwrap_or_default();
    assert!(
        conffiles.contains("/etc/device-worker-ng/config.yaml"),
        "config.yaml is not a conffile: {conffiles:?}"
    );
    let postinst = fs::read_to_string(ctl.path().join("postinst")).unwrap_or_default();
    for want in [
        "systemd-sysusers",
        "deb-systemd-helper",
        "deb-systemd-invoke",
    ] {
        assert!(
            postinst.contains(want),
            "postinst lacks {want}:\n{postinst}"
        );
    }

    let out = run(Command::new("lintian")
        .args(["--tag-display-limit", "0", "--info"])
        .arg(&pkgs.deb));
    let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
    let errors = error_lines(&report);
    assert!(
        errors.is_empty(),
        "lintian errors:\n{}\n---- lintian ----\n{report}",
        errors.join("\n")
    );
}

fn rpm_package_passes_rpmlint() {
    let pkgs = packages();
    let files = run(Command::new("rpm").args(["-qpl"]).arg(&pkgs.rpm));
    let files = text(&files.stdout);
    for want in [
        "/usr/share/man/man8/device-worker-ng.8.gz",
        "/usr/share/bash-completion/completions/device-worker-ng",
        "/usr/share/zsh/site-functions/_device-worker-ng",
        "/usr/share/fish/vendor_completions.d/device-worker-ng.fish",
        "/usr/lib/greenboot/check/required.d/40-device-worker-ng.sh",
    ] {
        assert!(files.contains(want), "the .rpm lacks {want}:\n{files}");
    }
    let recommends = run(Command::new("rpm")
        .args(["-qp", "--recommends"])
        .arg(&pkgs.rpm));
    assert!(
        text(&recommends.stdout).contains("podman"),
        "the .rpm does not recommend podman"
    );
    man_page_documents_every_key();
    let q = run(Command::new("rpm")
        .args(["-qp", "--configfiles", "--scripts"])
        .arg(&pkgs.rpm));
    let q = text(&q.stdout);
    assert!(
        q.contains("/etc/device-worker-ng/config.yaml"),
        "config.yaml is not a %config file:\n{q}"
    );
    for want in [
        "postinstall scriptlet",
        "preuninstall scriptlet",
        "postuninstall scriptlet",
    ] {
        assert!(q.contains(want), "the .rpm lacks its {want}:\n{q}");
    }
    let out = run(Command::new("rpmlint")
        .arg("-r")
        .arg(repo().join("packaging/rpm/rpmlintrc"))
        .arg(&pkgs.rpm));
    let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
    let errors = error_lines(&report);
    assert!(
        errors.is_empty(),
        "rpmlint errors:\n{}\n---- rpmlint ----\n{report}",
        errors.join("\n")
    );
}

/// The man page both packages ship (built beside the release binary by build.rs) lists every
/// setting, the exit statuses and the drop-ins.
fn man_page_documents_every_key() {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"))
        .join("packaging/release/man/device-worker-ng.8");
    let man = fs::read_to_string(&target).unwrap_or_else(|e| panic!("{}: {e}", target.display()));
    for key in KEYS {
        assert!(
            man.contains(&format!("\\fB{}\\fR", key.name.replace('-', "\\-"))),
            "the man page lacks {}",
            key.name
        );
    }
    for want in ["EXIT STATUS", "config.d", "greenboot"] {
        assert!(man.contains(want), "the man page lacks {want}");
    }
}

fn deb_installs_and_runs_in_systemd_guest() {
    let pkgs = packages();
    let run = GuestRun::of(
        Command::new("bash")
            .arg(repo().join("tests/vm/systemd/guest.sh"))
            .arg(&pkgs.deb),
    );
    // The console has the unit's journal when a check fails.
    run.assert_passed("systemd guest", GUEST_PASSES);
}
