//! `enroll`: simulated devices enroll through the server's real enrollment API (one-time
//! token, credential activation with a software EK).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use outpost_protocol::attest::{self, EnrollChallenge, EnrollProof, EnrollRequest, Enrolled};
use rsa::pkcs8::EncodePrivateKey;
use serde_json::{json, Value};

use crate::error::{key_err, SimError};
use crate::http::post;
use crate::softkeys;
use crate::state::{load, save, SimDevice, SimState};
use crate::LABEL;

#[derive(Debug, clap::Args)]
pub struct EnrollArgs {
    #[arg(long)]
    server: String,
    /// Operator API token (makes the enrollment tokens).
    #[arg(long, env = "OUTPOST_TOKEN", hide_env_values = true)]
    token: String,
    #[arg(long)]
    devices: usize,
    #[arg(long, default_value = "rpi4")]
    hardware_class: String,
    /// SHA-256 of the signed image the devices boot (their measured state).
    #[arg(long)]
    image_sha256: String,
    #[arg(long)]
    version: Option<String>,
    /// KEY=VALUE labels for every device.
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Distinct RSA keys behind the devices' EKs (each EK public area still differs).
    #[arg(long, default_value_t = 8)]
    ek_pool: usize,
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    #[arg(long)]
    state: PathBuf,
    /// Add to the devices already in --state (same server).
    #[arg(long)]
    append: bool,
}

pub async fn run(http: reqwest::Client, args: EnrollArgs) -> Result<(), SimError> {
    let EnrollArgs { server, token, devices, hardware_class, image_sha256, version, labels, ek_pool, concurrency, state, append } = args;
    let server = server.trim_end_matches('/').to_owned();
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).ok_or_else(|| SimError::Usage(format!("label {l:?} is not KEY=VALUE"))))
        .collect::<Result<_, _>>()?;
    eprintln!("{LABEL}: generating {ek_pool} RSA-2048 keys for the EKs");
    let keys: Vec<rsa::RsaPrivateKey> =
        (0..ek_pool.max(1)).map(|_| rsa::RsaPrivateKey::new(&mut attest::credential::OsRng, 2048).map_err(key_err)).collect::<Result<_, _>>()?;
    let keys = Arc::new(keys);
    let started = Instant::now();
    let who = Arc::new(Enrollment { server, token, class: hardware_class, labels });
    let mut enrolled = enroll_all(&http, &who, &keys, devices, concurrency).await?;
    for d in &mut enrolled {
        d.image_sha256 = image_sha256.clone();
        d.version = version.clone();
    }
    let secs = started.elapsed().as_secs_f64();
    let ek_keys = keys.iter().map(|k| k.to_pkcs8_der().map(|d| hex::encode(d.as_bytes())).map_err(key_err)).collect::<Result<_, _>>()?;
    let mut all = SimState { label: LABEL.into(), server: who.server.clone(), ek_keys, devices: Vec::new() };
    if append && state.exists() {
        let old = load(&state)?;
        if old.server != all.server {
            return Err(SimError::OtherServer { path: state, old: old.server, new: all.server });
        }
        all.devices = old.devices;
    }
    all.devices.extend(enrolled);
    save(&state, &all)?;
    eprintln!("{LABEL}: enrolled {devices} devices in {secs:.1} s ({:.0}/s)", devices as f64 / secs);
    Ok(())
}

/// What every device of one `enroll` shares: the server, the operator token, the
/// hardware class and the labels.
struct Enrollment {
    server: String,
    token: String,
    class: String,
    labels: BTreeMap<String, String>,
}

/// Enrolls `devices` devices from `concurrency` tasks, the EKs taken from `keys` in turn.
async fn enroll_all(http: &reqwest::Client, who: &Arc<Enrollment>, keys: &Arc<Vec<rsa::RsaPrivateKey>>, devices: usize, concurrency: usize) -> Result<Vec<SimDevice>, SimError> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (http, who, keys, next) = (http.clone(), who.clone(), keys.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= devices {
                    return Ok::<_, SimError>(out);
                }
                let k = i % keys.len();
                out.push(enroll_one(&http, &who, &keys[k], k).await?);
                if (i + 1) % 1000 == 0 {
                    eprintln!("  enrolled {} devices", i + 1);
                }
            }
        }));
    }
    let mut enrolled = Vec::new();
    for t in tasks {
        enrolled.extend(t.await.map_err(|e| SimError::Runtime(e.to_string()))??);
    }
    Ok(enrolled)
}

async fn enroll_one(http: &reqwest::Client, who: &Enrollment, ek: &rsa::RsaPrivateKey, ek_index: usize) -> Result<SimDevice, SimError> {
    let Enrollment { server, token, class, labels } = who;
    let one_time: Value = post(http, &format!("{server}/api/v1/device-tokens"), Some(token), &json!({"hardware_class": class, "ttl": "1h", "labels": labels})).await?;
    let one_time = one_time["token"].as_str().ok_or(SimError::Answer("no token in answer"))?.to_owned();
    let policy: [u8; 16] = attest::credential::random_bytes();
    let ek_public = softkeys::ek_public(&ek.to_public_key(), &policy);
    let ak = p256::ecdsa::SigningKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
    let ak_public = softkeys::ak_public(ak.verifying_key());
    let req = EnrollRequest {
        token: one_time,
        hardware_class: class.to_owned(),
        ek_public: hex::encode(&ek_public),
        ek_certificate: None,
        ak_public: hex::encode(&ak_public),
    };
    let ch: EnrollChallenge = post(http, &format!("{server}/api/v1/enroll"), None, &req).await?;
    let blob = hex::decode(&ch.credential_blob).map_err(key_err)?;
    let secret = hex::decode(&ch.encrypted_secret).map_err(key_err)?;
    let recovered = softkeys::activate_credential(ek, &softkeys::name(&ak_public), &blob, &secret).map_err(SimError::Key)?;
    let done: Enrolled = post(http, &format!("{server}/api/v1/enroll/{}", ch.challenge_id), None, &EnrollProof { secret: hex::encode(recovered) }).await?;
    Ok(SimDevice {
        device_id: done.device_id,
        hardware_class: class.to_owned(),
        ek: ek_index,
        ek_policy: hex::encode(policy),
        ak: hex::encode(ak.to_bytes()),
        image_sha256: String::new(),
        version: None,
        slot: outpost_protocol::slot::Slot::A,
        pending: Vec::new(),
        failed: Vec::new(),
    })
}
