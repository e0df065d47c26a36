//! The server's repository logic with an injected clock: verified publishes refuse
//! bad uploads without writing anything, and online metadata is re-signed on time.

use std::collections::BTreeMap;
use std::path::Path;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use chrono::{Duration, Utc};
use http_body_util::BodyExt;
use outpost_protocol::keys::SigningKey;
use outpost_protocol::tuf::{self, DelegatedRole, Delegations, RoleKeys, Root, TargetFile, Targets};
use outpost_server::repository::{PublishError, Repository};
use outpost_server::storage::{Store, TokenRole};
use outpost_server::{app, AppState, ServerConfig};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tower::ServiceExt;

struct Fixture {
    _dir: tempfile::TempDir,
    data: std::path::PathBuf,
    root_key: SigningKey,
    targets_key: SigningKey,
    fw_key: SigningKey,
    config: ServerConfig,
}

fn write_key(dir: &Path, name: &str, k: &SigningKey) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_vec(&k.to_key_file()).unwrap()).unwrap();
    p
}

fn role(ids: Vec<String>) -> RoleKeys {
    RoleKeys { keyids: ids, threshold: 1, extra: BTreeMap::new() }
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let [root_key, targets_key, snap_key, ts_key, fw_key] = std::array::from_fn(|_| SigningKey::generate().unwrap());
    let mut keys = BTreeMap::new();
    for k in [&root_key, &targets_key, &snap_key, &ts_key] {
        keys.insert(k.key_id().to_owned(), k.public().clone());
    }
    let mut roles = BTreeMap::new();
    roles.insert("root".into(), role(vec![root_key.key_id().into()]));
    roles.insert("targets".into(), role(vec![targets_key.key_id().into()]));
    roles.insert("snapshot".into(), role(vec![snap_key.key_id().into()]));
    roles.insert("timestamp".into(), role(vec![ts_key.key_id().into()]));
    let root = Root {
        typ: "root".into(),
        spec_version: tuf::SPEC_VERSION.into(),
        version: 1,
        expires: tuf::format_expires(Utc::now() + Duration::days(365)),
        consistent_snapshot: true,
        keys,
        roles,
        extra: BTreeMap::new(),
    };
    std::fs::write(dir.path().join("1.root.json"), tuf::sign(&root, &[&root_key]).unwrap()).unwrap();
    write_key(dir.path(), "snapshot.key", &snap_key);
    write_key(dir.path(), "timestamp.key", &ts_key);
    std::fs::write(
        dir.path().join("server.toml"),
        "listen = \"127.0.0.1:0\"\nplain_http = true\ndata_dir = \"data\"\n[repository]\ntrusted_root = \"1.root.json\"\n\
         snapshot_key = \"snapshot.key\"\ntimestamp_key = \"timestamp.key\"\nsnapshot_expiry = \"7d\"\ntimestamp_expiry = \"1d\"\n",
    )
    .unwrap();
    let config = ServerConfig::load(&dir.path().join("server.toml")).unwrap();
    Fixture { data: dir.path().join("data"), _dir: dir, root_key, targets_key, fw_key, config }
}

fn targets_with_delegation(f: &Fixture, version: u64) -> Targets {
    let mut t = tuf::metadata::new_targets(version, Utc::now() + Duration::days(90));
    let mut keys = BTreeMap::new();
    keys.insert(f.fw_key.key_id().to_owned(), f.fw_key.public().clone());
    t.delegations = Some(Delegations {
        keys,
        roles: Some(vec![DelegatedRole {
            name: "firmware".into(),
            keyids: vec![f.fw_key.key_id().into()],
            threshold: 1,
            terminating: false,
            paths: Some(vec!["firmware/rpi4/*/*".into()]),
            path_hash_prefixes: None,
            extra: BTreeMap::new(),
        }]),
        succinct_roles: None,
        extra: BTreeMap::new(),
    });
    t
}

fn firmware_role(version: u64, path: &str, bytes: &[u8]) -> Targets {
    let mut t = tuf::metadata::new_targets(version, Utc::now() + Duration::days(90));
    let mut hashes = BTreeMap::new();
    hashes.insert("sha256".into(), hex::encode(Sha256::digest(bytes)));
    t.targets.insert(path.into(), TargetFile { length: bytes.len() as u64, hashes, custom: None, extra: BTreeMap::new() });
    t
}

fn value(bytes: Vec<u8>) -> Value {
    serde_json::from_slice(&bytes).unwrap()
}

fn stage(f: &Fixture, bytes: &[u8]) {
    let p = f.data.join("repository/staging").join(hex::encode(Sha256::digest(bytes)));
    std::fs::write(p, bytes).unwrap();
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

fn refused_code(r: Result<outpost_server::repository::PublishOutcome, PublishError>) -> &'static str {
    match r {
        Err(PublishError::Refused { code, .. }) => code,
        Err(PublishError::Internal(e)) => panic!("internal error instead of refusal: {e}"),
        Ok(o) => panic!("publish was accepted: {o:?}"),
    }
}

async fn published(f: &Fixture) -> Repository {
    let repo = Repository::open(&f.config.repository).unwrap();
    let fw = b"firmware image v1".to_vec();
    stage(f, &fw);
    let mut roles = BTreeMap::new();
    roles.insert("targets".to_owned(), value(tuf::sign(&targets_with_delegation(f, 1), &[&f.targets_key]).unwrap()));
    roles.insert("firmware".to_owned(), value(tuf::sign(&firmware_role(1, "firmware/rpi4/1.0.0/fw.img", &fw), &[&f.fw_key]).unwrap()));
    let out = repo.publish(&[], &roles, Utc::now()).await.unwrap();
    assert_eq!((out.snapshot_version, out.timestamp_version), (1, 1));
    repo
}

#[tokio::test]
async fn publish_places_targets_and_signs_snapshot_and_timestamp() {
    let f = fixture();
    let _repo = published(&f).await;
    let md = f.data.join("repository/metadata");
    for name in ["1.root.json", "1.targets.json", "1.firmware.json", "1.snapshot.json", "timestamp.json"] {
        assert!(md.join(name).exists(), "{name} missing: {:?}", listing(&md));
    }
    let sha = hex::encode(Sha256::digest(b"firmware image v1"));
    assert!(f.data.join(format!("repository/targets/firmware/rpi4/1.0.0/{sha}.fw.img")).exists());
    assert!(listing(&f.data.join("repository/staging")).is_empty(), "staging not cleaned");
}

#[tokio::test]
async fn refused_publishes_write_nothing() {
    let f = fixture();
    let repo = published(&f).await;
    let md = f.data.join("repository/metadata");
    let before = listing(&md);
    let ts_before = std::fs::read(md.join("timestamp.json")).unwrap();
    let fw2 = b"firmware image v2".to_vec();
    let other = SigningKey::generate().unwrap();

    // Signed by a key the targets role does not delegate to.
    stage(&f, &fw2);
    let mut roles = BTreeMap::new();
    roles.insert("firmware".to_owned(), value(tuf::sign(&firmware_role(2, "firmware/rpi4/2.0.0/fw.img", &fw2), &[&other]).unwrap()));
    assert_eq!(refused_code(repo.publish(&[], &roles, Utc::now()).await), "bad_signature");

    // Not newer than what is served.
    roles.insert("firmware".to_owned(), value(tuf::sign(&firmware_role(1, "firmware/rpi4/2.0.0/fw.img", &fw2), &[&f.fw_key]).unwrap()));
    assert_eq!(refused_code(repo.publish(&[], &roles, Utc::now()).await), "stale_version");

    // A path outside the role's delegation.
    roles.insert("firmware".to_owned(), value(tuf::sign(&firmware_role(2, "firmware/x86/2.0.0/fw.img", &fw2), &[&f.fw_key]).unwrap()));
    assert_eq!(refused_code(repo.publish(&[], &roles, Utc::now()).await), "target_outside_delegation");

    // A target never uploaded.
    roles.insert("firmware".to_owned(), value(tuf::sign(&firmware_role(2, "firmware/rpi4/3.0.0/fw.img", b"never uploaded"), &[&f.fw_key]).unwrap()));
    assert_eq!(refused_code(repo.publish(&[], &roles, Utc::now()).await), "target_not_uploaded");

    // Expired metadata.
    let mut expired = firmware_role(2, "firmware/rpi4/2.0.0/fw.img", &fw2);
    expired.expires = tuf::format_expires(Utc::now() - Duration::seconds(5));
    roles.insert("firmware".to_owned(), value(tuf::sign(&expired, &[&f.fw_key]).unwrap()));
    assert_eq!(refused_code(repo.publish(&[], &roles, Utc::now()).await), "expired");

    // A root that skips a version, and one signed below the old threshold.
    let mut root: Root = serde_json::from_value(value(std::fs::read(md.join("1.root.json")).unwrap())["signed"].clone()).unwrap();
    root.version = 3;
    let skip = value(tuf::sign(&root, &[&f.root_key]).unwrap());
    assert_eq!(refused_code(repo.publish(&[skip], &BTreeMap::new(), Utc::now()).await), "bad_version");
    root.version = 2;
    let unsigned = value(tuf::sign(&root, &[&other]).unwrap());
    assert_eq!(refused_code(repo.publish(&[unsigned], &BTreeMap::new(), Utc::now()).await), "bad_signature");

    assert_eq!(listing(&md), before, "a refused publish wrote metadata");
    assert_eq!(std::fs::read(md.join("timestamp.json")).unwrap(), ts_before);
    assert_eq!(repo.status().await.roles["firmware"], 1);
}

#[tokio::test]
async fn online_metadata_is_resigned_before_it_expires() {
    let f = fixture();
    let repo = published(&f).await;
    let now = Utc::now();
    // Fresh: nothing due.
    assert_eq!(repo.resign_if_due(now + Duration::hours(1)).await.unwrap(), None);
    // Past half the timestamp's day: a new timestamp over the same snapshot.
    assert_eq!(repo.resign_if_due(now + Duration::hours(13)).await.unwrap(), Some((1, 2)));
    // Past half the snapshot's week: new snapshot and timestamp.
    let later = now + Duration::days(4);
    assert_eq!(repo.resign_if_due(later).await.unwrap(), Some((2, 3)));
    let status = repo.status().await;
    let expires = tuf::parse_expires(status.timestamp_expires.as_deref().unwrap(), "timestamp").unwrap();
    assert!(expires > later + Duration::hours(23), "timestamp expiry {expires} not renewed relative to {later}");
    // The re-signed metadata is what a reopened server (restart) loads.
    drop(repo);
    let reopened = Repository::open(&f.config.repository).unwrap();
    assert_eq!(reopened.status().await.timestamp_version, Some(3));
    assert_eq!(reopened.status().await.roles.get("firmware"), Some(&1));
}

async fn call(app: axum::Router, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let resp = app.oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes().to_vec();
    (status, headers, body)
}

/// A director key made offline, as `outpost director init` does (the server never
/// makes one).
fn director_key(path: &std::path::Path) -> std::path::PathBuf {
    let k = outpost_protocol::keys::SigningKey::generate().unwrap();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, serde_json::to_vec(&k.to_key_file()).unwrap()).unwrap();
    path.to_path_buf()
}

#[tokio::test]
async fn http_serves_repository_with_ranges_cache_headers_and_auth() {
    let f = fixture();
    let repo = std::sync::Arc::new(published(&f).await);
    let store = std::sync::Arc::new(Store::open(&f.config.database).await.unwrap());
    let viewer = store.create_token("dash", TokenRole::Viewer).await.unwrap();
    let app = app(AppState {
        repo,
        store,
        max_upload_bytes: 1 << 20,
        nonce_lifetime: std::time::Duration::from_secs(60),
        challenge_lifetime: std::time::Duration::from_secs(300),
        ek_cas: Default::default(),
        accept_uncertified_eks: false,
        measurement: Default::default(),
        device_ca: None,
        director: std::sync::Arc::new(
            outpost_server::director::Director::open(&director_key(&f.config.director_key), std::time::Duration::from_secs(3600)).unwrap(),
        ),
    });

    let (s, _, body) = call(app.clone(), Request::get("/healthz").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&body));

    let (s, h, _) = call(app.clone(), Request::get("/metadata/timestamp.json").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h[header::CACHE_CONTROL], "no-cache");
    assert_eq!(h[header::CONTENT_TYPE], "application/json");
    let (_, h, _) = call(app.clone(), Request::get("/metadata/1.snapshot.json").body(Body::empty()).unwrap()).await;
    assert!(h[header::CACHE_CONTROL].to_str().unwrap().contains("immutable"));

    let sha = hex::encode(Sha256::digest(b"firmware image v1"));
    let req = Request::get(format!("/targets/firmware/rpi4/1.0.0/{sha}.fw.img")).header(header::RANGE, "bytes=9-13").body(Body::empty()).unwrap();
    let (s, h, body) = call(app.clone(), req).await;
    assert_eq!(s, StatusCode::PARTIAL_CONTENT);
    assert_eq!(body, b"image");
    assert_eq!(h[header::CONTENT_RANGE], "bytes 9-13/17");

    let (s, _, _) = call(app.clone(), Request::post("/api/v1/publish").body(Body::from("{}")).unwrap()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let req = Request::post("/api/v1/publish").header(header::AUTHORIZATION, format!("Bearer {viewer}")).header(header::CONTENT_TYPE, "application/json").body(Body::from("{}")).unwrap();
    let (s, _, body) = call(app.clone(), req).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{}", String::from_utf8_lossy(&body));
    let req = Request::get("/api/v1/repository").header(header::AUTHORIZATION, format!("Bearer {viewer}")).body(Body::empty()).unwrap();
    let (s, _, body) = call(app, req).await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["roles"]["firmware"], 1);
}

fn ok(r: Result<outpost_server::repository::PublishOutcome, PublishError>) -> outpost_server::repository::PublishOutcome {
    match r {
        Ok(o) => o,
        Err(PublishError::Refused { code, message }) => panic!("refused: {code}: {message}"),
        Err(PublishError::Internal(e)) => panic!("internal error: {e}"),
    }
}

#[tokio::test]
async fn a_retry_of_a_publish_that_landed_changes_nothing() {
    let f = fixture();
    let repo = published(&f).await;
    let md = f.data.join("repository/metadata");
    let fw2 = b"firmware image v2".to_vec();
    stage(&f, &fw2);
    let mut roles = BTreeMap::new();
    roles.insert("firmware".to_owned(), value(tuf::sign(&firmware_role(2, "firmware/rpi4/2.0.0/fw.img", &fw2), &[&f.fw_key]).unwrap()));
    let first = ok(repo.publish(&[], &roles, Utc::now()).await);
    assert_eq!((first.snapshot_version, first.unchanged), (2, false));
    let before = listing(&md);
    let ts = std::fs::read(md.join("timestamp.json")).unwrap();
    // The answer was lost: the pipeline sends the same request again.
    let again = ok(repo.publish(&[], &roles, Utc::now()).await);
    assert!(again.unchanged && again.roles.is_empty(), "{again:?}");
    assert_eq!((again.snapshot_version, again.timestamp_version), (2, 2));
    assert_eq!(listing(&md), before);
    assert_eq!(std::fs::read(md.join("timestamp.json")).unwrap(), ts);
    // The same version with other bytes is not a retry.
    let mut other = firmware_role(2, "firmware/rpi4/2.0.0/fw.img", &fw2);
    other.expires = tuf::format_expires(Utc::now() + Duration::days(30));
    roles.insert("firmware".to_owned(), value(tuf::sign(&other, &[&f.fw_key]).unwrap()));
    assert_eq!(refused_code(repo.publish(&[], &roles, Utc::now()).await), "stale_version");
}

#[tokio::test]
async fn versioned_names_left_by_an_interrupted_publish_are_never_reused() {
    let f = fixture();
    let repo = published(&f).await;
    let md = f.data.join("repository/metadata");
    // What a crash of an older server left (and perhaps served): a role version and a
    // snapshot that no timestamp names.
    std::fs::write(md.join("2.firmware.json"), b"{\"served\": \"before the crash\"}\n").unwrap();
    std::fs::write(md.join("2.snapshot.json"), b"{\"served\": \"before the crash\"}\n").unwrap();
    drop(repo);
    let repo = Repository::open(&f.config.repository).unwrap();
    let fw2 = b"firmware image v2".to_vec();
    stage(&f, &fw2);
    let mut roles = BTreeMap::new();
    roles.insert("firmware".to_owned(), value(tuf::sign(&firmware_role(2, "firmware/rpi4/2.0.0/fw.img", &fw2), &[&f.fw_key]).unwrap()));
    let r = repo.publish(&[], &roles, Utc::now()).await;
    assert!(matches!(&r, Err(PublishError::Refused { code: "version_reused", message }) if message.contains("version 3")), "{r:?}");
    roles.insert("firmware".to_owned(), value(tuf::sign(&firmware_role(3, "firmware/rpi4/2.0.0/fw.img", &fw2), &[&f.fw_key]).unwrap()));
    let out = ok(repo.publish(&[], &roles, Utc::now()).await);
    assert_eq!(out.snapshot_version, 3, "the snapshot number a crash left behind was reused");
    assert_eq!(std::fs::read(md.join("2.snapshot.json")).unwrap(), b"{\"served\": \"before the crash\"}\n");
    assert_eq!(std::fs::read(md.join("2.firmware.json")).unwrap(), b"{\"served\": \"before the crash\"}\n");
}

#[tokio::test]
async fn a_revoked_delegation_drops_the_role_and_what_it_signed() {
    let f = fixture();
    let repo = published(&f).await;
    assert_eq!(repo.firmware_releases("rpi4").await.len(), 0, "custom-less targets are not releases");
    let mut t = tuf::metadata::new_targets(2, Utc::now() + Duration::days(90));
    t.delegations = None;
    let mut roles = BTreeMap::new();
    roles.insert("targets".to_owned(), value(tuf::sign(&t, &[&f.targets_key]).unwrap()));
    let out = ok(repo.publish(&[], &roles, Utc::now()).await);
    assert_eq!(out.removed_roles, vec!["firmware".to_owned()]);
    let md = f.data.join("repository/metadata");
    let snap: Value = serde_json::from_slice(&std::fs::read(md.join(format!("{}.snapshot.json", out.snapshot_version))).unwrap()).unwrap();
    assert_eq!(snap["signed"]["meta"].as_object().unwrap().keys().collect::<Vec<_>>(), vec!["targets.json"]);
    assert!(!md.join("firmware.json").exists() && md.join("1.firmware.json").exists(), "{:?}", listing(&md));
    assert_eq!(repo.target_sha256("firmware/rpi4/1.0.0/fw.img").await, None);
    // A restart reads the same.
    drop(repo);
    let repo = Repository::open(&f.config.repository).unwrap();
    assert_eq!(repo.status().await.roles.keys().collect::<Vec<_>>(), vec!["targets"]);
}

#[tokio::test]
async fn one_server_per_repository_directory() {
    let f = fixture();
    let repo = published(&f).await;
    let err = Repository::open(&f.config.repository).err().expect("a second open of the same repository succeeded").to_string();
    assert!(err.contains("another outpost-server process uses this repository directory"), "{err}");
    drop(repo);
    Repository::open(&f.config.repository).unwrap();
}
