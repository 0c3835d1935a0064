//! The command line: configuration errors, `status` without an agent, journal-aware errors,
//! and (root) `exec-as`, the first instruction of systemd services for uids of their own.

use std::process::Command;

use dwng_test_support::harness::{self, test, Need};

const BIN: &str = env!("CARGO_BIN_EXE_device-worker-ng");

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
    assert_eq!(
        out.trim(),
        format!("device-worker-ng {}", env!("CARGO_PKG_VERSION"))
    );
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
    assert!(err.contains("not running"), "{err}");
    let env = [("EDGE_DEVICE_CONTROL_SOCKET", sock.to_str().unwrap())];
    assert_eq!(run(&["status", "--json"], &env).0, 3);
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
