//! Build-time artefacts of the command line: the version with its git commit, and the man page
//! and shell completions rendered from the same clap definitions the binary parses with
//! (`src/cli.rs`). They go to OUT_DIR and are copied beside the binary
//! (`target/<profile>/man/`, `target/<profile>/completions/`), where the packages take them.

use std::env;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

#[allow(dead_code)]
#[path = "src/cli.rs"]
mod cli;

use clap::CommandFactory;

fn main() {
    println!("cargo:rerun-if-changed=src/cli.rs");
    println!("cargo:rerun-if-changed=README.md");
    let version = match git_commit() {
        Some(commit) => format!("{} (commit {commit})", env!("CARGO_PKG_VERSION")),
        None => env!("CARGO_PKG_VERSION").to_string(),
    };
    println!("cargo:rustc-env=DWNG_VERSION={version}");

    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let version: &'static str = Box::leak(version.into_boxed_str());
    let mut cmd = cli::Cli::command().version(version);
    cmd.build();

    let man = man_page(&cmd);
    let comp = out.join("completions");
    fs::create_dir_all(&comp).expect("create OUT_DIR/completions");
    use clap_complete::Shell;
    for (shell, file) in [
        (Shell::Bash, "device-worker-ng.bash"),
        (Shell::Zsh, "_device-worker-ng"),
        (Shell::Fish, "device-worker-ng.fish"),
    ] {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut cmd, "device-worker-ng", &mut buf);
        write_if_changed(&comp.join(file), &buf);
    }
    write_if_changed(&out.join("device-worker-ng.8"), man.as_bytes());

    // OUT_DIR is target/<profile>/build/<package>-<hash>/out.
    if let Some(profile_dir) = out.ancestors().nth(3) {
        let man_dir = profile_dir.join("man");
        let comp_dir = profile_dir.join("completions");
        let _ = fs::create_dir_all(&man_dir);
        let _ = fs::create_dir_all(&comp_dir);
        let page = man_dir.join("device-worker-ng.8");
        write_if_changed(&page, man.as_bytes());
        gzip(&page);
        for f in fs::read_dir(&comp).expect("read completions").flatten() {
            if let Ok(bytes) = fs::read(f.path()) {
                write_if_changed(&comp_dir.join(f.file_name()), &bytes);
            }
        }
    }
}

/// The short commit of the checkout being built, when it is one (a source tarball is not).
fn git_commit() -> Option<String> {
    let dir = env::var("CARGO_MANIFEST_DIR").ok()?;
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .args(args)
            .current_dir(&dir)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    // Rebuild when HEAD moves: HEAD itself (a branch switch) and the branch's ref (a commit).
    if let Some(head) = git(&["rev-parse", "--git-path", "HEAD"]) {
        println!("cargo:rerun-if-changed={}", abs(&dir, &head).display());
    }
    if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
        if let Some(p) = git(&["rev-parse", "--git-common-dir"]) {
            let common = abs(&dir, &p);
            println!("cargo:rerun-if-changed={}", common.join(&r).display());
            println!(
                "cargo:rerun-if-changed={}",
                common.join("packed-refs").display()
            );
        }
    }
    git(&["rev-parse", "--short=12", "HEAD"]).filter(|c| !c.is_empty())
}

fn abs(base: &str, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        Path::new(base).join(p)
    }
}

/// `PAGE.gz` beside `page`, as Debian policy wants man pages (`gzip -9n`: no name or time
/// stamp, so the bytes are reproducible). gzip is part of every build host's base system.
fn gzip(page: &Path) {
    let out = Command::new("gzip")
        .args(["-9n", "--stdout"])
        .arg(page)
        .output();
    match out {
        Ok(o) if o.status.success() => {
            write_if_changed(&page.with_extension("8.gz"), &o.stdout);
        }
        Ok(o) => println!(
            "cargo:warning=gzip {}: {}",
            page.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => println!("cargo:warning=no gzip for the man page: {e}"),
    }
}

fn write_if_changed(path: &Path, bytes: &[u8]) {
    if fs::read(path).ok().as_deref() == Some(bytes) {
        return;
    }
    let mut f = fs::File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.write_all(bytes)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Escapes text for roff: backslashes, and a leading dot or quote that roff would take for a
/// request.
fn roff(text: &str) -> String {
    let t = text.replace('\\', "\\e").replace('-', "\\-");
    if t.starts_with('.') || t.starts_with('\'') {
        format!("\\&{t}")
    } else {
        t
    }
}

/// clap_mangen's page (name, synopsis, description, options, subcommands) plus the sections
/// an operator looks for: every setting (from README.md's table, which a test keeps complete),
/// the exit statuses, the files.
fn man_page(cmd: &clap::Command) -> String {
    let mut buf = Vec::new();
    let man = clap_mangen::Man::new(cmd.clone())
        .section("8")
        .manual("System Administration")
        .source(format!("device-worker-ng {}", env!("CARGO_PKG_VERSION")));
    man.render_title(&mut buf).expect("render");
    man.render_name_section(&mut buf).expect("render");
    man.render_synopsis_section(&mut buf).expect("render");
    man.render_description_section(&mut buf).expect("render");
    man.render_options_section(&mut buf).expect("render");
    let mut page = String::from_utf8(buf).expect("clap_mangen writes UTF-8");
    // Inline, not clap_mangen's references to one page per subcommand (none is installed).
    page.push_str(".SH COMMANDS\n");
    // Hidden subcommands and options (internal modes) stay out of the page, as out of --help.
    for sub in cmd
        .get_subcommands()
        .filter(|s| s.get_name() != "help" && !s.is_hide_set())
    {
        let mut synopsis = format!("\\fBdevice\\-worker\\-ng {}\\fR", roff(sub.get_name()));
        let own: Vec<&clap::Arg> = sub
            .get_arguments()
            .filter(|a| {
                !a.is_global_set() && !a.is_hide_set() && a.get_long().is_some_and(|l| l != "help")
            })
            .collect();
        for a in &own {
            let long = a.get_long().unwrap_or_default();
            match a.get_value_names().and_then(|v| v.first()) {
                Some(v) if a.get_action().takes_values() => {
                    synopsis.push_str(&format!(" [\\-\\-{} \\fI{}\\fR]", roff(long), roff(v)))
                }
                _ => synopsis.push_str(&format!(" [\\-\\-{}]", roff(long))),
            }
        }
        page.push_str(&format!(".TP\n{synopsis}\n"));
        let about = sub
            .get_long_about()
            .or(sub.get_about())
            .map(|a| a.to_string())
            .unwrap_or_default();
        page.push_str(&format!("{}\n", roff(&about)));
        for a in &own {
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            page.push_str(&format!(
                ".RS\n.TP\n\\fB\\-\\-{}\\fR\n{}\n.RE\n",
                roff(a.get_long().unwrap_or_default()),
                roff(&help)
            ));
        }
    }

    page.push_str(".SH CONFIGURATION\n");
    page.push_str(&roff(
        "Settings come from the configuration file (--config, default \
/etc/device-worker-ng/config.yaml when it exists), then its drop-ins config.d/*.yaml beside it \
in lexical order, then EDGE_DEVICE_<KEY> environment variables, then --set KEY=VALUE flags; a \
later source wins. An unknown key or a bad value stops the agent with exit status 78 and one \
line naming the key and the file. SIGHUP reloads the configuration.",
    ));
    page.push('\n');
    for (key, kind, default, meaning) in settings_table() {
        page.push_str(".TP\n");
        page.push_str(&format!(
            "\\fB{}\\fR ({}, default {})\n{}\n",
            roff(&key),
            roff(&kind),
            roff(&default),
            roff(&meaning)
        ));
    }
    page.push_str(".PP\n");
    page.push_str(&roff(
        "Durations: 500ms, 1s, 2m, 1h, 1m30s. Memory: 256Mi, 1Gi, 500M, 129e6. CPU: 250m, 0.5, 2.",
    ));
    page.push('\n');

    page.push_str(".SH \"EXIT STATUS\"\n");
    for (code, what) in [
        ("0", "success; for check: healthy (device reconciling, or enrolled and waiting for its first desired state)"),
        ("1", "failure; for check: cannot tell (not allowed to use the control socket, a malformed answer)"),
        ("2", "bad command line"),
        ("3", "status, check, reset: no agent answers on the control socket"),
        ("4", "check: the device is degraded (status lists its problems)"),
        ("5", "check: the device is over its budget and evicting workloads"),
        ("6", "check: the device is not registered (enrolment pending or failing)"),
        ("7", "check: the server disconnected the device (device-worker-ng reset rejoins it)"),
        ("78", "configuration error, or an identity (certificate, key, CA) that can never work; the unit does not restart on it"),
    ] {
        page.push_str(&format!(".TP\n\\fB{code}\\fR\n{}\n", roff(what)));
    }

    page.push_str(".SH FILES\n");
    for (path, what) in [
        (
            "/etc/device-worker-ng/config.yaml",
            "the configuration; every key listed, commented, with its default",
        ),
        (
            "/etc/device-worker-ng/config.d/*.yaml",
            "drop-ins, applied after it in lexical order",
        ),
        (
            "/var/lib/device-worker-ng/",
            "state: identity, records of the workloads, desired state, outbox, workload logs",
        ),
        (
            "/run/device-worker-ng/control.sock",
            "the control socket that status, check and reset use (root only)",
        ),
        (
            "/usr/lib/greenboot/check/required.d/40-device-worker-ng.sh",
            "the greenboot health check",
        ),
    ] {
        page.push_str(&format!(".TP\n\\fI{}\\fR\n{}\n", roff(path), roff(what)));
    }
    page.push_str(".SH \"SEE ALSO\"\n");
    page.push_str("\\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1), \\fBpodman\\fR(1)\n");
    page
}

/// The rows of README.md's settings table: (key, type, default, meaning).
fn settings_table() -> Vec<(String, String, String, String)> {
    let readme = fs::read_to_string("README.md").unwrap_or_default();
    readme
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l
                .strip_prefix('|')?
                .strip_suffix('|')?
                .split(" | ")
                .map(str::trim)
                .collect();
            let [key, kind, default, meaning] = cells.as_slice() else {
                return None;
            };
            let key = key.strip_prefix('`')?.strip_suffix('`')?;
            if key.is_empty() || !key.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') {
                return None;
            }
            let unquote = |s: &str| s.trim_matches('`').replace('`', "");
            let default = match unquote(default).as_str() {
                "-" => "unset".to_string(),
                d => d.to_string(),
            };
            Some((key.to_string(), kind.to_string(), default, unquote(meaning)))
        })
        .collect()
}
