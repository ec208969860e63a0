//! Key-value stores shared by all components of an app, with the semantics of Spin's default
//! SQLite backend (`crates/key-value-spin/src/store.rs`).
//!
//! Stores live in memory, one per label; with a directory, each label is also written through
//! to `<dir>/<label>.json` so a restarted `serve` keeps its data.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// One labelled store.
#[derive(Debug, Default)]
pub struct Store {
    data: Mutex<BTreeMap<String, Vec<u8>>>,
    file: Option<PathBuf>,
}

/// How a value is kept on disk: readable text when it is UTF-8, hex otherwise.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum DiskValue {
    Utf8(String),
    Hex(String),
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(s: &str) -> anyhow::Result<Vec<u8>> {
    anyhow::ensure!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).context("bad hex"))
        .collect()
}

/// Why a compare-and-swap did not happen.
#[derive(Debug, PartialEq, Eq)]
pub enum SwapError {
    CasFailed(String),
    Other(String),
}

impl Store {
    fn open(file: Option<PathBuf>) -> anyhow::Result<Self> {
        let mut data = BTreeMap::new();
        if let Some(path) = &file {
            if path.exists() {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let disk: BTreeMap<String, DiskValue> = serde_json::from_str(&text)
                    .with_context(|| format!("parsing {}", path.display()))?;
                for (k, v) in disk {
                    let bytes = match v {
                        DiskValue::Utf8(s) => s.into_bytes(),
                        DiskValue::Hex(h) => from_hex(&h)?,
                    };
                    data.insert(k, bytes);
                }
            }
        }
        Ok(Self {
            data: Mutex::new(data),
            file,
        })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        // A panic while holding the lock cannot leave the map half-updated (every write is one
        // insert/remove), so a poisoned lock is still safe to use.
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Write the whole store to its file (atomically, via rename).
    fn persist(&self, data: &BTreeMap<String, Vec<u8>>) -> Result<(), String> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let disk: BTreeMap<&str, DiskValue> = data
            .iter()
            .map(|(k, v)| {
                let dv = match std::str::from_utf8(v) {
                    Ok(s) => DiskValue::Utf8(s.to_string()),
                    Err(_) => DiskValue::Hex(to_hex(v)),
                };
                (k.as_str(), dv)
            })
            .collect();
        let text = serde_json::to_string_pretty(&disk).map_err(|e| e.to_string())?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, path).map_err(|e| e.to_string())
    }

    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.lock().get(key).cloned()
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), String> {
        let mut data = self.lock();
        data.insert(key.to_string(), value.to_vec());
        self.persist(&data)
    }

    pub fn delete(&self, key: &str) -> Result<(), String> {
        let mut data = self.lock();
        if data.remove(key).is_some() {
            self.persist(&data)?;
        }
        Ok(())
    }

    pub fn exists(&self, key: &str) -> bool {
        self.lock().contains_key(key)
    }

    /// All keys, in key order (what SQLite's primary-key scan returns).
    pub fn keys(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// `get-many`: only the keys that exist, as the SQLite `IN (...)` query returns them.
    pub fn get_many(&self, keys: &[String]) -> Vec<(String, Option<Vec<u8>>)> {
        let data = self.lock();
        keys.iter()
            .filter_map(|k| data.get(k).map(|v| (k.clone(), Some(v.clone()))))
            .collect()
    }

    pub fn set_many(&self, pairs: &[(String, Vec<u8>)]) -> Result<(), String> {
        let mut data = self.lock();
        for (k, v) in pairs {
            data.insert(k.clone(), v.clone());
        }
        self.persist(&data)
    }

    pub fn delete_many(&self, keys: &[String]) -> Result<(), String> {
        let mut data = self.lock();
        for k in keys {
            data.remove(k);
        }
        self.persist(&data)
    }

    /// `wasi:keyvalue/atomics.increment`: the SQLite backend keeps counters as 8-byte
    /// little-endian i64; an absent key counts from 0. A value of another length is a host
    /// panic in Spin, reported here as `Err` (the caller turns it into a trap).
    pub fn increment(&self, key: &str, delta: i64) -> Result<i64, String> {
        let mut data = self.lock();
        let current = match data.get(key) {
            None => 0,
            Some(v) => {
                let bytes: [u8; 8] = v.as_slice().try_into().map_err(|_| {
                    format!("increment of key {key:?}: stored value is not an 8-byte integer (incorrect length)")
                })?;
                i64::from_le_bytes(bytes)
            }
        };
        let new = current.wrapping_add(delta);
        data.insert(key.to_string(), new.to_le_bytes().to_vec());
        self.persist(&data)?;
        Ok(new)
    }

    /// Compare-and-swap as the SQLite backend does it: `observed` is what `current()` read
    /// (`None` also when `current()` was never called). With `Some(old)` the write happens only
    /// while the stored value still equals `old`; with `None` it is an unconditional upsert.
    pub fn swap(&self, key: &str, observed: Option<&[u8]>, value: &[u8]) -> Result<(), SwapError> {
        let mut data = self.lock();
        match observed {
            Some(old) => {
                if data.get(key).map(Vec::as_slice) != Some(old) {
                    return Err(SwapError::CasFailed("failed to update 1 row".into()));
                }
                data.insert(key.to_string(), value.to_vec());
            }
            None => {
                data.insert(key.to_string(), value.to_vec());
            }
        }
        self.persist(&data).map_err(SwapError::Other)
    }
}

/// All stores of an app, by label.
#[derive(Debug, Default)]
pub struct KvManager {
    stores: HashMap<String, Arc<Store>>,
}

impl KvManager {
    /// Create the stores for `labels`, loading `<dir>/<label>.json` when a directory is given.
    pub fn new<'a>(
        labels: impl IntoIterator<Item = &'a str>,
        dir: Option<&Path>,
    ) -> anyhow::Result<Self> {
        if let Some(dir) = dir {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating key-value dir {}", dir.display()))?;
        }
        let mut stores = HashMap::new();
        for label in labels {
            if stores.contains_key(label) {
                continue;
            }
            let file = dir.map(|d| d.join(format!("{}.json", sanitize(label))));
            stores.insert(label.to_string(), Arc::new(Store::open(file)?));
        }
        Ok(Self { stores })
    }

    pub fn store(&self, label: &str) -> Option<Arc<Store>> {
        self.stores.get(label).cloned()
    }
}

/// Labels become file names; keep them to a safe alphabet.
fn sanitize(label: &str) -> String {
    label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A `cas` resource: the key and what `current()` last read.
#[derive(Debug)]
pub struct Cas {
    pub store: Arc<Store>,
    pub key: String,
    pub observed: Option<Vec<u8>>,
}

/// An open store as guests hold it (`fermyon:spin/key-value.store`, `wasi:keyvalue` bucket).
#[derive(Debug, Clone)]
pub struct OpenStore {
    pub store: Arc<Store>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_operations() {
        let s = Store::default();
        assert_eq!(s.get("a"), None);
        s.set("a", b"1").unwrap();
        s.set("b", b"2").unwrap();
        assert!(s.exists("a"));
        assert_eq!(s.keys(), ["a", "b"]);
        s.delete("a").unwrap();
        s.delete("missing").unwrap();
        assert_eq!(s.keys(), ["b"]);
        assert_eq!(
            s.get_many(&["b".into(), "zz".into()]),
            vec![("b".to_string(), Some(b"2".to_vec()))]
        );
    }

    #[test]
    fn cas_succeeds_iff_value_unchanged_since_current() {
        let s = Store::default();
        s.set("k", b"v1").unwrap();
        // current() read v1, nobody wrote: swap succeeds.
        s.swap("k", Some(b"v1"), b"v2").unwrap();
        assert_eq!(s.get("k").unwrap(), b"v2");
        // current() read v1 but the value is now v2: cas-failed, value untouched.
        assert_eq!(
            s.swap("k", Some(b"v1"), b"v3"),
            Err(SwapError::CasFailed("failed to update 1 row".into()))
        );
        assert_eq!(s.get("k").unwrap(), b"v2");
        // Same bytes written back in between still count as unchanged (value comparison).
        s.set("k", b"v2").unwrap();
        s.swap("k", Some(b"v2"), b"v4").unwrap();
        // Key deleted after current(): the UPDATE matches no row.
        s.delete("k").unwrap();
        assert!(matches!(
            s.swap("k", Some(b"v4"), b"v5"),
            Err(SwapError::CasFailed(_))
        ));
    }

    #[test]
    fn cas_on_absent_key_is_an_upsert() {
        let s = Store::default();
        // current() saw no value: the swap writes unconditionally...
        s.swap("n", None, b"first").unwrap();
        // ...even if someone created the key in between (Spin's lost-update window).
        s.swap("n", None, b"second").unwrap();
        assert_eq!(s.get("n").unwrap(), b"second");
    }

    #[test]
    fn increment_uses_little_endian_i64() {
        let s = Store::default();
        assert_eq!(s.increment("c", 5).unwrap(), 5);
        assert_eq!(s.increment("c", -2).unwrap(), 3);
        assert_eq!(s.get("c").unwrap(), 3i64.to_le_bytes());
        s.set("t", b"12").unwrap();
        assert!(s.increment("t", 1).is_err());
    }

    #[test]
    fn persists_through_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        {
            let m = KvManager::new(["default"], Some(dir.path())).unwrap();
            let s = m.store("default").unwrap();
            s.set("text", b"hello").unwrap();
            s.set("bin", &[0xff, 0x00]).unwrap();
        }
        let m = KvManager::new(["default"], Some(dir.path())).unwrap();
        let s = m.store("default").unwrap();
        assert_eq!(s.get("text").unwrap(), b"hello");
        assert_eq!(s.get("bin").unwrap(), [0xff, 0x00]);
        assert!(m.store("other").is_none());
    }
}
