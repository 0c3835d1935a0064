//! The `device-worker-ng` binary: a thin CLI over the library (definitions in `cli.rs`).

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use cli::{Cli, Command};
use device_worker_ng::config::{Inputs, Settings, EXIT_CONFIG};
use device_worker_ng::status::socket::SocketError;
use device_worker_ng::status::{self, Health};
use device_worker_ng::workload::WorkloadName;
use device_worker_ng::{daemon, logging, logs};

fn config_error(e: impl std::fmt::Display) -> ExitCode {
    logging::fatal(&e.to_string());
    ExitCode::from(EXIT_CONFIG as u8)
}

/// The exit status of a failed request on the control socket.
fn socket_error(e: SocketError) -> ExitCode {
    eprintln!("device-worker-ng: {e}");
    match e {
        SocketError::NotRunning { .. } => ExitCode::from(status::EXIT_NOT_RUNNING),
        _ => ExitCode::from(status::EXIT_UNKNOWN),
    }
}

/// `--socket`, else CONTROL_SOCKET of the configuration.
fn control_socket(socket: Option<PathBuf>, inputs: &Inputs) -> Result<PathBuf, ExitCode> {
    match socket {
        Some(p) => Ok(p),
        None => Settings::load(inputs)
            .map(|s| s.control_socket)
            .map_err(config_error),
    }
}

fn main() -> ExitCode {
    // A shell workload's log writer is this binary in a hidden mode (drivers::output).
    if let Some(code) = device_worker_ng::drivers::output::run_if_log_writer() {
        return code;
    }
    let cli = Cli::parse();
    let mut flags = Vec::new();
    // Before the --set flags: an explicit --set LOG_LEVEL still wins.
    if let Some(level) = &cli.log_level {
        flags.push(format!("LOG_LEVEL={level}"));
    }
    flags.extend(cli.set.iter().cloned());
    let inputs = Inputs::from_process(cli.config.clone(), flags);
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            device_worker_ng::heap::without_thread_cache();
            run(inputs)
        }
        Command::ExecAs { uid, argv } => {
            let why = device_worker_ng::drivers::systemd::exec_as(uid, &argv);
            eprintln!("device-worker-ng exec-as: {why}");
            // as a shell says a command cannot run
            Ok(ExitCode::from(126))
        }
        Command::Reset { socket } => {
            control_socket(socket, &inputs).map(|path| match status::socket::request_reset(&path) {
                Ok(answer) => {
                    println!("{answer}");
                    ExitCode::SUCCESS
                }
                Err(e) => socket_error(e),
            })
        }
        Command::Status { json, socket } => control_socket(socket, &inputs).map(|path| {
            match status::socket::request_status(&path) {
                Ok((snap, raw)) => {
                    if json {
                        print!("{raw}");
                    } else {
                        print!("{}", snap.render());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => socket_error(e),
            }
        }),
        Command::Logs { name, tail, follow } => show_logs(&inputs, &name, tail, follow),
        Command::Check { socket, quiet } => control_socket(socket, &inputs).map(|path| {
            match status::socket::request_status(&path) {
                Ok((snap, _)) => {
                    let health = Health::of(&snap);
                    if !quiet {
                        println!("{}", health.line(&snap));
                    }
                    ExitCode::from(health.exit_code())
                }
                Err(e) if quiet => match e {
                    SocketError::NotRunning { .. } => ExitCode::from(status::EXIT_NOT_RUNNING),
                    _ => ExitCode::from(status::EXIT_UNKNOWN),
                },
                Err(e) => socket_error(e),
            }
        }),
    };
    result.unwrap_or_else(|code| code)
}

/// `logs NAME`: the workload's output where the agent keeps it (the agent is not asked).
fn show_logs(
    inputs: &Inputs,
    name: &str,
    tail: Option<usize>,
    follow: bool,
) -> Result<ExitCode, ExitCode> {
    let settings = Settings::load(inputs).map_err(config_error)?;
    let request = WorkloadName::parse(name).map(|name| logs::Request { name, tail, follow });
    let shown = request.map_err(logs::LogsError::from).and_then(|r| {
        let source = logs::Source::of_workload(&settings, &r.name)?;
        logs::show(&source, &r, &mut std::io::stdout().lock())
    });
    Ok(match shown {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("device-worker-ng: {e}");
            ExitCode::FAILURE
        }
    })
}

fn run(inputs: Inputs) -> Result<ExitCode, ExitCode> {
    let settings = Settings::load(&inputs).map_err(config_error)?;
    settings.prepare_paths().map_err(config_error)?;
    logging::init(settings.log_level);
    match settings.files.as_slice() {
        [] => tracing::info!(
            "no configuration file: defaults, EDGE_DEVICE_* variables and --set flags only"
        ),
        files => {
            let list: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
            tracing::info!("configuration read from {}", list.join(", "))
        }
    }
    tracing::info!(version = cli::VERSION, "starting");
    // The error that ends the agent is written once (not also logged), so the journal
    // shows it once.
    Ok(match daemon::run(settings, inputs) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ daemon::DaemonError::Config(_)) => config_error(e),
        Err(e) => {
            logging::fatal(&e.to_string());
            ExitCode::FAILURE
        }
    })
}
