use crate::{Kv, KvError};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// An in-memory [`Kv`] for native tests. Clones share the same data. It can be told to fail,
/// so tests can prove that a key-value error halfway leaves state consistent.
#[derive(Clone, Default)]
pub struct MemoryKv {
    inner: Arc<Mutex<Inner>>,
}

/// Another writer's turn, run right after a swap.
type AfterSwap = Box<dyn FnOnce(&MemoryKv) + Send>;

#[derive(Default)]
struct Inner {
    data: BTreeMap<String, Vec<u8>>,
    /// Fail every write after this many more writes succeed.
    writes_before_failure: Option<usize>,
    /// Report every swap as failed, applied or not (Spin's Redis store).
    swap_always_reports_failure: bool,
    /// Called once with the store after the next applied swap (a writer slipping in).
    after_swap: Option<AfterSwap>,
}

impl MemoryKv {
    /// A store whose `swap` behaves as Spin's Redis store (`crates/key-value-redis`, Spin
    /// 4.0.2): the compare-and-swap is applied when the value is unchanged, and then reported
    /// as `cas-failed` either way (its `UNWATCH <key>` is refused by Redis).
    pub fn like_spin_redis() -> MemoryKv {
        let kv = MemoryKv::default();
        kv.lock().swap_always_reports_failure = true;
        kv
    }

    /// Run `f` right after the next swap that is applied, before its caller sees the answer:
    /// another writer that gets in between a swap and the caller's next read.
    pub fn after_next_swap(&self, f: impl FnOnce(&MemoryKv) + Send + 'static) {
        self.lock().after_swap = Some(Box::new(f));
    }

    pub fn keys(&self) -> Vec<String> {
        self.lock().data.keys().cloned().collect()
    }

    /// After `n` more successful writes, every write fails until [`MemoryKv::heal`].
    pub fn fail_writes_after(&self, n: usize) {
        self.lock().writes_before_failure = Some(n);
    }

    pub fn heal(&self) {
        self.lock().writes_before_failure = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock only happens in a failing test; keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    fn charge_write(&mut self) -> Result<(), KvError> {
        match self.writes_before_failure.as_mut() {
            Some(0) => Err(KvError("injected write failure".into())),
            Some(n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }
}

impl Kv for MemoryKv {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.lock().data.get(key).cloned())
    }

    fn set(&self, key: &str, value: &[u8]) -> Result<(), KvError> {
        let mut inner = self.lock();
        inner.charge_write()?;
        inner.data.insert(key.to_string(), value.to_vec());
        Ok(())
    }

    fn delete(&self, key: &str) -> Result<(), KvError> {
        let mut inner = self.lock();
        inner.charge_write()?;
        inner.data.remove(key);
        Ok(())
    }

    fn swap(&self, key: &str, expected: Option<&[u8]>, new: &[u8]) -> Result<bool, KvError> {
        let (hook, reported) = {
            let mut inner = self.lock();
            if inner.data.get(key).map(Vec::as_slice) != expected {
                return Ok(false);
            }
            inner.charge_write()?;
            inner.data.insert(key.to_string(), new.to_vec());
            (inner.after_swap.take(), !inner.swap_always_reports_failure)
        };
        if let Some(f) = hook {
            f(self);
        }
        Ok(reported)
    }
}
