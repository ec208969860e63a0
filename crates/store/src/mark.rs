//! Write marks: a few random revisions appended to every value [`crate::update`] writes, so a
//! writer can tell afterwards whether its compare-and-swap landed.
//!
//! Spin's Redis store reports `cas-failed` after a swap it applied (its `UNWATCH <key>` is
//! refused by Redis; `../shared/spin-platform.md` section 1.2). A value that merely equals what
//! we meant to write proves nothing (another writer may have computed the same bytes from the
//! same state), so each write carries a fresh 64-bit revision, plus the revisions of the few
//! writes before it. After a reported failure the writer reads the key again: its revision in
//! the mark means its write happened, even if another writer has already built on it.
//!
//! The mark is JSON whitespace after the document (space, tab, CR and LF as base-4 digits), so
//! every JSON reader, in any language, reads a marked value exactly as before, and values
//! written without a mark (older versions, `set_json`) stay valid.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// How many revisions a mark keeps: the newest write's and those of the writes before it.
/// A writer whose swap was reported failed finds its write as long as fewer than this many
/// writers changed the key between its swap and its read-back (32 revisions: 1 KiB a value).
pub const MARK_DEPTH: usize = 32;

/// Characters per revision: 64 bits in base 4.
const REVISION_CHARS: usize = 32;

/// The base-4 digits, all JSON whitespace.
const DIGITS: [u8; 4] = [b' ', b'\t', b'\r', b'\n'];

fn digit_value(b: u8) -> Option<u64> {
    DIGITS.iter().position(|d| *d == b).map(|p| p as u64)
}

/// A fresh random revision. `RandomState` is seeded from the platform's randomness (WASI
/// `random_get` in a component), once per thread and varied per use; the counter and the clock
/// only make two calls in one instance differ for certain.
pub fn new_revision() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    h.write_u128(nanos);
    h.finish()
}

/// The revisions in a stored value's mark, newest first; empty for an unmarked value.
pub fn revisions(stored: &[u8]) -> Vec<u64> {
    let tail_len = stored
        .iter()
        .rev()
        .take_while(|b| digit_value(**b).is_some())
        .count();
    let tail = &stored[stored.len() - tail_len..];
    // Whitespace that is not a whole number of revisions is not ours: skip it.
    let tail = &tail[tail.len() % REVISION_CHARS..];
    tail.chunks(REVISION_CHARS)
        .map(|chunk| {
            chunk
                .iter()
                .fold(0u64, |acc, b| (acc << 2) | digit_value(*b).unwrap_or(0))
        })
        .collect()
}

/// `json` followed by a mark holding `revision` and the newest of `before`.
pub fn append(mut json: Vec<u8>, revision: u64, before: &[u64]) -> Vec<u8> {
    let kept = before.len().min(MARK_DEPTH - 1);
    json.reserve((1 + kept) * REVISION_CHARS);
    for rev in std::iter::once(&revision).chain(&before[..kept]) {
        for i in (0..REVISION_CHARS).rev() {
            json.push(DIGITS[((rev >> (2 * i)) & 3) as usize]);
        }
    }
    json
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marked_value_is_still_the_same_json() {
        let marked = append(br#"{"a":[1,2]}"#.to_vec(), u64::MAX, &[0, 7]);
        let v: serde_json::Value = serde_json::from_slice(&marked).unwrap();
        assert_eq!(v, serde_json::json!({"a": [1, 2]}));
        assert_eq!(revisions(&marked), vec![u64::MAX, 0, 7]);
        // Numbers and strings end the document too.
        let n = append(b"42".to_vec(), 5, &[]);
        assert_eq!(serde_json::from_slice::<u32>(&n).unwrap(), 42);
        assert_eq!(revisions(&n), vec![5]);
    }

    #[test]
    fn unmarked_and_foreign_whitespace_have_no_revisions() {
        assert!(revisions(b"[1,2]").is_empty());
        assert!(revisions(b"[1,2]  \n").is_empty());
        assert!(revisions(b"").is_empty());
    }

    #[test]
    fn the_mark_keeps_a_bounded_history() {
        let before: Vec<u64> = (1..=(MARK_DEPTH as u64 + 12)).collect();
        let marked = append(b"null".to_vec(), 99, &before);
        let revs = revisions(&marked);
        assert_eq!(revs.len(), MARK_DEPTH);
        assert_eq!(revs[0], 99);
        assert_eq!(&revs[1..], &before[..MARK_DEPTH - 1]);
    }

    #[test]
    fn revisions_differ() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            assert!(seen.insert(new_revision()));
        }
    }
}
