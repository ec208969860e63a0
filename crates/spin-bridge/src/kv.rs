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
        use spin_sdk::wit::wasi::keyvalue::atomics::{increment, swap, Cas, CasError};
        // Spin's SQLite store makes a swap from an absent key an unconditional upsert: two
        // writers creating the key would both "win" and one change would be lost. Create it
        // atomically first (`increment` by 0 leaves a creation placeholder, or fails on a value
        // someone else wrote), then swap from the placeholder, conditionally.
        let creating = expected.is_none();
        if creating && increment(&self.bucket, key, 0).is_err() {
            return Ok(false);
        }
        let cas = Cas::new(&self.bucket, key).map_err(|e| KvError(format!("{e:?}")))?;
        let current = cas.current().map_err(|e| KvError(format!("{e:?}")))?;
        let unchanged = if creating {
            current
                .as_deref()
                .is_some_and(vpp_store::is_creation_placeholder)
        } else {
            current.as_deref() == expected
        };
        if !unchanged {
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

    #[cfg(not(feature = "atomics"))]
    fn swap(&self, key: &str, expected: Option<&[u8]>, new: &[u8]) -> Result<bool, KvError> {
        if self.get(key)?.as_deref() != expected {
            return Ok(false);
        }
        self.set(key, new)?;
        Ok(true)
    }
}
