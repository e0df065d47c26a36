//! `outpost-server`: serves the TUF image repository, takes offline-signed uploads
//! from pipelines, and keeps snapshot and timestamp fresh with its online keys.

mod api;
pub mod config;
pub mod director;
mod ekcert;
mod error;
mod fleet;
mod http;
pub mod repository;
pub mod storage;
mod targetfiles;
pub mod tls;

use std::future::IntoFuture;
use std::sync::Arc;

use outpost_fsio::sdnotify::{Notice, Notifier};

pub use config::{ServerConfig, Transport};
pub use api::{app, ApiError, AppState};
pub use error::ServerError;
pub use fleet::deviceca::make_ca as make_device_ca;

/// Opens the repository and store, starts the re-signing task and serves until
/// SIGINT/SIGTERM.
pub async fn serve(config: ServerConfig) -> Result<(), ServerError> {
    let repo = Arc::new(repository::Repository::open(&config.repository)?);
    let ek_cas = Arc::new(ekcert::EkCaStore::load(&config.ek_ca_certificates, &config.config_path)?);
    let store = Arc::new(storage::Store::open(&config.database).await?);
    tracing::info!(backend = store.backend(), "state store open");
    let director = Arc::new(director::Director::open(&config.director_key, config.director_targets_expiry)?);
    let device_ca = match &config.device_ca {
        Some(settings) => {
            let ca = fleet::deviceca::DeviceCa::load(settings)?;
            tracing::info!(trust_domain = %settings.trust_domain, lifetime = ?settings.lifetime,
                require_client_certificate = settings.require_client_certificate, "device CA loaded");
            Some(Arc::new(ca))
        }
        None => None,
    };
    let state = AppState {
        device_ca: device_ca.clone(),
        director,
        repo: repo.clone(),
        store: store.clone(),
        max_upload_bytes: config.max_upload_bytes,
        nonce_lifetime: config.nonce_lifetime,
        challenge_lifetime: config.challenge_lifetime,
        ek_cas,
        accept_uncertified_eks: config.accept_uncertified_eks,
        measurement: Arc::new(config.measurement.clone()),
    };
    warn_about_trust(&config);
    let indexed = fleet::sbom::index_release_sboms(&repo, &store).await;
    if indexed > 0 {
        tracing::info!(indexed, "indexed SBOMs of published releases");
    }
    let resign_repo = repo.clone();
    let state_store = store.clone();
    // The certificate is read before the port is bound: a server that cannot serve TLS
    // never says it is ready.
    let cert = match &config.transport {
        Transport::Tls(settings) => {
            let (cert, summary) = tls::ServerCert::load(settings)?;
            tls::log_loaded("loaded", &summary);
            Some(cert)
        }
        Transport::Plain => None,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| ServerError::io("listen on", config.listen.to_string(), e))?;
    let addr = listener.local_addr().map_err(|e| ServerError::io("listen on", config.listen.to_string(), e))?;
    tracing::info!(%addr, tls = cert.is_some(), "outpost-server listening");
    // systemd (Type=notify): ready once the listener is bound; watchdog pings from a
    // task of this runtime; STOPPING=1 when the shutdown signal arrives.
    let systemd = Arc::new(Notifier::from_env_or_report(|e| tracing::warn!(error = %e, "not notifying systemd")));
    // READY=1 goes first: the watchdog task, once spawned, may run on another worker
    // at once, and a manager (or a test) that hears WATCHDOG=1 before READY=1 sees a
    // service pinging before it said it serves.
    systemd.notify_or_report(Notice::Ready, report_notify);
    let watchdog = systemd.spawn_watchdog();
    let interval = config.resign_interval;
    let resigner = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            match resign_repo.resign_if_due(chrono::Utc::now()).await {
                Ok(Some((snapshot, timestamp))) => {
                    tracing::info!(snapshot, timestamp, "re-signed online metadata");
                    let _ = store.log("server", "resign", &serde_json::json!({"snapshot_version": snapshot, "timestamp_version": timestamp})).await;
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "re-signing online metadata failed"),
            }
        }
    });
    let tick_store = state_store.clone();
    let tick_every = config.rollout_tick;
    let ticker = tokio::spawn(async move {
        let mut tick = tokio::time::interval(tick_every);
        let mut certificates_purged: Option<std::time::Instant> = None;
        loop {
            tick.tick().await;
            match tick_store.rollout_tick(chrono::Utc::now().timestamp()).await {
                Ok(transitions) => director::log_transitions(&tick_store, &transitions).await,
                Err(e) => tracing::error!(error = %e, "re-evaluating rollouts failed"),
            }
            if let Err(e) = tick_store.purge_nonces(chrono::Utc::now().timestamp_millis()).await {
                tracing::error!(error = %e, "removing expired nonces failed");
            }
            // Hourly: certificates expired for longer than CERTIFICATE_RETENTION (each
            // device's latest stays).
            if certificates_purged.is_none_or(|at| at.elapsed() >= CERTIFICATE_PURGE_EVERY) {
                certificates_purged = Some(std::time::Instant::now());
                let before = chrono::Utc::now().timestamp() - CERTIFICATE_RETENTION.as_secs() as i64;
                match tick_store.purge_certificates(before).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(removed = n, "removed client certificates expired for over a week"),
                    Err(e) => tracing::error!(error = %e, "removing expired client certificates failed"),
                }
            }
        }
    });
    let stop = std::sync::Arc::new(tokio::sync::Notify::new());
    let stop_rx = stop.clone();
    let shutdown = async move {
        shutdown_signal().await;
        systemd.notify_or_report(Notice::Stopping, report_notify);
        stop.notify_one();
    };
    let mut reloader = None;
    let server: std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>> = match cert {
        Some(cert) => {
            reloader = Some(tls::reload_on_sighup(cert.clone())?);
            let listener = tls::TlsListener::new(listener, &cert, device_ca)?;
            let app = app(state).into_make_service_with_connect_info::<tls::Peer>();
            Box::pin(axum::serve(listener, app).with_graceful_shutdown(shutdown).into_future())
        }
        None => Box::pin(axum::serve(listener, app(state)).with_graceful_shutdown(shutdown).into_future()),
    };
    // In-flight requests get a grace period; a stalled client cannot hold the
    // server up forever.
    let result = tokio::select! {
        r = server => r,
        _ = async {
            stop_rx.notified().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "in-flight requests did not finish in time; closing them");
            Ok(())
        }
    };
    resigner.abort();
    ticker.abort();
    if let Some(reloader) = reloader {
        reloader.abort();
    }
    drop(watchdog);
    repo.remove_partial_uploads();
    tracing::info!("outpost-server stopped");
    result.map_err(|e| ServerError::io("serve", addr.to_string(), e))
}

/// Says at start what this server accepts that proves less than it seems.
fn warn_about_trust(config: &ServerConfig) {
    if matches!(config.transport, Transport::Plain) {
        tracing::warn!(
            listen = %config.listen,
            "plain_http = true: no TLS on the listener, so what the server and its clients say can be read and changed \
             on the way; only behind a TLS-terminating proxy, or for tests on loopback"
        );
    }
    if let Some(ca) = &config.device_ca {
        if ca.lifetime < fleet::deviceca::MIN_LIFETIME {
            tracing::warn!(lifetime = ?ca.lifetime, "device_ca.testbed_short_lifetime: client certificates live less than 5 minutes; for tests only");
        }
        if !ca.require_client_certificate {
            tracing::warn!("device_ca.require_client_certificate = false: device routes serve callers without a device certificate");
        }
    }
    if config.accept_uncertified_eks {
        tracing::warn!(
            "attestation.accept_uncertified_eks = true: devices enroll without an EK certificate chain, so anyone holding an \
             enrollment token can enroll a software TPM; configure attestation.ek_ca_certificates for real fleets"
        );
    } else if config.ek_ca_certificates.is_empty() {
        tracing::warn!(
            "no attestation.ek_ca_certificates: no device can enroll until the TPM makers' CAs are configured \
             (or attestation.accept_uncertified_eks = true for software TPMs)"
        );
    }
    for (class, policy) in config.measurement.iter().filter(|(_, p)| p.testbed()) {
        let pcrs: Vec<u32> = policy.pcrs().collect();
        tracing::warn!(
            class = %class, ?pcrs,
            "hardware class is a testbed: its measurements may come from PCRs software can reset, so root on such a device can forge its attestation"
        );
    }
    if config.measurement.is_empty() {
        tracing::warn!("no attestation.classes: no hardware class has a measurement policy, so no device can attest");
    }
}

/// A notice systemd did not get: logged; the server keeps serving.
fn report_notify(e: outpost_fsio::sdnotify::NotifyError) {
    tracing::warn!(error = %e, "notifying systemd failed");
}

const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);
/// How long the store keeps an expired client certificate (a device's latest is kept
/// regardless): long enough for `device show` to tell what a device last held.
const CERTIFICATE_RETENTION: std::time::Duration = std::time::Duration::from_secs(7 * 86_400);
/// How often the ticker purges them.
const CERTIFICATE_PURGE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested; finishing in-flight requests");
}
