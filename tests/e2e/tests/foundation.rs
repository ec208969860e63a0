//! Issue 2: the host runs the real components as Spin does. Each test shows one capability
//! through behaviour users rely on.

use e2e::{Env, ADMIN_KEY, READER_KEY};
use serde_json::json;
use std::io::{Read, Write};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_needs_no_key_and_reaches_the_apple_component_by_chaining() {
    let env = Env::start().await;
    let r = env.call("GET", "/api/health", None, None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let h = r.json();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(h["checks"]["keyValue"]["ok"], true);
    // Service chaining to the private apple component, and its secret variable is usable.
    assert_eq!(h["checks"]["appleComponent"]["reachable"], true);
    assert_eq!(h["checks"]["appleComponent"]["sealKey"], "valid");
    // Variables read (the value, never a secret).
    assert_eq!(
        h["checks"]["variables"]["publicUrl"],
        env.public_url.as_str()
    );
    assert!(!r.text().contains(ADMIN_KEY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_route_needs_a_bearer_key() {
    let env = Env::start().await;
    for (method, path) in [
        ("GET", "/api/accounts"),
        ("POST", "/api/accounts"),
        ("GET", "/api/licenses"),
        ("PUT", "/api/policies/p1"),
        ("POST", "/api/reconcile"),
        ("GET", "/api/audit"),
        ("GET", "/api/jobs"),
    ] {
        for key in [None, Some("wrong-key")] {
            let r = env.call(method, path, Some(&json!({})), key).await;
            assert_eq!(r.status, 401, "{method} {path} with {key:?}: {}", r.text());
            assert_eq!(r.code(), "unauthorized");
            assert!(r.json()["error"]["message"].is_string());
        }
    }
    // The reader key reads but may not change anything.
    assert_eq!(
        env.call("GET", "/api/accounts", None, Some(READER_KEY))
            .await
            .status,
        200
    );
    let r = env
        .call("POST", "/api/reconcile", None, Some(READER_KEY))
        .await;
    assert_eq!((r.status, r.code().as_str()), (403, "forbidden"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_unknown_routes_methods_and_large_bodies() {
    let env = Env::start().await;
    let r = env.get("/api/nothing/here").await;
    assert_eq!((r.status, r.code().as_str()), (404, "not_found"));
    let r = env.admin("DELETE", "/api/accounts", None).await;
    assert_eq!((r.status, r.code().as_str()), (405, "method_not_allowed"));
    // Outside /api the console has the root: a path it does not serve is its own 404
    // (never an API answer); Spin's health route stays Spin's.
    let r = env.call("GET", "/elsewhere", None, None).await;
    assert_eq!(r.status, 404);
    assert!(!r.text().contains("\"error\""), "{}", r.text());
    assert_eq!(
        env.call("GET", "/.well-known/spin/health", None, None)
            .await
            .status,
        200
    );

    let big = json!({"name": "x", "token": "A".repeat(1_100_000)});
    let r = env.admin("POST", "/api/accounts", Some(&big)).await;
    assert_eq!((r.status, r.code().as_str()), (413, "payload_too_large"));
    assert!(env.get("/api/accounts").await.json()["accounts"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_value_written_by_one_component_is_read_by_another() {
    let env = Env::start().await;
    // The licenses component writes settings and the audit record of the change ...
    let r = env
        .admin(
            "PUT",
            "/api/settings",
            Some(&json!({"licenseRemovalNotification": true, "lowLicenseThreshold": 3})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // ... which the accounts component reads in a later request.
    let audit = env.get("/api/audit").await.json();
    let rec = &audit["records"][0];
    assert_eq!(rec["action"], "PUT /api/settings", "{audit}");
    assert_eq!(rec["status"], 200);
    assert!(rec["actor"].as_str().unwrap().starts_with("admin:"));
    assert!(!audit.to_string().contains(ADMIN_KEY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_call_to_a_host_not_allowed_is_refused() {
    // Point the HTTP components' gateway at a host they are not allowed to call.
    let sim = apple_sim::Simulator::start().unwrap();
    let env = Env::start_with(vec![("apple_gateway_url", sim.origin())]).await;
    let r = env.call("GET", "/api/health", None, None).await;
    assert_eq!(r.status, 503, "{}", r.text());
    let h = r.json();
    assert_eq!(h["checks"]["appleComponent"]["reachable"], false, "{h}");
    assert!(
        sim.calls().is_empty(),
        "the request never left: {:?}",
        sim.calls()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_on_a_port_with_spin_headers_used_for_locations() {
    let env = Env::start().await;
    let addr = env.server.local_addr();
    let body = json!({"name": "HQ", "token": e2e::seed_location(&env.sim, "HQ", &[("1", 1)], &[])})
        .to_string();
    let req = format!(
        "POST /api/accounts HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    // The Location header is absolute, built from spin-full-url.
    let location = answer
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("location:"))
        .unwrap_or_default()
        .to_string();
    assert!(
        location.contains(&format!("http://{addr}/api/accounts/")),
        "{location}"
    );
}
