//! The per-instance host state and the Spin interfaces implemented on it:
//! `fermyon:spin/key-value@2.0.0`, `fermyon:spin/variables@2.0.0`,
//! `wasi:keyvalue/{store,atomics,batch}@0.2.0-draft2` and `wasi:config/store`.
//! Semantics follow Spin's `factor-key-value/src/host.rs` and `factor-variables`.

use std::sync::Arc;

use wasmtime::component::{HasSelf, Linker, Resource, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::key_value::{Cas, IncrementError, OpenStore, SwapError};
use crate::outbound::AllowedHosts;
use crate::variables::{ComponentVariables, GetError};
use crate::AppInner;

mod bindings {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "spin-host:host/host",
        imports: { default: trappable },
        with: {
            "fermyon:spin/key-value.store": crate::key_value::OpenStore,
            "wasi:keyvalue/store.bucket": crate::key_value::OpenStore,
            "wasi:keyvalue/atomics.cas": crate::key_value::Cas,
        },
    });
}

pub mod cron_bindings {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "fermyon:spin-cron/spin-cron",
        exports: { default: async },
    });
}

use bindings::fermyon::spin::key_value as spin_kv;
use bindings::fermyon::spin::variables as spin_vars;
use bindings::wasi::config::store as wasi_config;
use bindings::wasi::keyvalue::{atomics, batch, store as wasi_kv};

/// Spin's `DEFAULT_STORE_TABLE_CAPACITY`: at most this many stores open per instance.
const MAX_OPEN_STORES: usize = 256;

/// Which trigger an instance serves; decides service chaining and self-requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TriggerKind {
    Http,
    Cron,
}

/// Everything a component instance may use, fixed at load.
#[derive(Debug)]
pub struct ComponentEnv {
    pub id: String,
    pub kv_labels: Vec<String>,
    pub variables: ComponentVariables,
    pub allowed_hosts: AllowedHosts,
    pub environment: Vec<(String, String)>,
}

/// The `wasi:http` hooks: where outbound requests are checked and dispatched.
pub struct OutboundHooks {
    pub app: Arc<AppInner>,
    pub component: Arc<ComponentEnv>,
    pub trigger: TriggerKind,
}

/// The data of one `Store`: one request (or cron tick) of one component.
/// The system's wall clock (or the test's frozen one, [`crate::App::freeze_clock`]) moved on by a
/// test's offset ([`crate::App::advance_clock`]): what components read as the time of day.
/// Monotonic time is untouched.
struct ShiftedClock(Arc<std::sync::atomic::AtomicI64>, Arc<crate::TestClock>);

impl wasmtime_wasi::HostWallClock for ShiftedClock {
    fn resolution(&self) -> std::time::Duration {
        std::time::Duration::from_micros(1)
    }
    fn now(&self) -> std::time::Duration {
        use std::sync::atomic::Ordering;
        let frozen = self.1.frozen_at_secs.load(Ordering::SeqCst);
        let base = if frozen > 0 {
            let reads = self.1.reads.fetch_add(1, Ordering::SeqCst);
            std::time::Duration::from_secs(frozen as u64) + std::time::Duration::from_micros(reads)
        } else {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
        };
        let offset = self.0.load(std::sync::atomic::Ordering::SeqCst);
        base + std::time::Duration::from_secs(offset.max(0) as u64)
    }
}

pub struct HostState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    hooks: OutboundHooks,
    open_stores: usize,
    /// Records the invocation's peak linear memory (installed with [`HostState::meter`]).
    pub meter: crate::memory::MemoryMeter,
}

impl HostState {
    pub fn new(app: Arc<AppInner>, component: Arc<ComponentEnv>, trigger: TriggerKind) -> Self {
        let mut wasi = WasiCtx::builder();
        // Component logs should show where the host runs, as under `spin up`.
        wasi.inherit_stdout().inherit_stderr();
        wasi.envs(&component.environment);
        wasi.wall_clock(ShiftedClock(
            app.clock_offset_secs.clone(),
            app.test_clock.clone(),
        ));
        let meter = crate::memory::MemoryMeter::new(&component.id, app.memory.clone());
        Self {
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            hooks: OutboundHooks {
                app,
                component,
                trigger,
            },
            open_stores: 0,
            meter,
        }
    }

    /// Measure the peak memory of the invocation this store runs.
    pub fn meter(store: &mut wasmtime::Store<HostState>) {
        store.limiter(|s| &mut s.meter);
    }

    fn component(&self) -> &ComponentEnv {
        &self.hooks.component
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// Everything the components of this app may import.
pub fn linker(engine: &wasmtime::Engine) -> anyhow::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    bindings::Host_::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)?;
    Ok(linker)
}

type Trap<T> = wasmtime::Result<T>;

/// Spin's `open`: the label must be granted to the component, then exist, then fit the table.
enum OpenError {
    AccessDenied,
    NoSuchStore,
    TableFull,
}

impl HostState {
    fn open_store(&mut self, label: &str) -> Result<OpenStore, OpenError> {
        if !self.component().kv_labels.iter().any(|l| l == label) {
            return Err(OpenError::AccessDenied);
        }
        let store = self
            .hooks
            .app
            .kv
            .store(label)
            .ok_or(OpenError::NoSuchStore)?;
        if self.open_stores >= MAX_OPEN_STORES {
            return Err(OpenError::TableFull);
        }
        self.open_stores += 1;
        Ok(OpenStore { store })
    }

    /// A test's planned kill ([`crate::App::kill_after_writes`]): this write traps, so the
    /// invocation stops between two key-value writes as a platform limit or a crash would stop it.
    fn killed_here(&self) -> Trap<()> {
        use std::sync::atomic::Ordering;
        let left = &self.hooks.app.kill_after_writes;
        let prev = left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
            n if n < 0 => None,
            0 => Some(-1),
            n => Some(n - 1),
        });
        if prev == Ok(0) {
            return Err(wasmtime::Error::msg(
                "invocation killed between two key-value writes (test fault)",
            ));
        }
        Ok(())
    }

    fn store_of(&self, r: &Resource<OpenStore>) -> Trap<OpenStore> {
        Ok(self.table.get(r)?.clone())
    }
}

// ---- fermyon:spin/key-value@2.0.0 ----

impl spin_kv::Host for HostState {}

impl spin_kv::HostStore for HostState {
    fn open(&mut self, label: String) -> Trap<Result<Resource<OpenStore>, spin_kv::Error>> {
        match self.open_store(&label) {
            Ok(s) => Ok(Ok(self.table.push(s)?)),
            Err(OpenError::AccessDenied) => Ok(Err(spin_kv::Error::AccessDenied)),
            Err(OpenError::NoSuchStore) => Ok(Err(spin_kv::Error::NoSuchStore)),
            Err(OpenError::TableFull) => Ok(Err(spin_kv::Error::StoreTableFull)),
        }
    }

    fn get(
        &mut self,
        s: Resource<OpenStore>,
        key: String,
    ) -> Trap<Result<Option<Vec<u8>>, spin_kv::Error>> {
        Ok(self
            .store_of(&s)?
            .store
            .get(&key)
            .map_err(spin_kv::Error::Other))
    }

    fn set(
        &mut self,
        s: Resource<OpenStore>,
        key: String,
        value: Vec<u8>,
    ) -> Trap<Result<(), spin_kv::Error>> {
        self.killed_here()?;
        Ok(self
            .store_of(&s)?
            .store
            .set(&key, &value)
            .map_err(spin_kv::Error::Other))
    }

    fn delete(&mut self, s: Resource<OpenStore>, key: String) -> Trap<Result<(), spin_kv::Error>> {
        self.killed_here()?;
        Ok(self
            .store_of(&s)?
            .store
            .delete(&key)
            .map_err(spin_kv::Error::Other))
    }

    fn exists(
        &mut self,
        s: Resource<OpenStore>,
        key: String,
    ) -> Trap<Result<bool, spin_kv::Error>> {
        Ok(self
            .store_of(&s)?
            .store
            .exists(&key)
            .map_err(spin_kv::Error::Other))
    }

    fn get_keys(&mut self, s: Resource<OpenStore>) -> Trap<Result<Vec<String>, spin_kv::Error>> {
        Ok(self
            .store_of(&s)?
            .store
            .keys()
            .map_err(spin_kv::Error::Other))
    }

    fn drop(&mut self, s: Resource<OpenStore>) -> Trap<()> {
        self.table.delete(s)?;
        self.open_stores = self.open_stores.saturating_sub(1);
        Ok(())
    }
}

// ---- fermyon:spin/variables@2.0.0 ----

impl spin_vars::Host for HostState {
    fn get(&mut self, name: String) -> Trap<Result<String, spin_vars::Error>> {
        Ok(self.component().variables.get(&name).map_err(|e| match e {
            GetError::InvalidName(m) => spin_vars::Error::InvalidName(m),
            GetError::Undefined(m) => spin_vars::Error::Undefined(m),
        }))
    }
}

// ---- wasi:config/store (Spin maps it onto the same variables) ----

impl wasi_config::Host for HostState {
    fn get(&mut self, key: String) -> Trap<Result<Option<String>, wasi_config::Error>> {
        // Spin: undefined and invalid names are `none`, per the wasi-config guidance.
        Ok(Ok(self.component().variables.get(&key).ok()))
    }

    fn get_all(&mut self) -> Trap<Result<Vec<(String, String)>, wasi_config::Error>> {
        Ok(Ok(self
            .component()
            .variables
            .values
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()))
    }
}

// ---- wasi:keyvalue@0.2.0-draft2 ----

impl wasi_kv::Host for HostState {
    fn open(&mut self, identifier: String) -> Trap<Result<Resource<OpenStore>, wasi_kv::Error>> {
        match self.open_store(&identifier) {
            Ok(s) => Ok(Ok(self.table.push(s)?)),
            Err(OpenError::AccessDenied) => Ok(Err(wasi_kv::Error::AccessDenied)),
            Err(OpenError::NoSuchStore) => Ok(Err(wasi_kv::Error::NoSuchStore)),
            Err(OpenError::TableFull) => Ok(Err(wasi_kv::Error::Other(
                "too many stores open".to_string(),
            ))),
        }
    }
}

impl wasi_kv::HostBucket for HostState {
    fn get(
        &mut self,
        b: Resource<OpenStore>,
        key: String,
    ) -> Trap<Result<Option<Vec<u8>>, wasi_kv::Error>> {
        Ok(self
            .store_of(&b)?
            .store
            .get(&key)
            .map_err(wasi_kv::Error::Other))
    }

    fn set(
        &mut self,
        b: Resource<OpenStore>,
        key: String,
        value: Vec<u8>,
    ) -> Trap<Result<(), wasi_kv::Error>> {
        self.killed_here()?;
        Ok(self
            .store_of(&b)?
            .store
            .set(&key, &value)
            .map_err(wasi_kv::Error::Other))
    }

    fn delete(&mut self, b: Resource<OpenStore>, key: String) -> Trap<Result<(), wasi_kv::Error>> {
        self.killed_here()?;
        Ok(self
            .store_of(&b)?
            .store
            .delete(&key)
            .map_err(wasi_kv::Error::Other))
    }

    fn exists(
        &mut self,
        b: Resource<OpenStore>,
        key: String,
    ) -> Trap<Result<bool, wasi_kv::Error>> {
        Ok(self
            .store_of(&b)?
            .store
            .exists(&key)
            .map_err(wasi_kv::Error::Other))
    }

    fn list_keys(
        &mut self,
        b: Resource<OpenStore>,
        cursor: Option<String>,
    ) -> Trap<Result<wasi_kv::KeyResponse, wasi_kv::Error>> {
        // Spin returns every key at once and rejects cursors.
        if cursor.is_some() {
            return Ok(Err(wasi_kv::Error::Other(
                "list_keys: cursor not supported".to_string(),
            )));
        }
        Ok(self
            .store_of(&b)?
            .store
            .keys()
            .map(|keys| wasi_kv::KeyResponse { keys, cursor: None })
            .map_err(wasi_kv::Error::Other))
    }

    fn drop(&mut self, b: Resource<OpenStore>) -> Trap<()> {
        self.table.delete(b)?;
        self.open_stores = self.open_stores.saturating_sub(1);
        Ok(())
    }
}

impl atomics::Host for HostState {
    fn increment(
        &mut self,
        b: Resource<OpenStore>,
        key: String,
        delta: i64,
    ) -> Trap<Result<i64, wasi_kv::Error>> {
        self.killed_here()?;
        let store = self.store_of(&b)?;
        match store.store.increment(&key, delta) {
            Ok(n) => Ok(Ok(n)),
            // A non-8-byte value panics the host in Spin's SQLite backend; trap here likewise.
            Err(IncrementError::HostPanic(m)) => Err(wasmtime::Error::msg(m)),
            Err(IncrementError::Store(m)) => Ok(Err(wasi_kv::Error::Other(m))),
        }
    }

    fn swap(&mut self, cas: Resource<Cas>, value: Vec<u8>) -> Trap<Result<(), atomics::CasError>> {
        self.killed_here()?;
        let mut c = self.table.delete(cas)?;
        match c.swap(&value) {
            Ok(()) => Ok(Ok(())),
            Err(SwapError::CasFailed(_)) => {
                // The guest gets its cas back to retry with.
                let again = self.table.push(c)?;
                Ok(Err(atomics::CasError::CasFailed(again)))
            }
            Err(SwapError::Other(m)) => {
                Ok(Err(atomics::CasError::StoreError(wasi_kv::Error::Other(m))))
            }
        }
    }
}

impl atomics::HostCas for HostState {
    fn new(
        &mut self,
        b: Resource<OpenStore>,
        key: String,
    ) -> Trap<Result<Resource<Cas>, wasi_kv::Error>> {
        let store = self.store_of(&b)?.store;
        match store.new_cas(&key) {
            Ok(cas) => Ok(Ok(self.table.push(cas)?)),
            Err(m) => Ok(Err(wasi_kv::Error::Other(m))),
        }
    }

    fn current(&mut self, cas: Resource<Cas>) -> Trap<Result<Option<Vec<u8>>, wasi_kv::Error>> {
        let c = self.table.get_mut(&cas)?;
        Ok(c.current().map_err(wasi_kv::Error::Other))
    }

    fn drop(&mut self, cas: Resource<Cas>) -> Trap<()> {
        self.table.delete(cas)?;
        Ok(())
    }
}

impl batch::Host for HostState {
    fn get_many(
        &mut self,
        b: Resource<OpenStore>,
        keys: Vec<String>,
    ) -> Trap<Result<Vec<(String, Option<Vec<u8>>)>, wasi_kv::Error>> {
        Ok(self
            .store_of(&b)?
            .store
            .get_many(&keys)
            .map_err(wasi_kv::Error::Other))
    }

    fn set_many(
        &mut self,
        b: Resource<OpenStore>,
        key_values: Vec<(String, Vec<u8>)>,
    ) -> Trap<Result<(), wasi_kv::Error>> {
        self.killed_here()?;
        Ok(self
            .store_of(&b)?
            .store
            .set_many(&key_values)
            .map_err(wasi_kv::Error::Other))
    }

    fn delete_many(
        &mut self,
        b: Resource<OpenStore>,
        keys: Vec<String>,
    ) -> Trap<Result<(), wasi_kv::Error>> {
        self.killed_here()?;
        Ok(self
            .store_of(&b)?
            .store
            .delete_many(&keys)
            .map_err(wasi_kv::Error::Other))
    }
}
