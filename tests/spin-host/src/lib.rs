//! A test host that runs this app's Spin components on the wasmtime crates, behaving as
//! Spin 3.x/4.x does for spin-sdk 5.2 components (see docs in `/work/shared/spin-platform.md`
//! section 11). The Spin CLI cannot run here; this host lets tests run the real `.wasm` files.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use spin_host::{App, HostOptions};
//! let app = App::load("spin.toml".as_ref(), HostOptions::default())?;
//! let resp = app
//!     .handle(http::Request::get("/api/health").body(Vec::new())?)
//!     .await?;
//! assert_eq!(resp.status(), 200);
//! # Ok(()) }
//! ```

pub mod compile;
pub mod cron;
pub mod host;
pub mod http_trigger;
pub mod key_value;
pub mod manifest;
pub mod memory;
pub mod outbound;
pub mod redis_store;
pub mod routes;
pub mod runtime_config;
pub mod server;
pub mod variables;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use wasmtime::component::{InstancePre, Linker};
use wasmtime::Engine;

use crate::host::{ComponentEnv, HostState};
use crate::key_value::KvManager;
use crate::manifest::Manifest;
use crate::outbound::AllowedHosts;
use crate::routes::Router;
use crate::variables::ComponentVariables;

pub use crate::server::ServerHandle;

/// How to run an app, like `spin up` flags.
#[derive(Clone, Debug, Default)]
pub struct HostOptions {
    /// `--variable k=v` values; they win over `SPIN_VARIABLE_*` and manifest defaults.
    pub variables: Vec<(String, String)>,
    /// Persist key-value stores here (`<dir>/<label>.json`); `None` keeps them in memory.
    pub kv_dir: Option<PathBuf>,
    /// Store labels besides `default` that exist (what a runtime config would define).
    pub kv_labels: Vec<String>,
    /// Where compiled components are cached; `None` = `$CARGO_TARGET_DIR/spin-host-cache` or
    /// `<manifest dir>/target/spin-host-cache`.
    pub cache_dir: Option<PathBuf>,
    /// Do not read or write the compile cache.
    pub no_cache: bool,
    /// Ignore `SPIN_VARIABLE_*` from the process environment (for hermetic tests).
    pub ignore_env: bool,
    /// `--runtime-config-file`: key-value stores by label (`[key_value_store.<label>]`, types
    /// `spin` and `redis`); a label defined there wins over `kv_dir`/`kv_labels`.
    pub runtime_config: Option<PathBuf>,
    /// What the platform provides and enforces; see [`Platform`].
    pub platform: Platform,
    /// How long one invocation may run before the host stops it (a 500 to the caller).
    /// `None` = the platform's limit: none when self-hosted, 30 s on the managed clouds.
    pub invocation_limit: Option<std::time::Duration>,
}

/// The platform an app is run as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Platform {
    /// Self-hosted Spin (`spin up`): key-value atomics, service chaining, the cron trigger.
    #[default]
    SelfHosted,
    /// Fermyon Cloud and Akamai Functions, as far as they constrain this app: no
    /// `wasi:keyvalue/atomics` (a component importing it does not load), a store of at most
    /// 1,024 keys with keys of at most 255 bytes and values of at most 1 MB, no service chaining
    /// (`*.spin.internal` is refused), a 30 s limit per invocation, no cron trigger.
    ManagedCloud,
}

impl Platform {
    /// The time limit of one invocation (Fermyon Cloud and Akamai Functions: 30 s).
    pub fn invocation_limit(self) -> Option<std::time::Duration> {
        match self {
            Platform::SelfHosted => None,
            Platform::ManagedCloud => Some(std::time::Duration::from_secs(30)),
        }
    }

    /// Interfaces a component of this platform must not import.
    fn missing_interfaces(self) -> &'static [&'static str] {
        match self {
            Platform::SelfHosted => &[],
            // Fermyon Cloud links neither atomics nor batch; Akamai Functions no atomics.
            Platform::ManagedCloud => &["wasi:keyvalue/atomics", "wasi:keyvalue/batch"],
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<Platform> {
        match s {
            "self-hosted" | "spin" => Ok(Platform::SelfHosted),
            "managed-cloud" => Ok(Platform::ManagedCloud),
            other => anyhow::bail!("unknown platform {other:?} (self-hosted, managed-cloud)"),
        }
    }
}

/// A loaded component: its instantiation recipe and what it is allowed to do.
pub(crate) struct LoadedComponent {
    pub pre: InstancePre<HostState>,
    pub env: Arc<ComponentEnv>,
}

/// The shared state behind an [`App`].
pub struct AppInner {
    pub(crate) manifest: Manifest,
    pub(crate) engine: Engine,
    pub(crate) components: HashMap<String, LoadedComponent>,
    pub(crate) router: Router,
    /// Components that have an HTTP trigger (public or private): service chaining targets.
    pub(crate) http_components: Vec<String>,
    pub(crate) kv: KvManager,
    /// Peak linear memory per invocation (see `memory`).
    pub(crate) memory: Arc<memory::MemoryStats>,
    /// Set while serving: the address self-requests appear to come in on.
    pub(crate) self_origin: Mutex<Option<SocketAddr>>,
    pub(crate) platform: Platform,
    /// Stop an invocation after this long (epoch deadline and timer).
    pub(crate) invocation_limit: Option<std::time::Duration>,
    /// Key-value writes left before the invocation making the next one is killed (a test fault;
    /// negative: none planned). See [`App::kill_after_writes`].
    pub(crate) kill_after_writes: std::sync::atomic::AtomicI64,
    /// Seconds components' wall clock runs ahead of the system's ([`App::advance_clock`]).
    pub(crate) clock_offset_secs: Arc<std::sync::atomic::AtomicI64>,
    /// The test's own clock ([`App::freeze_clock`]), shared by every invocation.
    pub(crate) test_clock: Arc<TestClock>,
}

/// A frozen time of day ([`App::freeze_clock`]): Unix seconds (0: the system's clock) and the
/// reads made of it (each one a microsecond later, so time never repeats or goes back).
#[derive(Default)]
pub(crate) struct TestClock {
    pub(crate) frozen_at_secs: std::sync::atomic::AtomicI64,
    pub(crate) reads: std::sync::atomic::AtomicU64,
}

/// A loaded Spin application. Cheap to clone and share between threads.
#[derive(Clone)]
pub struct App {
    inner: Arc<AppInner>,
}

impl App {
    /// Load `spin.toml`, validate it as Spin does, componentize and compile (cached) every
    /// component in parallel.
    pub fn load(manifest_path: &Path, options: HostOptions) -> anyhow::Result<App> {
        let manifest = Manifest::load(manifest_path)?;
        if options.platform == Platform::ManagedCloud && !manifest.cron_triggers.is_empty() {
            anyhow::bail!(
                "this platform has no cron trigger: remove the [[trigger.cron]] entries and call \
                 the scheduled route from an external scheduler"
            );
        }
        let mut store_configs = match &options.runtime_config {
            Some(path) => runtime_config::load(path)?,
            None => Vec::new(),
        };
        store_configs.push(("default".to_string(), key_value::StoreConfig::Spin));
        for label in &options.kv_labels {
            store_configs.push((label.clone(), key_value::StoreConfig::Spin));
        }
        let defined: Vec<String> = store_configs.iter().map(|(l, _)| l.clone()).collect();
        manifest.check_kv_labels(&defined)?;

        let env = |k: &str| {
            if options.ignore_env {
                None
            } else {
                std::env::var(k).ok()
            }
        };
        let app_vars =
            variables::resolve_app_variables(&manifest.variables, &options.variables, env)?;

        let mut envs = BTreeMap::new();
        for (id, c) in &manifest.components {
            let allowed = AllowedHosts::parse(&c.allowed_outbound_hosts, &app_vars)
                .with_context(|| format!("component {id:?}: allowed_outbound_hosts"))?;
            let mut values = BTreeMap::new();
            for (k, t) in &c.variables {
                values.insert(k.clone(), t.resolve(&app_vars)?);
            }
            envs.insert(
                id.clone(),
                Arc::new(ComponentEnv {
                    id: id.clone(),
                    kv_labels: c.key_value_stores.clone(),
                    variables: ComponentVariables {
                        component_id: id.clone(),
                        values,
                    },
                    allowed_hosts: allowed,
                    environment: c
                        .environment
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                }),
            );
        }

        let router = Router::build(
            manifest
                .http_triggers
                .iter()
                .map(|t| (t.component.as_str(), t.route.as_deref())),
        )?;
        let http_components = manifest
            .http_triggers
            .iter()
            .map(|t| t.component.clone())
            .collect();

        let limits = (options.platform == Platform::ManagedCloud)
            .then_some(key_value::StoreLimits::MANAGED_CLOUD);
        let kv = KvManager::with_configs(&store_configs, options.kv_dir.as_deref(), limits)?;

        let invocation_limit = options
            .invocation_limit
            .or_else(|| options.platform.invocation_limit());
        let engine = compile::engine(invocation_limit.is_some())?;
        if invocation_limit.is_some() {
            compile::start_epoch_ticker(&engine);
        }
        let linker = host::linker(&engine)?;
        let cache_dir = if options.no_cache {
            None
        } else {
            Some(
                options
                    .cache_dir
                    .clone()
                    .unwrap_or_else(|| compile::default_cache_dir(&manifest.dir)),
            )
        };
        let components = compile_all(&engine, &linker, &manifest, cache_dir.as_deref(), &envs)?;
        for (id, c) in &components {
            let ty = c.pre.component().component_type();
            for (name, _) in ty.imports(&engine) {
                if let Some(missing) = options
                    .platform
                    .missing_interfaces()
                    .iter()
                    .find(|m| name.starts_with(*m))
                {
                    anyhow::bail!(
                        "component {id:?} imports {name}, which this platform does not provide \
                         ({missing}); build it without the `atomics` feature \
                         (--no-default-features)"
                    );
                }
            }
        }

        Ok(App {
            inner: Arc::new(AppInner {
                manifest,
                engine,
                components,
                router,
                http_components,
                kv,
                memory: Arc::default(),
                self_origin: Mutex::new(None),
                platform: options.platform,
                invocation_limit,
                kill_after_writes: std::sync::atomic::AtomicI64::new(-1),
                clock_offset_secs: Arc::default(),
                test_clock: Arc::default(),
            }),
        })
    }

    /// Handle one request as the HTTP trigger would. `req.uri()` is path + query; the Host
    /// header is optional (`localhost` is assumed without one).
    pub async fn handle(
        &self,
        req: http::Request<Vec<u8>>,
    ) -> anyhow::Result<http::Response<Vec<u8>>> {
        let client: SocketAddr = ([127, 0, 0, 1], 0).into();
        http_trigger::handle(self.inner.clone(), req, client).await
    }

    /// Invoke a cron component once, in a fresh instance, with `metadata.timestamp`.
    /// The outer error is a host failure or trap; the inner one the guest's `error::other`.
    pub async fn run_cron(
        &self,
        component_id: &str,
        timestamp: u64,
    ) -> anyhow::Result<Result<(), String>> {
        http_trigger::run_cron(self.inner.clone(), component_id, timestamp).await
    }

    /// `(component, cron_expression)` of every `[[trigger.cron]]`.
    pub fn cron_triggers(&self) -> Vec<(String, String)> {
        self.inner
            .manifest
            .cron_triggers
            .iter()
            .map(|t| (t.component.clone(), t.cron_expression.clone()))
            .collect()
    }

    /// Serve HTTP on `listen` (port 0 picks a free one). Returns once bound; the server stops
    /// when the handle is dropped.
    pub async fn serve(&self, listen: SocketAddr) -> anyhow::Result<ServerHandle> {
        server::serve(self.inner.clone(), listen).await
    }

    /// Peak linear memory per component since the last reset: (component, bytes, invocations).
    pub fn peak_memory(&self) -> Vec<(String, usize, u64)> {
        self.inner.memory.peaks()
    }

    pub fn reset_peak_memory(&self) {
        self.inner.memory.reset()
    }

    /// A test fault: after `writes` more key-value writes (by any component), the invocation
    /// making the next one traps there (the write is not applied), as if the platform killed it
    /// between two writes. One kill per call; [`App::kill_pending`] tells whether it came.
    pub fn kill_after_writes(&self, writes: u32) {
        self.inner
            .kill_after_writes
            .store(i64::from(writes), std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether a planned kill has not happened yet.
    pub fn kill_pending(&self) -> bool {
        self.inner
            .kill_after_writes
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 0
    }

    /// Cancel a planned kill that has not happened.
    pub fn cancel_kill(&self) {
        self.inner
            .kill_after_writes
            .store(-1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Stop the time of day components see at `unix_secs`: from then on it moves only by
    /// [`App::advance_clock`] (and a microsecond per read), not with the machine's, so a seeded
    /// test sees the same times on every run however fast the machine is.
    pub fn freeze_clock(&self, unix_secs: i64) {
        self.inner
            .test_clock
            .frozen_at_secs
            .store(unix_secs.max(1), std::sync::atomic::Ordering::SeqCst);
    }

    /// Move the time of day components see forward by `secs` (never back): a test waits out
    /// grace periods and poll intervals without sleeping. Applies to invocations started after.
    pub fn advance_clock(&self, secs: u64) {
        self.inner.clock_offset_secs.fetch_add(
            i64::try_from(secs).unwrap_or(i64::MAX),
            std::sync::atomic::Ordering::SeqCst,
        );
    }

    /// All keys of a store (sorted); empty for an unknown label.
    pub fn kv_keys(&self, label: &str) -> Vec<String> {
        self.inner
            .kv
            .store(label)
            .map(|s| {
                s.scan_keys()
                    .unwrap_or_else(|e| panic!("listing keys: {e}"))
            })
            .unwrap_or_default()
    }

    pub fn kv_get(&self, label: &str, key: &str) -> Option<Vec<u8>> {
        self.inner
            .kv
            .store(label)?
            .get(key)
            .unwrap_or_else(|e| panic!("reading {key:?}: {e}"))
    }

    /// Write a value as a component would. Panics if the label is unknown (a test bug).
    pub fn kv_set(&self, label: &str, key: &str, value: &[u8]) {
        let store = self
            .inner
            .kv
            .store(label)
            .unwrap_or_else(|| panic!("no key-value store labelled {label:?}"));
        if let Err(e) = store.set(key, value) {
            panic!("writing key-value store {label:?}: {e}");
        }
    }

    pub fn kv_delete(&self, label: &str, key: &str) {
        if let Some(s) = self.inner.kv.store(label) {
            let _ = s.delete(key);
        }
    }

    /// The application name from the manifest.
    pub fn name(&self) -> &str {
        &self.inner.manifest.name
    }

    /// `(component, route)` of every public HTTP route.
    pub fn routes(&self) -> Vec<(String, String)> {
        self.inner.router.routes()
    }
}

/// Compile every component, several at a time (cranelift also parallelises inside one).
fn compile_all(
    engine: &Engine,
    linker: &Linker<HostState>,
    manifest: &Manifest,
    cache_dir: Option<&Path>,
    envs: &BTreeMap<String, Arc<ComponentEnv>>,
) -> anyhow::Result<HashMap<String, LoadedComponent>> {
    let results: Vec<(String, anyhow::Result<wasmtime::component::Component>)> =
        std::thread::scope(|scope| {
            let handles: Vec<_> = manifest
                .components
                .values()
                .map(|c| {
                    let id = c.id.clone();
                    let source = c.source.clone();
                    let handle =
                        scope.spawn(move || compile::load_component(engine, &source, cache_dir));
                    (id, handle)
                })
                .collect();
            handles
                .into_iter()
                .map(|(id, h)| {
                    let r = h
                        .join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("compiler thread panicked")));
                    (id, r)
                })
                .collect()
        });

    let mut out = HashMap::new();
    for (id, component) in results {
        let component = component.with_context(|| format!("loading component {id:?}"))?;
        let pre = match linker.instantiate_pre(&component) {
            Ok(pre) => pre,
            Err(first) => {
                // Interfaces Spin provides but this host does not (sqlite, redis, llm, ...)
                // trap when called instead of failing the load, so components that merely
                // link them still run. Only done on failure: defining traps for everything
                // unknown also shadows semver-matched WASI imports.
                let mut l = linker.clone();
                l.define_unknown_imports_as_traps(&component)
                    .and_then(|()| l.instantiate_pre(&component))
                    .map_err(|_| anyhow::anyhow!("linking component {id:?}: {first:?}"))?
            }
        };
        let env = envs
            .get(&id)
            .cloned()
            .with_context(|| format!("no settings for component {id:?}"))?;
        out.insert(id, LoadedComponent { pre, env });
    }
    Ok(out)
}
