//! How a TUF repository names its files on disk and in URLs.

/// A target's consistent-snapshot name: `dir/name` → `dir/HASH.name` (TUF 5.7.3).
/// The repository stores target files under it, and clients fetch them by it.
pub fn consistent_name(target_path: &str, hash: &str) -> String {
    match target_path.rsplit_once('/') {
        Some((dir, name)) => format!("{dir}/{hash}.{name}"),
        None => format!("{hash}.{target_path}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_prefixes_the_file_name_not_the_path() {
        assert_eq!(consistent_name("firmware/rpi4/fw.img", "ab"), "firmware/rpi4/ab.fw.img");
        assert_eq!(consistent_name("fw.img", "ab"), "ab.fw.img");
    }
}
