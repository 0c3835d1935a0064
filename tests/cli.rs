//! The command line without root: configuration errors and `status` without an agent.

use std::process::Command;

use dwng_test_support::harness::{self, test};

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
