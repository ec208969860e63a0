//! The key-value seam of vpp-spin.
//!
//! Every component reaches Spin's key-value store through the [`Kv`] trait, so the domain is
//! testable natively with [`MemoryKv`]. Every key the app writes is built by a function in
//! [`keys`]: that module is the one place where the layout is written down.

pub mod keys;
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
/// `swap` writes `new` only if the stored value is still `expected` (`None`: the key is absent)
/// and says whether it did. Where the platform has no atomics the implementation documents its
/// weaker guarantee (see docs/architecture.md).
pub trait Kv {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError>;
    fn set(&self, key: &str, value: &[u8]) -> Result<(), KvError>;
    fn delete(&self, key: &str) -> Result<(), KvError>;
    fn exists(&self, key: &str) -> Result<bool, KvError> {
        Ok(self.get(key)?.is_some())
    }
    fn swap(&self, key: &str, expected: Option<&[u8]>, new: &[u8]) -> Result<bool, KvError>;
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
}

/// Errors of the typed helpers: the store failed, a stored value does not decode, or an update
/// kept colliding with other writers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    Kv(KvError),
    Corrupt { key: String, reason: String },
    Contended { key: String },
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Kv(e) => write!(f, "{e}"),
            StoreError::Corrupt { key, reason } => {
                write!(f, "stored value at {key} is unreadable: {reason}")
            }
            StoreError::Contended { key } => write!(f, "too many concurrent writers on {key}"),
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
    match kv.get(key)? {
        None => Ok(None),
        Some(bytes) => decode(key, &bytes).map(Some),
    }
}

pub fn set_json<T: Serialize>(kv: &impl Kv, key: &str, value: &T) -> Result<(), StoreError> {
    kv.set(key, &encode(key, value)?)?;
    Ok(())
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
        let current = match &raw {
            None => None,
            Some(bytes) => Some(decode::<T>(key, bytes)?),
        };
        let (next, out) = f(current)?;
        let Some(next) = next else { return Ok(out) };
        let bytes = encode(key, &next)?;
        if kv.swap(key, raw.as_deref(), &bytes)? {
            return Ok(out);
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
}
