//! The managed-cloud platform profile: what Fermyon Cloud and Akamai Functions refuse, and the
//! invocation time limit. The end-to-end suite (`tests/e2e/tests/managed_cloud.rs`) runs the
//! app's scenarios on it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use spin_host::{App, HostOptions, Platform};

fn write(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Where `scripts/test` puts the components built without atomics.
fn no_atomics_wasm(name: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let p = target.join("no-atomics").join(format!("{name}.wasm"));
    assert!(
        p.exists(),
        "{} missing: bash scripts/test builds it",
        p.display()
    );
    p
}

fn managed() -> HostOptions {
    HostOptions {
        platform: Platform::ManagedCloud,
        ignore_env: true,
        ..HostOptions::default()
    }
}

#[test]
fn a_cron_trigger_does_not_load() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write(
        dir.path(),
        "spin.toml",
        r#"
spin_manifest_version = 2
[application]
name = "cron"
[[trigger.cron]]
component = "tick"
cron_expression = "0 */5 * * * *"
[component.tick]
source = "tick.wasm"
"#,
    );
    let err = App::load(&manifest, managed()).err().expect("refused");
    assert!(format!("{err:#}").contains("no cron trigger"), "{err:#}");
}

/// A guest still waiting when its invocation's time is up is stopped: a 500, in about the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invocation_past_the_time_limit_is_stopped() {
    // An "apple component" that accepts the connection and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write(
        dir.path(),
        "spin.toml",
        &format!(
            r#"
spin_manifest_version = 2
[application]
name = "slow"
[[trigger.http]]
route = "/api/..."
component = "accounts"
[component.accounts]
source = "{}"
key_value_stores = ["default"]
allowed_outbound_hosts = ["http://{addr}"]
[component.accounts.variables]
admin_api_key = "k"
apple_gateway_url = "http://{addr}"
"#,
            no_atomics_wasm("accounts").display()
        ),
    );
    let options = HostOptions {
        invocation_limit: Some(Duration::from_millis(500)),
        cache_dir: Some(dir.path().join("cache")),
        ..managed()
    };
    let app = App::load(&manifest, options).unwrap();
    let t = Instant::now();
    let resp = app
        .handle(http::Request::get("/api/health").body(Vec::new()).unwrap())
        .await
        .unwrap();
    let took = t.elapsed();
    assert_eq!(resp.status(), 500);
    assert!(took < Duration::from_secs(20), "stopped after {took:?}");
    drop(silent);
}

/// Service chaining is refused: the default manifest's `http://apple.spin.internal` does not
/// reach the apple component there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_chaining_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write(
        dir.path(),
        "spin.toml",
        &format!(
            r#"
spin_manifest_version = 2
[application]
name = "chain"
[[trigger.http]]
route = "/api/..."
component = "accounts"
[[trigger.http]]
route = {{ private = true }}
component = "apple"
[component.accounts]
source = "{}"
key_value_stores = ["default"]
allowed_outbound_hosts = ["http://apple.spin.internal"]
[component.accounts.variables]
admin_api_key = "k"
[component.apple]
source = "{}"
key_value_stores = ["default"]
"#,
            no_atomics_wasm("accounts").display(),
            no_atomics_wasm("apple").display()
        ),
    );
    let options = HostOptions {
        cache_dir: Some(dir.path().join("cache")),
        ..managed()
    };
    let app = App::load(&manifest, options).unwrap();
    let resp = app
        .handle(http::Request::get("/api/health").body(Vec::new()).unwrap())
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
    assert_eq!(
        body["checks"]["appleComponent"]["reachable"], false,
        "{body}"
    );
}
