//! Talking to `outpost-server`: upload target files and offline-signed metadata.
//! Nothing here signs; the server verifies everything against its trusted root.

use std::path::Path;

use clap::Args;
use futures_util::StreamExt;
use outpost_protocol::tuf::{consistent_name, quote_target_path};
use serde_json::{json, Value};

use crate::error::{Result, SignerError};
use crate::localrepo::LocalRepo;
use crate::output::Output;

#[derive(Debug, Args, Clone)]
pub struct ServerArgs {
    /// Server base URL, e.g. http://127.0.0.1:8080 (omit to work offline).
    #[arg(long, env = "OUTPOST_SERVER")]
    pub server: Option<String>,
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
                client: reqwest::Client::new(),
            })),
        }
    }

    pub fn require(&self) -> Result<Server> {
        self.optional()?.ok_or_else(|| SignerError::Usage("--server (or OUTPOST_SERVER) is required".into()))
    }
}

async fn refused(what: &str, resp: reqwest::Response) -> SignerError {
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    let message = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or(body);
    SignerError::Server { what: what.into(), status, message }
}

fn http_err(url: &str, e: reqwest::Error) -> SignerError {
    SignerError::Http { url: url.into(), reason: outpost_protocol::display_chain(&e) }
}

impl Server {
    /// GET an admin API path (e.g. `/api/v1/devices`) with the bearer token.
    pub async fn get_json(&self, what: &str, path: &str) -> Result<Value> {
        let url = format!("{}{path}", self.url);
        let resp = self.client.get(&url).bearer_auth(&self.token).send().await.map_err(|e| http_err(&url, e))?;
        if !resp.status().is_success() {
            return Err(refused(what, resp).await);
        }
        resp.json().await.map_err(|e| http_err(&url, e))
    }

    /// POST a JSON body to an admin API path with the bearer token.
    pub async fn post_json(&self, what: &str, path: &str, body: &Value) -> Result<Value> {
        self.send_json(reqwest::Method::POST, what, path, body).await
    }

    /// Sends a JSON body with `method` to an admin API path with the bearer token.
    pub async fn send_json(&self, method: reqwest::Method, what: &str, path: &str, body: &Value) -> Result<Value> {
        let url = format!("{}{path}", self.url);
        let resp = self.client.request(method, &url).bearer_auth(&self.token).json(body).send().await.map_err(|e| http_err(&url, e))?;
        if !resp.status().is_success() {
            return Err(refused(what, resp).await);
        }
        resp.json().await.map_err(|e| http_err(&url, e))
    }

    async fn status(&self) -> Result<Value> {
        let url = format!("{}/api/v1/repository", self.url);
        let resp = self.client.get(&url).bearer_auth(&self.token).send().await.map_err(|e| http_err(&url, e))?;
        if !resp.status().is_success() {
            return Err(refused("repository status", resp).await);
        }
        resp.json().await.map_err(|e| http_err(&url, e))
    }

    async fn has_target(&self, name: &str) -> Result<bool> {
        let url = format!("{}/targets/{}", self.url, quote_target_path(name));
        let resp = self.client.head(&url).send().await.map_err(|e| http_err(&url, e))?;
        Ok(resp.status().is_success())
    }

    /// Streams a file to the server's staging area, with a progress bar on a terminal.
    pub async fn upload_target(&self, target_path: &str, file: &Path, show_progress: bool) -> Result<Value> {
        let url = format!("{}/api/v1/targets?path={}", self.url, quote_target_path(target_path));
        let f = tokio::fs::File::open(file).await.map_err(|e| SignerError::io("open", file, e))?;
        let len = f.metadata().await.map_err(|e| SignerError::io("stat", file, e))?.len();
        let bar = if show_progress { indicatif::ProgressBar::new(len) } else { indicatif::ProgressBar::hidden() };
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
        let resp = self
            .client
            .post(&url)
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_LENGTH, len)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await
            .map_err(|e| http_err(&url, e))?;
        bar.finish_and_clear();
        if !resp.status().is_success() {
            return Err(refused(&format!("upload of {target_path}"), resp).await);
        }
        resp.json().await.map_err(|e| http_err(&url, e))
    }

    async fn publish(&self, body: &Value) -> Result<Value> {
        let url = format!("{}/api/v1/publish", self.url);
        let resp = self.client.post(&url).bearer_auth(&self.token).json(body).send().await.map_err(|e| http_err(&url, e))?;
        if !resp.status().is_success() {
            return Err(refused("publish", resp).await);
        }
        resp.json().await.map_err(|e| http_err(&url, e))
    }
}

/// Uploads whatever of the local repository the server lacks: newer roots, newer
/// targets roles and their target files. `fresh` names a target file just published
/// from outside the repository directory.
pub async fn push(repo: &LocalRepo, server: &Server, fresh: &[(&str, &Path)], out: &Output) -> Result<Value> {
    let status = server.status().await?;
    let server_root = status.get("root_version").and_then(Value::as_u64).unwrap_or(0);
    let server_roles = status.get("roles").cloned().unwrap_or(json!({}));
    let (root, _) = repo.root()?;
    let mut roots = Vec::new();
    if server_root == 0 {
        return Err(SignerError::Usage(format!("{} has no trusted root; configure [repository].trusted_root on the server", server.url)));
    }
    for v in server_root + 1..=root.signed.version {
        let bytes = repo.root_version_bytes(v)?;
        roots.push(serde_json::from_slice::<Value>(&bytes).map_err(|e| SignerError::Usage(format!("{v}.root.json: {e}")))?);
    }
    let mut roles = serde_json::Map::new();
    let mut uploaded = Vec::new();
    for name in repo.role_names()? {
        let Some((env, bytes)) = repo.role(&name)? else { continue };
        let theirs = server_roles.get(&name).and_then(Value::as_u64).unwrap_or(0);
        let has_fresh = fresh.iter().any(|(p, _)| env.signed.targets.contains_key(*p));
        if env.signed.version < theirs || (env.signed.version == theirs && has_fresh) {
            return Err(SignerError::Usage(format!(
                "local {name} v{} is not newer than the server's v{theirs}: this repository directory is stale. \
                 Sync it with the pipeline's current copy before publishing",
                env.signed.version
            )));
        }
        if env.signed.version == theirs {
            continue;
        }
        for (path, t) in &env.signed.targets {
            let Some(sha) = t.hashes.get("sha256") else {
                return Err(SignerError::Usage(format!("target {path} has no sha256; Outpost servers name targets by sha256")));
            };
            let served = consistent_name(path, sha);
            if let Some((_, file)) = fresh.iter().find(|(p, _)| *p == path) {
                if !server.has_target(&served).await? {
                    server.upload_target(path, file, !out.json).await?;
                    uploaded.push(path.clone());
                }
                continue;
            }
            if server.has_target(&served).await? {
                continue;
            }
            let local = repo.target_file_path(path, sha);
            if !local.exists() {
                return Err(SignerError::Usage(format!(
                    "target {path} is neither on the server nor in {}",
                    local.display()
                )));
            }
            server.upload_target(path, &local, !out.json).await?;
            uploaded.push(path.clone());
        }
        roles.insert(name, serde_json::from_slice(&bytes).map_err(|e| SignerError::Usage(e.to_string()))?);
    }
    if roots.is_empty() && roles.is_empty() {
        return Ok(json!({"summary": "server is up to date", "roots": 0, "roles": [], "uploaded_targets": uploaded}));
    }
    let role_names: Vec<String> = roles.keys().cloned().collect();
    let result = server.publish(&json!({"roots": roots, "roles": roles})).await?;
    Ok(json!({
        "summary": format!("{} root(s), roles {:?}, {} target file(s); server now at snapshot v{} timestamp v{}",
            roots.len(), role_names, uploaded.len(),
            result.get("snapshot_version").and_then(Value::as_u64).unwrap_or(0),
            result.get("timestamp_version").and_then(Value::as_u64).unwrap_or(0)),
        "roots": roots.len(),
        "roles": role_names,
        "uploaded_targets": uploaded,
        "server": result,
    }))
}
