//! TLS benchmark driver (run by bench/tls.sh; method in bench/README.md, section *TLS*).
//!
//! Two enrolled devices sharing one swtpm: one of a plain-HTTP server, one of a TLS
//! server whose device routes require the device CA's client certificate. Their TPM
//! commands pass a relay in this process that counts and times them by command code,
//! so "no TPM signature" is counted at the TPM's socket, not inferred from timings.
//! 1. `signing`: the device's TLS key through rustls' `SigningKey`/`Signer` (what a
//!    handshake calls), directly and through the relay, against ring's ECDSA P-256;
//! 2. `connections`: new connections doing GET /healthz in five modes, interleaved;
//! 3. `checkins`: sequential attested check-ins on both servers, and one over TLS
//!    without the certificate, which the server must refuse;
//! 4. `renewals`: the certificate dropped and re-issued by a check-in, then one more.
//!
//! Usage: tls_bench PLAIN_CONFIG TLS_CONFIG PLAIN_PID TLS_PID CA_FILE SECS ROUNDS CHECKINS RENEWALS SIGNS
//! (JSON on stdout; a claim that does not hold ends the run with a panic naming it).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use outpost_agent::attest::{self, DeviceState};
use outpost_agent::config::AgentConfig;
use outpost_agent::devicecert::DeviceIdentity;
use outpost_agent::{AgentError, Fetcher};
use outpost_protocol::attest::{DeviceHealth, Verdict};
use ring::signature::{EcdsaKeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption, WebPkiServerVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::sign::SigningKey;
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde_json::{json, Value};

const TPM2_CC_SIGN: u32 = 0x15D;
const TPM2_CC_CERTIFY: u32 = 0x148;
const TPM2_CC_QUOTE: u32 = 0x158;

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat of the server");
    // Fields after the command name (which may contain spaces) start after ')'.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    (f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime")) / 100.0
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[(((sorted.len() as f64 - 1.0) * p).round() as usize).min(sorted.len() - 1)]
}

/// Per TPM command code: how many crossed the relay, and the seconds from each command
/// to the first bytes of its answer. At one moment, or the difference of two.
#[derive(Debug, Clone, Default)]
struct Tally(BTreeMap<u32, (u64, f64)>);

impl Tally {
    fn count(&self, code: u32) -> u64 { self.0.get(&code).map_or(0, |c| c.0) }
    fn since(&self, earlier: &Tally) -> Tally {
        let diff = |(k, (n, s)): (&u32, &(u64, f64))| {
            let (n0, s0) = earlier.0.get(k).copied().unwrap_or_default();
            (*k, (n - n0, s - s0))
        };
        Tally(self.0.iter().map(diff).filter(|(_, (n, _))| *n > 0).collect())
    }
    fn add(&mut self, t: &Tally) {
        for (k, (n, s)) in &t.0 {
            let e = self.0.entry(*k).or_default();
            *e = (e.0 + n, e.1 + s);
        }
    }
    fn json(&self) -> Value {
        let by: serde_json::Map<String, Value> = self.0.iter().map(|(k, (n, s))| (command_name(*k), json!({"count": n, "ms": s * 1000.0}))).collect();
        json!({"sign": self.count(TPM2_CC_SIGN), "certify": self.count(TPM2_CC_CERTIFY), "quote": self.count(TPM2_CC_QUOTE),
               "commands": self.0.values().map(|c| c.0).sum::<u64>(), "by_command": by})
    }
}

fn command_name(code: u32) -> String {
    let known = [(0x131, "CreatePrimary"), (0x157, "Load"), (0x15D, "Sign"), (0x165, "FlushContext"), (0x158, "Quote"), (0x148, "Certify"),
                 (0x176, "StartAuthSession"), (0x17A, "GetCapability"), (0x173, "ReadPublic"), (0x17E, "PCR_Read"), (0x153, "Create"),
                 (0x151, "PolicySecret"), (0x14E, "NV_Read"), (0x169, "NV_ReadPublic")];
    known.iter().find(|(c, _)| *c == code).map_or_else(|| format!("0x{code:03x}"), |(_, n)| (*n).to_owned())
}

/// What crossed the relay to one swtpm.
#[derive(Default)]
struct TpmCounts {
    tally: Mutex<Tally>,
    /// Set when the stream did not parse as TPM commands: the counts are then void.
    garbled: AtomicBool,
}

/// The command of one connection waiting for its answer, and since when.
type Inflight = Mutex<Option<(u32, Instant)>>;

impl TpmCounts {
    fn tally(&self) -> Tally {
        assert!(!self.garbled.load(Ordering::SeqCst), "the TPM relay saw bytes that are not TPM commands: its counts are void");
        self.tally.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Counts the whole commands at the front of `pending` (header: tag u16, size u32,
    /// command code u32, big-endian) and removes them.
    fn take(&self, pending: &mut Vec<u8>, inflight: &Inflight) {
        while pending.len() >= 10 {
            let size = u32::from_be_bytes([pending[2], pending[3], pending[4], pending[5]]) as usize;
            if !(10..=1 << 16).contains(&size) {
                self.garbled.store(true, Ordering::SeqCst);
                pending.clear();
                return;
            }
            if pending.len() < size {
                return;
            }
            let code = u32::from_be_bytes([pending[6], pending[7], pending[8], pending[9]]);
            self.tally.lock().unwrap_or_else(|p| p.into_inner()).0.entry(code).or_default().0 += 1;
            *inflight.lock().unwrap_or_else(|p| p.into_inner()) = Some((code, Instant::now()));
            pending.drain(..size);
        }
    }

    fn answered(&self, inflight: &Inflight) {
        if let Some((code, since)) = inflight.lock().unwrap_or_else(|p| p.into_inner()).take() {
            self.tally.lock().unwrap_or_else(|p| p.into_inner()).0.entry(code).or_default().1 += since.elapsed().as_secs_f64();
        }
    }
}

/// A relay on 127.0.0.1 (data port P and control port P+1, as swtpm's TCTI expects)
/// to the swtpm at `upstream`, counting and timing the commands sent to its data port.
struct TpmRelay {
    port: u16,
    counts: Arc<TpmCounts>,
}

impl TpmRelay {
    fn start(upstream: u16) -> TpmRelay {
        let (data, ctrl, port) = loop {
            let data = TcpListener::bind("127.0.0.1:0").expect("bind the TPM relay");
            let port = data.local_addr().expect("relay address").port();
            if let Some(ctrl) = port.checked_add(1).and_then(|p| TcpListener::bind(("127.0.0.1", p)).ok()) {
                break (data, ctrl, port);
            }
        };
        let counts = Arc::new(TpmCounts::default());
        relay(data, upstream, Some(counts.clone()));
        relay(ctrl, upstream + 1, None);
        TpmRelay { port, counts }
    }
}

/// Which way a relay direction carries bytes (and what it watches of them).
enum Flow { Commands, Answers }

fn relay(listener: TcpListener, upstream: u16, counts: Option<Arc<TpmCounts>>) {
    std::thread::spawn(move || {
        for down in listener.incoming().flatten() {
            // Refused upstream: the agent's TCTI sees its connection closed.
            let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
            let _ = (down.set_nodelay(true), up.set_nodelay(true));
            let (Ok(down_w), Ok(up_r)) = (down.try_clone(), up.try_clone()) else { continue };
            let watch = counts.clone().map(|c| (c, Arc::new(Inflight::default())));
            let answers = watch.clone();
            std::thread::spawn(move || pump(up_r, down_w, Flow::Answers, answers));
            std::thread::spawn(move || pump(down, up, Flow::Commands, watch));
        }
    });
}

/// Copies `from` to `to`; commands are counted before they go on (so before their
/// answer can arrive), answers end their command's time when their first bytes come.
fn pump(mut from: TcpStream, mut to: TcpStream, flow: Flow, watch: Option<(Arc<TpmCounts>, Arc<Inflight>)>) {
    let (mut buf, mut pending) = (vec![0u8; 16384], Vec::new());
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        match (&watch, &flow) {
            (Some((c, inflight)), Flow::Commands) => {
                pending.extend_from_slice(&buf[..n]);
                c.take(&mut pending, inflight);
            }
            (Some((c, inflight)), Flow::Answers) => c.answered(inflight),
            (None, _) => {}
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// The verifier of the configured CA, counting the certificates it verifies: a TLS 1.3
/// client verifies the server's certificate in a full handshake, not in a resumed one.
#[derive(Debug)]
struct CountingVerifier {
    inner: Arc<WebPkiServerVerifier>,
    full: AtomicU64,
}

impl ServerCertVerifier for CountingVerifier {
    fn verify_server_cert(&self, ee: &CertificateDer<'_>, im: &[CertificateDer<'_>], name: &ServerName<'_>, ocsp: &[u8], now: UnixTime) -> Result<ServerCertVerified, rustls::Error> {
        self.full.fetch_add(1, Ordering::SeqCst);
        self.inner.verify_server_cert(ee, im, name, ocsp, now)
    }
    fn verify_tls12_signature(&self, m: &[u8], c: &CertificateDer<'_>, d: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> { self.inner.verify_tls12_signature(m, c, d) }
    fn verify_tls13_signature(&self, m: &[u8], c: &CertificateDer<'_>, d: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> { self.inner.verify_tls13_signature(m, c, d) }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> { self.inner.supported_verify_schemes() }
}

/// A client trusting `ca` the way the agent does, with `resolver` as its identity and
/// `resumption`, keeping no idle connection (each request connects anew).
fn tls_client(ca: &Path, resolver: Option<Arc<dyn ResolvesClientCert>>, resumption: Resumption) -> (reqwest::Client, Arc<CountingVerifier>) {
    let trust = outpost_httpclient::trust(Some(ca), "CA file").expect("the CA file");
    let mut config = match resolver {
        Some(r) => trust.config.with_client_cert_resolver(r),
        None => trust.config.with_no_client_auth(),
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("the CA file") {
        roots.add(cert.expect("a CA certificate")).expect("a CA certificate");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build().expect("the verifier");
    let verifier = Arc::new(CountingVerifier { inner, full: AtomicU64::new(0) });
    config.dangerous().set_certificate_verifier(verifier.clone());
    config.resumption = resumption;
    let client = outpost_httpclient::build(reqwest::Client::builder().pool_max_idle_per_host(0), config).expect("HTTP client");
    (client, verifier)
}

/// An enrolled device whose TPM commands go through a counting relay.
struct Device {
    config: AgentConfig,
    fetcher: Fetcher,
    relay: TpmRelay,
    /// The TCTI to swtpm itself, without the relay.
    direct_tcti: String,
    server_pid: u32,
}

fn device(path: &str, pid: &str) -> Device {
    let mut config = AgentConfig::load(Path::new(path)).expect("agent config");
    let tpm = config.tpm.as_mut().expect("a [tpm] section in the agent config");
    let direct_tcti = tpm.tcti.clone();
    let upstream: u16 = direct_tcti.split("port=").nth(1).and_then(|p| p.split(',').next()).and_then(|p| p.parse().ok()).expect("a swtpm:host=...,port=N TCTI");
    let relay = TpmRelay::start(upstream);
    tpm.tcti = format!("swtpm:host=127.0.0.1,port={}", relay.port);
    let fetcher = config.device_fetcher().expect("the device's HTTP client");
    Device { config, fetcher, relay, direct_tcti, server_pid: pid.parse().expect("server pid") }
}

/// Signs `n` messages the size of a TLS 1.3 CertificateVerify input through `key`'s
/// `Signer`, checks each signature with the key's public key; each sign's time, ms.
fn time_signs(key: &dyn SigningKey, n: usize) -> Vec<f64> {
    let spki = key.public_key().expect("the key's public key");
    let point = spki.as_ref()[spki.as_ref().len() - 65..].to_vec();
    let public = UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, point);
    (0..n)
        .map(|i| {
            let mut message = vec![0x20u8; 64];
            message.extend_from_slice(b"TLS 1.3, client CertificateVerify\0");
            message.extend_from_slice(&[i as u8; 32]);
            let signer = key.choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256]).expect("ECDSA P-256 SHA-256 offered");
            let t = Instant::now();
            let signature = signer.sign(&message).expect("sign");
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            public.verify(&message, &signature).expect("the signature verifies under the key's public key");
            ms
        })
        .collect()
}

fn summary(ms: &[f64]) -> Value {
    json!({"count": ms.len(), "mean_ms": ms.iter().sum::<f64>() / ms.len() as f64, "p50_ms": percentile(ms, 0.5), "p99_ms": percentile(ms, 0.99)})
}

/// TPM signing (directly and through the counting relay) against ring in-process.
fn signing(dev: &Device, n: usize) -> Value {
    let schemes = [SignatureScheme::ECDSA_NISTP256_SHA256];
    let direct = DeviceIdentity::load(&dev.direct_tcti, &dev.config.state_dir).expect("the device's identity");
    let key = direct.resolve(&[], &schemes).expect("the TLS device has a usable client certificate").key.clone();
    let tpm_direct = time_signs(key.as_ref(), n);
    let relayed = dev.fetcher.identity().expect("identity").resolve(&[], &schemes).expect("usable certificate").key.clone();
    let before = dev.relay.counts.tally();
    let tpm_relayed = time_signs(relayed.as_ref(), n);
    let counted = dev.relay.counts.tally().since(&before);
    assert_eq!(counted.count(TPM2_CC_SIGN), n as u64, "the relay must count one TPM2_Sign per signature");
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).expect("a P-256 key");
    let soft = rustls::crypto::ring::sign::any_ecdsa_type(&PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8.as_ref().to_vec()))).expect("ring key");
    let ring_ms = time_signs(soft.as_ref(), 20_000);
    json!({"tpm": summary(&tpm_direct), "tpm_via_relay": summary(&tpm_relayed), "relay_counted": counted.json(), "ring": summary(&ring_ms)})
}

/// What a way of connecting claims to do, checked against the counts.
#[derive(Clone, Copy)]
enum Kind { Plain, TlsFull, TlsResumed, MtlsFull, MtlsResumed }

struct Mode {
    kind: Kind,
    name: &'static str,
    client: reqwest::Client,
    url: String,
    server_pid: u32,
    /// Counts full handshakes (None: plain HTTP, and the agent's own client).
    verifier: Option<Arc<CountingVerifier>>,
    // Sums over the rounds.
    connections: u64, wall_s: f64, server_cpu_s: f64, tpm_signs: u64,
}

impl Mode {
    fn full_handshakes(&self) -> Option<u64> { self.verifier.as_ref().map(|v| v.full.load(Ordering::SeqCst)) }

    /// Panics unless the mode did what its name says.
    fn check(&self, rounds: u64) {
        let (n, signs, full) = (self.connections, self.tpm_signs, self.full_handshakes());
        let holds = match self.kind {
            Kind::Plain => signs == 0,
            Kind::TlsFull => full == Some(n) && signs == 0,
            Kind::TlsResumed => full.is_some_and(|f| (1..=rounds).contains(&f)) && signs == 0,
            Kind::MtlsFull => full == Some(n) && signs == n,
            Kind::MtlsResumed => (1..=rounds).contains(&signs) && n > 10 * signs,
        };
        assert!(holds, "{}: {n} connections, {full:?} full handshakes, {signs} TPM signatures: not what the mode claims", self.name);
    }

    fn json(&self) -> Value {
        json!({"name": self.name, "connections": self.connections, "wall_s": self.wall_s, "server_cpu_s": self.server_cpu_s,
               "per_s": self.connections as f64 / self.wall_s, "server_cpu_ms_per_connection": self.server_cpu_s * 1000.0 / self.connections as f64,
               "full_handshakes": self.full_handshakes(), "tpm_signs": self.tpm_signs})
    }
}

fn modes(plain: &Device, tls: &Device, ca: &Path) -> Vec<Mode> {
    let identity: Arc<dyn ResolvesClientCert> = tls.fetcher.identity().expect("identity").clone();
    let (plain_client, _) = tls_client(ca, None, Resumption::disabled());
    let (full, full_v) = tls_client(ca, None, Resumption::disabled());
    let (resumed, resumed_v) = tls_client(ca, None, Resumption::default());
    let (mtls, mtls_v) = tls_client(ca, Some(identity), Resumption::disabled());
    let mode = |kind: Kind, name: &'static str, client: reqwest::Client, dev: &Device, verifier: Option<Arc<CountingVerifier>>| Mode {
        kind, name, client, url: format!("{}/healthz", dev.config.server_url), server_pid: dev.server_pid, verifier,
        connections: 0, wall_s: 0.0, server_cpu_s: 0.0, tpm_signs: 0,
    };
    vec![
        mode(Kind::Plain, "plain_http", plain_client, plain, None),
        mode(Kind::TlsFull, "tls_full", full, tls, Some(full_v)),
        mode(Kind::TlsResumed, "tls_resumed", resumed, tls, Some(resumed_v)),
        mode(Kind::MtlsFull, "mtls_full", mtls, tls, Some(mtls_v)),
        mode(Kind::MtlsResumed, "mtls_resumed", tls.fetcher.client().clone(), tls, None),
    ]
}

/// ROUNDS rounds of SECS seconds per mode, interleaved; every request a new connection.
fn connections(rt: &tokio::runtime::Runtime, modes: &mut [Mode], tpm: &TpmCounts, secs: f64, rounds: u64) {
    for _ in 0..rounds {
        for m in modes.iter_mut() {
            let (cpu0, tally0, t0) = (cpu_seconds(m.server_pid), tpm.tally(), Instant::now());
            let n = rt.block_on(async {
                let mut n = 0u64;
                while t0.elapsed().as_secs_f64() < secs {
                    let resp = m.client.get(&m.url).send().await.unwrap_or_else(|e| panic!("{}: GET {}: {e:?}", m.name, m.url));
                    assert!(resp.status().is_success(), "{}: GET {}: {}", m.name, m.url, resp.status());
                    resp.bytes().await.expect("the /healthz body");
                    n += 1;
                }
                n
            });
            m.wall_s += t0.elapsed().as_secs_f64();
            m.server_cpu_s += cpu_seconds(m.server_pid) - cpu0;
            m.tpm_signs += tpm.tally().since(&tally0).count(TPM2_CC_SIGN);
            m.connections += n;
        }
    }
    modes.iter().for_each(|m| m.check(rounds));
}

fn state() -> DeviceState {
    DeviceState { slot: outpost_protocol::slot::Slot::A, version: Some("1.0.0".into()), sbom_sha256: None, health: DeviceHealth::Healthy, reports: vec![], incidents: vec![] }
}

/// One attested check-in with the device's own client and identity; its time in ms.
fn checkin(rt: &tokio::runtime::Runtime, dev: &Device) -> (f64, outpost_protocol::attest::CheckinVerdict) {
    let t = Instant::now();
    let v = rt.block_on(attest::checkin(&dev.config, dev.fetcher.client(), &state(), dev.fetcher.identity())).expect("check-in");
    (t.elapsed().as_secs_f64() * 1000.0, v)
}

/// N sequential check-ins per device, in `rounds` rounds with the devices alternating.
fn checkins(rt: &tokio::runtime::Runtime, devices: [&Device; 2], n: usize, rounds: usize) -> Vec<Value> {
    let mut lat = [Vec::new(), Vec::new()];
    let mut cpu = [0.0f64; 2];
    let mut tpm = [Tally::default(), Tally::default()];
    let mut verdicts = [BTreeMap::<String, usize>::new(), BTreeMap::new()];
    for r in 0..rounds {
        let count = n / rounds + usize::from(r < n % rounds);
        for (i, dev) in devices.iter().enumerate() {
            let (cpu0, tally0) = (cpu_seconds(dev.server_pid), dev.relay.counts.tally());
            for _ in 0..count {
                let (ms, v) = checkin(rt, dev);
                assert!(matches!(v.verdict, Verdict::Attested), "check-in not attested: {:?}", v.reason);
                assert!(v.client_certificate.is_none(), "a steady-state check-in renewed the certificate");
                *verdicts[i].entry(v.verdict.to_string()).or_default() += 1;
                lat[i].push(ms);
            }
            cpu[i] += cpu_seconds(dev.server_pid) - cpu0;
            tpm[i].add(&dev.relay.counts.tally().since(&tally0));
        }
    }
    // Steady state: the TLS device's connections resume, so its TPM signs (almost) nothing.
    assert!(tpm[1].count(TPM2_CC_SIGN) <= rounds as u64 && tpm[1].count(TPM2_CC_CERTIFY) == 0, "TLS check-ins paid TPM signatures: {:?}", tpm[1]);
    (0..2)
        .map(|i| {
            let wall: f64 = lat[i].iter().sum::<f64>() / 1000.0;
            json!({"count": n, "latency_ms": lat[i], "p50_ms": percentile(&lat[i], 0.5), "p99_ms": percentile(&lat[i], 0.99),
                   "per_s": n as f64 / wall, "server_cpu_s": cpu[i], "server_cpu_ms_per_checkin": cpu[i] * 1000.0 / n as f64,
                   "verdicts": verdicts[i], "tpm": tpm[i].json()})
        })
        .collect()
}

/// After `k` other connections (each storing two sessions at the server), does the
/// agent's next connection still resume? For each k, the TPM signatures it paid.
fn eviction(rt: &tokio::runtime::Runtime, tls: &Device, ca: &Path, ks: &[u64]) -> Value {
    let (url, (other, _)) = (format!("{}/healthz", tls.config.server_url), tls_client(ca, None, Resumption::disabled()));
    let get = |c: &reqwest::Client| rt.block_on(async { c.get(&url).send().await.and_then(|r| r.error_for_status()).expect("GET /healthz") });
    let probe = |&k: &u64| {
        get(tls.fetcher.client()); // the agent's newest session is now the server's newest
        (0..k).for_each(|_| drop(get(&other)));
        let before = tls.relay.counts.tally();
        get(tls.fetcher.client());
        json!({"other_connections": k, "tpm_signs": tls.relay.counts.tally().since(&before).count(TPM2_CC_SIGN)})
    };
    Value::Array(ks.iter().map(probe).collect())
}

/// A check-in to the TLS server without a client certificate (and not asking for one)
/// must be refused: the server really requires the certificate the runs presented.
fn refused_without_certificate(rt: &tokio::runtime::Runtime, dev: &Device, ca: &Path) -> String {
    let (bare, _) = tls_client(ca, None, Resumption::default());
    match rt.block_on(attest::checkin(&dev.config, &bare, &state(), None)) {
        Err(AgentError::Api { status: 401, message, .. }) => message,
        other => panic!("a check-in without the client certificate was not refused with 401: {other:?}"),
    }
}

/// `k` times: the certificate dropped, a check-in that asks for a new one (TPM2_Certify
/// by the AK) and installs it, then one ordinary check-in (a full handshake presenting
/// the new certificate: one TPM2_Sign).
fn renewals(rt: &tokio::runtime::Runtime, dev: &Device, k: usize) -> Value {
    let identity = dev.fetcher.identity().expect("identity");
    let (mut renew_ms, mut next_ms) = (Vec::new(), Vec::new());
    let (mut renew_tpm, mut next_tpm) = (Tally::default(), Tally::default());
    for _ in 0..k {
        identity.drop_certificate().expect("drop the certificate");
        let t0 = dev.relay.counts.tally();
        let (ms, v) = checkin(rt, dev);
        assert!(matches!(v.verdict, Verdict::Attested), "renewal check-in not attested: {:?}", v.reason);
        identity.install(v.client_certificate.as_ref().expect("the renewal check-in brought a certificate")).expect("install the certificate");
        renew_ms.push(ms);
        let t1 = dev.relay.counts.tally();
        renew_tpm.add(&t1.since(&t0));
        let (ms, _) = checkin(rt, dev);
        next_ms.push(ms);
        next_tpm.add(&dev.relay.counts.tally().since(&t1));
    }
    let (certify, signs, next_signs) = (renew_tpm.count(TPM2_CC_CERTIFY), renew_tpm.count(TPM2_CC_SIGN), next_tpm.count(TPM2_CC_SIGN));
    assert!(certify == k as u64 && signs == 0 && next_signs == k as u64, "renewals: {renew_tpm:?}, next: {next_tpm:?}");
    json!({"count": k, "renewal": summary(&renew_ms), "renewal_tpm": renew_tpm.json(), "next": summary(&next_ms), "next_tpm": next_tpm.json()})
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    assert!(args.len() == 11, "usage: tls_bench PLAIN_CONFIG TLS_CONFIG PLAIN_PID TLS_PID CA_FILE SECS ROUNDS CHECKINS RENEWALS SIGNS");
    let (plain, tls) = (device(&args[1], &args[3]), device(&args[2], &args[4]));
    let ca = Path::new(&args[5]);
    let (secs, rounds): (f64, u64) = (args[6].parse().expect("seconds per mode and round"), args[7].parse().expect("rounds"));
    let (n, k, signs): (usize, usize, usize) = (args[8].parse().expect("check-ins"), args[9].parse().expect("renewals"), args[10].parse().expect("signatures"));
    assert!(tls.config.server_url.starts_with("https://") && plain.config.server_url.starts_with("http://"), "the first config is the plain server's, the second the TLS server's");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");

    let signing = signing(&tls, signs);
    let mut modes = modes(&plain, &tls, ca);
    connections(&rt, &mut modes, &tls.relay.counts, secs, rounds);
    let checkins = checkins(&rt, [&plain, &tls], n, rounds as usize);
    let refusal = refused_without_certificate(&rt, &tls, ca);
    let eviction = eviction(&rt, &tls, ca, &[32, 64, 96, 120, 136, 160, 256, 1024, 4096]);
    let renewals = renewals(&rt, &tls, k);
    let out = json!({"signing": signing, "connections": modes.iter().map(Mode::json).collect::<Vec<_>>(), "rounds": rounds, "secs": secs,
        "checkins": {"plain": checkins[0], "tls": checkins[1], "refused_without_certificate": refusal}, "renewals": renewals, "eviction": eviction});
    println!("{}", serde_json::to_string_pretty(&out).expect("json"));
}
