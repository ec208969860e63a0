//! The end-to-end harness: loads the real `spin.toml` with the real built `.wasm` components
//! into `spin-host`, serves it on a loopback port (Apple's notifications and the scheduler call
//! back into it), and points the apple component at a fresh Apple simulator.

use apple_sim::Simulator;
use base64::Engine;
use serde_json::Value;
use spin_host::{App, HostOptions, ServerHandle};
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
}

impl Env {
    pub async fn start() -> Env {
        Env::start_with(Vec::new()).await
    }

    /// Start with extra or overriding Spin variables.
    pub async fn start_with(extra: Vec<(&str, String)>) -> Env {
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
        let options = HostOptions {
            variables,
            ..HostOptions::default()
        };
        let app = App::load(&manifest(), options).expect("load spin.toml");
        let server = app.serve(listen).await.expect("serve");
        Env {
            app,
            sim,
            server,
            public_url,
        }
    }

    pub async fn call(
        &self,
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
        let resp = self
            .app
            .handle(req)
            .await
            .expect("host handled the request");
        let (parts, body) = resp.into_parts();
        Resp {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }
    }

    pub async fn admin(&self, method: &str, path: &str, body: Option<&Value>) -> Resp {
        self.call(method, path, body, Some(ADMIN_KEY)).await
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.admin("GET", path, None).await
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

/// An account's stored copy, comparable across runs: the assets document (without sync time,
/// generation and simulator icon URLs), its generation, and every assignment shard of it.
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
            .expect("assets document");
        let mut doc: Value = serde_json::from_slice(&raw).expect("assets json");
        doc["syncedAt"] = Value::Null;
        // Icons point at the simulator, whose port differs between runs.
        if let Some(assets) = doc["assets"].as_array_mut() {
            for a in assets {
                a["iconUrl"] = Value::Null;
            }
        }
        let generation = doc["generation"].as_u64().expect("generation");
        doc["generation"] = Value::Null;
        let prefix = format!("assignments/{id}/{generation}/");
        let mut shards: Vec<(String, Value)> = self
            .keys()
            .into_iter()
            .filter(|k| k.starts_with(&prefix))
            .filter_map(|k| {
                let v = serde_json::from_slice(&self.app.kv_get("default", &k)?).ok()?;
                Some((k[prefix.len()..].to_string(), v))
            })
            .collect();
        shards.sort_by(|a, b| a.0.cmp(&b.0));
        StoredCopy {
            assets: doc,
            generation,
            shards,
        }
    }
}
