//! The `device-worker-ng` binary: a thin CLI over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use device_worker_ng::config::{Inputs, Settings, EXIT_CONFIG};
use device_worker_ng::{daemon, logging, status};

/// Exit code of `status` when no agent answers.
const EXIT_NOT_RUNNING: u8 = 3;

#[derive(Parser)]
#[command(name = "device-worker-ng", version, about = "Flotta edge device agent")]
struct Cli {
    /// YAML configuration file (keys as in the README; each also as EDGE_DEVICE_<KEY>).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Override a configuration key (highest precedence); repeatable.
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    set: Vec<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the daemon).
    Run,
    /// Rejoin a device the server disconnected: it forgets the disconnect, its certificate,
    /// configuration and undelivered events, and enrols afresh.
    Reset {
        /// Control socket of the running agent (default: CONTROL_SOCKET).
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
    /// Show the running agent's state.
    Status {
        /// Print the snapshot as JSON.
        #[arg(long)]
        json: bool,
        /// Control socket to ask (default: CONTROL_SOCKET from the configuration).
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
}

fn config_error(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("device-worker-ng: {e}");
    ExitCode::from(EXIT_CONFIG as u8)
}

fn main() -> ExitCode {
    // glibc gives every thread that allocates its own malloc arena; the agent's short-lived
    // blocking threads would each pin one. One arena keeps its RSS small (issue targets); the
    // agent's threads allocate little, so there is nothing to contend for.
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only tunes the allocator; called before any other thread exists.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 1);
    }
    let cli = Cli::parse();
    let inputs = Inputs::from_process(cli.config.clone(), cli.set.clone());
    match cli.command {
        Command::Run => {
            let settings = match Settings::load(&inputs) {
                Ok(s) => s,
                Err(e) => return config_error(e),
            };
            if let Err(e) = settings.prepare_paths() {
                return config_error(e);
            }
            logging::init(settings.log_level);
            match daemon::run(settings, inputs) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e @ daemon::DaemonError::Config(_)) => {
                    tracing::error!("{e}");
                    config_error(e)
                }
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("device-worker-ng: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Reset { socket } => {
            let path = match socket {
                Some(p) => p,
                None => match Settings::load(&inputs) {
                    Ok(s) => s.control_socket,
                    Err(e) => return config_error(e),
                },
            };
            match status::socket::request_reset(&path) {
                Ok(answer) => {
                    println!("{answer}");
                    ExitCode::SUCCESS
                }
                Err(e @ status::socket::SocketError::NotRunning { .. }) => {
                    eprintln!("device-worker-ng: {e}");
                    ExitCode::from(EXIT_NOT_RUNNING)
                }
                Err(e) => {
                    eprintln!("device-worker-ng: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Status { json, socket } => {
            let path = match socket {
                Some(p) => p,
                None => match Settings::load(&inputs) {
                    Ok(s) => s.control_socket,
                    Err(e) => return config_error(e),
                },
            };
            match status::socket::request_status(&path) {
                Ok((snap, raw)) => {
                    if json {
                        print!("{raw}");
                    } else {
                        print!("{}", snap.render());
                    }
                    ExitCode::SUCCESS
                }
                Err(e @ status::socket::SocketError::NotRunning { .. }) => {
                    eprintln!("device-worker-ng: {e}");
                    ExitCode::from(EXIT_NOT_RUNNING)
                }
                Err(e) => {
                    eprintln!("device-worker-ng: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
