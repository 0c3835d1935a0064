//! The qemu guests' verdicts (tests/vm): a guest script boots a guest, runs a payload that
//! prints `PASS <check>: ...` / `FAIL <check>: ...` lines on the serial console, and exits 0
//! when everything held.

use std::process::Command;
use std::time::Instant;

/// One finished guest run.
pub struct GuestRun {
    pub code: Option<i32>,
    pub console: String,
    stderr: String,
    seconds: f64,
}

impl GuestRun {
    /// Runs the guest script `cmd` to its end.
    pub fn of(cmd: &mut Command) -> GuestRun {
        let started = Instant::now();
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        GuestRun {
            code: out.status.code(),
            console: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            seconds: started.elapsed().as_secs_f64(),
        }
    }

    /// No `FAIL` line, a line for each of the `required` prefixes, exit status 0; a failure
    /// shows the whole console (with the guest's logs) and the script's stderr.
    pub fn assert_passed(&self, what: &str, required: &[&str]) {
        let lines: Vec<&str> = self.console.lines().collect();
        let fails: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.starts_with("FAIL "))
            .collect();
        assert!(
            fails.is_empty(),
            "{what}: failed checks:\n{}\n{}",
            fails.join("\n"),
            self.transcript()
        );
        for want in required {
            assert!(
                lines.iter().any(|l| l.starts_with(want)),
                "{what}: no line starting with {want:?} in the guest console\n{}",
                self.transcript()
            );
        }
        assert_eq!(
            self.code,
            Some(0),
            "{what}: exit status of the guest script\n{}",
            self.transcript()
        );
    }

    /// The console, the script's stderr and how the run ended, for a failure message.
    pub fn transcript(&self) -> String {
        format!(
            "---- console ----\n{}\n---- stderr ----\n{}\n---- exited {:?} after {:.1} s",
            self.console, self.stderr, self.code, self.seconds
        )
    }
}
