//! The Flotta protocol layer against a real mTLS test server (PROTOCOL.md).

use std::time::{Duration, SystemTime};

use device_worker_ng::flotta::client::{
    ClientError, ClientOptions, EnrolmentStatus, FlottaClient, TlsMaterial, TlsPaths,
};
use device_worker_ng::flotta::hardware;
use device_worker_ng::flotta::identity::{CertificateInfo, DeviceKey, IdentityStore};
use device_worker_ng::flotta::messages::{
    ControlKind, DateTime, DeviceConfigurationMessage, DeviceStatus, EnrolmentInfo, EventInfo,
    EventType, Heartbeat, Workload, WorkloadState, WorkloadStatus,
};
use dwng_test_support::flotta_server::{self, Fault, FlottaTestServer, ServerOptions};
use dwng_test_support::harness::{self, test};

fn main() {
    harness::main(&[
        test(
            "enrolment_pending_then_approved",
            &[],
            enrolment_pending_then_approved,
        ),
        test(
            "auto_approval_after_n_calls",
            &[],
            auto_approval_after_n_calls,
        ),
        test(
            "registration_signs_a_cert_like_the_real_server",
            &[],
            registration_signs_a_cert_like_the_real_server,
        ),
        test("configurable_validity", &[], configurable_validity),
        test(
            "configuration_control_and_heartbeat_with_device_cert",
            &[],
            configuration_control_and_heartbeat_with_device_cert,
        ),
        test(
            "bootstrap_cert_is_refused_where_the_server_refuses_it",
            &[],
            bootstrap_cert_is_refused_where_the_server_refuses_it,
        ),
        test(
            "expired_cert_gets_401_on_get_but_can_heartbeat_and_renew",
            &[],
            expired_cert_gets_401_on_get_but_can_heartbeat_and_renew,
        ),
        test("cn_mismatch_is_forbidden", &[], cn_mismatch_is_forbidden),
        test(
            "faults_map_to_typed_errors",
            &[],
            faults_map_to_typed_errors,
        ),
        test("huge_body_is_too_large", &[], huge_body_is_too_large),
        test("slow_server_times_out", &[], slow_server_times_out),
        test(
            "connect_timeout_and_refused_connection",
            &[],
            connect_timeout_and_refused_connection,
        ),
        test(
            "trailing_slash_and_double_slash_server",
            &[],
            trailing_slash_and_double_slash_server,
        ),
        test(
            "untrusted_server_is_refused",
            &[],
            untrusted_server_is_refused,
        ),
        test(
            "mismatched_key_is_a_config_error_not_a_panic",
            &[],
            mismatched_key_is_a_config_error_not_a_panic,
        ),
        test("server_validation_rules", &[], server_validation_rules),
        test("client_speaks_tls13_only", &[], client_speaks_tls13_only),
        test(
            "server_requires_a_client_certificate",
            &[],
            server_requires_a_client_certificate,
        ),
    ])
}

const ID: &str = "edge-1";

fn opts() -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(5),
        ..ClientOptions::default()
    }
}

fn bootstrap_client(s: &FlottaTestServer) -> FlottaClient {
    let paths = TlsPaths {
        ca_root: s.ca_path(),
        cert: s.register_cert_path(),
        key: s.register_key_path(),
    };
    FlottaClient::from_paths(&s.url(), &paths, &opts()).expect("bootstrap client")
}

fn client_with(
    s: &FlottaTestServer,
    cert_pem: &str,
    key_pem: &str,
    o: &ClientOptions,
) -> FlottaClient {
    let tls = TlsMaterial {
        ca_root_pem: s.ca_pem().as_bytes().to_vec(),
        cert_pem: cert_pem.as_bytes().to_vec(),
        key_pem: key_pem.as_bytes().to_vec(),
    };
    FlottaClient::new(&s.url(), &tls, o).expect("device client")
}

fn enrolment() -> EnrolmentInfo {
    EnrolmentInfo {
        features: None,
        target_namespace: Some("fleet-a".into()),
    }
}

/// Enrol, approve and register `ID`; returns the device client and its key.
fn registered_device(s: &FlottaTestServer) -> (FlottaClient, String, DeviceKey) {
    let boot = bootstrap_client(s);
    boot.enrol(ID, &enrolment()).unwrap();
    s.approve(ID);
    let key = DeviceKey::generate().unwrap();
    let cert = boot.register(ID, &key.csr_pem(ID).unwrap(), None).unwrap();
    let c = client_with(s, &cert, &key.to_pem(), &opts());
    (c, cert, key)
}

fn heartbeat() -> Heartbeat {
    Heartbeat {
        status: DeviceStatus::Up,
        version: "1".into(),
        workloads: vec![WorkloadStatus {
            name: "nginx".into(),
            status: WorkloadState::Running,
            last_data_upload: DateTime::zero(),
        }],
        events: vec![EventInfo {
            reason: "Started".into(),
            message: "nginx started".into(),
            event_type: EventType::Info,
        }],
        ..Heartbeat::default()
    }
}

fn enrolment_pending_then_approved() {
    let s = FlottaTestServer::start(ServerOptions::default());
    let boot = bootstrap_client(&s);
    let info = EnrolmentInfo {
        target_namespace: Some("fleet-a".into()),
        features: Some(device_worker_ng::flotta::messages::EnrolmentFeatures {
            model_name: String::new(),
            hardware: Some(hardware::gather()),
        }),
    };
    assert_eq!(boot.enrol(ID, &info).unwrap(), EnrolmentStatus::Pending);
    assert_eq!(boot.enrol(ID, &info).unwrap(), EnrolmentStatus::Pending);
    assert!(s.is_enrolled(ID));
    s.approve(ID);
    assert_eq!(boot.enrol(ID, &info).unwrap(), EnrolmentStatus::Approved);

    // The wire carried what PROTOCOL.md §1.3 demands.
    let reqs = s.requests();
    assert_eq!(reqs.len(), 3);
    for r in &reqs {
        assert_eq!(r.path, format!("/api/flotta-management/v1/data/{ID}/out"));
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
        assert_eq!(r.directive.as_deref(), Some("enrolment"));
        assert_eq!(r.client_cn.as_deref(), Some("register"));
    }
}

fn auto_approval_after_n_calls() {
    let s = FlottaTestServer::start(ServerOptions {
        auto_approve_after: Some(2),
        ..ServerOptions::default()
    });
    let boot = bootstrap_client(&s);
    assert_eq!(
        boot.enrol(ID, &enrolment()).unwrap(),
        EnrolmentStatus::Pending
    );
    assert_eq!(
        boot.enrol(ID, &enrolment()).unwrap(),
        EnrolmentStatus::Pending
    );
    assert_eq!(
        boot.enrol(ID, &enrolment()).unwrap(),
        EnrolmentStatus::Approved
    );
}

fn registration_signs_a_cert_like_the_real_server() {
    let s = FlottaTestServer::start(ServerOptions::default());
    let boot = bootstrap_client(&s);
    let key = DeviceKey::generate().unwrap();
    let csr = key.csr_pem(ID).unwrap();

    // Not enrolled / not approved → 404 (§8 item 8).
    assert!(matches!(
        boot.register(ID, &csr, None),
        Err(ClientError::NotFound { .. })
    ));
    boot.enrol(ID, &enrolment()).unwrap();
    assert!(matches!(
        boot.register(ID, &csr, None),
        Err(ClientError::NotFound { .. })
    ));
    s.approve(ID);

    let pem = boot.register(ID, &csr, Some(hardware::gather())).unwrap();
    let info = CertificateInfo::from_pem(pem.as_bytes()).unwrap();
    assert_eq!(info.common_name.as_deref(), Some(ID));
    assert_eq!(info.organization, vec!["flotta-operator"]);
    assert_eq!(
        info.organizational_units,
        vec!["fleet-a"],
        "OU = target namespace"
    );
    assert!(info.matches_key(&key.public_key_der()));
    let now = SystemTime::now();
    let nb = now.duration_since(info.not_before).unwrap().as_secs();
    assert!(
        (86_400 - 60..=86_400 + 60).contains(&nb),
        "NotBefore = now - 1d, got {nb}"
    );
    let life = info.lifetime().as_secs();
    assert!(
        (31 * 86_400 - 60..=31 * 86_400 + 60).contains(&life),
        "{life}"
    );
    assert!(s.is_registered(ID));

    // The bootstrap cert cannot register an already registered device: 500.
    let e = boot.register(ID, &csr, None).unwrap_err();
    assert!(matches!(e, ClientError::Server { status: 500, .. }), "{e}");
    assert!(e.is_retryable());

    // Stored atomically and usable.
    let dir = tempfile::tempdir().unwrap();
    let store = IdentityStore::new(dir.path());
    store.install(&pem, &key).unwrap();
    let c = FlottaClient::from_paths(
        &s.url(),
        &TlsPaths {
            ca_root: s.ca_path(),
            cert: store.cert_path(),
            key: store.key_path(),
        },
        &opts(),
    )
    .unwrap();
    assert!(c.get_configuration(ID).unwrap().is_some());
}

fn configurable_validity() {
    let s = FlottaTestServer::start(ServerOptions {
        cert_validity: Duration::from_secs(3600),
        ..ServerOptions::default()
    });
    let (_, cert, _) = registered_device(&s);
    let info = CertificateInfo::from_pem(cert.as_bytes()).unwrap();
    let life = info.lifetime().as_secs();
    assert!(
        (86_400 + 3600 - 60..=86_400 + 3600 + 60).contains(&life),
        "{life}"
    );
}

fn configuration_control_and_heartbeat_with_device_cert() {
    let s = FlottaTestServer::start(ServerOptions::default());
    let (c, _, _) = registered_device(&s);

    // Default configuration (§4.6 minimal): no workloads.
    let m = c.get_configuration(ID).unwrap().expect("a configuration");
    assert_eq!(m.directive, "device");
    assert_eq!(m.content.device_id, ID);
    assert!(m.content.workloads.is_empty());
    assert_eq!(m.content.version, s.version());

    let cfg = DeviceConfigurationMessage {
        workloads: vec![Workload {
            name: "nginx".into(),
            namespace: "fleet-a".into(),
            specification: "containers:\n- image: nginx\n  name: nginx\n".into(),
            cron: Some("*/5 * * * *".into()),
            ..Workload::default()
        }],
        ..flotta_server::default_configuration()
    };
    s.set_configuration(ID, cfg);
    let m = c.get_configuration(ID).unwrap().unwrap();
    assert_eq!(m.content.workloads[0].name, "nginx");
    assert_eq!(m.content.workloads[0].cron.as_deref(), Some("*/5 * * * *"));
    let v1 = m.content.version.clone();

    assert_eq!(
        c.get_control(ID).unwrap(),
        None,
        "empty 200 = nothing (§8 item 5)"
    );

    c.post_heartbeat(ID, &heartbeat()).unwrap();
    let hbs = s.heartbeats();
    assert_eq!(hbs.len(), 1);
    assert_eq!(hbs[0].0, ID);
    assert_eq!(hbs[0].1, heartbeat());
    // A heartbeat changes the resourceVersion (§8 item 6).
    let v2 = c.get_configuration(ID).unwrap().unwrap().content.version;
    assert_ne!(v1, v2);

    // Disconnect on the control channel.
    s.set_disconnect(ID, true);
    assert_eq!(
        c.get_control(ID).unwrap().unwrap().kind(),
        ControlKind::Disconnect
    );
    s.set_disconnect(ID, false);

    // Deleted device: data/in and heartbeat 404, control/in disconnect.
    s.delete_device(ID);
    assert!(matches!(
        c.get_configuration(ID),
        Err(ClientError::NotFound { .. })
    ));
    assert!(matches!(
        c.post_heartbeat(ID, &heartbeat()),
        Err(ClientError::NotFound { .. })
    ));
    assert_eq!(
        c.get_control(ID).unwrap().unwrap().kind(),
        ControlKind::Disconnect
    );
}

fn bootstrap_cert_is_refused_where_the_server_refuses_it() {
    let s = FlottaTestServer::start(ServerOptions::default());
    let boot = bootstrap_client(&s);
    boot.enrol(ID, &enrolment()).unwrap();
    s.approve(ID);
    // GETs with CN=register → 401; heartbeat → 403 (§3.3 consequences).
    assert!(matches!(
        boot.get_configuration(ID),
        Err(ClientError::Unauthorized { .. })
    ));
    assert!(matches!(
        boot.get_control(ID),
        Err(ClientError::Unauthorized { .. })
    ));
    assert!(matches!(
        boot.post_heartbeat(ID, &heartbeat()),
        Err(ClientError::Forbidden { .. })
    ));
}

fn expired_cert_gets_401_on_get_but_can_heartbeat_and_renew() {
    let s = FlottaTestServer::start(ServerOptions::default());
    let old = s.issue_device_cert(ID, -40, -10);
    let info = CertificateInfo::from_pem(old.cert_pem.as_bytes()).unwrap();
    assert!(info.is_expired_at(SystemTime::now()));
    let c = client_with(&s, &old.cert_pem, &old.key_pem, &opts());

    let e = c.get_configuration(ID).unwrap_err();
    assert!(matches!(e, ClientError::Unauthorized { .. }), "{e}");
    assert!(!e.is_retryable());
    assert!(matches!(
        c.get_control(ID),
        Err(ClientError::Unauthorized { .. })
    ));
    // POST data/out is signature-only (§8 item 1).
    c.post_heartbeat(ID, &heartbeat()).unwrap();

    // Renewal with the expired cert (§3.5).
    let key = DeviceKey::generate().unwrap();
    let pem = c.register(ID, &key.csr_pem(ID).unwrap(), None).unwrap();
    let new = CertificateInfo::from_pem(pem.as_bytes()).unwrap();
    assert!(new.is_valid_at(SystemTime::now()));
    assert_eq!(
        new.organizational_units,
        vec!["default"],
        "OU kept from the cert"
    );
    let renewed = client_with(&s, &pem, &key.to_pem(), &opts());
    assert!(renewed.get_configuration(ID).unwrap().is_some());
}

fn cn_mismatch_is_forbidden() {
    let s = FlottaTestServer::start(ServerOptions::default());
    let other = s.issue_device_cert("edge-2", -1, 30);
    s.approve(ID);
    let c = client_with(&s, &other.cert_pem, &other.key_pem, &opts());
    let e = c.get_configuration(ID).unwrap_err();
    assert!(matches!(e, ClientError::Forbidden { .. }), "{e}");
    assert!(!e.is_retryable());
    assert!(matches!(
        c.get_control(ID),
        Err(ClientError::Forbidden { .. })
    ));
    assert!(matches!(
        c.post_heartbeat(ID, &heartbeat()),
        Err(ClientError::Forbidden { .. })
    ));
    // The CN comparison is case-insensitive (§1.3): past the 403, the
    // upper-case path id then names no EdgeDevice.
    let e = c.get_configuration("EDGE-2").unwrap_err();
    assert!(matches!(e, ClientError::NotFound { .. }), "{e}");
}

fn faults_map_to_typed_errors() {
    let s = FlottaTestServer::start(ServerOptions::default());
    let (c, _, _) = registered_device(&s);

    s.inject_fault(Fault::Status(503), 2);
    for _ in 0..2 {
        let e = c.get_configuration(ID).unwrap_err();
        assert!(matches!(e, ClientError::Server { status: 503, .. }), "{e}");
        assert!(e.is_retryable());
    }
    assert!(
        c.get_configuration(ID).is_ok(),
        "fault expired after N requests"
    );

    s.inject_fault(Fault::Status(401), 1);
    assert!(matches!(
        c.post_heartbeat(ID, &heartbeat()),
        Err(ClientError::Unauthorized { .. })
    ));
    s.inject_fault(Fault::Status(418), 1);
    let e = c.get_control(ID).unwrap_err();
    assert!(
        matches!(e, ClientError::Unexpected { status: 418, .. }),
        "{e}"
    );

    s.inject_fault(Fault::GarbageBody, 1);
    let e = c.get_configuration(ID).unwrap_err();
    match &e {
        ClientError::Malformed { what, endpoint, .. } => {
            assert_eq!(*what, "device configuration message");
            assert_eq!(endpoint.path, format!("data/{ID}/in"));
        }
        other => panic!("{other}"),
    }
    assert!(!e.is_retryable());
    s.inject_fault(Fault::GarbageBody, 1);
    assert!(matches!(
        c.get_control(ID),
        Err(ClientError::Malformed { .. })
    ));

    s.inject_fault(Fault::DropConnection, 1);
    let e = c.get_configuration(ID).unwrap_err();
    assert!(matches!(e, ClientError::Network { .. }), "{e}");
    assert!(e.is_retryable());
    assert!(
        c.get_configuration(ID).is_ok(),
        "recovers on a new connection"
    );
}

fn huge_body_is_too_large() {
    let s = FlottaTestServer::start(ServerOptions::default());
    let (_, cert, key) = registered_device(&s);
    let small = ClientOptions {
        max_body_bytes: 64 * 1024,
        ..opts()
    };
    let c = client_with(&s, &cert, &key.to_pem(), &small);
    s.inject_fault(Fault::HugeBody(200 * 1024), 1);
    let e = c.get_configuration(ID).unwrap_err();
    assert!(
        matches!(e, ClientError::TooLarge { limit: 65536, .. }),
        "{e}"
    );
    // Default cap is 1 MiB.
    let c = client_with(&s, &cert, &key.to_pem(), &opts());
    s.inject_fault(Fault::HugeBody(2 * 1024 * 1024), 1);
    assert!(matches!(
        c.get_configuration(ID),
        Err(ClientError::TooLarge {
            limit: 1_048_576,
            ..
        })
    ));
    assert!(c.get_configuration(ID).is_ok());
}

fn slow_server_times_out() {
    let s = FlottaTestServer::start(ServerOptions::default());
    let (_, cert, key) = registered_device(&s);
    let fast = ClientOptions {
        request_timeout: Duration::from_millis(300),
        ..opts()
    };
    let c = client_with(&s, &cert, &key.to_pem(), &fast);
    s.inject_fault(Fault::Delay(Duration::from_secs(3)), 1);
    let t = std::time::Instant::now();
    let e = c.get_configuration(ID).unwrap_err();
    assert!(matches!(e, ClientError::Timeout { .. }), "{e}");
    assert!(e.is_retryable());
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

fn connect_timeout_and_refused_connection() {
    // Nothing listens on this port once the server is gone.
    let s = FlottaTestServer::start(ServerOptions::default());
    let (_, cert, key) = registered_device(&s);
    let url = s.url();
    let tls = TlsMaterial {
        ca_root_pem: s.ca_pem().as_bytes().to_vec(),
        cert_pem: cert.into_bytes(),
        key_pem: key.to_pem().into_bytes(),
    };
    s.stop();
    let c = FlottaClient::new(&url, &tls, &opts()).unwrap();
    let e = c.get_configuration(ID).unwrap_err();
    assert!(matches!(e, ClientError::Network { .. }), "{e}");
    assert!(e.is_retryable());
}

fn trailing_slash_and_double_slash_server() {
    let s = FlottaTestServer::start(ServerOptions::default());
    let (_, cert, key) = registered_device(&s);
    for server in [
        format!("{}/", s.url()),
        format!("{}//", s.url()),
        format!("{}/api/flotta-management/v1/", s.url()),
    ] {
        let tls = TlsMaterial {
            ca_root_pem: s.ca_pem().as_bytes().to_vec(),
            cert_pem: cert.clone().into_bytes(),
            key_pem: key.to_pem().into_bytes(),
        };
        let c = FlottaClient::new(&server, &tls, &opts()).unwrap();
        assert!(c.get_configuration(ID).unwrap().is_some(), "{server}");
    }
    for r in s.requests() {
        assert!(!r.path.contains("//"), "{}", r.path);
    }
}

fn untrusted_server_is_refused() {
    let s = FlottaTestServer::start(ServerOptions::default());
    let other = FlottaTestServer::start(ServerOptions::default());
    let (_, cert, key) = registered_device(&s);
    // Trust the other server's CA only: the handshake must fail (no system roots either).
    let tls = TlsMaterial {
        ca_root_pem: other.ca_pem().as_bytes().to_vec(),
        cert_pem: cert.into_bytes(),
        key_pem: key.to_pem().into_bytes(),
    };
    let c = FlottaClient::new(&s.url(), &tls, &opts()).unwrap();
    let e = c.get_configuration(ID).unwrap_err();
    assert!(matches!(e, ClientError::Tls { .. }), "{e}");
    assert!(!e.is_retryable());
}

fn mismatched_key_is_a_config_error_not_a_panic() {
    let s = FlottaTestServer::start(ServerOptions::default());
    let issued = s.issue_device_cert(ID, -1, 30);
    let wrong = DeviceKey::generate().unwrap();
    let tls = TlsMaterial {
        ca_root_pem: s.ca_pem().as_bytes().to_vec(),
        cert_pem: issued.cert_pem.into_bytes(),
        key_pem: wrong.to_pem().into_bytes(),
    };
    let e = FlottaClient::new(&s.url(), &tls, &opts()).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Config {
                what: "CERT/KEY",
                ..
            }
        ),
        "{e}"
    );
    // SEC1 `EC PRIVATE KEY` works too (the format of the official agent's files, §3.4).
    let sec1 = sec1_from_pkcs8(&issued.key_pem);
    assert!(sec1.contains("BEGIN EC PRIVATE KEY"));
    let c = client_with(
        &s,
        std::str::from_utf8(&tls.cert_pem).unwrap(),
        &sec1,
        &opts(),
    );
    assert!(c.get_configuration(ID).unwrap().is_some());
}

/// Re-encode a P-256 PKCS#8 key as SEC1: PKCS#8 wraps the SEC1 structure in
/// an OCTET STRING; rcgen/ring emit a fixed layout for P-256.
fn sec1_from_pkcs8(pem: &str) -> String {
    use base64::Engine as _;
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).unwrap();
    let der = der.secret_pkcs8_der();
    // The inner ECPrivateKey is the content of the last OCTET STRING (tag 0x04)
    // at the top level of PrivateKeyInfo: version, algorithm, privateKey.
    let mut i = 2 + if der[1] & 0x80 != 0 {
        (der[1] & 0x7f) as usize
    } else {
        0
    };
    let mut inner = &[][..];
    while i < der.len() {
        let tag = der[i];
        let (len, hdr) = if der[i + 1] & 0x80 == 0 {
            (der[i + 1] as usize, 2)
        } else {
            let n = (der[i + 1] & 0x7f) as usize;
            (
                der[i + 2..i + 2 + n]
                    .iter()
                    .fold(0, |a, b| (a << 8) | *b as usize),
                2 + n,
            )
        };
        if tag == 0x04 {
            inner = &der[i + hdr..i + hdr + len];
            break;
        }
        i += hdr + len;
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(inner);
    let lines: Vec<String> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    format!(
        "-----BEGIN EC PRIVATE KEY-----\n{}\n-----END EC PRIVATE KEY-----\n",
        lines.join("\n")
    )
}

fn server_validation_rules() {
    // The test server's own conformance: exercise it with raw requests through
    // a rustls client, where our client would never send such things.
    let s = FlottaTestServer::start(ServerOptions::default());
    let issued = s.issue_device_cert(ID, -1, 30);
    let raw = raw::Raw::new(&s, &issued.cert_pem, &issued.key_pem);
    let base = "/api/flotta-management/v1";

    let (st, body) = raw.send("GET", "/nope", None, b"");
    assert_eq!(st, 404);
    assert!(
        body.contains("\"code\":404") && body.contains("path /nope was not found"),
        "{body}"
    );
    let (st, body) = raw.send(
        "POST",
        &format!("{base}/data/{ID}/in"),
        Some("application/json"),
        b"{}",
    );
    assert_eq!(st, 405, "{body}");
    let (st, _) = raw.send("POST", &format!("{base}/data/{ID}/out"), None, b"{}");
    assert_eq!(st, 415);
    let (st, body) = raw.send(
        "POST",
        &format!("{base}/data/{ID}/out"),
        Some("application/json"),
        b"",
    );
    assert_eq!(st, 422);
    assert!(body.contains("\"code\":602"), "{body}");
    let (st, _) = raw.send(
        "POST",
        &format!("{base}/data/{ID}/out"),
        Some("application/json"),
        b"{nope",
    );
    assert_eq!(st, 400);
    let (st, _) = raw.send(
        "POST",
        &format!("{base}/data/{ID}/out"),
        Some("application/json"),
        br#"{"version":"1"}"#,
    );
    assert_eq!(st, 400);
    let (st, body) = raw.send(
        "POST",
        &format!("{base}/data/{ID}/out"),
        Some("application/json; charset=utf-8"),
        br#"{"type":"Data"}"#,
    );
    assert_eq!(st, 422, "{body}");
    let (st, _) = raw.send(
        "POST",
        &format!("{base}/data/{ID}/out"),
        Some("application/json"),
        br#"{"directive":"return_url","content":"x"}"#,
    );
    assert_eq!(st, 400);
    let (st, _) = raw.send(
        "POST",
        &format!("{base}/data/{ID}/out"),
        Some("application/json"),
        br#"{"directive":"ansible","content":null}"#,
    );
    assert_eq!(st, 500, "no playbooks = 500 (§2.7)");
    let (st, _) = raw.send(
        "POST",
        &format!("{base}/control/{ID}/out"),
        Some("application/json"),
        br#"{"type":"event","content":"pong"}"#,
    );
    assert_eq!(st, 200);
    // `//` is normalised like path.Clean (§1.2).
    let (st, _) = raw.send("GET", &format!("/{base}//data/{ID}/in"), None, b"");
    assert_eq!(st, 200);
}

mod raw {
    //! A bare rustls + HTTP/1.1 client for requests ureq-based code never makes.
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    use dwng_test_support::flotta_server::FlottaTestServer;

    pub struct Raw {
        addr: String,
        config: Arc<rustls::ClientConfig>,
    }

    impl Raw {
        pub fn new(s: &FlottaTestServer, cert: &str, key: &str) -> Self {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_slice(s.ca_pem().as_bytes()).unwrap())
                .unwrap();
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap();
            Raw {
                addr: s.url().trim_start_matches("https://").to_owned(),
                config: Arc::new(config),
            }
        }

        pub fn send(
            &self,
            method: &str,
            path: &str,
            ct: Option<&str>,
            body: &[u8],
        ) -> (u16, String) {
            let conn = rustls::ClientConnection::new(
                self.config.clone(),
                ServerName::try_from("127.0.0.1").unwrap(),
            )
            .unwrap();
            let sock = TcpStream::connect(&self.addr).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, sock);
            let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
            if let Some(ct) = ct {
                req.push_str(&format!("Content-Type: {ct}\r\n"));
            }
            req.push_str("\r\n");
            tls.write_all(req.as_bytes()).unwrap();
            tls.write_all(body).unwrap();
            let mut out = Vec::new();
            let _ = tls.read_to_end(&mut out);
            let text = String::from_utf8_lossy(&out).into_owned();
            let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
            let body = text
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_owned())
                .unwrap_or_default();
            (status, body)
        }
    }
}

fn client_speaks_tls13_only() {
    // A TLS 1.2-only server with a certificate the client trusts: the
    // handshake must still fail, because the server requires 1.3 (§1.1) and
    // the agent never downgrades.
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = p.self_signed(&key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from(cert.der().to_vec())],
        PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
    )
    .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        let conn = rustls::ServerConnection::new(std::sync::Arc::new(config)).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, sock);
        let err = tls.conn.complete_io(&mut tls.sock).unwrap_err();
        err.to_string()
    });

    let s = FlottaTestServer::start(ServerOptions::default());
    let issued = s.issue_device_cert(ID, -1, 30);
    let tls = TlsMaterial {
        ca_root_pem: cert.pem().into_bytes(),
        cert_pem: issued.cert_pem.into_bytes(),
        key_pem: issued.key_pem.into_bytes(),
    };
    let c = FlottaClient::new(&format!("https://{addr}"), &tls, &opts()).unwrap();
    let e = c.get_configuration(ID).unwrap_err();
    assert!(
        matches!(e, ClientError::Tls { .. } | ClientError::Network { .. }),
        "{e}"
    );
    let server_side = server.join().unwrap();
    // rustls on the server side: the ClientHello did not offer TLS 1.2 at all.
    assert!(server_side.contains("Tls12NotOffered"), "{server_side}");
}

fn server_requires_a_client_certificate() {
    use std::io::Write;
    let s = FlottaTestServer::start(ServerOptions::default());
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(s.ca_pem().as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let conn = rustls::ClientConnection::new(
        std::sync::Arc::new(config),
        rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
    )
    .unwrap();
    let sock = std::net::TcpStream::connect(s.url().trim_start_matches("https://")).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let _ = tls.write_all(b"GET / HTTP/1.1\r\n\r\n");
    let mut buf = Vec::new();
    let r = std::io::Read::read_to_end(&mut tls, &mut buf);
    assert!(
        r.is_err() || buf.is_empty(),
        "no HTTP answer without a client cert"
    );
    std::thread::sleep(Duration::from_millis(100));
    assert!(s.tls_failures() >= 1);
    assert!(s.requests().is_empty());
}
