use spin_sdk::key_value::Store;
use vpp_store::{Kv, KvError};

/// The store label every component uses. Only `default` exists on Akamai Functions and
/// Fermyon Cloud, so the app uses one store.
pub const STORE_LABEL: &str = "default";

/// Spin's key-value store as a [`Kv`].
pub struct SpinKv {
    store: Store,
    #[cfg(feature = "atomics")]
    bucket: spin_sdk::wit::wasi::keyvalue::store::Bucket,
}

impl SpinKv {
    pub fn open() -> Result<SpinKv, KvError> {
        let store = Store::open(STORE_LABEL).map_err(|e| KvError(e.to_string()))?;
        #[cfg(feature = "atomics")]
        let bucket = spin_sdk::wit::wasi::keyvalue::store::open(STORE_LABEL)
            .map_err(|e| KvError(format!("{e:?}")))?;
        Ok(SpinKv {
            store,
            #[cfg(feature = "atomics")]
            bucket,
        })
    }
}

impl Kv for SpinKv {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        self.store.get(key).map_err(|e| KvError(e.to_string()))
    }

    fn set(&self, key: &str, value: &[u8]) -> Result<(), KvError> {
        self.store
            .set(key, value)
            .map_err(|e| KvError(e.to_string()))
    }

    fn delete(&self, key: &str) -> Result<(), KvError> {
        self.store.delete(key).map_err(|e| KvError(e.to_string()))
    }

    fn exists(&self, key: &str) -> Result<bool, KvError> {
        self.store.exists(key).map_err(|e| KvError(e.to_string()))
    }

    #[cfg(feature = "atomics")]
    fn swap(&self, key: &str, expected: Option<&[u8]>, new: &[u8]) -> Result<bool, KvError> {
        match expected {
            None => self.create(key, new),
            Some(old) => self.swap_from(key, |cur| cur == Some(old), new),
        }
    }

    /// One `wasi:keyvalue/batch.get-many` call. Spin's stores answer with the keys that exist
    /// only (SQLite's `IN`), so the values are matched to `keys` by name. Spin's Redis store
    /// sends `KEYS` with the keys as patterns, which Redis refuses (spinframework/spin
    /// `crates/key-value-redis/src/store.rs`, 4.0.2 and main): on any error the keys are read
    /// one by one, as on the stores without `batch`.
    #[cfg(feature = "atomics")]
    fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Vec<u8>>>, KvError> {
        let list: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        let Ok(got) = spin_sdk::wit::wasi::keyvalue::batch::get_many(&self.bucket, &list) else {
            return keys.iter().map(|k| self.get(k)).collect();
        };
        let mut found: std::collections::BTreeMap<String, Vec<u8>> = got
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect();
        Ok(keys.iter().map(|k| found.remove(*k)).collect())
    }

    #[cfg(not(feature = "atomics"))]
    fn swap(&self, key: &str, expected: Option<&[u8]>, new: &[u8]) -> Result<bool, KvError> {
        if self.get(key)?.as_deref() != expected {
            return Ok(false);
        }
        self.set(key, new)?;
        Ok(true)
    }
}

/// How often a writer that finds another one creating a key looks again before it takes the
/// claim as abandoned, and how long it waits in between (about a second in all: a creator holds
/// the claim for three store calls).
#[cfg(feature = "atomics")]
const CLAIM_LOOKS: u32 = 20;
#[cfg(feature = "atomics")]
const CLAIM_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

#[cfg(feature = "atomics")]
impl SpinKv {
    /// Writes `new` to `key` if `unchanged` holds for its current bytes, conditionally.
    fn swap_from(
        &self,
        key: &str,
        unchanged: impl Fn(Option<&[u8]>) -> bool,
        new: &[u8],
    ) -> Result<bool, KvError> {
        use spin_sdk::wit::wasi::keyvalue::atomics::{swap, Cas, CasError};
        let cas = Cas::new(&self.bucket, key).map_err(|e| KvError(format!("{e:?}")))?;
        let current = cas.current().map_err(|e| KvError(format!("{e:?}")))?;
        if !unchanged(current.as_deref()) {
            return Ok(false);
        }
        match swap(cas, new) {
            Ok(()) => Ok(true),
            // Not proof that nothing was written: Spin's Redis store reports applied swaps as
            // cas-failed too. `vpp_store::update` reads the key back to tell (write marks).
            Err(CasError::CasFailed(_)) => Ok(false),
            Err(CasError::StoreError(e)) => Err(KvError(format!("{e:?}"))),
        }
    }

    /// Creates `key` (which the caller read as absent) unless someone else does first.
    ///
    /// Spin's SQLite store makes a swap from an absent key an unconditional upsert, so two
    /// writers creating one key would both "win" and one change would be lost
    /// (../shared/spin-platform.md §1.2). Its `increment` is atomic, but panics the host on a
    /// value that is not an 8-byte integer, so it must never touch a key holding a document.
    /// Creation therefore goes through a claim of its own ([`keys::creation_claim`]) that only
    /// `increment` touches: whoever raises it to 1 creates the key and deletes the claim; anyone
    /// else waits for the key to appear and then takes the ordinary compare-and-swap path
    /// (`Ok(false)`: `vpp_store::update` reads again). A claim whose holder stopped between
    /// claiming and creating is broken after about a second.
    fn create(&self, key: &str, new: &[u8]) -> Result<bool, KvError> {
        use spin_sdk::wit::wasi::keyvalue::atomics::increment;
        let claim = vpp_store::keys::creation_claim(key);
        for _ in 0..CLAIM_LOOKS {
            let n = increment(&self.bucket, &claim, 1).map_err(|e| KvError(format!("{e:?}")))?;
            if n == 1 {
                // Ours. The key is read again under the claim: someone may have created it
                // since the caller read it (then the swap is an ordinary conditional one).
                let created = self.swap_from(
                    key,
                    |cur| cur.is_none_or(vpp_store::is_creation_placeholder),
                    new,
                );
                let released = self.delete(&claim);
                let created = created?;
                released?;
                return Ok(created);
            }
            if self.exists(key)? {
                return Ok(false);
            }
            std::thread::sleep(CLAIM_WAIT);
        }
        // Still absent and still claimed: its holder stopped in between. Break the claim; the
        // caller reads again and claims anew.
        self.delete(&claim)?;
        Ok(false)
    }
}
