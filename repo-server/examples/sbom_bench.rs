//! SBOM index benchmark driver (run by bench/sbom.sh; see bench/README.md).
//!
//! Builds the server's SBOM index (the real `Store`, SQLite in DIR) for RELEASES
//! releases of COMPONENTS components each, drawn from a pool of package names with
//! versions that vary between releases; records DEVICES devices, each running one of
//! the releases (by image digest); then times QUERIES fleet searches (`Store::sbom_search`:
//! name or purl, with and without a version range) and, as the same-run baseline, the
//! same lookup forced to scan the component table (`NOT INDEXED`).
//!
//! Usage: sbom_bench DIR RELEASES COMPONENTS DEVICES QUERIES   (JSON on stdout)

use std::time::Instant;

use outpost_sbom::query::Query;
use outpost_sbom::ComponentRef;
use outpost_server::storage::{SbomRelease, Store};

/// A small deterministic generator (xorshift), so runs are comparable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    assert!(a.len() == 6, "usage: sbom_bench DIR RELEASES COMPONENTS DEVICES QUERIES");
    let dir = std::path::PathBuf::from(&a[1]);
    let (releases, components, devices, queries): (usize, usize, usize, usize) =
        (a[2].parse().expect("releases"), a[3].parse().expect("components"), a[4].parse().expect("devices"), a[5].parse().expect("queries"));
    std::fs::create_dir_all(&dir).expect("dir");
    let db = dir.join("bench.db");
    let _ = std::fs::remove_file(&db);
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let store = rt.block_on(Store::open_sqlite(&db)).expect("store");
    let pool = (components * 5).max(1000) as u64;
    let mut rng = Rng(0x5eed_1234_abcd_0001);

    // 1. Index build.
    let t0 = Instant::now();
    let mut images = Vec::with_capacity(releases);
    for r in 0..releases {
        let mut comps = Vec::with_capacity(components);
        let mut used = std::collections::BTreeSet::new();
        while comps.len() < components {
            let n = rng.below(pool);
            if !used.insert(n) {
                continue;
            }
            let version = format!("{}.{}.{}-{}", 1 + n % 3, (r as u64 / 20 + n) % 40, n % 7, 1 + r % 3);
            let name = format!("lib{n:05}");
            comps.push(ComponentRef {
                purl: Some(format!("pkg:deb/debian/{name}@{}?arch=amd64", version.replace('+', "%2B"))),
                name,
                version: Some(version),
            });
        }
        let image = format!("{:064x}", (r as u128) * 0x9e37_79b9_7f4a_7c15 + 1);
        let rel = SbomRelease {
            sbom_sha256: format!("{:064x}", (r as u128) * 0x2545_f491_4f6c_dd1d + 7),
            target: format!("firmware/class{}/1.{r}.0/fw.img", r % 4),
            hardware_class: format!("class{}", r % 4),
            version: format!("1.{r}.0"),
            image_sha256: image.clone(),
        };
        rt.block_on(store.index_sbom(&rel, &comps)).expect("index");
        images.push(image);
    }
    let index_s = t0.elapsed().as_secs_f64();

    // 2. Devices, each running one release (what attested check-ins record).
    let t1 = Instant::now();
    {
        let mut conn = rusqlite::Connection::open(&db).expect("open db");
        let tx = conn.transaction().expect("tx");
        {
            let mut st = tx
                .prepare(
                    "INSERT INTO devices (device_id, hardware_class, ek_public, ak_public, enrolled_at, image_sha256, version, attestation)
                     VALUES (?1, ?2, x'00', x'00', '2026-11-23T00:00:00Z', ?3, ?4, 'attested')",
                )
                .expect("prepare");
            for d in 0..devices {
                let r = rng.below(releases as u64) as usize;
                st.execute(rusqlite::params![format!("dev-{d:08}"), format!("class{}", r % 4), images[r], format!("1.{r}.0")]).expect("device");
            }
        }
        tx.commit().expect("commit");
    }
    let devices_s = t1.elapsed().as_secs_f64();

    // 3. Searches.
    let mut lat = Vec::with_capacity(queries);
    let mut found_releases = 0usize;
    let mut found_devices = 0usize;
    for i in 0..queries {
        let n = rng.below(pool);
        let q = match i % 4 {
            0 => format!("lib{n:05}"),
            1 => format!("lib{n:05}@>=1.10.0,<2.30.0"),
            2 => format!("pkg:deb/debian/lib{n:05}"),
            _ => format!("pkg:deb/debian/lib{n:05}@<1.20"),
        };
        let query = Query::parse(&q).expect("query");
        let t = Instant::now();
        let res = rt.block_on(store.sbom_search(&query)).expect("search");
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        found_releases += res.releases.len();
        found_devices += res.devices.len();
    }
    let mut sorted = lat.clone();
    sorted.sort_by(f64::total_cmp);

    // 4. Baseline: the same name lookup scanning the component table.
    let conn = rusqlite::Connection::open(&db).expect("open db");
    let mut scan = Vec::new();
    for _ in 0..5 {
        let n = rng.below(pool);
        let t = Instant::now();
        let c: i64 = conn
            .query_row("SELECT count(*) FROM sbom_components NOT INDEXED WHERE name = ?1", [format!("lib{n:05}")], |r| r.get(0))
            .expect("scan");
        scan.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(c >= 0);
    }
    scan.sort_by(f64::total_cmp);
    let rows: i64 = conn.query_row("SELECT count(*) FROM sbom_components", [], |r| r.get(0)).expect("count");
    let db_bytes = std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0)
        + std::fs::metadata(dir.join("bench.db-wal")).map(|m| m.len()).unwrap_or(0);
    let out = serde_json::json!({
        "releases": releases, "components_per_release": components, "devices": devices, "queries": queries,
        "component_rows": rows, "db_bytes": db_bytes,
        "index_build_s": index_s, "index_rows_per_s": rows as f64 / index_s, "devices_insert_s": devices_s,
        "search_p50_ms": pct(&sorted, 0.5), "search_p99_ms": pct(&sorted, 0.99), "search_max_ms": sorted[sorted.len() - 1],
        "mean_releases_found": found_releases as f64 / queries as f64, "mean_devices_found": found_devices as f64 / queries as f64,
        "scan_median_ms": pct(&scan, 0.5),
    });
    println!("{}", serde_json::to_string_pretty(&out).expect("json"));
}
