//! dm-verity for root filesystems: the hash tree the kernel checks every block
//! against, and the one value that binds it, the root hash, carried on the measured
//! kernel command line (`outpost.verity=ROOT,SALT,BLOCKS`).
//!
//! The format is the kernel's version 1 without a superblock, 4096-byte data and hash
//! blocks, SHA-256: a slot image is `data_blocks` blocks of filesystem followed at
//! once by the hash tree. Each hash is SHA-256(salt || block); a hash block holds 128
//! of them, zero-padded; level 0 hashes the data blocks, each level above hashes the
//! blocks of the one below, the levels are stored top level first, and the root hash
//! is the hash of the top level's single block (what `veritysetup format
//! --no-superblock --format=1 --hash-offset=<data bytes>` writes and prints).
//!
//! Nothing here trusts the tree an image carries: [`Verity::compute`] derives the root
//! hash from the data blocks alone and reports whether the image's own tree is the one
//! the kernel will need.

use std::io::Read;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Data and hash block size (bytes).
pub const BLOCK: u64 = 4096;
const DIGEST: usize = 32;
/// 128 digests per hash block: 2^7.
const PER_BLOCK_BITS: u32 = 7;
/// The kernel's limit on a salt (bytes).
const MAX_SALT: usize = 256;
/// The kernel command line argument that carries the verity parameters.
pub const KERNEL_ARG: &str = "outpost.verity=";

/// The signed dm-verity parameters of a slot image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verity {
    /// Filesystem blocks (4096 bytes) covered; the hash tree starts right after them.
    pub data_blocks: u64,
    /// Hex salt hashed before every block.
    pub salt: String,
    /// Hex SHA-256 root hash of the tree.
    pub root_hash: String,
}

/// The tree computed from an image's data blocks.
pub struct Tree {
    pub root: [u8; 32],
    /// The hash blocks, top level first, as they follow the data in the image.
    pub blocks: Vec<u8>,
}

fn is_hex(s: &str) -> bool {
    s.len() % 2 == 0 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Hash blocks per level, bottom (level 0) first, as the kernel lays them out.
fn level_sizes(data_blocks: u64) -> Vec<u64> {
    let mut levels = 0u32;
    while PER_BLOCK_BITS * levels < 64 && (data_blocks - 1) >> (PER_BLOCK_BITS * levels) != 0 {
        levels += 1;
    }
    (0..levels)
        .map(|i| {
            let shift = PER_BLOCK_BITS * (i + 1);
            if shift >= 64 {
                1
            } else {
                data_blocks.div_ceil(1u64 << shift)
            }
        })
        .collect()
}

impl Verity {
    /// Well-formed parameters for an image of `image_len` bytes: a lower-case hex
    /// 32-byte root hash, a hex salt the kernel accepts, and data plus tree that fit
    /// in the image exactly.
    pub fn validate(&self, image_len: u64) -> Result<()> {
        let bad = |m: String| Err(Error::schema("verity", m));
        if self.root_hash.len() != 2 * DIGEST || !is_hex(&self.root_hash) {
            return bad(format!("root_hash {:?} is not 64 lower-case hex digits", self.root_hash));
        }
        if !is_hex(&self.salt) || self.salt.len() > 2 * MAX_SALT {
            return bad(format!("salt {:?} is not lower-case hex of at most {MAX_SALT} bytes", self.salt));
        }
        if self.data_blocks == 0 {
            return bad("data_blocks is 0: a verity root covers at least one block".into());
        }
        let want = self.data_blocks.checked_mul(BLOCK).and_then(|d| d.checked_add(Self::tree_len(self.data_blocks)));
        if want != Some(image_len) {
            return bad(format!(
                "{} data blocks and their hash tree make {} bytes, but the image is {image_len} bytes",
                self.data_blocks,
                want.map_or("more than 2^64".to_owned(), |w| w.to_string())
            ));
        }
        Ok(())
    }

    /// Bytes of the hash tree over `data_blocks` blocks.
    pub fn tree_len(data_blocks: u64) -> u64 {
        level_sizes(data_blocks).iter().sum::<u64>() * BLOCK
    }

    /// The value GRUB puts after [`KERNEL_ARG`]: `ROOT,SALT,BLOCKS` (one word, nothing
    /// GRUB escapes).
    pub fn arg_value(&self) -> String {
        format!("{},{},{}", self.root_hash, self.salt, self.data_blocks)
    }

    /// Reads `data_blocks` blocks from `data` and builds their tree with `salt`.
    pub fn compute(data: &mut impl Read, data_blocks: u64, salt: &[u8]) -> std::io::Result<Tree> {
        let hash = |block: &[u8]| -> [u8; 32] {
            let mut h = Sha256::new();
            h.update(salt);
            h.update(block);
            h.finalize().into()
        };
        let mut buf = vec![0u8; BLOCK as usize];
        // Grown as blocks are read, never sized by the claimed count: a count larger
        // than the data ends in a read error, not an allocation of 32 bytes per block.
        let mut below: Vec<[u8; 32]> = Vec::new();
        for _ in 0..data_blocks {
            data.read_exact(&mut buf)?;
            below.push(hash(&buf));
        }
        let mut levels: Vec<Vec<u8>> = Vec::new();
        for _ in level_sizes(data_blocks) {
            let mut level = Vec::new();
            for chunk in below.chunks(1 << PER_BLOCK_BITS) {
                let start = level.len();
                level.extend(chunk.iter().flatten());
                level.resize(start + BLOCK as usize, 0);
            }
            below = level.chunks(BLOCK as usize).map(hash).collect();
            levels.push(level);
        }
        // With one data block there are no hash blocks: the root is that block's hash.
        let root = below.first().copied().unwrap_or_else(|| hash(&[]));
        Ok(Tree { root, blocks: levels.into_iter().rev().flatten().collect() })
    }
}

/// Whether a kernel command line carries exactly `verity`'s argument.
pub fn cmdline_carries(cmdline: &str, verity: &Verity) -> bool {
    let want = verity.arg_value();
    let mut found = cmdline.split(' ').filter_map(|w| w.strip_prefix(KERNEL_ARG));
    found.next() == Some(want.as_str()) && found.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 300 blocks of a fixed pattern, salt 00112233..eeff: the root hash and tree
    /// `veritysetup format --no-superblock --format=1 --data-blocks=300
    /// --hash-offset=1228800` (cryptsetup 2.6) printed and wrote.
    const ROOT: &str = "f8d4b0860a14c254c8bd6dec011e0990503728caabeec481c82e87fe8f50861f";
    const TREE_SHA256: &str = "27849921e079c2338cad2965d059edb3ee31126b84634d4cf473f3a2ecbc8c16";
    const SALT: &str = "00112233445566778899aabbccddeeff";

    fn pattern(blocks: u64) -> Vec<u8> {
        (0..blocks * BLOCK).map(|i| ((i * 7 + i / BLOCK) % 251) as u8).collect()
    }

    #[test]
    fn the_tree_is_the_one_veritysetup_writes() {
        let data = pattern(300);
        let tree = Verity::compute(&mut &data[..], 300, &hex::decode(SALT).unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(hex::encode(tree.root), ROOT);
        assert_eq!(tree.blocks.len() as u64, Verity::tree_len(300));
        assert_eq!(Verity::tree_len(300), 4 * BLOCK, "3 blocks of level 0, 1 above");
        assert_eq!(hex::encode(Sha256::digest(&tree.blocks)), TREE_SHA256);
    }

    #[test]
    fn one_changed_byte_anywhere_changes_the_root() {
        let salt = hex::decode(SALT).unwrap_or_default();
        let mut data = pattern(300);
        for at in [0usize, 4096 * 128 + 17, 300 * 4096 - 1] {
            data[at] ^= 1;
            let tree = Verity::compute(&mut &data[..], 300, &salt).unwrap_or_else(|e| panic!("{e}"));
            assert_ne!(hex::encode(tree.root), ROOT, "byte {at}");
            data[at] ^= 1;
        }
        let other_salt = Verity::compute(&mut &data[..], 300, b"x").unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(hex::encode(other_salt.root), ROOT);
    }

    #[test]
    fn a_block_count_beyond_the_data_is_a_read_error_not_an_allocation() {
        let data = pattern(3);
        let err = Verity::compute(&mut &data[..], 1 << 40, b"").err().map(|e| e.kind());
        assert_eq!(err, Some(std::io::ErrorKind::UnexpectedEof));
    }

    #[test]
    fn level_layout_matches_the_kernel() {
        assert_eq!(level_sizes(1), Vec::<u64>::new());
        assert_eq!(level_sizes(128), vec![1]);
        assert_eq!(level_sizes(129), vec![2, 1]);
        // A 256 MiB slot: 512 blocks of level 0, 4 above, 1 at the top.
        assert_eq!(level_sizes(65536), vec![512, 4, 1]);
        assert_eq!(Verity::tree_len(65536), 517 * BLOCK);
    }

    #[test]
    fn parameters_are_validated_against_the_image() {
        let v = Verity { data_blocks: 300, salt: SALT.into(), root_hash: ROOT.into() };
        let len = 304 * BLOCK;
        assert!(v.validate(len).is_ok());
        let short = v.validate(len - 1).unwrap_err().to_string();
        assert!(short.contains("the image is 1245183 bytes"), "{short}");
        let upper = Verity { root_hash: ROOT.to_uppercase(), ..v.clone() }.validate(len).unwrap_err().to_string();
        assert!(upper.contains("root_hash"), "{upper}");
        let salt = Verity { salt: "0g".into(), ..v.clone() }.validate(len).unwrap_err().to_string();
        assert!(salt.contains("salt"), "{salt}");
        assert!(Verity { data_blocks: 0, ..v.clone() }.validate(0).is_err());
        assert!(Verity { data_blocks: u64::MAX, ..v.clone() }.validate(len).is_err());
    }

    #[test]
    fn the_command_line_must_carry_this_root_exactly_once() {
        let v = Verity { data_blocks: 300, salt: SALT.into(), root_hash: ROOT.into() };
        let arg = format!("{KERNEL_ARG}{}", v.arg_value());
        assert!(cmdline_carries(&format!("/vmlinuz root=x ro {arg} quiet"), &v));
        assert!(!cmdline_carries("/vmlinuz root=x ro", &v));
        assert!(!cmdline_carries(&format!("/vmlinuz {arg} {arg}"), &v));
        let other = Verity { data_blocks: 299, ..v.clone() };
        assert!(!cmdline_carries(&format!("/vmlinuz {KERNEL_ARG}{}", other.arg_value()), &v));
    }
}
