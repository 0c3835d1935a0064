//! The one idea behind run numbers, retry and cron tokens and certificate generations: a
//! result or a timer that belongs to an earlier generation is stale and dropped.

use serde::Serialize;

/// A generation: starts at 0, [`Generation::bump`]ed whenever what it guards is replaced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Generation(u64);

impl Generation {
    /// Moves to the next generation and returns it.
    pub fn bump(&mut self) -> Generation {
        self.0 += 1;
        *self
    }

    /// Whether `other` (carried by a result or a timer) is this generation.
    pub fn is(self, other: Generation) -> bool {
        self == other
    }
}

impl std::fmt::Display for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}
