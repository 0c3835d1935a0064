use super::*;
use std::io::Write;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

#[test]
fn defaults_without_any_input() {
    let s = Settings::load(&Inputs::default()).unwrap();
    assert_eq!(s.log_level, LogLevel::Info);
    assert_eq!(s.state_dir, PathBuf::from("/var/lib/device-worker-ng"));
    assert_eq!(s.sample_interval, Duration::from_secs(1));
    assert_eq!(s.reserved_memory, 256 << 20);
    assert_eq!(s.reserved_cpu_millis, 250);
    assert_eq!(s.server, None);
    assert_eq!(s.restart_max_failures, 5);
    assert_eq!(s.sources["LOG_LEVEL"], Source::Default);
}

#[test]
fn precedence_flag_over_env_over_file_over_default() {
    let f =
        file("LOG_LEVEL: debug\nSTATE_DIR: /from/file\nNAMESPACE: filens\nSAMPLE_INTERVAL: 2s\n");
    let inputs = Inputs {
        file: Some(f.path().to_path_buf()),
        env: env(&[
            ("EDGE_DEVICE_STATE_DIR", "/from/env"),
            ("EDGE_DEVICE_NAMESPACE", "envns"),
            ("PATH", "/usr/bin"),
        ]),
        flags: vec!["NAMESPACE=flagns".into()],
    };
    let s = Settings::load(&inputs).unwrap();
    assert_eq!(s.log_level, LogLevel::Debug, "file beats default");
    assert_eq!(s.state_dir, PathBuf::from("/from/env"), "env beats file");
    assert_eq!(s.namespace, "flagns", "flag beats env");
    assert_eq!(s.sample_interval, Duration::from_secs(2));
    assert_eq!(s.sources["NAMESPACE"], Source::Flag);
    assert_eq!(
        s.sources["STATE_DIR"],
        Source::Env("EDGE_DEVICE_STATE_DIR".into())
    );
}

#[test]
fn env_alone_is_enough() {
    let inputs = Inputs {
        file: None,
        env: env(&[
            ("EDGE_DEVICE_DESIRED_STATE", "/etc/dwng/desired.yaml"),
            ("EDGE_DEVICE_SERVER", "https://project-flotta.io:8043/"),
            ("EDGE_DEVICE_DEVICE_ID", "edge-1"),
            ("EDGE_DEVICE_RESERVED_MEMORY", "1Gi"),
        ]),
        flags: vec![],
    };
    let s = Settings::load(&inputs).unwrap();
    assert_eq!(
        s.desired_state,
        Some(PathBuf::from("/etc/dwng/desired.yaml"))
    );
    assert_eq!(s.server.as_deref(), Some("https://project-flotta.io:8043"));
    assert_eq!(s.device_id.as_deref(), Some("edge-1"));
    assert_eq!(s.reserved_memory, 1 << 30);
}

#[test]
fn unknown_key_in_file_names_key_and_file() {
    let f = file("LOG_LEVEL: info\nLOGLEVEL: debug\n");
    let inputs = Inputs {
        file: Some(f.path().to_path_buf()),
        ..Default::default()
    };
    let e = Settings::load(&inputs).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ConfigError::UnknownKey { .. }));
    assert!(msg.contains("LOGLEVEL"), "{msg}");
    assert!(msg.contains(&f.path().display().to_string()), "{msg}");
    assert!(!msg.contains('\n'), "one line: {msg}");
}

#[test]
fn unknown_env_key_is_rejected() {
    let inputs = Inputs {
        env: env(&[("EDGE_DEVICE_SERVR", "https://x")]),
        ..Default::default()
    };
    let msg = Settings::load(&inputs).unwrap_err().to_string();
    assert!(msg.contains("EDGE_DEVICE_SERVR"), "{msg}");
    assert!(msg.contains("environment variable"), "{msg}");
}

#[test]
fn wrong_types_name_key_source_and_expectation() {
    let cases: &[(&str, &str, &str)] = &[
        ("SAMPLE_INTERVAL", "fast", "a duration"),
        ("SAMPLE_INTERVAL", "0s", "a duration"),
        ("RESERVED_MEMORY", "lots", "a memory quantity"),
        ("RESERVED_CPU", "50%", "a cpu quantity"),
        ("LOG_LEVEL", "loud", "one of error"),
        ("STATE_DIR", "relative/dir", "an absolute path"),
        ("SERVER", "http://plain", "an https:// URL"),
        ("DEVICE_ID", "Edge_1", "a lowercase RFC 1123 name"),
        ("RESTART_MAX_FAILURES", "-1", "a whole number"),
    ];
    for (key, value, expected) in cases {
        let inputs = Inputs {
            env: env(&[(&format!("EDGE_DEVICE_{key}"), value)]),
            ..Default::default()
        };
        let e = Settings::load(&inputs).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ConfigError::WrongType { .. }), "{key}: {msg}");
        assert!(msg.contains(key), "{msg}");
        assert!(msg.contains(expected), "{msg}");
        assert!(msg.contains(value), "{msg}");
    }
}

#[test]
fn structured_value_in_file_is_a_wrong_type() {
    let f = file("RESERVED_MEMORY: [1, 2]\n");
    let inputs = Inputs {
        file: Some(f.path().to_path_buf()),
        ..Default::default()
    };
    let msg = Settings::load(&inputs).unwrap_err().to_string();
    assert!(
        msg.contains("RESERVED_MEMORY") && msg.contains("a list"),
        "{msg}"
    );
}

#[test]
fn numbers_and_bools_in_yaml_are_accepted_as_text() {
    let f = file("RESTART_MAX_FAILURES: 3\nSAMPLE_INTERVAL: 2\n");
    let s = Settings::load(&Inputs {
        file: Some(f.path().to_path_buf()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(s.restart_max_failures, 3);
    assert_eq!(s.sample_interval, Duration::from_secs(2));
}

#[test]
fn missing_and_malformed_files() {
    let e = Settings::load(&Inputs {
        file: Some("/nonexistent/dwng.yaml".into()),
        ..Default::default()
    })
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "configuration file /nonexistent/dwng.yaml: no such file or directory"
    );
    let f = file("LOG_LEVEL: [unclosed\n");
    let msg = Settings::load(&Inputs {
        file: Some(f.path().to_path_buf()),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(msg.contains("not valid YAML"), "{msg}");
    let f = file("- just\n- a list\n");
    let msg = Settings::load(&Inputs {
        file: Some(f.path().to_path_buf()),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(msg.contains("expected a mapping"), "{msg}");
}

#[test]
fn bad_flag_syntax() {
    let e = Settings::load(&Inputs {
        flags: vec!["LOG_LEVEL".into()],
        ..Default::default()
    })
    .unwrap_err();
    assert_eq!(e, ConfigError::BadFlag("LOG_LEVEL".into()));
}

#[test]
fn unreadable_paths_are_reported_by_prepare() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Settings::load(&Inputs::default()).unwrap();
    s.state_dir = dir.path().join("state");
    s.control_socket = dir.path().join("run/control.sock");
    s.desired_state = Some(dir.path().join("missing.yaml"));
    let msg = s.prepare_paths().unwrap_err().to_string();
    assert!(
        msg.contains("DESIRED_STATE") && msg.contains("missing.yaml"),
        "{msg}"
    );
    assert!(msg.contains("no such file"), "{msg}");

    s.desired_state = None;
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"x").unwrap();
    s.state_dir = blocker.join("state");
    let msg = s.prepare_paths().unwrap_err().to_string();
    assert!(
        msg.contains("STATE_DIR") && msg.contains("cannot create"),
        "{msg}"
    );

    s.state_dir = dir.path().join("state");
    s.prepare_paths().unwrap();
    assert!(s.state_dir.is_dir());
}

#[test]
fn rfc1123_names() {
    assert!(is_rfc1123_name("4c4c4544004e3810804cb5c04f564433"));
    assert!(is_rfc1123_name("edge-1.site-a"));
    assert!(!is_rfc1123_name("Edge"));
    assert!(!is_rfc1123_name("-edge"));
    assert!(!is_rfc1123_name("edge_1"));
    assert!(!is_rfc1123_name(""));
}

#[test]
fn readme_documents_every_key() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for k in KEYS {
        assert!(
            readme.contains(&format!("| `{}` |", k.name)),
            "README.md's configuration table lacks {}",
            k.name
        );
    }
}

#[test]
fn exponents_and_compound_durations_are_accepted() {
    let inputs = Inputs {
        env: env(&[
            ("EDGE_DEVICE_RESERVED_MEMORY", "129e6"),
            ("EDGE_DEVICE_SERVER_OUTAGE_THRESHOLD", "1m30s"),
        ]),
        ..Default::default()
    };
    let s = Settings::load(&inputs).unwrap();
    assert_eq!(s.reserved_memory, 129_000_000);
    assert_eq!(s.server_outage_threshold, Duration::from_secs(90));
}

#[test]
fn dropins_apply_in_lexical_order_after_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let main = dir.path().join("config.yaml");
    std::fs::write(
        &main,
        "LOG_LEVEL: warn\nNAMESPACE: main\nSTATE_DIR: /from/main\n",
    )
    .unwrap();
    let d = dir.path().join(DROPIN_DIR);
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("20-late.yaml"), "NAMESPACE: late\n").unwrap();
    std::fs::write(
        d.join("10-early.yaml"),
        "NAMESPACE: early\nLOG_LEVEL: debug\n",
    )
    .unwrap();
    // Not drop-ins: another extension, a hidden file.
    std::fs::write(d.join("30-off.yaml.dpkg-old"), "NAMESPACE: old\n").unwrap();
    std::fs::write(d.join(".99-hidden.yaml"), "NAMESPACE: hidden\n").unwrap();
    let inputs = Inputs {
        file: Some(main.clone()),
        env: env(&[("EDGE_DEVICE_STATE_DIR", "/from/env")]),
        ..Default::default()
    };
    let s = Settings::load(&inputs).unwrap();
    assert_eq!(s.namespace, "late");
    assert_eq!(s.log_level, LogLevel::Debug);
    assert_eq!(
        s.state_dir,
        PathBuf::from("/from/env"),
        "env beats drop-ins"
    );
    assert_eq!(
        s.files,
        vec![main, d.join("10-early.yaml"), d.join("20-late.yaml")]
    );
    assert_eq!(s.sources["NAMESPACE"], Source::File(d.join("20-late.yaml")));
}

#[test]
fn a_bad_dropin_is_named_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let main = dir.path().join("config.yaml");
    std::fs::write(&main, "LOG_LEVEL: info\n").unwrap();
    let d = dir.path().join(DROPIN_DIR);
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("10-ok.yaml"), "NAMESPACE: x\n").unwrap();
    std::fs::write(d.join("50-bad.yaml"), "SAMPLE_INTERVAL: often\n").unwrap();
    let inputs = Inputs {
        file: Some(main),
        ..Default::default()
    };
    let msg = Settings::load(&inputs).unwrap_err().to_string();
    assert!(msg.contains("SAMPLE_INTERVAL"), "{msg}");
    assert!(msg.contains("50-bad.yaml"), "{msg}");
    std::fs::write(d.join("50-bad.yaml"), "SAMPLE_INTERVALL: 1s\n").unwrap();
    let msg = Settings::load(&inputs).unwrap_err().to_string();
    assert!(
        msg.contains("SAMPLE_INTERVALL") && msg.contains("50-bad.yaml"),
        "{msg}"
    );
}

#[test]
fn proxy_settings() {
    let ok = |v: &str| {
        Settings::load(&Inputs {
            env: env(&[
                ("EDGE_DEVICE_HTTPS_PROXY", v),
                ("EDGE_DEVICE_NO_PROXY", " Internal.example, .lan ,,"),
            ]),
            ..Default::default()
        })
    };
    let s = ok("http://proxy.example:3128/").unwrap();
    assert_eq!(s.https_proxy.as_deref(), Some("http://proxy.example:3128"));
    assert_eq!(s.no_proxy, vec!["internal.example", ".lan"]);
    assert!(ok("HTTP://user:pw@proxy:8080").is_ok());
    for bad in [
        "proxy:3128",
        "https://proxy:3128",
        "socks5://p:1080",
        "http://",
        "http://p/x",
    ] {
        let e = ok(bad).unwrap_err().to_string();
        assert!(
            e.contains("HTTPS_PROXY") && e.contains("http:// proxy URL"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn default_limits_take_quantities_and_shares_of_the_budget() {
    let load = |v: &str| {
        Settings::load(&Inputs {
            env: env(&[("EDGE_DEVICE_DEFAULT_LIMITS", v)]),
            ..Default::default()
        })
    };
    let d = Settings::load(&Inputs::default()).unwrap().default_limits;
    assert_eq!(d.memory, Some(Share::OfBudget(0.5)));
    assert_eq!(d.cpu, None);
    assert_eq!(d.pids, Some(1024));
    let l = d.resolve(1 << 30, 2000);
    assert_eq!(
        (l.memory_bytes, l.cpu_millicores, l.pids),
        (Some(512 << 20), None, Some(1024))
    );
    let d = load(" pids=64 , cpu=25%, memory=256Mi")
        .unwrap()
        .default_limits;
    assert_eq!(
        d.resolve(1 << 30, 2000),
        crate::cgroup::Limits {
            memory_bytes: Some(256 << 20),
            cpu_millicores: Some(500),
            pids: Some(64)
        }
    );
    assert_eq!(
        load("none").unwrap().default_limits,
        DefaultLimits::default()
    );
    for bad in [
        "",
        "memory",
        "memory=0",
        "memory=150%",
        "memory=lots",
        "cpu=-1",
        "pids=0",
        "pids=10%",
        "gpu=1",
        "memory=1Gi,memory=2Gi",
    ] {
        let e = load(bad).unwrap_err();
        assert!(
            matches!(e, ConfigError::WrongType { .. }) && e.to_string().contains("DEFAULT_LIMITS"),
            "{bad:?}: {e}"
        );
    }
}
