//! Smoke tests against this repo's real components, when they have been built
//! (`cargo build --target wasm32-wasip1 --release -p accounts ...`). Skipped otherwise.

use std::path::PathBuf;

use spin_host::{App, HostOptions};

fn wasm(name: &str) -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = std::env::var_os("SPIN_HOST_WASM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/wasm32-wasip1/release"));
    let p = dir.join(format!("{name}.wasm"));
    p.exists().then_some(p)
}

fn write_manifest(dir: &std::path::Path, body: &str) -> PathBuf {
    let path = dir.join("spin.toml");
    std::fs::write(&path, body).unwrap();
    path
}

#[tokio::test]
async fn accounts_component_answers_http() {
    let Some(accounts) = wasm("accounts") else {
        eprintln!("accounts.wasm not built; skipping");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(
        dir.path(),
        &format!(
            r#"
spin_manifest_version = 2
[application]
name = "smoke"
[variables]
admin_api_key = {{ default = "k" }}
[[trigger.http]]
route = "/api/..."
component = "accounts"
[component.accounts]
source = "{}"
key_value_stores = ["default"]
[component.accounts.variables]
admin_api_key = "{{{{ admin_api_key }}}}"
"#,
            accounts.display()
        ),
    );
    let options = HostOptions {
        cache_dir: Some(dir.path().join("cache")),
        ..Default::default()
    };
    let app = App::load(&manifest, options).unwrap();

    let health = app
        .handle(
            http::Request::get("/.well-known/spin/health")
                .body(Vec::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let missing = app
        .handle(http::Request::get("/nope").body(Vec::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert!(missing.body().is_empty());

    let resp = app
        .handle(
            http::Request::get("/api/health")
                .header("host", "127.0.0.1:3000")
                .body(Vec::new())
                .unwrap(),
        )
        .await
        .unwrap();
    eprintln!(
        "GET /api/health -> {} {}",
        resp.status(),
        String::from_utf8_lossy(resp.body())
    );
    assert!(resp.status().as_u16() < 500, "{}", resp.status());

    // A second load hits the compile cache.
    let t = std::time::Instant::now();
    let _again = App::load(
        &manifest,
        HostOptions {
            cache_dir: Some(dir.path().join("cache")),
            ..Default::default()
        },
    )
    .unwrap();
    eprintln!("cached load took {:?}", t.elapsed());
}
