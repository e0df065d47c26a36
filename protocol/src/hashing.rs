//! The hash algorithms TUF metadata may name, computed incrementally so that large
//! files are hashed while they stream.

use std::collections::BTreeMap;

use sha2::Digest;

use crate::error::{Error, Result};

/// One running hash per algorithm named in signed metadata.
pub struct MultiHasher {
    hashers: Vec<(String, Algo)>,
}

enum Algo {
    Sha224(sha2::Sha224),
    // SHA-256/384/512 through ring: its assembly (SHA extensions where the CPU has
    // them) hashes large images at the speed of OpenSSL.
    Ring(ring::digest::Context),
}

impl MultiHasher {
    /// Hashers for every algorithm in `expected`. An algorithm we cannot compute is an
    /// error: silently skipping it would let an attacker pick the hash we check.
    pub fn for_expected(expected: &BTreeMap<String, String>, what: &str) -> Result<Self> {
        if expected.is_empty() {
            return Err(Error::Integrity { what: what.into(), reason: "signed metadata lists no hashes".into() });
        }
        let mut hashers = Vec::with_capacity(expected.len());
        for name in expected.keys() {
            let algo = match name.as_str() {
                "sha224" => Algo::Sha224(sha2::Sha224::new()),
                "sha256" => Algo::Ring(ring::digest::Context::new(&ring::digest::SHA256)),
                "sha384" => Algo::Ring(ring::digest::Context::new(&ring::digest::SHA384)),
                "sha512" => Algo::Ring(ring::digest::Context::new(&ring::digest::SHA512)),
                other => {
                    return Err(Error::Integrity {
                        what: what.into(),
                        reason: format!("unsupported hash algorithm {other:?}"),
                    })
                }
            };
            hashers.push((name.clone(), algo));
        }
        Ok(MultiHasher { hashers })
    }

    pub fn update(&mut self, data: &[u8]) {
        for (_, h) in &mut self.hashers {
            match h {
                Algo::Sha224(h) => h.update(data),
                Algo::Ring(h) => h.update(data),
            }
        }
    }

    /// Compares every digest with `expected`.
    pub fn verify(self, expected: &BTreeMap<String, String>, what: &str) -> Result<()> {
        for (name, h) in self.hashers {
            let got = match h {
                Algo::Sha224(h) => hex::encode(h.finalize()),
                Algo::Ring(h) => hex::encode(h.finish().as_ref()),
            };
            let want = expected.get(&name).map(|s| s.to_ascii_lowercase()).unwrap_or_default();
            if got != want {
                return Err(Error::Integrity {
                    what: what.into(),
                    reason: format!("{name} hash mismatch: signed metadata says {want}, got {got}"),
                });
            }
        }
        Ok(())
    }
}

/// Verifies a whole buffer against optional length and hashes (snapshot/timestamp `meta`).
pub fn verify_bytes(
    data: &[u8],
    length: Option<u64>,
    hashes: Option<&BTreeMap<String, String>>,
    what: &str,
) -> Result<()> {
    if let Some(len) = length {
        if data.len() as u64 != len {
            return Err(Error::Integrity {
                what: what.into(),
                reason: format!("length {} differs from signed length {len}", data.len()),
            });
        }
    }
    if let Some(hashes) = hashes {
        let mut h = MultiHasher::for_expected(hashes, what)?;
        h.update(data);
        h.verify(hashes, what)?;
    }
    Ok(())
}

/// Hex SHA-256 of a buffer.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

/// Reads `reader` to its end in 1 MiB chunks, handing each to `each` (for hashing or
/// signing files too large to hold in memory); returns the number of bytes read.
pub fn for_each_chunk(mut reader: impl std::io::Read, mut each: impl FnMut(&[u8])) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        each(&buf[..n]);
        total += n as u64;
    }
}

/// Hex SHA-256 and length of what `reader` yields, read in chunks.
pub fn sha256_reader(reader: impl std::io::Read) -> std::io::Result<(String, u64)> {
    let mut h = sha2::Sha256::new();
    let len = for_each_chunk(reader, |chunk| h.update(chunk))?;
    Ok((hex::encode(h.finalize()), len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_hash_matches_the_buffer_hash_across_chunks() {
        for len in [0usize, 1, (1 << 20) - 1, 1 << 20, (3 << 20) + 5] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            assert_eq!(sha256_reader(data.as_slice()).unwrap(), (sha256_hex(&data), len as u64), "length {len}");
        }
    }

    #[test]
    fn every_algorithm_matches_known_digests_across_chunks() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        let mut expected = BTreeMap::new();
        expected.insert("sha224".to_owned(), hex::encode(sha2::Sha224::digest(&data)));
        expected.insert("sha256".to_owned(), hex::encode(sha2::Sha256::digest(&data)));
        expected.insert("sha384".to_owned(), hex::encode(sha2::Sha384::digest(&data)));
        expected.insert("sha512".to_owned(), hex::encode(sha2::Sha512::digest(&data)));
        let mut h = MultiHasher::for_expected(&expected, "t").unwrap();
        for c in data.chunks(4099) {
            h.update(c);
        }
        h.verify(&expected, "t").unwrap();
        let mut wrong = expected.clone();
        wrong.insert("sha256".to_owned(), "00".repeat(32));
        let mut h = MultiHasher::for_expected(&wrong, "t").unwrap();
        h.update(&data);
        assert!(h.verify(&wrong, "t").is_err());
    }
}
