//! The key-value seam of vpp-spin.
//!
//! Every component reaches Spin's key-value store through the [`Kv`] trait, so the domain is
//! testable natively with [`MemoryKv`]. Every key the app writes is built by a function in
//! [`keys`]: that module is the one place where the layout is written down.

pub mod keys;
pub mod mark;
mod memory;

pub use memory::MemoryKv;

use serde::{de::DeserializeOwned, Serialize};
use std::fmt;

/// A failure of the key-value store itself (not "key absent": that is `Ok(None)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvError(pub String);

impl fmt::Display for KvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key-value store: {}", self.0)
    }
}

impl std::error::Error for KvError {}

/// The operations Spin's key-value store offers on every platform, plus compare-and-swap.
///
/// `swap` writes `new` only if the stored value is still `expected` (`None`: the key is absent).
/// `Ok(true)` means it wrote; `Ok(false)` means it may not have: Spin's Redis store reports
/// `cas-failed` after a swap it applied, so a caller that must know reads the key back, as
/// [`update`] does with its write marks ([`mark`]). Where the platform has no atomics the
/// implementation documents its weaker guarantee (see docs/architecture.md).
pub trait Kv {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError>;
    fn set(&self, key: &str, value: &[u8]) -> Result<(), KvError>;
    fn delete(&self, key: &str) -> Result<(), KvError>;
    fn exists(&self, key: &str) -> Result<bool, KvError> {
        Ok(self.get(key)?.is_some())
    }
    fn swap(&self, key: &str, expected: Option<&[u8]>, new: &[u8]) -> Result<bool, KvError>;
    /// The values of `keys`, in their order, in one call to the store where it has one
    /// (`wasi:keyvalue/batch.get-many`); one `get` each otherwise. Not a snapshot: each value
    /// is as one `get` would read it.
    fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Vec<u8>>>, KvError> {
        keys.iter().map(|k| self.get(k)).collect()
    }
}

impl<K: Kv + ?Sized> Kv for &K {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        (**self).get(key)
    }
    fn set(&self, key: &str, value: &[u8]) -> Result<(), KvError> {
        (**self).set(key, value)
    }
    fn delete(&self, key: &str) -> Result<(), KvError> {
        (**self).delete(key)
    }
    fn exists(&self, key: &str) -> Result<bool, KvError> {
        (**self).exists(key)
    }
    fn swap(&self, key: &str, expected: Option<&[u8]>, new: &[u8]) -> Result<bool, KvError> {
        (**self).swap(key, expected, new)
    }
    fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Vec<u8>>>, KvError> {
        (**self).get_many(keys)
    }
}

/// Errors of the typed helpers: the store failed, a stored value does not decode, or an update
/// kept colliding with other writers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    Kv(KvError),
    Corrupt {
        key: String,
        reason: String,
    },
    Contended {
        key: String,
    },
    /// The value a writer built is over [`keys::VALUE_LIMIT`]: refused before anything is
    /// written (Fermyon Cloud refuses values over 1 MB; nothing is ever cut to fit).
    TooLarge {
        key: String,
        bytes: usize,
    },
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Kv(e) => write!(f, "{e}"),
            StoreError::Corrupt { key, reason } => {
                write!(f, "stored value at {key} is unreadable: {reason}")
            }
            StoreError::Contended { key } => write!(f, "too many concurrent writers on {key}"),
            StoreError::TooLarge { key, bytes } => write!(
                f,
                "the value for {key} would be {bytes} bytes, over the store's limit of {} bytes; nothing was written",
                keys::VALUE_LIMIT
            ),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<KvError> for StoreError {
    fn from(e: KvError) -> Self {
        StoreError::Kv(e)
    }
}

/// How often [`update`] retries after losing a compare-and-swap race.
pub const MAX_SWAP_ATTEMPTS: usize = 16;

pub fn get_json<T: DeserializeOwned>(kv: &impl Kv, key: &str) -> Result<Option<T>, StoreError> {
    from_stored(key, kv.get(key)?.as_deref())
}

/// What [`get_json`] makes of the bytes read from `key` (by [`Kv::get_many`], say).
pub fn from_stored<T: DeserializeOwned>(
    key: &str,
    stored: Option<&[u8]>,
) -> Result<Option<T>, StoreError> {
    match stored {
        None => Ok(None),
        Some(bytes) => decode_or_absent(key, bytes),
    }
}

/// What an atomic `increment(key, 0)` leaves in a key that was absent: 8 zero bytes (Spin's
/// SQLite store) or `0` (Redis). An earlier version created keys this way before their first
/// compare-and-swap; a key whose creator stopped in between still holds one. A value that does not
/// decode and is a creation placeholder reads as absent, and a swap from it is conditional.
pub fn is_creation_placeholder(bytes: &[u8]) -> bool {
    bytes == b"0" || bytes == [0u8; 8]
}

fn decode_or_absent<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<Option<T>, StoreError> {
    match decode(key, bytes) {
        Ok(v) => Ok(Some(v)),
        Err(_) if is_creation_placeholder(bytes) => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn set_json<T: Serialize>(kv: &impl Kv, key: &str, value: &T) -> Result<(), StoreError> {
    kv.set(key, &within_limit(key, encode(key, value)?)?)?;
    Ok(())
}

/// The size guard of every typed write: a value over [`keys::VALUE_LIMIT`] is an error
/// ([`StoreError::TooLarge`]) and nothing is written.
pub fn within_limit(key: &str, bytes: Vec<u8>) -> Result<Vec<u8>, StoreError> {
    if bytes.len() > keys::VALUE_LIMIT {
        return Err(StoreError::TooLarge {
            key: key.to_string(),
            bytes: bytes.len(),
        });
    }
    Ok(bytes)
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

/// Read-modify-write a JSON value without losing a concurrent update: `f` gets the current
/// value (or `None`) and returns the new one plus a result; the write is a compare-and-swap
/// against the bytes read, retried from a fresh read when another writer got there first.
/// Returning `None` as the new value leaves the key untouched.
///
/// Every write carries a fresh revision in its [`mark`]. When the store reports the swap as
/// failed, the key is read again: if a mark there holds our revision, the write landed (Spin's
/// Redis store reports applied swaps as failed) and `f` is not applied a second time.
pub fn update<T, R>(
    kv: &impl Kv,
    key: &str,
    mut f: impl FnMut(Option<T>) -> Result<(Option<T>, R), StoreError>,
) -> Result<R, StoreError>
where
    T: Serialize + DeserializeOwned,
{
    for _ in 0..MAX_SWAP_ATTEMPTS {
        let raw = kv.get(key)?;
        let (current, before) = match &raw {
            None => (None, Vec::new()),
            Some(bytes) => match decode_or_absent::<T>(key, bytes)? {
                Some(v) => (Some(v), mark::revisions(bytes)),
                None => (None, Vec::new()),
            },
        };
        let (next, out) = f(current)?;
        let Some(next) = next else { return Ok(out) };
        let revision = mark::new_revision();
        let bytes = within_limit(key, mark::append(encode(key, &next)?, revision, &before))?;
        if kv.swap(key, raw.as_deref(), &bytes)? {
            return Ok(out);
        }
        if let Some(now) = kv.get(key)? {
            if mark::revisions(&now).contains(&revision) {
                return Ok(out);
            }
        }
    }
    Err(StoreError::Contended {
        key: key.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_over_the_limit_is_refused_and_nothing_is_written() {
        let kv = MemoryKv::default();
        set_json(&kv, "k", &"small").unwrap();
        let big = "x".repeat(keys::VALUE_LIMIT);
        let err = set_json(&kv, "k", &big).unwrap_err();
        assert!(
            matches!(err, StoreError::TooLarge { ref key, bytes } if key == "k" && bytes > keys::VALUE_LIMIT)
        );
        assert!(err.to_string().contains("nothing was written"), "{err}");
        assert_eq!(
            get_json::<String>(&kv, "k").unwrap().as_deref(),
            Some("small")
        );
        let err = update::<String, ()>(&kv, "k", |_| Ok((Some(big.clone()), ()))).unwrap_err();
        assert!(matches!(err, StoreError::TooLarge { .. }), "{err:?}");
        assert_eq!(
            get_json::<String>(&kv, "k").unwrap().as_deref(),
            Some("small")
        );
        // Just under the limit (with the write mark) still goes in.
        let fits = "y".repeat(keys::VALUE_LIMIT - 1_000);
        update::<String, ()>(&kv, "k", |_| Ok((Some(fits.clone()), ()))).unwrap();
        assert_eq!(get_json::<String>(&kv, "k").unwrap(), Some(fits));
    }

    #[test]
    fn json_round_trip_and_corrupt_value() {
        let kv = MemoryKv::default();
        set_json(&kv, "a", &vec![1, 2, 3]).unwrap();
        assert_eq!(get_json::<Vec<i32>>(&kv, "a").unwrap(), Some(vec![1, 2, 3]));
        assert_eq!(get_json::<Vec<i32>>(&kv, "missing").unwrap(), None);
        kv.set("bad", b"{not json").unwrap();
        assert!(matches!(
            get_json::<Vec<i32>>(&kv, "bad"),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_creation_placeholder_reads_as_absent_and_is_replaced_by_a_conditional_swap() {
        for placeholder in [b"0".to_vec(), vec![0u8; 8]] {
            let kv = MemoryKv::default();
            kv.set("k", &placeholder).unwrap();
            assert_eq!(get_json::<Vec<i32>>(&kv, "k").unwrap(), None);
            let seen = update::<Vec<i32>, bool>(&kv, "k", |cur| {
                let absent = cur.is_none();
                Ok((Some(vec![7]), absent))
            })
            .unwrap();
            assert!(seen, "the placeholder is handed to the update as absent");
            assert_eq!(get_json::<Vec<i32>>(&kv, "k").unwrap(), Some(vec![7]));
        }
        // A value that decodes is never taken for a placeholder.
        let kv = MemoryKv::default();
        kv.set("n", b"0").unwrap();
        assert_eq!(get_json::<u64>(&kv, "n").unwrap(), Some(0));
    }

    #[test]
    fn update_retries_after_a_lost_race() {
        let kv = MemoryKv::default();
        set_json(&kv, "n", &1u32).unwrap();
        let mut first = true;
        let out = update::<u32, u32>(&kv, "n", |cur| {
            let cur = cur.unwrap_or(0);
            if first {
                // Another writer slips in between our read and our swap.
                first = false;
                set_json(&kv, "n", &10u32).unwrap();
            }
            Ok((Some(cur + 1), cur + 1))
        })
        .unwrap();
        assert_eq!(out, 11);
        assert_eq!(get_json::<u32>(&kv, "n").unwrap(), Some(11));
    }

    #[test]
    fn update_gives_up_when_always_contended() {
        let kv = MemoryKv::default();
        let mut i = 0u32;
        let r = update::<u32, ()>(&kv, "n", |_| {
            i += 1;
            set_json(&kv, "n", &i).unwrap();
            Ok((Some(0), ()))
        });
        assert_eq!(r, Err(StoreError::Contended { key: "n".into() }));
    }

    #[test]
    fn update_with_none_writes_nothing() {
        let kv = MemoryKv::default();
        update::<u32, ()>(&kv, "n", |_| Ok((None, ()))).unwrap();
        assert!(!kv.exists("n").unwrap());
    }

    /// Spin's Redis store reports every swap as failed; each update must still apply once.
    #[test]
    fn update_applies_once_when_the_store_reports_an_applied_swap_as_failed() {
        let kv = MemoryKv::like_spin_redis();
        for _ in 0..10 {
            update::<u32, ()>(&kv, "n", |cur| Ok((Some(cur.unwrap_or(0) + 1), ()))).unwrap();
        }
        assert_eq!(get_json::<u32>(&kv, "n").unwrap(), Some(10));
    }

    /// The write landed, then another writer built on it before we read the key back: our
    /// revision is in its mark, so we do not apply our change a second time.
    #[test]
    fn update_finds_its_write_under_a_later_writers_value() {
        let kv = MemoryKv::like_spin_redis();
        set_json(&kv, "items", &Vec::<String>::new()).unwrap();
        kv.after_next_swap(|kv| {
            update::<Vec<String>, ()>(kv, "items", |cur| {
                let mut v = cur.unwrap_or_default();
                v.push("theirs".into());
                Ok((Some(v), ()))
            })
            .unwrap();
        });
        update::<Vec<String>, ()>(&kv, "items", |cur| {
            let mut v = cur.unwrap_or_default();
            v.push("ours".into());
            Ok((Some(v), ()))
        })
        .unwrap();
        assert_eq!(
            get_json::<Vec<String>>(&kv, "items").unwrap(),
            Some(vec!["ours".to_string(), "theirs".to_string()])
        );
    }

    /// Another writer computed the very same value from the same state and won the race: the
    /// key holds the JSON we meant to write, but not our revision, so our change is applied again
    /// on the fresh value (two increments, not one).
    #[test]
    fn an_equal_value_from_another_writer_does_not_count_as_ours() {
        let kv = MemoryKv::like_spin_redis();
        set_json(&kv, "n", &5u32).unwrap();
        let mut first = true;
        update::<u32, ()>(&kv, "n", |cur| {
            let cur = cur.unwrap_or(0);
            if first {
                first = false;
                // Read 5 like us, wrote 6 before our swap.
                update::<u32, ()>(&kv, "n", |c| Ok((Some(c.unwrap_or(0) + 1), ()))).unwrap();
            }
            Ok((Some(cur + 1), ()))
        })
        .unwrap();
        assert_eq!(get_json::<u32>(&kv, "n").unwrap(), Some(7));
    }

    /// Model: writers on several threads append unique items through a store that reports
    /// applied swaps as failed (and one that does not); every item ends up there exactly once.
    /// The guarantee holds while fewer than `mark::MARK_DEPTH` writes land between a writer's
    /// swap and its read-back: two threads, one a core, keep that window to a few writes (four
    /// threads on two cores once let one be descheduled there for more than 8).
    #[test]
    fn concurrent_writers_lose_nothing_and_repeat_nothing() {
        for kv in [MemoryKv::like_spin_redis(), MemoryKv::default()] {
            let threads = 2;
            let per_thread = 150;
            std::thread::scope(|s| {
                for t in 0..threads {
                    let kv = kv.clone();
                    s.spawn(move || {
                        for i in 0..per_thread {
                            let item = t * 1000 + i;
                            // Contention can exhaust the attempts: the caller retries later.
                            loop {
                                let r = update::<Vec<u32>, ()>(&kv, "items", |cur| {
                                    let mut v = cur.unwrap_or_default();
                                    v.push(item);
                                    Ok((Some(v), ()))
                                });
                                match r {
                                    Ok(()) => break,
                                    Err(StoreError::Contended { .. }) => continue,
                                    Err(e) => panic!("{e}"),
                                }
                            }
                        }
                    });
                }
            });
            let mut items = get_json::<Vec<u32>>(&kv, "items").unwrap().unwrap();
            assert_eq!(items.len(), (threads * per_thread) as usize);
            items.sort();
            items.dedup();
            assert_eq!(items.len(), (threads * per_thread) as usize);
        }
    }

    #[test]
    fn values_written_before_marks_existed_are_updated() {
        let kv = MemoryKv::like_spin_redis();
        kv.set("n", b"3").unwrap();
        update::<u32, ()>(&kv, "n", |cur| Ok((Some(cur.unwrap_or(0) + 1), ()))).unwrap();
        assert_eq!(get_json::<u32>(&kv, "n").unwrap(), Some(4));
    }
}
