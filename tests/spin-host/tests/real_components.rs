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
    // No chaining grant here: the component reports apple unreachable (denied), but it ran.
    assert_ne!(resp.status(), 500);
    assert!(
        String::from_utf8_lossy(resp.body()).contains("HttpRequestDenied") || resp.status() == 200
    );

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

/// The repo's own `spin.toml`, with sources pointed at the built components: the accounts
/// health check reaches the private apple component through service chaining.
#[tokio::test]
async fn full_app_service_chaining_and_cron() {
    let names = ["accounts", "licenses", "apple", "scheduler"];
    let Some(paths) = names.iter().map(|n| wasm(n)).collect::<Option<Vec<_>>>() else {
        eprintln!("components not all built; skipping");
        return;
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let Ok(text) = std::fs::read_to_string(root.join("spin.toml")) else {
        eprintln!("no spin.toml; skipping");
        return;
    };
    let wasm_dir = paths[0].parent().unwrap().display().to_string();
    let text = text.replace(
        "source = \"target/wasm32-wasip1/release",
        &format!("source = \"{wasm_dir}"),
    );
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(dir.path(), &text);
    let options = HostOptions {
        variables: vec![
            ("admin_api_key".into(), "adm".into()),
            (
                "token_seal_key".into(),
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
            ),
            ("scheduler_api_key".into(), "sch".into()),
            ("public_url".into(), "http://127.0.0.1:1".into()),
        ],
        cache_dir: Some(root.join("target/spin-host-cache")),
        ignore_env: true,
        ..Default::default()
    };
    let app = App::load(&manifest, options).unwrap();
    let resp = app
        .handle(
            http::Request::get("/api/health")
                .header("host", "127.0.0.1:3000")
                .body(Vec::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let body = String::from_utf8_lossy(resp.body()).to_string();
    eprintln!("GET /api/health -> {} {body}", resp.status());
    assert_eq!(resp.status(), 200);
    assert!(body.contains("\"reachable\":true"), "{body}");
    // The KV write of the health probe is visible from Rust.
    assert!(!app.kv_keys("default").is_empty());

    // Nothing listens on public_url: the cron component's request fails, as a result.
    let r = app.run_cron("scheduler", 1_700_000_000).await.unwrap();
    assert!(r.is_err(), "{r:?}");
    assert_eq!(app.cron_triggers()[0].0, "scheduler");
}

#[test]
fn app_is_shareable() {
    fn send_sync<T: Send + Sync + Clone>() {}
    send_sync::<App>();
    fn send_future<F: std::future::Future + Send>(_: F) {}
    #[allow(dead_code)]
    fn check(app: App) {
        send_future(async move {
            let _ = app.handle(http::Request::new(Vec::new())).await;
            let _ = app.run_cron("x", 0).await;
        });
    }
}

/// `serve` binds, answers over TCP, and stops when the handle is dropped.
#[tokio::test]
async fn serve_binds_and_stops_on_drop() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(
        dir.path(),
        "spin_manifest_version = 2\n[application]\nname = \"empty\"\n",
    );
    let app = App::load(&manifest, HostOptions::default()).unwrap();
    let server = app.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = server.local_addr();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /.well-known/spin/health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with("OK"), "{out}");
    drop(server);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
