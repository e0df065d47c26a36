//! Talking to `outpost-server`: upload target files and offline-signed metadata.
//! Nothing here signs; the server verifies everything against its trusted root.

use std::path::Path;

use clap::Args;
use futures_util::StreamExt;
use outpost_protocol::tuf::{consistent_name, quote_target_path};
use outpost_protocol::api::repository::{PublishOutcome, PublishRequest, RepositoryStatus, StagedTarget};
use outpost_protocol::api::ErrorBody;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::error::{Result, SignerError};
use crate::localrepo::LocalRepo;
use crate::output::Output;

#[derive(Debug, Args, Clone)]
pub struct ServerArgs {
    /// Server base URL, e.g. https://outpost.example.internal:8443 (omit to work offline).
    #[arg(long, env = "OUTPOST_SERVER")]
    pub server: Option<String>,
    /// PEM file of the CA certificates the server's TLS certificate must chain to
    /// (only these). Without it: the system's trust store.
    #[arg(long, env = "OUTPOST_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate (leaf first) to present in TLS handshakes, for a proxy or
    /// load balancer in front of the server that requires one (the server itself
    /// authorizes by --token). Needs --client-key.
    #[arg(long, env = "OUTPOST_CLIENT_CERTIFICATE", requires = "client_key")]
    pub client_certificate: Option<std::path::PathBuf>,
    /// PEM private key of --client-certificate.
    #[arg(long, env = "OUTPOST_CLIENT_KEY", requires = "client_certificate", hide_env_values = true)]
    pub client_key: Option<std::path::PathBuf>,
    /// Pipeline API token (bearer).
    #[arg(long, env = "OUTPOST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

pub struct Server {
    pub url: String,
    pub token: String,
    client: reqwest::Client,
}

impl ServerArgs {
    pub fn optional(&self) -> Result<Option<Server>> {
        match (&self.server, &self.token) {
            (None, _) => Ok(None),
            (Some(_), None) => Err(SignerError::Usage("--server needs --token (or OUTPOST_TOKEN)".into())),
            (Some(url), Some(token)) => Ok(Some(Server {
                url: url.trim_end_matches('/').to_owned(),
                token: token.clone(),
                client: self.http_client()?,
            })),
        }
    }

    pub fn require(&self) -> Result<Server> {
        self.optional()?.ok_or_else(|| SignerError::Usage("--server (or OUTPOST_SERVER) is required".into()))
    }

    /// The HTTP client: TLS verified against --ca-file's certificates only, or against
    /// the system's trust store (`outpost_httpclient`, as every Outpost client),
    /// presenting --client-certificate when given.
    fn http_client(&self) -> Result<reqwest::Client> {
        let usage = |e: outpost_httpclient::Error| SignerError::Usage(e.to_string());
        let identity = match (&self.client_certificate, &self.client_key) {
            (Some(cert), Some(key)) => Some(outpost_httpclient::Identity::load((cert, "--client-certificate"), (key, "--client-key")).map_err(usage)?),
            _ => None,
        };
        let builder = reqwest::Client::builder().user_agent(concat!("outpost/", env!("CARGO_PKG_VERSION")));
        outpost_httpclient::client(builder, self.ca_file.as_deref(), "--ca-file", identity).map_err(usage)
    }
}

async fn refused(what: &str, resp: reqwest::Response) -> SignerError {
    let status = resp.status().as_u16();
    let body = resp.bytes().await.unwrap_or_default();
    let message = ErrorBody::message_or(&body, |raw| String::from_utf8_lossy(raw).into_owned());
    SignerError::Server { what: what.into(), status, message }
}

fn http_err(url: &str, e: reqwest::Error) -> SignerError {
    SignerError::Http { url: url.into(), reason: outpost_protocol::display_chain(&e) }
}

/// Whether an upload draws a progress bar (on a terminal, for people) or stays quiet
/// (with --json, for pipelines).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Bar,
    Hidden,
}

impl Progress {
    /// A bar unless the output is machine-readable.
    pub fn for_output(out: &Output) -> Progress {
        if out.json {
            Progress::Hidden
        } else {
            Progress::Bar
        }
    }

    fn bar(self, len: u64) -> indicatif::ProgressBar {
        match self {
            Progress::Bar => indicatif::ProgressBar::new(len),
            Progress::Hidden => indicatif::ProgressBar::hidden(),
        }
    }
}

impl Server {
    /// Sends `req` (to `url`) with the bearer token; a refusal becomes an error naming
    /// `what`, a success is read as `T`.
    async fn answer<T: DeserializeOwned>(&self, what: &str, url: &str, req: reqwest::RequestBuilder) -> Result<T> {
        let resp = req.bearer_auth(&self.token).send().await.map_err(|e| http_err(url, e))?;
        if !resp.status().is_success() {
            return Err(refused(what, resp).await);
        }
        resp.json().await.map_err(|e| http_err(url, e))
    }

    /// GET an admin API path (e.g. `/api/v1/devices`) with the bearer token.
    pub async fn get_json<T: DeserializeOwned>(&self, what: &str, path: &str) -> Result<T> {
        let url = format!("{}{path}", self.url);
        self.answer(what, &url, self.client.get(&url)).await
    }

    /// POST a JSON body to an admin API path with the bearer token.
    pub async fn post_json<B: Serialize + ?Sized, T: DeserializeOwned>(&self, what: &str, path: &str, body: &B) -> Result<T> {
        self.send_json(reqwest::Method::POST, what, path, body).await
    }

    /// Sends a JSON body with `method` to an admin API path with the bearer token.
    pub async fn send_json<B: Serialize + ?Sized, T: DeserializeOwned>(&self, method: reqwest::Method, what: &str, path: &str, body: &B) -> Result<T> {
        let url = format!("{}{path}", self.url);
        self.answer(what, &url, self.client.request(method, &url).json(body)).await
    }

    async fn status(&self) -> Result<RepositoryStatus> {
        self.get_json("repository status", "/api/v1/repository").await
    }

    async fn has_target(&self, name: &str) -> Result<bool> {
        let url = format!("{}/targets/{}", self.url, quote_target_path(name));
        let resp = self.client.head(&url).send().await.map_err(|e| http_err(&url, e))?;
        Ok(resp.status().is_success())
    }

    /// Streams a file to the server's staging area, with a progress bar as `progress` says.
    pub async fn upload_target(&self, target_path: &str, file: &Path, progress: Progress) -> Result<StagedTarget> {
        let url = format!("{}/api/v1/targets?path={}", self.url, quote_target_path(target_path));
        let f = tokio::fs::File::open(file).await.map_err(|e| SignerError::io("open", file, e))?;
        let len = f.metadata().await.map_err(|e| SignerError::io("stat", file, e))?.len();
        let bar = progress.bar(len);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message(format!("uploading {target_path}"));
        let b2 = bar.clone();
        let stream = tokio_util::io::ReaderStream::with_capacity(f, 1 << 20).inspect(move |chunk| {
            if let Ok(c) = chunk {
                b2.inc(c.len() as u64);
            }
        });
        let req = self
            .client
            .post(&url)
            .header(reqwest::header::CONTENT_LENGTH, len)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(reqwest::Body::wrap_stream(stream));
        let staged = self.answer(&format!("upload of {target_path}"), &url, req).await;
        bar.finish_and_clear();
        staged
    }

    async fn publish(&self, body: &PublishRequest) -> Result<PublishOutcome> {
        self.post_json("publish", "/api/v1/publish", body).await
    }
}

/// What `push` did, as `outpost` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    pub summary: String,
    /// Root versions uploaded.
    pub roots: usize,
    /// Targets roles uploaded.
    pub roles: Vec<String>,
    pub uploaded_targets: Vec<String>,
    /// The server's answer to the publish (none when it was up to date).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<PublishOutcome>,
}

/// Uploads whatever of the local repository the server lacks: newer roots, newer
/// targets roles and their target files. `fresh` names a target file just published
/// from outside the repository directory.
pub async fn push(repo: &LocalRepo, server: &Server, fresh: &[(&str, &Path)], out: &Output) -> Result<PushReport> {
    let status = server.status().await?;
    let (root, _) = repo.root()?;
    let mut roots = Vec::new();
    if status.root_version == 0 {
        return Err(SignerError::ServerState {
            url: server.url.clone(),
            reason: "has no trusted root; configure [repository].trusted_root on the server".into(),
        });
    }
    for v in status.root_version + 1..=root.signed.version {
        let bytes = repo.root_version_bytes(v)?;
        roots.push(serde_json::from_slice::<Value>(&bytes).map_err(|e| SignerError::input(repo.metadata_path(&format!("{v}.root.json")).display(), e))?);
    }
    let mut roles = std::collections::BTreeMap::new();
    let mut uploaded = Vec::new();
    for name in repo.role_names()? {
        let Some((env, bytes)) = repo.role(&name)? else { continue };
        let theirs = status.roles.get(&name).copied().unwrap_or(0);
        let has_fresh = fresh.iter().any(|(p, _)| env.signed.targets.contains_key(*p));
        if env.signed.version < theirs || (env.signed.version == theirs && has_fresh) {
            return Err(SignerError::repo(&repo.dir, format!(
                "local {name} v{} is not newer than the server's v{theirs}: this repository directory is stale. \
                 Sync it with the pipeline's current copy before publishing",
                env.signed.version
            )));
        }
        if env.signed.version == theirs {
            continue;
        }
        upload_targets(repo, server, &env.signed, fresh, Progress::for_output(out), &mut uploaded).await?;
        let value = serde_json::from_slice(&bytes).map_err(|e| SignerError::input(format!("{name} metadata"), e))?;
        roles.insert(name, value);
    }
    let role_names: Vec<String> = roles.keys().cloned().collect();
    let root_count = roots.len();
    if roots.is_empty() && roles.is_empty() {
        return Ok(PushReport { summary: "server is up to date".into(), roots: 0, roles: role_names, uploaded_targets: uploaded, server: None });
    }
    let result = server.publish(&PublishRequest { roots, roles }).await?;
    Ok(PushReport {
        summary: format!(
            "{root_count} root(s), roles {role_names:?}, {} target file(s); server now at snapshot v{} timestamp v{}",
            uploaded.len(),
            result.snapshot_version,
            result.timestamp_version
        ),
        roots: root_count,
        roles: role_names,
        uploaded_targets: uploaded,
        server: Some(result),
    })
}

/// Uploads the target files of `role` the server does not serve yet: a `fresh` file
/// from where it was made, the others from the repository directory. Their paths go
/// into `uploaded`.
async fn upload_targets(
    repo: &LocalRepo,
    server: &Server,
    role: &outpost_protocol::tuf::Targets,
    fresh: &[(&str, &Path)],
    progress: Progress,
    uploaded: &mut Vec<String>,
) -> Result<()> {
    for (path, t) in &role.targets {
        let Some(sha) = t.hashes.get("sha256") else {
            return Err(SignerError::repo(&repo.dir, format!("target {path} has no sha256; Outpost servers name targets by sha256")));
        };
        let served = consistent_name(path, sha);
        if server.has_target(&served).await? {
            continue;
        }
        let file = match fresh.iter().find(|(p, _)| *p == path) {
            Some((_, file)) => file.to_path_buf(),
            None => {
                let local = repo.target_file_path(path, sha);
                if !local.exists() {
                    return Err(SignerError::repo(&repo.dir, format!("target {path} is neither on the server nor in {}", local.display())));
                }
                local
            }
        };
        server.upload_target(path, &file, progress).await?;
        uploaded.push(path.clone());
    }
    Ok(())
}
