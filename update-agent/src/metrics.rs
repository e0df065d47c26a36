//! The agent's Prometheus metrics: one text encoder for everything it exposes (the
//! policy counters on `/metrics`, the installer's state in `STATE/metrics.prom` for
//! node_exporter's textfile collector), written with `prometheus-client`, and the
//! `/metrics` listener.
//!
//! The listener runs on a device that may be reachable by whoever is on its network,
//! so it takes nothing from a client on trust: hyper parses the requests; at most
//! `max_connections` connections are open at once (more wait in the kernel's backlog),
//! at most `max_connections_per_peer` from one address (more are closed at once); a
//! client has `header_timeout` to send its whole request head and `request_timeout` for
//! the whole exchange; every connection serves one request. A failed `accept()` (no
//! descriptors left, EMFILE) backs off instead of spinning.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use crate::error::{AgentError, Result};

/// The content type of what [`Exposition::encode`] writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

#[derive(Debug)]
struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    samples: Vec<(Vec<(&'static str, String)>, i64)>,
}

/// Metric families gathered for one scrape (or one write of the textfile), in the
/// order they were added. Counter names are given without `_total`, which the
/// encoder appends to their samples.
#[derive(Debug, Default)]
pub struct Exposition {
    families: Vec<Family>,
}

impl Exposition {
    fn add(&mut self, name: &'static str, help: &'static str, kind: Kind, labels: Vec<(&'static str, String)>, value: i64) {
        match self.families.last_mut() {
            Some(f) if f.name == name => f.samples.push((labels, value)),
            _ => self.families.push(Family { name, help, kind, samples: vec![(labels, value)] }),
        }
    }

    /// A gauge sample; samples of one family are added one after the other.
    pub fn gauge(&mut self, name: &'static str, help: &'static str, labels: Vec<(&'static str, String)>, value: i64) {
        self.add(name, help, Kind::Gauge, labels, value);
    }

    /// A counter sample (exposed as `NAME_total`).
    pub fn counter(&mut self, name: &'static str, help: &'static str, labels: Vec<(&'static str, String)>, value: u64) {
        self.add(name, help, Kind::Counter, labels, i64::try_from(value).unwrap_or(i64::MAX));
    }

    /// The OpenMetrics text of these families (which Prometheus and node_exporter's
    /// textfile collector read). Label values are escaped here.
    pub fn encode(self) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// A label value in the text format: backslash, double quote and newline escaped
/// (prometheus-client writes values as given).
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl prometheus_client::collector::Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::result::Result<(), std::fmt::Error> {
        for f in &self.families {
            let metric_type = match f.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
            };
            let mut family = encoder.encode_descriptor(f.name, f.help, None, metric_type)?;
            if let [(labels, value)] = f.samples.as_slice() {
                if labels.is_empty() {
                    // One sample without labels (`name 1`, not `name{} 1`).
                    encode_value(f.kind, *value, family)?;
                    continue;
                }
            }
            for (labels, value) in &f.samples {
                let labels: Vec<(&str, String)> = labels.iter().map(|(k, v)| (*k, escape(v))).collect();
                encode_value(f.kind, *value, family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

fn encode_value(kind: Kind, value: i64, sample: prometheus_client::encoding::MetricEncoder<'_>) -> std::result::Result<(), std::fmt::Error> {
    match kind {
        Kind::Counter => ConstCounter::new(u64::try_from(value).unwrap_or(0)).encode(sample),
        Kind::Gauge => ConstGauge::new(value).encode(sample),
    }
}

/// Limits of the `/metrics` listener (`[policy] metrics_*` in agent.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Connections open at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Connections open at once from one IP address; more are closed at once.
    pub max_connections_per_peer: usize,
    /// Time for the whole request head, counted from the connection's acceptance.
    pub header_timeout: Duration,
    /// Time for the whole exchange, request and answer.
    pub request_timeout: Duration,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits {
            max_connections: 64,
            max_connections_per_peer: 8,
            header_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// What a scrape answers with: the current metrics, rendered when asked.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Binds `addr` and serves `GET /metrics` with `render` until the process ends.
pub async fn serve(addr: SocketAddr, limits: ListenerLimits, render: Render) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| AgentError::Policy(format!("metrics listener on {addr}: {e}")))?;
    tokio::spawn(accept_loop(listener, limits, render));
    Ok(())
}

/// The pause after `failures` accept errors in a row: 10 ms, doubling up to 1 s.
pub fn accept_backoff(failures: u32) -> Duration {
    Duration::from_millis(10u64.saturating_mul(1u64 << failures.saturating_sub(1).min(7))).min(Duration::from_secs(1))
}

fn router(render: Render) -> axum::Router {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let render = render.clone();
                async move {
                    // Reading the BPF counters is a few syscalls under the engine's lock.
                    match tokio::task::spawn_blocking(move || render()).await {
                        Ok(body) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
                        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "metrics unavailable\n").into_response(),
                    }
                }
            }),
        )
        .fallback(|| async { (StatusCode::NOT_FOUND, "only GET /metrics is served here\n") })
}

/// Open connections per peer address; a slot is given back when its guard drops.
#[derive(Clone, Default)]
struct Peers(Arc<Mutex<HashMap<IpAddr, usize>>>);

struct PeerSlot {
    peers: Peers,
    ip: IpAddr,
}

impl Peers {
    fn take(&self, ip: IpAddr, max: usize) -> Option<PeerSlot> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PeerSlot { peers: self.clone(), ip })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut map = self.peers.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, limits: ListenerLimits, render: Render) {
    let app = hyper_util::service::TowerToHyperService::new(router(render));
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let peers = Peers::default();
    let mut failures: u32 = 0;
    loop {
        // A slot first: at the limit, new connections wait in the accept queue.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let (sock, peer) = match listener.accept().await {
            Ok(c) => {
                failures = 0;
                c
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let pause = accept_backoff(failures);
                if failures.is_power_of_two() {
                    tracing::warn!(error = %e, failures, ?pause, "metrics listener cannot accept a connection; backing off");
                }
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        let Some(peer_slot) = peers.take(peer.ip(), limits.max_connections_per_peer) else {
            tracing::debug!(%peer, "metrics: too many connections from this address; closed");
            continue;
        };
        let app = app.clone();
        tokio::spawn(async move {
            let _held = (slot, peer_slot);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(false)
                .max_buf_size(16 * 1024)
                .serve_connection(hyper_util::rt::TokioIo::new(sock), app);
            match tokio::time::timeout(limits.request_timeout, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics connection ended"),
                Err(_) => tracing::debug!(%peer, "metrics connection closed at the request deadline"),
            }
        });
    }
}

/// The installer's state for node_exporter's textfile collector, written with the
/// same encoder as the agent's `/metrics` (values from signed metadata escaped):
/// the install phase, the running release (version, sha256), how many releases were
/// rolled back, and the current download's durable and total bytes.
pub fn write_install_textfile(path: &std::path::Path, phase: &str, running: Option<(&str, &str)>, rolled_back: u64, progress: Option<(u64, u64)>) {
    let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let mut m = Exposition::default();
    m.gauge("outpost_agent_install_phase", "Current install phase (1 = current).", vec![("phase", phase.to_owned())], 1);
    if let Some((version, sha256)) = running {
        m.gauge("outpost_agent_running_release_info", "The release the device runs.", vec![("version", version.to_owned()), ("sha256", sha256.to_owned())], 1);
    }
    m.gauge("outpost_agent_rolled_back_releases", "Releases rolled back on this device.", vec![], gauge(rolled_back));
    if let Some((done, total)) = progress {
        m.gauge("outpost_agent_download_durable_bytes", "Bytes of the current download kept durably.", vec![], gauge(done));
        m.gauge("outpost_agent_download_total_bytes", "Length of the current download.", vec![], gauge(total));
    }
    if let Err(e) = outpost_fsio::write_atomic(path, m.encode().as_bytes()) {
        tracing::warn!(error = %e, "cannot write metrics file");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_errors_back_off_up_to_a_second() {
        assert_eq!(accept_backoff(1), Duration::from_millis(10));
        assert_eq!(accept_backoff(2), Duration::from_millis(20));
        assert_eq!(accept_backoff(5), Duration::from_millis(160));
        assert_eq!(accept_backoff(8), Duration::from_secs(1));
        assert_eq!(accept_backoff(u32::MAX), Duration::from_secs(1));
        // 100 failures in a row take more than a minute, not a busy loop.
        let total: Duration = (1..=100).map(accept_backoff).sum();
        assert!(total > Duration::from_secs(60), "{total:?}");
    }

    #[test]
    fn exposition_keeps_names_labels_and_escapes_values() {
        let mut m = Exposition::default();
        m.gauge("outpost_policy_enforcing", "1 when enforcing.", vec![], 1);
        m.gauge("outpost_policy_info", "The enforced policy.", vec![("name", "ed\"ge".into()), ("version", "3".into())], 1);
        m.counter("outpost_policy_packets", "Packets by verdict.", vec![("verdict", "allowed".into())], 12);
        m.counter("outpost_policy_packets", "Packets by verdict.", vec![("verdict", "denied".into())], 3);
        let text = m.encode();
        assert!(text.contains("\noutpost_policy_enforcing 1\n"), "{text}");
        assert!(text.contains("outpost_policy_info{name=\"ed\\\"ge\",version=\"3\"} 1\n"), "{text}");
        assert!(text.contains("# TYPE outpost_policy_packets counter\n"), "{text}");
        assert!(text.contains("outpost_policy_packets_total{verdict=\"allowed\"} 12\n"), "{text}");
        assert!(text.contains("outpost_policy_packets_total{verdict=\"denied\"} 3\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn peer_slots_are_capped_and_given_back() {
        let peers = Peers::default();
        let ip: IpAddr = "127.0.0.2".parse().expect("ip");
        let a = peers.take(ip, 2).expect("first");
        let _b = peers.take(ip, 2).expect("second");
        assert!(peers.take(ip, 2).is_none(), "third from one address");
        assert!(peers.take("127.0.0.1".parse().expect("ip"), 2).is_some(), "another address");
        drop(a);
        assert!(peers.take(ip, 2).is_some(), "a slot given back");
    }

    /// A client that sends its request head a byte at a time is closed at the header
    /// timeout, and meanwhile a normal scrape answers.
    #[tokio::test]
    async fn a_slow_request_head_is_closed_and_does_not_block_scrapes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let limits = ListenerLimits { header_timeout: Duration::from_millis(600), ..ListenerLimits::default() };
        let probe = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = probe.local_addr().expect("addr");
        drop(probe);
        serve(addr, limits, Arc::new(|| {
            let mut m = Exposition::default();
            m.gauge("up_test", "Test.", vec![], 1);
            m.encode()
        }))
        .await
        .expect("serve");
        let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let started = std::time::Instant::now();
        let mut closed = false;
        for b in b"GET /metrics HTTP/1.1\r\nHost: x\r\n" {
            if slow.write_all(&[*b]).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut buf = Vec::new();
        if !closed {
            let n = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
            closed = matches!(n, Ok(Ok(_)) | Ok(Err(_)));
        }
        assert!(closed, "a slow request head was not closed");
        assert!(started.elapsed() < Duration::from_secs(5), "closed after {:?}", started.elapsed());
        let mut ok = tokio::net::TcpStream::connect(addr).await.expect("connect");
        ok.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), ok.read_to_string(&mut answer)).await.expect("answer in time").expect("read");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("up_test 1"), "{answer}");
    }
}
