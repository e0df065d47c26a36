//! The signer's one error type: each variant names the operation and what it was on.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum SignerError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{context}: {source}")]
    Protocol {
        context: String,
        #[source]
        source: outpost_protocol::Error,
    },

    #[error("role {role} needs {threshold} signature(s) from its keys {keyids:?}; the keys given provide {have}. Pass more of its private keys with --key/--sign-key")]
    NotEnoughKeys { role: String, threshold: u64, have: usize, keyids: Vec<String> },

    /// The local repository's state refuses the operation (missing metadata, a
    /// version already published, a delegation that does not allow it).
    #[error("repository {dir}: {reason}")]
    Repo { dir: PathBuf, reason: String },

    #[error("server refused {what}: HTTP {status}: {message}")]
    Server { what: String, status: u16, message: String },

    #[error("{url}: {reason}")]
    Http { url: String, reason: String },

    /// The server answered, but is not in a state the command can work with.
    #[error("server {url}: {reason}")]
    ServerState { url: String, reason: String },

    /// A command-line flag, or a combination of flags, that cannot work as given —
    /// also a flag's value that names something the repository does not have (the
    /// fix is another value). What the repository's own state refuses is [`Repo`].
    ///
    /// [`Repo`]: SignerError::Repo
    #[error("{0}")]
    Usage(String),

    /// A file or document whose content is not what it must be (a policy bundle, an
    /// SBOM, a deny-list, a Sigstore bundle or signature, a key file, metadata); `what`
    /// names it, by path where it has one.
    #[error("{what}: {reason}")]
    Input { what: String, reason: String },

    /// A signature or digest that does not match what it must: `what` names the file
    /// or signature that failed the check.
    #[error("{what}: {reason}")]
    Verify { what: String, reason: String },

    /// Work moved to the blocking pool that panicked or was cancelled.
    #[error("{task}: {source}")]
    Task {
        task: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },

    /// Serialising JSON of our own (settings, key files, metadata, bundles).
    #[error("encode {what} as JSON: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },

    /// The `sigstore` crate could not do `op` (load a key, export it).
    #[error("sigstore: {op}: {source}")]
    Sigstore {
        op: &'static str,
        #[source]
        source: Box<sigstore::errors::SigstoreError>,
    },

    /// Making an SBOM (from a root filesystem or a Cargo.lock) failed.
    #[error("{op}: {source}")]
    Sbom {
        op: &'static str,
        #[source]
        source: outpost_sbom::SbomError,
    },
}

pub type Result<T, E = SignerError> = std::result::Result<T, E>;

impl SignerError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SignerError::Io { op, path: path.into(), source }
    }

    pub(crate) fn proto(context: impl Into<String>, source: outpost_protocol::Error) -> Self {
        SignerError::Protocol { context: context.into(), source }
    }

    pub(crate) fn input(what: impl std::fmt::Display, reason: impl std::fmt::Display) -> Self {
        SignerError::Input { what: what.to_string(), reason: reason.to_string() }
    }

    pub(crate) fn verify(what: impl std::fmt::Display, reason: impl std::fmt::Display) -> Self {
        SignerError::Verify { what: what.to_string(), reason: reason.to_string() }
    }

    pub(crate) fn repo(dir: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        SignerError::Repo { dir: dir.into(), reason: reason.into() }
    }

    /// For `map_err` on a blocking task's join.
    pub(crate) fn task(task: &'static str) -> impl FnOnce(tokio::task::JoinError) -> Self {
        move |source| SignerError::Task { task, source }
    }

    /// For `map_err` on serialising our own JSON.
    pub(crate) fn encode(what: &'static str) -> impl FnOnce(serde_json::Error) -> Self {
        move |source| SignerError::Encode { what, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::display_chain;

    #[test]
    fn messages_name_what_failed_and_say_each_cause_once() {
        assert_eq!(SignerError::Usage("pass --rootfs DIR or --cargo-lock FILE".into()).to_string(), "pass --rootfs DIR or --cargo-lock FILE");
        assert_eq!(SignerError::input("b.sigstore.json", "not JSON: EOF").to_string(), "b.sigstore.json: not JSON: EOF");
        assert_eq!(
            SignerError::verify("fw.img.sig", "signature does not verify for fw.img").to_string(),
            "fw.img.sig: signature does not verify for fw.img"
        );
        assert_eq!(SignerError::repo("/r", "no targets metadata").to_string(), "repository /r: no targets metadata");

        let json = serde_json::from_str::<u8>("x").unwrap_err();
        let cause = json.to_string();
        let e = SignerError::encode("repository settings")(json);
        assert_eq!(display_chain(&e), format!("encode repository settings as JSON: {cause}"));

        let e = SignerError::Sbom { op: "make the SBOM", source: outpost_sbom::SbomError::Invalid("no components".into()) };
        assert_eq!(display_chain(&e), "make the SBOM: SBOM: no components");
    }
}
