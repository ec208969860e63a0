//! The end-to-end harness: loads the real `spin.toml` with the real built `.wasm` components
//! into `spin-host`, serves it on a loopback port (Apple's notifications and the scheduler call
//! back into it), and points the apple component at a fresh Apple simulator.

use apple_sim::Simulator;
use base64::Engine;
use serde_json::{json, Value};
use spin_host::{App, HostOptions, Platform, ServerHandle};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

pub const ADMIN_KEY: &str = "e2e-admin-key-0123456789";
pub const READER_KEY: &str = "e2e-reader-key-0123456789";
pub const SCHEDULER_KEY: &str = "e2e-scheduler-key-0123456789";

pub fn seal_key() -> String {
    base64::engine::general_purpose::STANDARD.encode([42u8; 32])
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// Where the release `.wasm` files are: `VPP_WASM_DIR`, else the workspace's target dir.
fn wasm_dir() -> PathBuf {
    if let Ok(d) = std::env::var("VPP_WASM_DIR") {
        return PathBuf::from(d);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join("target"));
    target.join("wasm32-wasip1/release")
}

/// The real manifest with `source` paths pointed at the built components (written once per
/// test process: tests run in parallel).
fn manifest() -> PathBuf {
    static MANIFEST: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    MANIFEST.get_or_init(write_manifest).clone()
}

fn write_manifest() -> PathBuf {
    let root = workspace_root();
    let text = std::fs::read_to_string(root.join("spin.toml")).expect("spin.toml");
    let dir = wasm_dir();
    for c in ["accounts", "licenses", "apple", "scheduler", "console"] {
        let wasm = dir.join(format!("{c}.wasm"));
        assert!(
            wasm.exists(),
            "{} is missing: build the components first (bash scripts/test does)",
            wasm.display()
        );
    }
    let rewritten = text.replace(
        "source = \"target/wasm32-wasip1/release/",
        &format!("source = \"{}/", dir.display()),
    );
    let out_dir = root.join("target/e2e");
    std::fs::create_dir_all(&out_dir).expect("target/e2e");
    let path = out_dir.join(format!("spin-{}.toml", std::process::id()));
    std::fs::write(&path, rewritten).expect("write manifest");
    path
}

fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// A response as the tests see it.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The error code of the API's error shape.
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

pub struct Env {
    pub app: App,
    pub sim: Simulator,
    pub server: ServerHandle,
    pub public_url: String,
    /// How the app was started: [`Env::another_instance`] starts more the same way.
    launch: Launch,
}

/// How the host runs the app: the platform, and where the key-value store lives.
#[derive(Clone, Debug, Default)]
pub struct HostSetup {
    pub platform: Platform,
    /// A runtime config file (e.g. `[key_value_store.default] type = "redis"`).
    pub runtime_config: Option<PathBuf>,
    /// A manifest to load instead of the real `spin.toml` (self-hosted only).
    pub manifest: Option<PathBuf>,
}

#[derive(Clone)]
struct Launch {
    variables: Vec<(String, String)>,
    setup: HostSetup,
}

/// One more instance of the app of an [`Env`]: same variables and key-value store, its own port.
pub struct Instance {
    pub app: App,
    pub server: ServerHandle,
    pub public_url: String,
}

impl Instance {
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        key: Option<&str>,
    ) -> Resp {
        request(&self.app, method, path, body, key).await
    }

    pub async fn admin(&self, method: &str, path: &str, body: Option<&Value>) -> Resp {
        self.call(method, path, body, Some(ADMIN_KEY)).await
    }
}

/// Load and serve the app on `listen` as `launch` says.
async fn launch_app(launch: &Launch, listen: SocketAddr, sim: &Simulator) -> (App, ServerHandle) {
    let public_url = format!("http://{listen}");
    let mut variables = launch.variables.clone();
    variables.retain(|(k, _)| k != "public_url");
    variables.push(("public_url".into(), public_url.clone()));
    let manifest = match launch.setup.platform {
        Platform::SelfHosted => launch.setup.manifest.clone().unwrap_or_else(manifest),
        Platform::ManagedCloud => {
            variables.retain(|(k, _)| k != "apple_gateway_url" && k != "internal_secret");
            variables.push((
                "apple_gateway_url".into(),
                format!("{public_url}/internal/apple"),
            ));
            variables.push(("internal_secret".into(), INTERNAL_SECRET.into()));
            managed_cloud_manifest(&public_url, &sim.origin(), &variables)
        }
    };
    let options = HostOptions {
        variables,
        runtime_config: launch.setup.runtime_config.clone(),
        platform: launch.setup.platform,
        ..HostOptions::default()
    };
    let app = App::load(&manifest, options).expect("load spin.toml");
    let server = app.serve(listen).await.expect("serve");
    (app, server)
}

/// The internal secret the managed-cloud manifests use.
pub const INTERNAL_SECRET: &str = "e2e-internal-secret-0123456789";

/// Where the components built without key-value atomics are (`scripts/test` builds them):
/// `VPP_WASM_NO_ATOMICS_DIR`, else `<target>/no-atomics`.
fn no_atomics_wasm_dir() -> PathBuf {
    if let Ok(d) = std::env::var("VPP_WASM_NO_ATOMICS_DIR") {
        return PathBuf::from(d);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join("target"));
    target.join("no-atomics")
}

/// The real manifest changed the way README's Platforms section tells users to for Fermyon
/// Cloud and Akamai Functions: no cron trigger (no scheduler component), the apple component on
/// the public route `/internal/apple/...` reached by a self-request with `internal_secret`,
/// literal `allowed_outbound_hosts` (no variables), the components built without atomics.
fn managed_cloud_manifest(
    public_url: &str,
    apple_origin: &str,
    vars: &[(String, String)],
) -> PathBuf {
    let root = workspace_root();
    let text = std::fs::read_to_string(root.join("spin.toml")).expect("spin.toml");
    let mut doc: toml::Table = toml::from_str(&text).expect("spin.toml parses");
    let dir = no_atomics_wasm_dir();
    for c in ["accounts", "licenses", "apple"] {
        let wasm = dir.join(format!("{c}.wasm"));
        assert!(
            wasm.exists(),
            "{} is missing: build the components without atomics first (bash scripts/test does)",
            wasm.display()
        );
    }
    let triggers = doc["trigger"].as_table_mut().expect("[trigger]");
    triggers.remove("cron");
    for t in triggers["http"].as_array_mut().expect("[[trigger.http]]") {
        if t["component"].as_str() == Some("apple") {
            t["route"] = toml::Value::String("/internal/apple/...".into());
        }
    }
    // Variables in allowed_outbound_hosts are written out (Fermyon Cloud has no expressions there).
    let defaults: Vec<(String, String)> = doc["variables"]
        .as_table()
        .expect("[variables]")
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.get("default")?.as_str()?.to_string())))
        .collect();
    let value_of = |name: &str| {
        vars.iter()
            .chain(defaults.iter())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let components = doc["component"].as_table_mut().expect("[component]");
    components.remove("scheduler");
    for (id, c) in components.iter_mut() {
        let c = c.as_table_mut().expect("component table");
        c.insert(
            "source".into(),
            toml::Value::String(dir.join(format!("{id}.wasm")).display().to_string()),
        );
        let hosts: Vec<toml::Value> = c["allowed_outbound_hosts"]
            .as_array()
            .expect("allowed_outbound_hosts")
            .iter()
            .filter_map(|h| h.as_str())
            .map(|h| match h {
                "http://apple.spin.internal" => public_url.to_string(),
                "{{ apple_base_url }}" => apple_origin.to_string(),
                h if h.starts_with("{{") => value_of(h.trim_matches(['{', '}', ' '])),
                h => h.to_string(),
            })
            .map(toml::Value::String)
            .collect();
        c.insert("allowed_outbound_hosts".into(), toml::Value::Array(hosts));
    }
    let out_dir = root.join("target/e2e");
    std::fs::create_dir_all(&out_dir).expect("target/e2e");
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = out_dir.join(format!("spin-cloud-{}-{n}.toml", std::process::id()));
    std::fs::write(&path, toml::to_string(&doc).expect("toml")).expect("write manifest");
    path
}

/// Send one request to an app as the HTTP trigger would.
pub async fn request(
    app: &App,
    method: &str,
    path: &str,
    body: Option<&Value>,
    key: Option<&str>,
) -> Resp {
    let mut b = http::Request::builder().method(method).uri(path);
    if let Some(k) = key {
        b = b.header("authorization", format!("Bearer {k}"));
    }
    let bytes = match body {
        Some(v) => {
            b = b.header("content-type", "application/json");
            serde_json::to_vec(v).expect("json")
        }
        None => Vec::new(),
    };
    let req = b.body(bytes).expect("request");
    let resp = app.handle(req).await.expect("host handled the request");
    let (parts, body) = resp.into_parts();
    Resp {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

impl Env {
    pub async fn start() -> Env {
        Env::start_with(Vec::new()).await
    }

    /// Start with extra or overriding Spin variables.
    pub async fn start_with(extra: Vec<(&str, String)>) -> Env {
        Env::start_on(extra, HostSetup::default()).await
    }

    /// Start from the real manifest changed by `edit` (e.g. a component given another route),
    /// with extra or overriding Spin variables.
    pub async fn start_edited(extra: Vec<(&str, String)>, edit: impl Fn(&str) -> String) -> Env {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let base = std::fs::read_to_string(manifest()).expect("manifest");
        let edited = edit(&base);
        assert_ne!(edited, base, "the edit changed nothing");
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path = workspace_root().join(format!(
            "target/e2e/spin-{}-edited-{n}.toml",
            std::process::id()
        ));
        std::fs::write(&path, edited).expect("write manifest");
        let setup = HostSetup {
            manifest: Some(path),
            ..HostSetup::default()
        };
        Env::start_on(extra, setup).await
    }

    /// Start on a platform and key-value store of choice.
    pub async fn start_on(extra: Vec<(&str, String)>, setup: HostSetup) -> Env {
        let sim = Simulator::start().expect("simulator");
        let listen = free_port();
        let public_url = format!("http://{listen}");
        let mut variables: Vec<(String, String)> = vec![
            ("admin_api_key".into(), ADMIN_KEY.into()),
            ("reader_api_key".into(), READER_KEY.into()),
            ("scheduler_api_key".into(), SCHEDULER_KEY.into()),
            ("token_seal_key".into(), seal_key()),
            ("apple_base_url".into(), sim.origin()),
            ("public_url".into(), public_url.clone()),
        ];
        for (k, v) in extra {
            variables.retain(|(name, _)| name != k);
            variables.push((k.to_string(), v));
        }
        let launch = Launch { variables, setup };
        let (app, server) = launch_app(&launch, listen, &sim).await;
        Env {
            app,
            sim,
            server,
            public_url,
            launch,
        }
    }

    /// Another instance of this app (same variables, platform and key-value store; its own
    /// port and `public_url`): SpinKube replicas sharing Redis.
    pub async fn another_instance(&self) -> Instance {
        let listen = free_port();
        let (app, server) = launch_app(&self.launch, listen, &self.sim).await;
        Instance {
            app,
            server,
            public_url: format!("http://{listen}"),
        }
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        key: Option<&str>,
    ) -> Resp {
        request(&self.app, method, path, body, key).await
    }

    pub async fn admin(&self, method: &str, path: &str, body: Option<&Value>) -> Resp {
        self.call(method, path, body, Some(ADMIN_KEY)).await
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.admin("GET", path, None).await
    }

    /// Turns license removal notices on (`PUT /api/settings`), and checks it was accepted.
    pub async fn notices_on(&self) {
        let body = json!({"licenseRemovalNotification": true});
        let r = self.admin("PUT", "/api/settings", Some(&body)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }

    /// Keys in the app's default store.
    pub fn keys(&self) -> Vec<String> {
        self.app.kv_keys("default")
    }
}

/// Seed a location at the simulator with assets (`(adamId, total)`) and foreign device
/// assignments (`(adamId, serial)`); returns its token file.
pub fn seed_location(
    sim: &Simulator,
    name: &str,
    assets: &[(&str, u64)],
    assignments: &[(&str, &str)],
) -> String {
    let token = sim.add_location(apple_sim::LocationSpec::named(name));
    let specs = assets
        .iter()
        .map(|(id, total)| apple_sim::AssetSpec {
            adam_id: id.to_string(),
            total_count: *total,
            name: Some(format!("App {id}")),
            ..Default::default()
        })
        .collect();
    sim.add_assets(&token, specs).expect("seed assets");
    if !assignments.is_empty() {
        let specs = assignments
            .iter()
            .map(|(id, serial)| apple_sim::AssignmentSpec::device(id, serial))
            .collect();
        sim.add_assignments(&token, specs)
            .expect("seed assignments");
    }
    token
}

impl Env {
    /// Add an account and return its id (panics unless 201).
    pub async fn add_account(&self, name: &str, token: &str) -> String {
        let r = self
            .admin(
                "POST",
                "/api/accounts",
                Some(&serde_json::json!({"name": name, "token": token})),
            )
            .await;
        assert_eq!(r.status, 201, "add account: {}", r.text());
        r.json()["id"].as_str().expect("id").to_string()
    }

    /// Run a job to its end: resume it until it is no longer running.
    pub async fn finish_job(&self, job: &Value) -> Value {
        let id = job["id"].as_str().expect("job id").to_string();
        let mut current = job.clone();
        for _ in 0..500 {
            if current["state"] != "running" {
                return current;
            }
            let r = self
                .admin("POST", &format!("/api/jobs/{id}/resume"), None)
                .await;
            assert!(r.status == 200 || r.status == 202, "resume: {}", r.text());
            current = r.json();
        }
        panic!("job {id} did not finish: {current}");
    }

    /// Refresh an account to completion; returns the finished job.
    pub async fn refresh(&self, id: &str) -> Value {
        let r = self
            .admin("POST", &format!("/api/accounts/{id}/refresh"), None)
            .await;
        assert_eq!(r.status, 202, "refresh: {}", r.text());
        self.finish_job(&r.json()).await
    }

    /// Keys in the store that belong to an account (its id appears in them).
    pub fn keys_of(&self, account_id: &str) -> Vec<String> {
        self.keys()
            .into_iter()
            .filter(|k| k.contains(account_id))
            .collect()
    }

    /// Wait (polling, async-friendly) until the simulator has applied every event.
    pub async fn sim_idle(&self) {
        for _ in 0..200 {
            if self.sim.is_idle() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("simulator still busy");
    }
}

impl Env {
    /// Wait until Apple applied an event we track and our API no longer shows it pending.
    pub async fn settled_event(&self, id: &str) -> Value {
        self.sim_idle().await;
        let mut last = Value::Null;
        for _ in 0..150 {
            let r = self.get(&format!("/api/events/{id}")).await;
            assert_eq!(r.status, 200, "{}", r.text());
            last = r.json();
            if last["state"] != "pending" {
                return last;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("event {id} still pending: {last}");
    }
}

/// An account's stored copy, comparable across runs, read through the layout of
/// `crates/store/src/keys.rs` ("The copy"): the assets of every asset page in key order
/// (without simulator icon URLs), the generation, and every assignment per asset from the copy
/// shards (`(asset key, subject → made by)`).
pub struct StoredCopy {
    pub assets: Value,
    pub generation: u64,
    pub shards: Vec<(String, Value)>,
}

impl Env {
    pub fn stored_copy(&self, id: &str) -> StoredCopy {
        let raw = self
            .app
            .kv_get("default", &format!("assets/{id}"))
            .expect("copy index");
        let index: Value = serde_json::from_slice(&raw).expect("index json");
        let generation = index["generation"].as_u64().expect("generation");
        let pages = index["assetPages"].as_u64().expect("assetPages");
        let shards = index["copyShards"].as_u64().expect("copyShards");
        let read = |key: String| -> Value {
            self.app
                .kv_get("default", &key)
                .and_then(|v| serde_json::from_slice(&v).ok())
                .unwrap_or(Value::Null)
        };
        let mut assets = serde_json::Map::new();
        for p in 0..pages {
            if let Value::Object(page) = read(format!("assets/{id}/{generation}/{p}")) {
                for (k, mut rec) in page {
                    // Icons point at the simulator, whose port differs between runs.
                    rec["iconUrl"] = Value::Null;
                    assets.insert(k, rec);
                }
            }
        }
        let mut by_asset: std::collections::BTreeMap<String, serde_json::Map<String, Value>> =
            std::collections::BTreeMap::new();
        for n in 0..shards {
            if let Value::Object(shard) = read(format!("assignments/{id}/{generation}/{n}")) {
                for (asset, subjects) in shard {
                    if let Value::Object(subjects) = subjects {
                        by_asset.entry(asset).or_default().extend(subjects);
                    }
                }
            }
        }
        StoredCopy {
            assets: json!({
                "assets": assets.into_iter().map(|(_, v)| v).collect::<Vec<Value>>(),
                "assetCount": index["assets"],
                "assignmentCount": index["assignments"],
            }),
            generation,
            shards: by_asset
                .into_iter()
                .map(|(k, v)| (k, Value::Object(v)))
                .collect(),
        }
    }
}
