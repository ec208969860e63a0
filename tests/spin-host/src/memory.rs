//! Peak linear memory per invocation: every `Store` gets a [`MemoryMeter`] as its wasmtime
//! `ResourceLimiter`; it allows every growth (Spin sets no limit by default) and, when the
//! invocation's store is dropped, records the largest memory the guest reached. Benchmarks read
//! the figures with [`crate::App::peak_memory`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Largest linear memory seen per component, and how many invocations were measured.
#[derive(Default)]
pub struct MemoryStats {
    peaks: Mutex<BTreeMap<String, (usize, u64)>>,
}

impl MemoryStats {
    fn record(&self, component: &str, peak: usize) {
        let mut peaks = self.peaks.lock().unwrap_or_else(|e| e.into_inner());
        let e = peaks.entry(component.to_string()).or_insert((0, 0));
        e.0 = e.0.max(peak);
        e.1 += 1;
    }

    /// (component, peak bytes, invocations) since the last [`MemoryStats::reset`].
    pub fn peaks(&self) -> Vec<(String, usize, u64)> {
        let peaks = self.peaks.lock().unwrap_or_else(|e| e.into_inner());
        peaks
            .iter()
            .map(|(k, (p, n))| (k.clone(), *p, *n))
            .collect()
    }

    pub fn reset(&self) {
        self.peaks.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// The limiter of one invocation.
pub struct MemoryMeter {
    component: String,
    stats: Arc<MemoryStats>,
    peak: usize,
}

impl MemoryMeter {
    pub fn new(component: &str, stats: Arc<MemoryStats>) -> Self {
        MemoryMeter {
            component: component.to_string(),
            stats,
            peak: 0,
        }
    }
}

impl wasmtime::ResourceLimiter for MemoryMeter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.peak = self.peak.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        _desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(true)
    }
}

impl Drop for MemoryMeter {
    fn drop(&mut self) {
        if self.peak > 0 {
            self.stats.record(&self.component, self.peak);
        }
    }
}
