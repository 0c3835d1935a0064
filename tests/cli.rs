//! The command line: configuration errors, `status` without an agent, `logs` over files laid
//! out as the shell driver's log writer leaves them, journal-aware errors, and (root)
//! `exec-as`, the first instruction of systemd services for uids of their own.

use std::process::Command;
use std::time::Duration;

use dwng_test_support::harness::{self, test, Need};
use dwng_test_support::lines::Lines;

const BIN: &str = env!("CARGO_BIN_EXE_device-worker-ng");
/// The identity test makes its certificates the way operators do.
const OPENSSL: harness::Needs = &[Need::tool("openssl", "openssl")];
/// The systemd driver's workload output is read with journalctl.
const JOURNALCTL: harness::Needs = &[Need::tool("journalctl", "systemd")];

fn main() {
    harness::main(&[
        test("version", &[], version),
        test(
            "configuration_errors_exit_78_with_one_line",
            &[],
            configuration_errors_exit_78_with_one_line,
        ),
        test(
            "status_without_an_agent_says_so",
            &[],
            status_without_an_agent_says_so,
        ),
        test(
            "journal_lines_carry_priorities_and_a_fatal_error_once",
            &[],
            journal_lines_carry_priorities_and_a_fatal_error_once,
        ),
        test(
            "exec_as_becomes_the_uid_and_runs_the_program",
            &[Need::Root],
            exec_as_becomes_the_uid_and_runs_the_program,
        ),
        test(
            "logs_tail_spans_the_rotation_and_follow_survives_one",
            &[],
            logs_tail_spans_the_rotation_and_follow_survives_one,
        ),
        test(
            "logs_of_a_unit_the_journal_never_saw_is_an_error",
            JOURNALCTL,
            logs_of_a_unit_the_journal_never_saw_is_an_error,
        ),
        test(
            "logs_refuses_names_that_are_no_names",
            &[],
            logs_refuses_names_that_are_no_names,
        ),
        test(
            "bootstrap_identity_that_can_never_work_exits_78_with_its_reason",
            OPENSSL,
            bootstrap_identity_that_can_never_work_exits_78_with_its_reason,
        ),
    ])
}

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut c = Command::new(BIN);
    c.env_clear().env("PATH", "/usr/bin:/bin").args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn version() {
    let (code, out, _) = run(&["--version"], &[]);
    assert_eq!(code, 0);
    // Built from a git checkout (as the tests are): the commit is part of the version.
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let want = match head {
        Some(c) => format!(
            "device-worker-ng {} (commit {c})",
            env!("CARGO_PKG_VERSION")
        ),
        None => format!("device-worker-ng {}", env!("CARGO_PKG_VERSION")),
    };
    assert_eq!(out.trim(), want);
    // --help points to documentation the package installs, not to the README.
    let (code, out, _) = run(&["--help"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("man device-worker-ng"), "{out}");
    assert!(!out.contains("README"), "{out}");
}

fn configuration_errors_exit_78_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(&cfg, "LOG_LEVEL: info\nSAMPLE_INTERVAL: often\n").unwrap();
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec!["--config", "/nonexistent.yaml", "run"],
            vec![],
            "/nonexistent.yaml: no such file",
        ),
        (
            vec!["--config", cfg.to_str().unwrap(), "run"],
            vec![],
            "SAMPLE_INTERVAL",
        ),
        (
            vec!["run"],
            vec![("EDGE_DEVICE_BOGUS", "1")],
            "unknown configuration key EDGE_DEVICE_BOGUS",
        ),
        (
            vec!["run", "--set", "LOG_LEVEL=shouty"],
            vec![],
            "LOG_LEVEL from --set flag",
        ),
        (
            vec!["run"],
            vec![("EDGE_DEVICE_DESIRED_STATE", "/nonexistent/desired.yaml")],
            "DESIRED_STATE (/nonexistent/desired.yaml): no such file",
        ),
        (
            vec!["run", "--set", "WORKLOAD_LOG_MAX=4Ki"],
            vec![],
            "WORKLOAD_LOG_MAX: must be at least 128Ki",
        ),
    ];
    for (args, env, expected) in cases {
        let (code, out, err) = run(&args, &env);
        assert_eq!(code, 78, "{args:?} {env:?}: {err}");
        assert!(out.is_empty());
        assert!(err.contains(expected), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(!err.contains("panicked"));
    }
}

fn status_without_an_agent_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    let (code, out, err) = run(&["status", "--socket", sock.to_str().unwrap()], &[]);
    assert_eq!(code, 3);
    assert!(out.is_empty());
    assert_eq!(
        err.trim(),
        format!(
            "device-worker-ng: not running: nothing answers on {} (no such file or directory)",
            sock.display()
        )
    );
    let env = [("EDGE_DEVICE_CONTROL_SOCKET", sock.to_str().unwrap())];
    assert_eq!(run(&["status", "--json"], &env).0, 3);
    // The health check says the same with its exit status, and nothing with --quiet.
    let (code, out, err) = run(&["check"], &env);
    assert_eq!(code, 3, "{out}{err}");
    assert!(err.contains("not running"), "{err}");
    let (code, out, err) = run(&["check", "--quiet"], &env);
    assert_eq!((code, out.as_str(), err.as_str()), (3, "", ""));
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A P-256 key and a CSR for CN=register, in `dir` as NAME.key / NAME.csr.
fn key_and_csr(dir: &std::path::Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            "/CN=register",
        ],
    );
}

/// A CA as NAME.pem / NAME.key.
fn ca(dir: &std::path::Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-subj",
            "/O=flotta-operator",
            "-days",
            "30",
        ],
    );
}

/// Signs NAME.csr with CA into NAME.pem; `v3` adds extensions (plain `x509 -req` makes v1).
fn sign(dir: &std::path::Path, name: &str, ca: &str, v3: bool) {
    let (csr, pem, ca_pem, ca_key) = (
        format!("{name}.csr"),
        format!("{name}.pem"),
        format!("{ca}.pem"),
        format!("{ca}.key"),
    );
    let mut args = vec![
        "x509", "-req", "-in", &csr, "-CA", &ca_pem, "-CAkey", &ca_key, "-out", &pem, "-days", "30",
    ];
    if v3 {
        std::fs::write(dir.join("ext.cnf"), "extendedKeyUsage=clientAuth\n").unwrap();
        args.extend(["-extfile", "ext.cnf"]);
    }
    openssl(dir, &args);
}

fn bootstrap_identity_that_can_never_work_exits_78_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ca(d, "ca");
    ca(d, "other-ca");
    key_and_csr(d, "v1");
    sign(d, "v1", "ca", false);
    key_and_csr(d, "good");
    sign(d, "good", "ca", true);
    key_and_csr(d, "stranger");
    sign(d, "stranger", "other-ca", true);
    std::fs::write(
        d.join("garbage.pem"),
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let p = |f: &str| d.join(f).display().to_string();
    // (CERT, KEY, what the one line must say)
    let cases = [
        ("v1.pem", "v1.key", "is an X.509 v1 certificate"),
        ("garbage.pem", "good.key", "is not a PEM certificate"),
        ("good.pem", "v1.key", "is not the key of"),
        ("stranger.pem", "stranger.key", "is not signed by CA_ROOT"),
    ];
    for (cert, key, reason) in cases {
        let env = [
            ("EDGE_DEVICE_SERVER", "https://127.0.0.1:9".to_string()),
            ("EDGE_DEVICE_CA_ROOT", p("ca.pem")),
            ("EDGE_DEVICE_CERT", p(cert)),
            ("EDGE_DEVICE_KEY", p(key)),
            ("EDGE_DEVICE_DEVICE_ID", "edge-identity".into()),
            ("EDGE_DEVICE_STATE_DIR", p("state")),
            ("EDGE_DEVICE_CONTROL_SOCKET", p("control.sock")),
            (
                "EDGE_DEVICE_CGROUP_ROOT",
                "device-worker-ng-test-identity".into(),
            ),
        ];
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (code, _, err) = run(&["run", "--log-level", "error"], &env);
        assert_eq!(code, 78, "{cert}/{key}: {err}");
        assert!(err.contains(reason), "{cert}/{key}: {err}");
        assert!(err.contains(&p(cert)) || err.contains(&p(key)), "{err}");
        let ours: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with("device-worker-ng:"))
            .collect();
        assert_eq!(ours.len(), 1, "one line: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

fn logs_tail_spans_the_rotation_and_follow_survives_one() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    std::fs::write(logs.join("w.log.1"), "one\ntwo\nthree\n").unwrap();
    std::fs::write(logs.join("w.log"), "four\nfive\n").unwrap();
    let state = dir.path().to_str().unwrap();
    let env = [("EDGE_DEVICE_STATE_DIR", state)];
    assert_eq!(
        run(&["logs", "w"], &env),
        (0, "one\ntwo\nthree\nfour\nfive\n".into(), String::new())
    );
    assert_eq!(
        run(&["logs", "w", "--tail", "3"], &env).1,
        "three\nfour\nfive\n"
    );
    assert_eq!(run(&["logs", "w", "--tail", "1"], &env).1, "five\n");

    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("EDGE_DEVICE_STATE_DIR", state)
        .args(["logs", "w", "--tail", "1", "--follow"]);
    let follow = Lines::spawn(cmd);
    let next = || follow.next(Duration::from_secs(10));
    assert_eq!(next().as_deref(), Some("five"));
    let append = |text: &str| {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(logs.join("w.log"))
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    };
    append("six\n");
    assert_eq!(next().as_deref(), Some("six"));
    // Rotated as the log writer does it: what came before the rotation and after both show.
    append("seven\n");
    std::fs::rename(logs.join("w.log"), logs.join("w.log.1")).unwrap();
    append("eight\n");
    assert_eq!(next().as_deref(), Some("seven"));
    assert_eq!(next().as_deref(), Some("eight"));
}

fn logs_refuses_names_that_are_no_names() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret.log"), "not yours\n").unwrap();
    let env = [("EDGE_DEVICE_STATE_DIR", dir.path().to_str().unwrap())];
    for name in ["../secret", "/etc/passwd", "Upper", ""] {
        let (code, out, err) = run(&["logs", name], &env);
        assert_eq!(code, 1, "{name}: {err}");
        assert!(out.is_empty(), "{name}: {out}");
        assert!(err.contains("is not a workload name"), "{name}: {err}");
    }
    let (code, _, err) = run(&["logs", "absent"], &env);
    assert_eq!(code, 1);
    assert!(
        err.contains("no output recorded for workload absent"),
        "{err}"
    );
}

/// Runs `device-worker-ng run` with stderr going to a file that JOURNAL_STREAM names, the way
/// systemd connects a service's stderr to journald; returns the exit code and that stderr.
fn run_as_journal_stream(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal-stream");
    let file = std::fs::File::create(&path).unwrap();
    let meta = file.metadata().unwrap();
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(file);
    for (k, v) in env {
        c.env(k, v);
    }
    let status = c.status().unwrap();
    (
        status.code().unwrap_or(-1),
        std::fs::read_to_string(&path).unwrap(),
    )
}

fn journal_lines_carry_priorities_and_a_fatal_error_once() {
    // A configuration error: before logging is set up, one line at error priority.
    let (code, err) = run_as_journal_stream(&["run", "--set", "LOG_LEVEL=shouty"], &[]);
    assert_eq!(code, 78, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("<3>device-worker-ng: ") && err.contains("LOG_LEVEL"),
        "{err}"
    );

    // An error after logging is set up (another agent answers on the control socket; as
    // non-root, the cgroups already fail): every line has a priority and no timestamp of its
    // own, and the error that ends the agent appears once.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("control.sock");
    let _other_agent = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let root = format!("dwng-test-journal-{}", std::process::id());
    let env = [
        ("EDGE_DEVICE_STATE_DIR", dir.path().join("state")),
        ("EDGE_DEVICE_CONTROL_SOCKET", sock.clone()),
    ];
    let env: Vec<(&str, &str)> = env
        .iter()
        .map(|(k, v)| (*k, v.to_str().unwrap()))
        .chain([
            ("EDGE_DEVICE_CGROUP_ROOT", root.as_str()),
            ("EDGE_DEVICE_LOG_LEVEL", "debug"),
        ])
        .collect();
    let (code, err) = run_as_journal_stream(&["run"], &env);
    if let Ok(layout) = device_worker_ng::cgroup::detect() {
        let _ = device_worker_ng::cgroup::Hierarchy::new(layout, &root, None).remove_all();
    }
    assert_eq!(code, 1, "{err}");
    for line in err.lines() {
        let prio = line.get(..3).unwrap_or("");
        assert!(
            ["<3>", "<4>", "<6>", "<7>"].contains(&prio),
            "a priority prefix on every line: {line:?}"
        );
        // fmt's own timestamps start the line with the year (2026-11-30T11:28:04.1Z)
        assert!(
            !line[3..].starts_with(|c: char| c.is_ascii_digit()),
            "no timestamp: {line:?}"
        );
        assert!(
            !line.contains("INFO") && !line.contains("ERROR"),
            "{line:?}"
        );
    }
    let fatal: Vec<&str> = err.lines().filter(|l| l.starts_with("<3>")).collect();
    assert_eq!(fatal.len(), 1, "the fatal error once: {err}");
}

/// `exec-as UID -- PROGRAM...` (the systemd driver's services for a workload with a uid of
/// its own): the program runs as that uid, gid the same, no other groups; root is refused.
fn exec_as_becomes_the_uid_and_runs_the_program() {
    let (code, out, err) = run(
        &[
            "exec-as",
            "524301",
            "--",
            "/bin/sh",
            "-c",
            "id -u; id -g; id -G",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "524301\n524301\n524301\n");
    let (code, _, err) = run(&["exec-as", "0", "--", "/bin/true"], &[]);
    assert_eq!(code, 126);
    assert!(err.contains("refusing uid 0"), "{err}");
    let (code, _, err) = run(&["exec-as", "524301", "--", "/nonexistent/program"], &[]);
    assert_eq!(code, 126);
    assert!(err.contains("cannot execute /nonexistent/program"), "{err}");
}

/// Under the systemd driver a shell workload's output is its service's journal; journalctl
/// finds nothing for a unit it never saw and exits 0, which `logs` must not pass on as an
/// empty success (a mistyped name would look like a silent workload).
fn logs_of_a_unit_the_journal_never_saw_is_an_error() {
    use device_worker_ng::logs::{show, Request, Source};
    let t = tempfile::tempdir().unwrap();
    let e = show(
        &Source::Journal {
            slice: "dwng-test-nothing.slice".into(),
            state_dir: t.path().to_path_buf(),
        },
        &Request {
            name: device_worker_ng::workload::WorkloadName::parse("never-ran").unwrap(),
            tail: Some(5),
            follow: false,
        },
        &mut Vec::new(),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("no output recorded for workload never-ran (looked for the journal of"),
        "{e}"
    );
}
