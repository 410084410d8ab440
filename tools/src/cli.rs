//! What the command-line programs share: value parsers for sizes, rates and durations,
//! the logging set-up, and the exit codes.
//!
//! Exit codes, the same for every program and subcommand:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done; nothing wrong found |
//! | 1 | ran, and found a problem (fsck: under-replicated or corrupt; repair: blocks left) |
//! | 2 | usage or configuration error (bad flag, unreadable or invalid topology or config) |
//! | 3 | could not run (cluster not up, IO error, a node failed) |

use std::process::ExitCode;

use strait::units;

/// The exit codes, for `--help`.
pub const EXIT_CODES: &str = "Exit codes: 0 done, nothing wrong found; 1 found a problem (fsck, repair); 2 usage or configuration error; 3 could not run.";

/// Why a program stops with a non-zero exit code.
#[derive(Debug)]
pub enum Failure {
    /// It ran and found a problem (exit 1).
    Found(String),
    /// Bad usage or configuration (exit 2).
    Usage(String),
    /// It could not do its job (exit 3).
    CannotRun(String),
}

impl Failure {
    /// The process exit code.
    pub fn code(&self) -> u8 {
        match self {
            Failure::Found(_) => 1,
            Failure::Usage(_) => 2,
            Failure::CannotRun(_) => 3,
        }
    }

    /// Prints the message as `program: message` on stderr; the exit code.
    pub fn exit(self, program: &str) -> ExitCode {
        let code = self.code();
        let (Failure::Found(m) | Failure::Usage(m) | Failure::CannotRun(m)) = self;
        eprintln!("{program}: {m}");
        ExitCode::from(code)
    }
}

impl From<String> for Failure {
    fn from(m: String) -> Self {
        Failure::CannotRun(m)
    }
}

/// Logs to stderr at `default` level, or as `RUST_LOG` says. A second call does nothing.
pub fn init_logging(default: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default.into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

/// A byte count: `64MiB`, `1GB`, `4096`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    units::parse_bytes(s).map_err(|e| e.to_string())
}

/// A byte count that indexes memory.
pub fn parse_size_usize(s: &str) -> Result<usize, String> {
    parse_size(s).and_then(|v| usize::try_from(v).map_err(|_| format!("{s}: too large")))
}

/// A rate in bytes per second: `1gbit`, `125MB/s`.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    units::parse_rate(s).map_err(|e| e.to_string())
}

/// A duration: `5ms`, `2s`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    units::parse_duration(s).map_err(|e| e.to_string())
}

/// A write mode on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Both IDCs before the ack.
    Sync,
    /// The local IDC before the ack; the remote copy is queued.
    Async,
}

impl From<Mode> for strait::wire::WriteMode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Sync => strait::wire::WriteMode::Sync,
            Mode::Async => strait::wire::WriteMode::Async,
        }
    }
}

/// When a writer sets its pipeline up, on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SetupAt {
    /// With the first packet (`WriteParams::setup_with_first_packet`): a small block
    /// costs one round trip through the pipeline.
    WithData,
    /// When the writer is made (the library's default).
    AtCreate,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_the_documented_ones() {
        assert_eq!(Failure::Found(String::new()).code(), 1);
        assert_eq!(Failure::Usage(String::new()).code(), 2);
        assert_eq!(Failure::from(String::new()).code(), 3);
    }

    #[test]
    fn sizes_rates_and_durations_parse_or_explain() {
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_rate("8bit").ok(), Some(1));
        assert_eq!(
            parse_duration("5ms"),
            Ok(std::time::Duration::from_millis(5))
        );
        assert!(parse_size("lots").is_err());
    }
}
