//! Key-value stores shared by all components of an app, with the semantics of the Spin backend
//! each label is configured with:
//! - `type = "spin"` (the default): Spin's SQLite backend (`crates/key-value-spin/src/store.rs`),
//!   kept in memory here; with a directory, each label is also written through to
//!   `<dir>/<label>.json` so a restarted `serve` keeps its data;
//! - `type = "redis"`: Spin's Redis backend (`crates/key-value-redis/src/store.rs`) against a real
//!   Redis server, see [`crate::redis_store`];
//! - on the managed-cloud platform ([`crate::Platform::ManagedCloud`]) Fermyon Cloud's limits
//!   apply on top: 1,024 keys, keys of at most 255 bytes, values of at most 1 MB.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Keys with their values (`None`: absent), as the batch interface answers.
pub type KeyValues = Vec<(String, Option<Vec<u8>>)>;

/// One labelled store kept by this host (Spin's SQLite semantics).
#[derive(Debug, Default)]
pub struct MemoryStore {
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

impl MemoryStore {
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

/// The limits a platform puts on a store (Fermyon Cloud's, `fermyon-dev:content/cloud/faq.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreLimits {
    pub max_keys: usize,
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
}

impl StoreLimits {
    /// Fermyon Cloud: 1,024 keys, keys of at most 255 bytes, values of at most 1 MB.
    pub const MANAGED_CLOUD: StoreLimits = StoreLimits {
        max_keys: 1024,
        max_key_bytes: 255,
        max_value_bytes: 1_000_000,
    };
}

/// Where a store keeps its data.
#[derive(Debug)]
pub enum Backend {
    Memory(MemoryStore),
    Redis(crate::redis_store::RedisStore),
}

/// One labelled store as components see it: a backend, and the platform's limits if any.
#[derive(Debug)]
pub struct Store {
    pub backend: Backend,
    pub limits: Option<StoreLimits>,
}

/// Why an `increment` failed: Spin's SQLite backend panics the host on a value that is not an
/// 8-byte integer (a trap here); Redis answers with an error the guest sees.
#[derive(Debug, PartialEq, Eq)]
pub enum IncrementError {
    HostPanic(String),
    Store(String),
}

impl Store {
    pub fn memory() -> Store {
        Store {
            backend: Backend::Memory(MemoryStore::default()),
            limits: None,
        }
    }

    /// Check a write against the platform's limits: key and value sizes, and whether a new key
    /// still fits.
    fn admit(&self, key: &str, value_len: usize) -> Result<(), String> {
        let Some(l) = self.limits else {
            return Ok(());
        };
        if key.len() > l.max_key_bytes {
            return Err(format!(
                "key of {} bytes exceeds the platform limit of {} bytes",
                key.len(),
                l.max_key_bytes
            ));
        }
        if value_len > l.max_value_bytes {
            return Err(format!(
                "value of {value_len} bytes exceeds the platform limit of {} bytes",
                l.max_value_bytes
            ));
        }
        if !self.exists(key)? && self.key_count()? >= l.max_keys {
            return Err(format!(
                "store is full: the platform allows at most {} keys",
                l.max_keys
            ));
        }
        Ok(())
    }

    fn admit_key(&self, key: &str) -> Result<(), String> {
        match self.limits {
            Some(l) if key.len() > l.max_key_bytes => Err(format!(
                "key of {} bytes exceeds the platform limit of {} bytes",
                key.len(),
                l.max_key_bytes
            )),
            _ => Ok(()),
        }
    }

    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        self.admit_key(key)?;
        match &self.backend {
            Backend::Memory(m) => Ok(m.get(key)),
            Backend::Redis(r) => r.get(key),
        }
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), String> {
        self.admit(key, value.len())?;
        match &self.backend {
            Backend::Memory(m) => m.set(key, value),
            Backend::Redis(r) => r.set(key, value),
        }
    }

    pub fn delete(&self, key: &str) -> Result<(), String> {
        self.admit_key(key)?;
        match &self.backend {
            Backend::Memory(m) => m.delete(key),
            Backend::Redis(r) => r.delete(key),
        }
    }

    pub fn exists(&self, key: &str) -> Result<bool, String> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.exists(key)),
            Backend::Redis(r) => r.exists(key),
        }
    }

    /// Every key, as the guest's `get-keys`/`list-keys` returns them (Redis: `KEYS *`).
    pub fn keys(&self) -> Result<Vec<String>, String> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.keys()),
            Backend::Redis(r) => r.keys(),
        }
    }

    fn key_count(&self) -> Result<usize, String> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.keys().len()),
            Backend::Redis(r) => r.key_count(),
        }
    }

    /// Every key, sorted, for inspection by tests (Redis: `SCAN`, which does not block).
    pub fn scan_keys(&self) -> Result<Vec<String>, String> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.keys()),
            Backend::Redis(r) => r.scan_keys(),
        }
    }

    pub fn get_many(&self, keys: &[String]) -> Result<KeyValues, String> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.get_many(keys)),
            Backend::Redis(r) => r.get_many(keys),
        }
    }

    pub fn set_many(&self, pairs: &[(String, Vec<u8>)]) -> Result<(), String> {
        for (k, v) in pairs {
            self.admit(k, v.len())?;
        }
        match &self.backend {
            Backend::Memory(m) => m.set_many(pairs),
            Backend::Redis(r) => r.set_many(pairs),
        }
    }

    pub fn delete_many(&self, keys: &[String]) -> Result<(), String> {
        match &self.backend {
            Backend::Memory(m) => m.delete_many(keys),
            Backend::Redis(r) => r.delete_many(keys),
        }
    }

    pub fn increment(&self, key: &str, delta: i64) -> Result<i64, IncrementError> {
        self.admit(key, 8).map_err(IncrementError::Store)?;
        match &self.backend {
            Backend::Memory(m) => m.increment(key, delta).map_err(IncrementError::HostPanic),
            Backend::Redis(r) => r.increment(key, delta).map_err(IncrementError::Store),
        }
    }

    /// Start a compare-and-swap on `key` (`cas.new`).
    pub fn new_cas(self: &Arc<Self>, key: &str) -> Result<Cas, String> {
        let state = match &self.backend {
            Backend::Memory(_) => CasState::Memory { observed: None },
            Backend::Redis(r) => CasState::Redis(r.new_cas()?),
        };
        Ok(Cas {
            store: self.clone(),
            key: key.to_string(),
            state,
        })
    }
}

/// How a label is configured: what a runtime config's `[key_value_store.<label>]` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreConfig {
    /// `type = "spin"`: this host's SQLite-semantics store (in memory, or in the kv dir).
    Spin,
    /// `type = "redis"`, `url = "redis://..."`.
    Redis { url: String },
}

/// All stores of an app, by label.
#[derive(Debug, Default)]
pub struct KvManager {
    stores: HashMap<String, Arc<Store>>,
}

impl KvManager {
    /// Create the stores for `labels` (all of type `spin`), loading `<dir>/<label>.json` when a
    /// directory is given.
    pub fn new<'a>(
        labels: impl IntoIterator<Item = &'a str>,
        dir: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let configs: Vec<(String, StoreConfig)> = labels
            .into_iter()
            .map(|l| (l.to_string(), StoreConfig::Spin))
            .collect();
        Self::with_configs(&configs, dir, None)
    }

    /// Create the stores as configured; the first configuration of a label wins.
    pub fn with_configs(
        configs: &[(String, StoreConfig)],
        dir: Option<&Path>,
        limits: Option<StoreLimits>,
    ) -> anyhow::Result<Self> {
        if let Some(dir) = dir {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating key-value dir {}", dir.display()))?;
        }
        let mut stores = HashMap::new();
        for (label, config) in configs {
            if stores.contains_key(label) {
                continue;
            }
            let backend = match config {
                StoreConfig::Spin => {
                    let file = dir.map(|d| d.join(format!("{}.json", sanitize(label))));
                    Backend::Memory(MemoryStore::open(file)?)
                }
                StoreConfig::Redis { url } => Backend::Redis(
                    crate::redis_store::RedisStore::open(url)
                        .with_context(|| format!("key-value store {label:?}"))?,
                ),
            };
            stores.insert(label.clone(), Arc::new(Store { backend, limits }));
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

/// A `cas` resource: the key, and what the backend needs to close the swap.
#[derive(Debug)]
pub struct Cas {
    pub store: Arc<Store>,
    pub key: String,
    state: CasState,
}

#[derive(Debug)]
enum CasState {
    /// What `current()` last read (`None` also when it was never called).
    Memory { observed: Option<Vec<u8>> },
    /// A dedicated connection that `current()` put a `WATCH` on.
    Redis(crate::redis_store::RedisCas),
}

impl Cas {
    /// `cas.current`: the value now; the swap is checked against it.
    pub fn current(&mut self) -> Result<Option<Vec<u8>>, String> {
        self.store.admit_key(&self.key)?;
        match (&mut self.state, &self.store.backend) {
            (CasState::Memory { observed }, Backend::Memory(m)) => {
                let value = m.get(&self.key);
                observed.clone_from(&value);
                Ok(value)
            }
            (CasState::Redis(c), _) => c.current(&self.key),
            (CasState::Memory { .. }, Backend::Redis(_)) => {
                Err("cas state does not match its store".to_string())
            }
        }
    }

    /// `atomics.swap`.
    pub fn swap(&mut self, value: &[u8]) -> Result<(), SwapError> {
        self.store
            .admit(&self.key, value.len())
            .map_err(SwapError::Other)?;
        match (&mut self.state, &self.store.backend) {
            (CasState::Memory { observed }, Backend::Memory(m)) => {
                m.swap(&self.key, observed.as_deref(), value)
            }
            (CasState::Redis(c), _) => c.swap(&self.key, value),
            (CasState::Memory { .. }, Backend::Redis(_)) => Err(SwapError::Other(
                "cas state does not match its store".to_string(),
            )),
        }
    }
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
        let s = MemoryStore::default();
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
        let s = MemoryStore::default();
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
        let s = MemoryStore::default();
        // current() saw no value: the swap writes unconditionally...
        s.swap("n", None, b"first").unwrap();
        // ...even if someone created the key in between (Spin's lost-update window).
        s.swap("n", None, b"second").unwrap();
        assert_eq!(s.get("n").unwrap(), b"second");
    }

    #[test]
    fn increment_uses_little_endian_i64() {
        let s = MemoryStore::default();
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
        assert_eq!(s.get("text").unwrap().unwrap(), b"hello");
        assert_eq!(s.get("bin").unwrap().unwrap(), [0xff, 0x00]);
        assert!(m.store("other").is_none());
    }

    #[test]
    fn managed_cloud_limits() {
        let configs = vec![("default".to_string(), StoreConfig::Spin)];
        let m = KvManager::with_configs(&configs, None, Some(StoreLimits::MANAGED_CLOUD)).unwrap();
        let s = m.store("default").unwrap();
        // Keys of up to 255 bytes, values of up to 1 MB.
        s.set(&"k".repeat(255), b"v").unwrap();
        assert!(s.set(&"k".repeat(256), b"v").unwrap_err().contains("255"));
        assert!(s.get(&"k".repeat(256)).is_err());
        s.set("big", &vec![b'x'; 1_000_000]).unwrap();
        assert!(s.set("big", &vec![b'x'; 1_000_001]).is_err());
        // 1,024 keys: the 1,025th is refused, overwriting an existing one is not.
        for i in 0..1022 {
            s.set(&format!("n{i}"), b"1").unwrap();
        }
        assert_eq!(s.keys().unwrap().len(), 1024);
        assert!(s.set("one-too-many", b"1").unwrap_err().contains("1024"));
        s.set("n0", b"2").unwrap();
        s.delete("n0").unwrap();
        s.set("one-more", b"1").unwrap();
        // A swap that would create the 1,025th key is refused too.
        let mut cas = s.new_cas("new-key").unwrap();
        assert_eq!(cas.current().unwrap(), None);
        assert!(matches!(cas.swap(b"1"), Err(SwapError::Other(_))));
    }
}
