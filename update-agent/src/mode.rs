//! How a command runs and prints, named once for the daemon, the policy commands and
//! the CLI (so that none of them takes a bare `bool`). Imports nothing of the crate.

/// How long a daemon runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passes {
    /// Until the process is stopped, each concern on its own interval.
    Forever,
    /// One of everything (and the installs and reboots it leads to), then exit; the
    /// install's error is the daemon's error.
    Once,
}

impl Passes {
    /// `--once` on the command line.
    pub fn from_once_flag(once: bool) -> Passes {
        if once {
            Passes::Once
        } else {
            Passes::Forever
        }
    }
}

/// How results are printed on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Sentences for people.
    Text,
    /// One JSON object a line (`--json`).
    Json,
}

impl Format {
    /// `--json` on the command line.
    pub fn from_json_flag(json: bool) -> Format {
        if json {
            Format::Json
        } else {
            Format::Text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_flags_name_their_cases() {
        assert_eq!(Passes::from_once_flag(true), Passes::Once);
        assert_eq!(Passes::from_once_flag(false), Passes::Forever);
        assert_eq!(Format::from_json_flag(true), Format::Json);
        assert_eq!(Format::from_json_flag(false), Format::Text);
    }
}
