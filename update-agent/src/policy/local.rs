//! Enforcement by hand: `policy enforce FILE` (an unsigned local bundle, in the
//! foreground) and `policy detach` (the explicit end of enforcement).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use outpost_ebpf::SwapReport;

use super::{cgroup2_mount, lock, serve_metrics, PolicyEngine, Source};
use crate::error::{AgentError, Result};
use crate::mode::Format;

/// `outpost-agent policy detach`: the explicit end of enforcement.
pub fn detach(pin_dir: &Path, format: Format) -> Result<()> {
    let d = outpost_ebpf::detach_pinned(pin_dir).map_err(|e| AgentError::Policy(e.to_string()))?;
    tracing::warn!(pin_dir = %pin_dir.display(), links = d.links.len(), maps = d.maps, "network policy enforcement removed by policy detach");
    if format == Format::Json {
        let links: Vec<String> = d.links.iter().map(|l| l.display().to_string()).collect();
        println!("{}", serde_json::json!({"event": "detached", "pin_dir": pin_dir.display().to_string(), "links": links, "maps": d.maps}));
    } else if d.links.is_empty() && d.maps == 0 {
        println!("nothing pinned under {}: no network policy was enforced from there", pin_dir.display());
    } else {
        println!("detached: {} program link(s) and {} map(s) unpinned from {}; nothing filters any more", d.links.len(), d.maps, pin_dir.display());
    }
    Ok(())
}

/// `outpost-agent policy enforce FILE`: enforce a local bundle in the foreground (for
/// trying a bundle on a device; the daemon enforces only signed bundles). SIGHUP
/// re-reads FILE; SIGINT/SIGTERM detach everything and exit.
pub async fn enforce_local(file: &Path, unsigned: crate::danger::UnsignedPolicy, cgroup_root: Option<PathBuf>, metrics: Option<std::net::SocketAddr>, pin_dir: &Path, format: Format) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let root = cgroup_root.or_else(cgroup2_mount).ok_or_else(|| AgentError::Policy("no cgroup v2 mount found; pass --cgroup-root".into()))?;
    // Handlers first: a SIGHUP sent as soon as the bundle is announced is a re-read,
    // never the default action (exit).
    let mut hup = signal(SignalKind::hangup()).map_err(|e| AgentError::Policy(format!("SIGHUP handler: {e}")))?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| AgentError::Policy(format!("SIGTERM handler: {e}")))?;
    let engine = Arc::new(Mutex::new(PolicyEngine::start(&root, None, pin_dir)?));
    let emit = |event: &str, r: Option<&SwapReport>, e: &mut PolicyEngine| {
        let (name, version, applied) = match e.current() {
            Some((n, v, a)) => (n.to_string(), v, Some(a)),
            None => (String::new(), 0, None),
        };
        let line = serde_json::json!({
            "event": event, "name": name, "version": version, "applied": applied,
            "generation": r.map(|r| r.generation), "rules": r.map(|r| r.rules), "entries": r.map(|r| r.entries),
            "to_flip_ms": r.map(|r| r.to_flip.as_secs_f64() * 1e3), "total_ms": r.map(|r| r.total.as_secs_f64() * 1e3),
            "refused": e.refused,
        });
        if format == Format::Json {
            println!("{line}");
        } else {
            println!("{event}: {name} v{version} ({}){}", applied.map(|a| format!("{a:?}").to_lowercase()).unwrap_or_default(), r.map(|r| format!(", {} rules in generation {}, applied in {:.2} ms", r.rules, r.generation, r.to_flip.as_secs_f64() * 1e3)).unwrap_or_default());
        }
    };
    let read = |f: &Path| std::fs::read(f).map_err(|e| AgentError::io("read", f, e));
    {
        let bytes = read(file)?;
        let mut e = lock(&engine);
        let r = e.offer(&bytes, Source::Unsigned(unsigned), Utc::now())?;
        emit("applied", r.as_ref(), &mut e);
    }
    if let Some(addr) = metrics {
        serve_metrics(addr, crate::metrics::ListenerLimits::default(), engine.clone()).await?;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = hup.recv() => {
                let mut e = lock(&engine);
                match read(file).and_then(|b| e.offer(&b, Source::Unsigned(unsigned), Utc::now())) {
                    Ok(Some(r)) => emit("applied", Some(&r), &mut e),
                    Ok(None) => emit("unchanged", None, &mut e),
                    Err(_) => emit("refused", None, &mut e),
                }
            }
            _ = tick.tick() => {
                let mut e = lock(&engine);
                if let Some(r) = e.tick(Utc::now()) {
                    emit("essential", Some(&r), &mut e);
                }
                e.log_denies();
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    // The links and maps are pinned: the policy stays enforced after this process.
    drop(engine);
    if format == Format::Json {
        println!("{}", serde_json::json!({"event": "stopped", "pin_dir": pin_dir.display().to_string()}));
    } else {
        println!("stopped: the policy stays enforced (pinned in {}); `outpost-agent policy detach` removes it", pin_dir.display());
    }
    Ok(())
}
