//! The command line's definitions, and nothing else: `main.rs` parses with them and `build.rs`
//! renders the man page and the shell completions from them (it includes this file), so the
//! three cannot drift apart. Hence no dependency here but clap.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// `0.1.0 (commit abc1234)`: build.rs sets DWNG_VERSION from git; a build outside a git
/// checkout (and build.rs itself) has the plain version.
pub const VERSION: &str = match option_env!("DWNG_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// Where every setting is documented on an installed device.
const SETTINGS_HELP: &str = "\
Settings are KEY: value lines of the configuration file (default /etc/device-worker-ng/config.yaml \
when it exists, then its config.d/*.yaml drop-ins in lexical order), EDGE_DEVICE_<KEY> \
environment variables and --set KEY=VALUE; later ones win. Every key, its type and default: \
man device-worker-ng, or the commented lines of /etc/device-worker-ng/config.yaml.";

#[derive(Parser, Debug)]
#[command(
    name = "device-worker-ng",
    version = VERSION,
    about = "Project Flotta edge device agent: workloads in enforced cgroups, within the device's budget",
    long_about = "The agent of a Project Flotta edge device. It receives the desired state (from \
the Flotta edge API over mTLS, or from a local file), runs every workload (podman pods, shell \
commands, Kubernetes Deployments) in its own cgroup with enforced limits, keeps the device \
within its resource budget and reports back. Without a subcommand it runs the daemon, as the \
Go device-worker-ng did.",
    after_help = SETTINGS_HELP,
)]
pub struct Cli {
    /// Configuration file (KEY: value); default /etc/device-worker-ng/config.yaml when it exists.
    /// Drop-ins in config.d/*.yaml beside it are applied after it.
    #[arg(long, short = 'c', global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override a configuration key (highest precedence); repeatable.
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Log level (error, warn, info, debug, trace): the same as --set LOG_LEVEL=LEVEL.
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent (the daemon); the default without a subcommand.
    Run,
    /// Show the running agent's state: device, problems, server, budget, workloads.
    Status {
        /// Print the snapshot as JSON.
        #[arg(long)]
        json: bool,
        /// Control socket to ask (default: CONTROL_SOCKET from the configuration).
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
    /// Health check for probes and greenboot: one line, and the exit status says the device's
    /// health (0 healthy; 3 not running; 4 degraded; 5 over budget; 6 not registered;
    /// 7 disconnected by the server; 1 cannot tell, e.g. not root).
    Check {
        /// Control socket to ask (default: CONTROL_SOCKET from the configuration).
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Print nothing; only the exit status.
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// Show a shell workload's output, kept in STATE_DIR/logs (root only; the agent need not
    /// be running).
    Logs {
        /// The workload.
        name: String,
        /// Only the last N lines.
        #[arg(long, value_name = "N")]
        tail: Option<usize>,
        /// Keep showing output as it comes, until interrupted.
        #[arg(long, short)]
        follow: bool,
    },
    /// Rejoin a device the server disconnected: it forgets the disconnect, its certificate,
    /// configuration and undelivered events, and enrols afresh.
    Reset {
        /// Control socket of the running agent (default: CONTROL_SOCKET).
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
}
