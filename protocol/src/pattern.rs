//! Delegation path patterns, matched the way the TUF specification's reference
//! implementation does: the pattern and the target path are split on `/`, must have
//! the same number of segments, and each segment is matched shell-style (`*`, `?`,
//! `[seq]`, `[!seq]`), so `*` never crosses a `/`.

/// Does `target_path` match the delegation `pattern`?
pub fn path_matches(pattern: &str, target_path: &str) -> bool {
    let p: Vec<&str> = pattern.split('/').collect();
    let t: Vec<&str> = target_path.split('/').collect();
    p.len() == t.len() && p.iter().zip(&t).all(|(p, t)| segment_matches(p, t))
}

/// Could `pattern` match some path that starts with the segments in `prefix`
/// (each given segment matched literally) and has at least one more segment?
pub fn pattern_may_match_prefix(pattern: &str, prefix: &[&str]) -> bool {
    let p: Vec<&str> = pattern.split('/').collect();
    p.len() > prefix.len() && p.iter().zip(prefix).all(|(p, t)| segment_matches(p, t))
}

fn segment_matches(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    glob(&p, &t)
}

fn glob(p: &[char], t: &[char]) -> bool {
    // Iterative matcher with backtracking over the last `*`.
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi, ti));
                    pi += 1;
                    continue;
                }
                '?' => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                '[' => {
                    if let Some((matched, next)) = class(p, pi, t[ti]) {
                        if matched {
                            pi = next;
                            ti += 1;
                            continue;
                        }
                    } else if t[ti] == '[' {
                        // An unclosed `[` is a literal, as in fnmatch.
                        pi += 1;
                        ti += 1;
                        continue;
                    }
                }
                c if c == t[ti] => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, st)) => {
                pi = sp + 1;
                ti = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Matches `c` against the bracket expression starting at `p[start] == '['`.
/// Returns (matched, index after `]`), or None when the bracket is not closed.
fn class(p: &[char], start: usize, c: char) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = i < p.len() && p[i] == '!';
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while i < p.len() {
        if p[i] == ']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
            if p[i] <= c && c <= p[i + 2] {
                matched = true;
            }
            i += 3;
        } else {
            if p[i] == c {
                matched = true;
            }
            i += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_stays_within_a_segment() {
        assert!(path_matches("firmware/rpi4/*/*", "firmware/rpi4/1.0.0/fw.img"));
        assert!(!path_matches("firmware/*", "firmware/rpi4/1.0.0/fw.img"));
        assert!(path_matches("*.txt", "a.txt"));
        assert!(!path_matches("*.txt", "dir/a.txt"));
        assert!(path_matches("targets/*.tgz", "targets/foo.tgz"));
        assert!(path_matches("f?o/[a-c]x[!0-9]", "foo/bxy"));
        assert!(!path_matches("f?o/[a-c]x[!0-9]", "foo/bx1"));
        assert!(path_matches("*", "anything"));
        assert!(path_matches("a*b*c", "aXXbYYc"));
        assert!(!path_matches("a*b*c", "aXXbYY"));
    }

    #[test]
    fn prefix_matching() {
        assert!(pattern_may_match_prefix("firmware/rpi4/*/*", &["firmware", "rpi4"]));
        assert!(!pattern_may_match_prefix("firmware/x86/*/*", &["firmware", "rpi4"]));
        assert!(pattern_may_match_prefix("firmware/*/*/*", &["firmware", "rpi4"]));
        assert!(!pattern_may_match_prefix("firmware/*", &["firmware", "rpi4"]));
    }
}
