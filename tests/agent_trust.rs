//! Hostile and careless input (issue 10): one test per finding of the probe, each against the
//! real agent on this host's cgroups. Untrusted text (a workload name from the file or the
//! server, a record in STATE_DIR, the desired-state file itself) must never reach a path, a
//! kill or a stall; workloads must be kept apart; output and STATE_DIR must stay bounded.
//! Root only.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use device_worker_ng::cgroup::Layout;
use device_worker_ng::flotta::messages::DeviceConfigurationMessage;
use device_worker_ng::status::Snapshot;
use dwng_test_support::agent::Agent;
use dwng_test_support::flotta_server::{FlottaTestServer, ServerOptions};
use dwng_test_support::harness::{self, test, Need, Needs, ROOT_CGROUPS};
use dwng_test_support::lines::Lines;
use dwng_test_support::wait::{poll_until, wait_until};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_device-worker-ng");
const POLL: Duration = Duration::from_millis(50);
/// Long enough for the agent to act on something (a debounced file event, a removal).
const SETTLE: Duration = Duration::from_millis(1500);

/// Disk full needs a small tmpfs of its own (mount, from util-linux).
const TMPFS: Needs = &[
    Need::Root,
    Need::Cgroups,
    Need::tool("mount", "mount"),
    Need::tool("umount", "mount"),
];

fn main() {
    harness::main(&[
        test(
            "traversal_name_from_the_file_touches_nothing_outside",
            ROOT_CGROUPS,
            traversal_name_from_the_file_touches_nothing_outside,
        ),
        test(
            "traversal_name_from_the_server_touches_nothing_outside",
            ROOT_CGROUPS,
            traversal_name_from_the_server_touches_nothing_outside,
        ),
        test(
            "records_claiming_another_cgroup_or_name_are_ignored",
            ROOT_CGROUPS,
            records_claiming_another_cgroup_or_name_are_ignored,
        ),
        test(
            "a_duplicate_name_leaves_the_first_running",
            ROOT_CGROUPS,
            a_duplicate_name_leaves_the_first_running,
        ),
        test(
            "workloads_past_max_workloads_are_refused_unread",
            ROOT_CGROUPS,
            workloads_past_max_workloads_are_refused_unread,
        ),
        test(
            "deeply_nested_yaml_is_refused_without_a_stall",
            ROOT_CGROUPS,
            deeply_nested_yaml_is_refused_without_a_stall,
        ),
        test(
            "a_truncated_or_recreated_file_restarts_nothing",
            ROOT_CGROUPS,
            a_truncated_or_recreated_file_restarts_nothing,
        ),
        test(
            "a_fifo_or_a_device_as_desired_state_blocks_nothing",
            ROOT_CGROUPS,
            a_fifo_or_a_device_as_desired_state_blocks_nothing,
        ),
        test(
            "boot_without_a_valid_desired_state_keeps_what_runs",
            ROOT_CGROUPS,
            boot_without_a_valid_desired_state_keeps_what_runs,
        ),
        test(
            "disk_full_degrades_and_records_are_written_once_it_clears",
            TMPFS,
            disk_full_degrades_and_records_are_written_once_it_clears,
        ),
        test(
            "output_is_capped_without_the_agent_in_its_path",
            ROOT_CGROUPS,
            output_is_capped_without_the_agent_in_its_path,
        ),
        test(
            "workloads_cannot_read_or_signal_each_other",
            ROOT_CGROUPS,
            workloads_cannot_read_or_signal_each_other,
        ),
        test("state_dir_is_private", ROOT_CGROUPS, state_dir_is_private),
        test(
            "corrupt_outbox_and_desired_state_are_kept_aside_and_logged",
            ROOT_CGROUPS,
            corrupt_outbox_and_desired_state_are_kept_aside_and_logged,
        ),
    ])
}

// ---- helpers --------------------------------------------------------------------------------

/// A shell workload of the desired-state file (`extra`: more lines of its specification).
fn shell(name: &str, command: &str, extra: &str) -> String {
    format!(
        "  - name: {name:?}\n    kind: shell\n    specification: |\n      command: [\"/bin/sh\", \"-c\", {command:?}]\n{extra}"
    )
}

fn desired(workloads: &[String]) -> String {
    format!("workloads:\n{}", workloads.join(""))
}

fn running_pid(s: &Snapshot, name: &str) -> Option<i32> {
    Agent::workload(s, name)
        .filter(|w| w.state == "running")
        .and_then(|w| w.pid)
}

fn wait_running(a: &Agent, names: &[&str]) -> Snapshot {
    a.wait_for(
        &format!("{names:?} running"),
        Duration::from_secs(15),
        |s| names.iter().all(|n| running_pid(s, n).is_some()),
    )
}

fn alive(pid: i32) -> bool {
    device_worker_ng::drivers::process::start_ticks(pid).is_some()
}

/// Something outside everything the agent owns: a process in a cgroup of its own at the top
/// of every hierarchy (where `../../<name>` under `<CGROUP_ROOT>/workloads` leads), and files
/// beside STATE_DIR (where `../../<name>.json` and `.log` under its subfolders lead).
struct Victim {
    name: String,
    dirs: Vec<PathBuf>,
    files: Vec<(PathBuf, &'static str)>,
    process: Child,
}

impl Victim {
    fn new(a: &Agent) -> Victim {
        let name = format!("{}-victim", a.cgroup_root);
        let mut dirs: Vec<PathBuf> = match device_worker_ng::cgroup::detect().unwrap() {
            Layout::Unified { root } => vec![root.join(&name)],
            Layout::Legacy(m) | Layout::Hybrid(m) => [m.memory, m.cpu, m.cpuacct, m.pids]
                .iter()
                .map(|c| c.join(&name))
                .collect(),
        };
        dirs.sort();
        dirs.dedup();
        let process = Command::new("/bin/sleep").arg("600").spawn().unwrap();
        let v = Victim {
            files: ["json", "log"]
                .iter()
                .map(|ext| {
                    (
                        a.dir.path().join(format!("{name}.{ext}")),
                        "not the agent's",
                    )
                })
                .collect(),
            name,
            dirs,
            process,
        };
        for d in &v.dirs {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("cgroup.procs"), v.process.id().to_string()).unwrap();
        }
        for (f, text) in &v.files {
            std::fs::write(f, text).unwrap();
        }
        v.untouched().unwrap();
        v
    }

    /// The workload name that points at it.
    fn traversal(&self) -> String {
        format!("../../{}", self.name)
    }

    fn pid(&self) -> i32 {
        self.process.id() as i32
    }

    /// Its process lives in its cgroup, which exists, and its files are unchanged; if not,
    /// everything that happened to it.
    fn untouched(&self) -> Result<(), String> {
        let pid = self.pid();
        let mut harm = Vec::new();
        if !alive(pid) {
            harm.push(format!("victim process {pid} was killed"));
        }
        for d in &self.dirs {
            match std::fs::read_to_string(d.join("cgroup.procs")) {
                Err(e) => harm.push(format!("victim cgroup {}: {e}", d.display())),
                Ok(procs) if !procs.lines().any(|l| l.trim() == pid.to_string()) => {
                    harm.push(format!("victim {pid} no longer in {}", d.display()))
                }
                Ok(_) => {}
            }
        }
        for (f, text) in &self.files {
            match std::fs::read_to_string(f) {
                Ok(t) if t == *text => {}
                other => harm.push(format!("victim file {}: {other:?}", f.display())),
            }
        }
        if harm.is_empty() {
            Ok(())
        } else {
            Err(harm.join("; "))
        }
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        for d in &self.dirs {
            let _ = poll_until(Duration::from_secs(2), POLL, || {
                std::fs::remove_dir(d).ok().or((!d.exists()).then_some(()))
            });
        }
        for (f, _) in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

// ---- 1. names that are paths -----------------------------------------------------------------

fn traversal_name_from_the_file_touches_nothing_outside() {
    let mut a = Agent::new(BIN, "workloads: []\n");
    let victim = Victim::new(&a);
    let good = shell("good", "exec sleep 600", "");
    let evil = shell(&victim.traversal(), "exec sleep 600", "");
    a.set_desired(&desired(&[good.clone(), evil]));
    a.start();
    let s = a.wait_for(
        "good running, the traversal refused",
        Duration::from_secs(15),
        |s| running_pid(s, "good").is_some() && Agent::workload(s, &victim.traversal()).is_some(),
    );
    let good_pid = running_pid(&s, "good");
    victim
        .untouched()
        .unwrap_or_else(|e| panic!("{e}\n{}", a.log()));

    // Leaving the desired state is when the probe saw the victim killed and deleted.
    a.set_desired(&desired(&[good]));
    a.wait_for("the traversal gone", Duration::from_secs(10), |s| {
        Agent::workload(s, &victim.traversal()).is_none()
    });
    std::thread::sleep(SETTLE);
    victim
        .untouched()
        .unwrap_or_else(|e| panic!("{e}\n{}", a.log()));
    assert_eq!(running_pid(&a.status(), "good"), good_pid);

    // It was shown as refused, and owned nothing meanwhile.
    let refused = s
        .workloads
        .iter()
        .find(|w| w.name == victim.traversal())
        .unwrap();
    assert_eq!(refused.state, "failed");
    assert!(
        refused.reason.contains("not a workload name"),
        "{refused:?}"
    );
    assert!(refused.pid.is_none() && refused.cgroup.is_none() && refused.log.is_none());
}

fn server_config(workloads: &[(&str, &str)]) -> DeviceConfigurationMessage {
    let w: Vec<_> = workloads
        .iter()
        .map(|(name, cmd)| {
            json!({"name": name, "namespace": "default", "kind": "shell",
                   "specification": format!("command: [\"/bin/sh\", \"-c\", {cmd:?}]\n")})
        })
        .collect();
    serde_json::from_value(json!({
        "configuration": {"heartbeat": {"hardware_profile": {}, "period_seconds": 1},
                          "metrics": {"receiver": {"request_num_samples": 30000, "timeout_seconds": 10}}, "mounts": []},
        "workloads": w
    }))
    .unwrap()
}

fn traversal_name_from_the_server_touches_nothing_outside() {
    let server = FlottaTestServer::start(ServerOptions {
        auto_approve_after: Some(1),
        ..ServerOptions::default()
    });
    let mut a = Agent::new(BIN, "workloads: []\n");
    a.extra_env.extend(server.agent_env("edge-trust"));
    a.extra_env
        .push(("EDGE_DEVICE_POLL_INTERVAL".into(), "200ms".into()));
    let victim = Victim::new(&a);
    let evil = victim.traversal();
    server.set_configuration(
        "edge-trust",
        server_config(&[("web", "exec sleep 600"), (&evil, "exec sleep 600")]),
    );
    a.start();
    let s = a.wait_for(
        "web running, the traversal refused",
        Duration::from_secs(30),
        |s| running_pid(s, "web").is_some() && s.workloads.iter().any(|w| w.name == evil),
    );
    let web = running_pid(&s, "web");
    server.set_configuration("edge-trust", server_config(&[("web", "exec sleep 600")]));
    a.wait_for("the traversal gone", Duration::from_secs(15), |s| {
        s.workloads.iter().all(|w| w.name != evil)
    });
    std::thread::sleep(SETTLE);
    victim
        .untouched()
        .unwrap_or_else(|e| panic!("{e}\n{}", a.log()));
    assert_eq!(running_pid(&a.status(), "web"), web);
    // The server heard of the refusal (a heartbeat event names it).
    assert!(
        server.heartbeats().iter().any(|(_, hb)| {
            serde_json::to_string(hb).is_ok_and(|t| t.contains("not a workload name"))
        }),
        "no heartbeat event about the refusal"
    );
}

// ---- 2. records in STATE_DIR -----------------------------------------------------------------

/// A record as an earlier agent wrote it, claiming `dirs` as the workload's cgroup.
fn record(name: &str, pid: i32, dirs: &[PathBuf]) -> String {
    let ticks = device_worker_ng::drivers::process::start_ticks(pid).unwrap();
    let cgroup = match device_worker_ng::cgroup::detect().unwrap() {
        Layout::Unified { .. } => json!({"version": "v2", "dir": dirs[0]}),
        Layout::Legacy(m) | Layout::Hybrid(m) => {
            let at = |c: &Path| {
                dirs.iter()
                    .find(|d| d.starts_with(c))
                    .cloned()
                    .unwrap_or_default()
            };
            json!({"version": "v1", "memory": at(&m.memory), "cpu": at(&m.cpu),
                   "cpuacct": at(&m.cpuacct), "pids": at(&m.pids)})
        }
    };
    json!({"name": name, "kind": "shell", "fingerprint": "f", "cgroup": cgroup, "pid": pid,
           "pid_start_ticks": ticks, "started_at_unix": 1, "restarts": 0, "oom_kills_at_start": 0})
    .to_string()
}

fn records_claiming_another_cgroup_or_name_are_ignored() {
    let mut a = Agent::new(BIN, "workloads: []\n");
    let victim = Victim::new(&a);
    let records = a.state_dir().join("workloads");
    std::fs::create_dir_all(&records).unwrap();
    // A record of a valid name whose cgroup is the victim's, with the victim's live pid.
    std::fs::write(
        records.join("claims.json"),
        record("claims", victim.pid(), &victim.dirs),
    )
    .unwrap();
    // A record that names, inside, a workload that is a path.
    std::fs::write(
        records.join("named.json"),
        record(&victim.traversal(), victim.pid(), &victim.dirs),
    )
    .unwrap();
    a.start();
    a.wait_for("desired state applied", Duration::from_secs(10), |s| {
        s.device.state == "reconciling"
    });
    std::thread::sleep(SETTLE);
    victim
        .untouched()
        .unwrap_or_else(|e| panic!("{e}\n{}", a.log()));
    let log = a.log();
    for (file, why) in [
        ("claims.json", "which is not the workload's own"),
        ("named.json", "not a workload name"),
    ] {
        assert!(
            log.lines().any(|l| l.contains("ignoring a workload record")
                && l.contains(file)
                && l.contains(why)),
            "{file}: {why}\n{log}"
        );
    }
    assert!(a.status().workloads.is_empty());
}

// ---- 3. duplicates ---------------------------------------------------------------------------

fn a_duplicate_name_leaves_the_first_running() {
    let first = shell("dup", "exec sleep 600", "");
    let mut a = Agent::new(BIN, &desired(std::slice::from_ref(&first)));
    a.start();
    let pid = running_pid(&wait_running(&a, &["dup"]), "dup").unwrap();
    let second = shell("dup", "exec sleep 700", "");
    a.set_desired(&desired(&[first, second]));
    let s = a.wait_for("the duplicate seen", Duration::from_secs(10), |s| {
        !s.device.problems.is_empty()
    });
    std::thread::sleep(SETTLE);
    let s2 = a.status();
    let w = Agent::workload(&s2, "dup").unwrap();
    assert_eq!(
        (w.state.as_str(), w.pid, w.restarts),
        ("running", Some(pid), 0),
        "the first one untouched: {}",
        s2.render()
    );
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(cmdline.ends_with(b"600\0"), "the first one runs");
    let refused = s
        .workloads
        .iter()
        .filter(|w| w.name == "dup")
        .nth(1)
        .unwrap();
    assert!(
        refused.state == "failed" && refused.reason.contains("duplicate"),
        "{refused:?}"
    );
    assert!(
        s.device.problems.iter().any(|p| p.contains("refused")),
        "{:?}",
        s.device.problems
    );
}

// ---- 4. many workloads -----------------------------------------------------------------------

fn workloads_past_max_workloads_are_refused_unread() {
    // Requests no device has: they all wait for admission, nothing starts.
    let many: Vec<String> = (0..400)
        .map(|i| {
            shell(
                &format!("w{i}"),
                "exec sleep 600",
                "      resources:\n        requests: {memory: 1000Ti}\n",
            )
        })
        .collect();
    let mut a = Agent::new(BIN, &desired(&many));
    a.start();
    let s = a.wait_for("the desired state taken in", Duration::from_secs(30), |s| {
        s.workloads.len() >= 256
    });
    assert_eq!(s.workloads.len(), 256, "MAX_WORKLOADS (256) taken, no more");
    let problem = s
        .device
        .problems
        .iter()
        .find(|p| p.contains("MAX_WORKLOADS"))
        .unwrap_or_else(|| panic!("{:?}", s.device.problems));
    assert!(
        problem.contains("144 workload(s)") && problem.contains("w256"),
        "{problem}"
    );
    assert!(s.workloads.iter().all(|w| w.state == "pending"));
    // The controller reports its longest handler (bench/scale.sh measures it).
    assert!(
        s.agent.longest_handler_ms > 0.0 && !s.agent.longest_handler_event.is_empty(),
        "{:?}",
        s.agent
    );
}

// ---- 5. deep nesting -------------------------------------------------------------------------

fn deeply_nested_yaml_is_refused_without_a_stall() {
    let keep = shell("keep", "exec sleep 600", "");
    let mut a = Agent::new(BIN, &desired(&[keep]));
    a.start();
    let pid = running_pid(&wait_running(&a, &["keep"]), "keep");
    // Four million levels, just under the 4 MiB cap: a parser that is quadratic in the depth
    // (the probe's: 5-10 s for 50 000 levels) would not finish today.
    let mut deep = String::from("workloads: ");
    deep.push_str(&"[".repeat(4_000_000));
    a.set_desired(&deep);
    let s = a.wait_for("the nesting refused", Duration::from_secs(20), |s| {
        s.device
            .problems
            .iter()
            .any(|p| p.contains("desired state") && p.contains("deep"))
    });
    assert_eq!(
        running_pid(&s, "keep"),
        pid,
        "the last good state keeps running"
    );
}

// ---- 6. truncate-then-write, delete-then-recreate --------------------------------------------

fn a_truncated_or_recreated_file_restarts_nothing() {
    let text = desired(&[shell("keep", "exec sleep 600", "")]);
    let mut a = Agent::new(BIN, &text);
    a.start();
    let pid = running_pid(&wait_running(&a, &["keep"]), "keep");
    let path = a.desired_path();
    let no_problem = |s: &Snapshot| s.device.problems.is_empty();

    // Each change is made, then left alone for longer than the quiet time; the agent reads
    // it and must keep the last good state (the probe saw every workload restarted).
    let settled = |what: &str, problem: &'static str| {
        std::thread::sleep(SETTLE);
        let s = a.wait_for(what, Duration::from_secs(10), |_| true);
        let w = Agent::workload(&s, "keep").map(|w| (w.pid, w.restarts));
        assert_eq!(
            w,
            Some((pid, 0)),
            "{what}: stopped or restarted:\n{}",
            s.render()
        );
        if !problem.is_empty() {
            assert!(
                s.device.problems.iter().any(|p| p.contains(problem)),
                "{what}: {:?}",
                s.device.problems
            );
        }
    };
    // An editor that truncates, pauses, then writes.
    std::fs::File::create(&path).unwrap();
    settled("truncated", "empty");
    std::fs::write(&path, &text).unwrap();
    a.wait_for("rewritten file read", Duration::from_secs(10), no_problem);

    // One that deletes and recreates.
    std::fs::remove_file(&path).unwrap();
    settled("deleted", "no such file");
    std::fs::write(&path, &text).unwrap();
    a.wait_for("recreated file read", Duration::from_secs(10), no_problem);

    // Something else than a desired state (a stray `{}`, a comment, half-written YAML).
    std::fs::write(&path, "{}\n").unwrap();
    settled("no workloads key", "workloads");
    std::fs::write(&path, "# to be written\n").unwrap();
    settled("a comment", "");
    std::fs::write(&path, &text).unwrap();
    a.wait_for("good again", Duration::from_secs(10), no_problem);
    settled("good again", "");
}

// ---- 7. a FIFO or a device as the desired state ------------------------------------------------

fn a_fifo_or_a_device_as_desired_state_blocks_nothing() {
    let keep = shell("keep", "exec sleep 600", "");
    let extra = shell("extra", "exec sleep 600", "");
    let mut a = Agent::new(BIN, &desired(std::slice::from_ref(&keep)));
    a.start();
    let pid = running_pid(&wait_running(&a, &["keep"]), "keep");
    let path = a.desired_path();
    let not_regular = |s: &Snapshot| {
        s.device
            .problems
            .iter()
            .any(|p| p.contains("not a regular file"))
    };

    std::fs::remove_file(&path).unwrap();
    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // Status answers (the controller is not stuck in open(2)) and says why.
    std::thread::sleep(SETTLE);
    a.wait_for(
        "status while a FIFO is the desired state",
        Duration::from_secs(5),
        |_| true,
    );
    a.wait_for("FIFO refused", Duration::from_secs(10), not_regular);
    // Replaced by a regular file: read at once (the probe saw the agent stay blocked).
    a.set_desired(&desired(&[keep.clone(), extra]));
    wait_running(&a, &["keep", "extra"]);

    let link = a.dir.path().join(".zero");
    std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
    std::fs::rename(&link, &path).unwrap();
    std::thread::sleep(SETTLE);
    a.wait_for(
        "status while /dev/zero is the desired state",
        Duration::from_secs(5),
        |_| true,
    );
    a.wait_for("/dev/zero refused", Duration::from_secs(10), not_regular);
    a.set_desired(&desired(&[keep]));
    let s = a.wait_for("extra removed", Duration::from_secs(10), |s| {
        Agent::workload(s, "extra").is_none() && !not_regular(s)
    });
    assert_eq!(running_pid(&s, "keep"), pid);
}

// ---- 8. boot with nothing valid ----------------------------------------------------------------

fn boot_without_a_valid_desired_state_keeps_what_runs() {
    let text = desired(&[
        shell("one", "exec sleep 600", ""),
        shell("two", "exec sleep 600", ""),
    ]);
    let mut a = Agent::new(BIN, &text);
    a.start();
    let s = wait_running(&a, &["one", "two"]);
    let pids = (running_pid(&s, "one"), running_pid(&s, "two"));
    a.kill9();
    // Nothing valid anywhere: the file is malformed and the last accepted state is corrupt.
    a.set_desired("workloads: [unclosed\n");
    let saved = a.state_dir().join("desired.json");
    std::fs::write(&saved, "{torn").unwrap();
    a.start();
    std::thread::sleep(SETTLE);
    let s = a.status();
    let adopted = |s: &Snapshot| (running_pid(s, "one"), running_pid(s, "two"));
    assert_eq!(adopted(&s), pids, "adopted, not stopped: {}", s.render());
    assert!(pids.0.is_some_and(alive) && pids.1.is_some_and(alive));
    a.wait_for("the problem shown", Duration::from_secs(10), |s| {
        s.device
            .problems
            .iter()
            .any(|p| p.contains("no valid desired state anywhere"))
    });
    // The corrupt file is kept aside and the log says where (finding 13).
    let aside = a.state_dir().join("desired.json.corrupt");
    assert_eq!(std::fs::read_to_string(&aside).unwrap(), "{torn");
    assert!(
        a.log().contains(&aside.display().to_string()),
        "{}",
        a.log()
    );

    // A valid desired state says what they are: nothing restarts.
    a.set_desired(&text);
    let s = a.wait_for("applied", Duration::from_secs(10), |s| {
        s.device.problems.is_empty()
    });
    assert_eq!(adopted(&s), pids);
    assert!(s.workloads.iter().all(|w| w.restarts == 0));
}

// ---- 9. disk full ------------------------------------------------------------------------------

/// A small tmpfs, unmounted (lazily: the agent's writers may still hold files) on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs at {}", at.display());
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system of `dir` with one file; returns it.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = [0u8; 4096];
    while f.write_all(&block).is_ok() {}
    let _ = f.sync_all();
    path
}

fn disk_full_degrades_and_records_are_written_once_it_clears() {
    let keep = shell("keep", "exec sleep 600", "");
    let mut a = Agent::new(BIN, &desired(std::slice::from_ref(&keep)));
    let _tmpfs = Tmpfs::mount(&a.state_dir(), "512k");
    a.start();
    wait_running(&a, &["keep"]);
    let filler = fill(&a.state_dir());
    a.set_desired(&desired(&[
        keep.clone(),
        shell("late", "exec sleep 600", ""),
    ]));
    let s = a.wait_for("the storage problem", Duration::from_secs(10), |s| {
        s.device.problems.iter().any(|p| p.contains("STATE_DIR"))
    });
    assert_eq!(s.device.state, "degraded");
    let problem = s
        .device
        .problems
        .iter()
        .find(|p| p.contains("STATE_DIR"))
        .unwrap();
    assert!(problem.contains("No space left"), "{problem}");
    let late = running_pid(
        &a.wait_for("late runs anyway", Duration::from_secs(10), |s| {
            running_pid(s, "late").is_some()
        }),
        "late",
    );
    let record = a.state_dir().join("workloads/late.json");
    assert!(!record.exists());

    // Room again: the problem clears and what failed is written after all.
    std::fs::remove_file(filler).unwrap();
    a.wait_for(
        "the storage problem cleared",
        Duration::from_secs(30),
        |s| s.device.problems.is_empty() && s.device.state == "reconciling",
    );
    wait_until(
        "late's record written",
        Duration::from_secs(15),
        POLL,
        || record.exists(),
    );
    let saved = std::fs::read_to_string(a.state_dir().join("desired.json")).unwrap();
    assert!(
        saved.contains("late"),
        "the desired state written again: {saved}"
    );

    // So a restart adopts it instead of killing it.
    a.kill9();
    a.start();
    let s = wait_running(&a, &["keep", "late"]);
    assert_eq!(running_pid(&s, "late"), late);
}

// ---- 10. output --------------------------------------------------------------------------------

fn logs(a: &Agent, args: &[&str]) -> String {
    let out = a.command().arg("logs").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn output_is_capped_without_the_agent_in_its_path() {
    // WORKLOAD_LOG_MAX's default.
    const CAP: u64 = 10 << 20;
    // As fast as 100m of cpu lets it (the log writer's cpu counts as the workload's).
    let chatty = shell(
        "chatty",
        "exec /usr/bin/yes 0123456789abcdef",
        "      resources:\n        limits: {cpu: 100m}\n",
    );
    let polite = shell(
        "polite",
        "trap 'echo last words; exit 0' TERM; for i in 1 2 3 4 5; do echo line $i; done; while :; do sleep 0.1; done",
        "",
    );
    let mut a = Agent::new(BIN, &desired(&[chatty.clone(), polite]));
    a.start();
    wait_running(&a, &["chatty", "polite"]);
    let logs_dir = a.state_dir().join("logs");
    let size = |f: &str| std::fs::metadata(logs_dir.join(f)).map_or(0, |m| m.len());
    let ino = |f: &str| {
        std::fs::metadata(logs_dir.join(f)).map_or(0, |m| std::os::unix::fs::MetadataExt::ino(&m))
    };
    let capped = || {
        let (cur, old) = (size("chatty.log"), size("chatty.log.1"));
        assert!(cur <= CAP / 2 && old <= CAP / 2, "{cur} + {old} over {CAP}");
    };
    wait_until(
        "a file's worth of output",
        Duration::from_secs(20),
        POLL,
        || size("chatty.log") + size("chatty.log.1") >= CAP / 2,
    );
    for _ in 0..20 {
        capped();
        std::thread::sleep(POLL);
    }
    wait_until("rotated", Duration::from_secs(20), POLL, || {
        size("chatty.log.1") > 0
    });

    // The agent is not in the path: with it gone, output keeps flowing (and rotating).
    a.kill9();
    let before = ino("chatty.log.1");
    wait_until(
        "output without the agent",
        Duration::from_secs(20),
        POLL,
        || ino("chatty.log.1") != before,
    );
    capped();
    a.start();
    wait_running(&a, &["chatty", "polite"]);

    assert_eq!(logs(&a, &["polite", "--tail", "2"]), "line 4\nline 5\n");
    let mut cmd = a.command();
    cmd.args(["logs", "polite", "--follow"]);
    let follow = Lines::spawn(cmd);
    let next = || follow.next(Duration::from_secs(10));
    assert_eq!(next().as_deref(), Some("line 1"));
    // Stopping it: its last words are written (the log writer outlives the stop's signals)
    // and `--follow` shows them.
    a.set_desired(&desired(&[chatty]));
    let last = std::iter::from_fn(next).find(|l| l == "last words");
    drop(follow);
    assert!(last.is_some(), "{}", logs(&a, &["polite"]));
    a.wait_for("polite removed", Duration::from_secs(10), |s| {
        Agent::workload(s, "polite").is_none()
    });
    // Its log writer ended with it, and its output went with it (names come and go: kept
    // logs of removed workloads would fill STATE_DIR, however small each is).
    wait_until(
        "polite's cgroup and output removed",
        Duration::from_secs(5),
        POLL,
        || {
            !a.cgroup("polite").exists()
                && !logs_dir.join("polite.log").exists()
                && !logs_dir.join("polite.log.1").exists()
        },
    );
    let out = a.command().args(["logs", "polite"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no output recorded"));
}

// ---- 11. workloads apart -----------------------------------------------------------------------

/// A workload that finds the pid in `pid_file`, then tries to read that process's environment
/// and to stop it, and says how that went.
fn prober(pid_file: &Path, user: &str) -> String {
    let f = pid_file.display();
    shell(
        "prober",
        &format!(
            "while [ ! -s {f} ]; do sleep 0.1; done; p=$(cat {f}); \
             if grep -qa SECRET= /proc/$p/environ; then e=read; else e=denied; fi; \
             if kill -STOP $p 2>/dev/null; then kill -CONT $p; s=sent; else s=denied; fi; \
             echo probe uid=$(id -u) environ=$e signal=$s; exec sleep 600"
        ),
        user,
    )
}

fn victim_workload(user: &str) -> String {
    let env = "      env: [{name: SECRET, value: not-for-neighbours}]\n";
    shell("secretive", "exec sleep 600", &format!("{env}{user}"))
}

fn uid_of(pid: i32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn workloads_cannot_read_or_signal_each_other() {
    // World-readable, so that the prober (an unprivileged uid) can read the victim's pid.
    let pid_file = std::env::temp_dir().join(format!("dwng-prober-{}", std::process::id()));
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _cleanup = Remove(pid_file.clone());
    let _ = std::fs::remove_file(&pid_file);
    let mut a = Agent::new(BIN, &desired(&[victim_workload(""), prober(&pid_file, "")]));
    a.start();
    let s = wait_running(&a, &["secretive", "prober"]);
    let victim = running_pid(&s, "secretive").unwrap();
    let write_pid = |pid: i32| {
        std::fs::write(&pid_file, pid.to_string()).unwrap();
        std::fs::set_permissions(&pid_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    };
    write_pid(victim);
    let probe_log = a.state_dir().join("logs/prober.log");
    let probe = |uid: &str| {
        let wanted = format!("probe uid={uid}");
        poll_until(Duration::from_secs(10), POLL, || {
            std::fs::read_to_string(&probe_log)
                .ok()?
                .lines()
                .rev()
                .find(|l| l.starts_with(&wanted))
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("no probe as {uid}; log: {}", a.log()))
    };
    let seen = probe("");
    assert!(
        seen.ends_with(" environ=denied signal=denied"),
        "one workload reads or signals another: {seen}"
    );
    // Each runs as a uid of its own, as status says.
    let uids: Vec<Option<u32>> = ["secretive", "prober"]
        .iter()
        .map(|n| Agent::workload(&s, n).unwrap().uid)
        .collect();
    let (Some(victim_uid), Some(prober_uid)) = (uids[0], uids[1]) else {
        panic!("status shows no uid: {uids:?}");
    };
    assert_ne!(victim_uid, prober_uid);
    assert!(victim_uid >= 524288 && prober_uid >= 524288, "{uids:?}");
    assert_eq!(uid_of(victim), victim_uid);
    assert!(
        seen.starts_with(&format!("probe uid={prober_uid} ")),
        "{seen}"
    );

    // An explicit `user:` still wins: two workloads that share one (as all did before) can.
    std::fs::remove_file(&pid_file).unwrap();
    let nobody = "      user: nobody\n";
    a.set_desired(&desired(&[
        victim_workload(nobody),
        prober(&pid_file, nobody),
    ]));
    let s = a.wait_for("both restarted as nobody", Duration::from_secs(15), |s| {
        ["secretive", "prober"]
            .iter()
            .all(|n| running_pid(s, n).is_some_and(|p| p != victim && uid_of(p) == 65534))
    });
    write_pid(running_pid(&s, "secretive").unwrap());
    assert_eq!(probe("65534"), "probe uid=65534 environ=read signal=sent");
}

// ---- 12. modes -----------------------------------------------------------------------------------

fn state_dir_is_private() {
    let mut a = Agent::new(
        BIN,
        &desired(&[shell("w", "echo hello; exec sleep 600", "")]),
    );
    // Left open by someone (an older version, an installer with another umask).
    for d in ["", "workloads", "logs"] {
        let p = a.state_dir().join(d);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    a.start();
    wait_running(&a, &["w"]);
    wait_until("record written", Duration::from_secs(5), POLL, || {
        a.state_dir().join("workloads/w.json").exists()
    });
    let mode = |p: &str| {
        std::fs::metadata(a.state_dir().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    for d in ["", "workloads", "logs"] {
        assert_eq!(mode(d), 0o700, "STATE_DIR/{d}");
    }
    assert_eq!(mode("workloads/w.json"), 0o600);
    assert_eq!(mode("desired.json"), 0o600);
    assert_eq!(mode("logs/w.log") & 0o007, 0, "no access for others");
}

// ---- 13. corrupt files -------------------------------------------------------------------------

fn corrupt_outbox_and_desired_state_are_kept_aside_and_logged() {
    let server = FlottaTestServer::start(ServerOptions::default());
    let mut a = Agent::new(BIN, "workloads: []\n");
    a.extra_env.extend(server.agent_env("edge-corrupt"));
    std::fs::create_dir_all(a.state_dir()).unwrap();
    let files = [("outbox.json", "{\"events\": [tor"), ("desired.json", "[1")];
    for (f, text) in files {
        std::fs::write(a.state_dir().join(f), text).unwrap();
    }
    a.start();
    wait_until("both read", Duration::from_secs(10), POLL, || {
        files
            .iter()
            .all(|(f, _)| a.state_dir().join(format!("{f}.corrupt")).exists())
    });
    let log = a.log();
    for (f, text) in files {
        let aside = a.state_dir().join(format!("{f}.corrupt"));
        assert_eq!(std::fs::read_to_string(&aside).unwrap(), text);
        let path = a.state_dir().join(f).display().to_string();
        assert!(
            log.lines()
                .any(|l| l.contains(&path) && l.contains("corrupt")),
            "{f} logged:\n{log}"
        );
    }
    assert!(a.try_status().is_some());
}
