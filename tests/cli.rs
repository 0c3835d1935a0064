//! The command line without root: configuration errors, `status` without an agent, and
//! `logs` over files laid out as the shell driver's log writer leaves them.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

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
        test(
            "logs_tail_spans_the_rotation_and_follow_survives_one",
            &[],
            logs_tail_spans_the_rotation_and_follow_survives_one,
        ),
        test(
            "logs_refuses_names_that_are_no_names",
            &[],
            logs_refuses_names_that_are_no_names,
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
    assert!(err.contains("not running"), "{err}");
    let env = [("EDGE_DEVICE_CONTROL_SOCKET", sock.to_str().unwrap())];
    assert_eq!(run(&["status", "--json"], &env).0, 3);
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

    let mut follow = Command::new(BIN)
        .env_clear()
        .env("EDGE_DEVICE_STATE_DIR", state)
        .args(["logs", "w", "--tail", "1", "--follow"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, seen) = std::sync::mpsc::channel();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let next = || seen.recv_timeout(Duration::from_secs(10)).ok();
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
    let _ = follow.kill();
    let _ = follow.wait();
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
