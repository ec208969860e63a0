//! Scale benchmark: an account of 10,000 assets and 1,000,000 assignments (990,000 foreign,
//! 10,000 ours that no policy wants) in the simulator, driven through the real components in
//! spin-host with the default job budgets (20 s, 300 Apple calls per invocation):
//! a full refresh, an incremental refresh of 100 changes, reconcile, and the read routes timed
//! beside a one-key-value-read route (`GET /api/settings`) in the same run.
//!
//! Run: `bash scripts/bench` (builds the components, then runs this example with the test host
//! of the tests, or optimised with `VPP_BENCH_PROFILE=bench-host`). `VPP_SCALE_ASSETS` / `VPP_SCALE_ASSIGNMENTS` change the size. Prints figures;
//! asserts nothing about time.

use e2e::{Env, ADMIN_KEY};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

/// Assets that carry our licenses, and ours on each (the unused ones reconcile takes back).
const OUR_ASSETS: usize = 10;
const OURS_PER_ASSET: usize = 1_000;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

fn count_calls(env: &Env) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for c in env.sim.calls() {
        let path = c.path.trim_start_matches('/').to_string();
        let kind = if path.contains("lookup") || path.contains("WebObjects") {
            "lookup".to_string()
        } else {
            path.rsplit("v2/").next().unwrap_or(&path).to_string()
        };
        *out.entry(kind).or_default() += 1;
    }
    out
}

fn snapshot(env: &Env) -> HashMap<String, Vec<u8>> {
    env.keys()
        .into_iter()
        .filter_map(|k| env.app.kv_get("default", &k).map(|v| (k, v)))
        .collect()
}

fn mib(b: usize) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn peak_memory(env: &Env) -> String {
    env.app
        .peak_memory()
        .iter()
        .map(|(c, p, n)| format!("{c} {:.1} MiB ({n} invocations)", mib(*p)))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn timed(env: &Env, path: &str, n: usize) -> Vec<f64> {
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = env.call("GET", path, None, Some(ADMIN_KEY)).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    lat
}

fn pct(lat: &[f64], p: f64) -> f64 {
    lat[((lat.len() as f64 - 1.0) * p).round() as usize]
}

async fn run() {
    let assets = env_usize("VPP_SCALE_ASSETS", 10_000);
    let total = env_usize("VPP_SCALE_ASSIGNMENTS", 1_000_000);
    let ours = OUR_ASSETS * OURS_PER_ASSET;
    let foreign = total.saturating_sub(ours);
    let env = Env::start().await;
    env.sim.set_page_size(1000);
    env.sim.set_rate_limit_enabled(false);
    let token = env
        .sim
        .add_location(apple_sim::LocationSpec::named("Scale"));
    let specs = (0..assets)
        .map(|i| apple_sim::AssetSpec {
            adam_id: format!("{}", 100_000 + i),
            total_count: 1_000_000,
            ..Default::default()
        })
        .collect();
    env.sim.add_assets(&token, specs).expect("assets");
    let specs = (0..foreign)
        .map(|i| {
            apple_sim::AssignmentSpec::device(
                &format!("{}", 100_000 + (i % assets)),
                &format!("SER{i:07}"),
            )
        })
        .collect();
    env.sim.add_assignments(&token, specs).expect("assignments");
    println!("scale: {assets} assets, {total} assignments ({foreign} foreign, {ours} ours)");

    // Adding the account starts its first full refresh: every Apple call from here is counted
    // (the add itself claims the location: a client config read and write).
    env.sim.clear_calls();
    env.app.reset_peak_memory();
    let t = Instant::now();
    let id = env.add_account("Scale", &token).await;

    // 1. Full refresh of the foreign assignments.
    let job = env.refresh(&id).await;
    let refresh = t.elapsed();
    assert_eq!(job["state"], "succeeded", "{job}");
    let calls = count_calls(&env);
    let min: BTreeMap<&str, usize> = BTreeMap::from([
        ("client/config", 1),
        ("assets", assets.div_ceil(1000)),
        ("assignments", foreign.div_ceil(1000)),
        ("users", 1),
        ("lookup", assets.div_ceil(100)),
    ]);
    // The service config is the apple component's own read, once per five minutes of work
    // (Apple's rule, for its limits and the lookup URL), not the job's: counted apart.
    let service = calls.get("service/config").copied().unwrap_or(0);
    println!(
        "full refresh: {:.1} s, {} slices, the job's Apple calls {} (minimum {}: 1 client config, {} asset pages, {} assignment pages, 1 users page, {} name lookups), plus {service} service config reads by the apple component",
        refresh.as_secs_f64(),
        job["slices"],
        calls.values().sum::<usize>() - service,
        min.values().sum::<usize>(),
        min["assets"],
        min["assignments"],
        min["lookup"],
    );
    println!("  calls by kind: {calls:?}");
    println!("  peak memory per invocation: {}", peak_memory(&env));

    // 2. Our licenses: 1,000 devices on each of 10 assets through the API, settled at Apple.
    let t = Instant::now();
    let mut events = Vec::new();
    for a in 0..OUR_ASSETS {
        let serials: Vec<String> = (0..OURS_PER_ASSET)
            .map(|i| format!("OUR{a:02}{i:05}"))
            .collect();
        let r = env
            .admin(
                "POST",
                "/api/assignments",
                Some(&json!({"accountId": id, "adamId": format!("{}", 100_000 + a), "serialNumbers": serials})),
            )
            .await;
        assert!(r.status == 202 || r.status == 200, "assign: {}", r.text());
        for e in r.json()["events"].as_array().cloned().unwrap_or_default() {
            if let Some(eid) = e["id"].as_str().or(e.as_str()) {
                events.push(eid.to_string());
            }
        }
    }
    for e in &events {
        env.settled_event(e).await;
    }
    println!(
        "assign {ours} of ours: {:.1} s, {} events",
        t.elapsed().as_secs_f64(),
        events.len()
    );

    // 3. A full refresh of the whole million, measured for the structural bounds.
    env.sim.clear_calls();
    env.app.reset_peak_memory();
    let t = Instant::now();
    let job = env.refresh(&id).await;
    let refresh_all = t.elapsed();
    assert_eq!(job["state"], "succeeded", "{job}");
    let calls = count_calls(&env);
    let keys = env.keys();
    let sizes: Vec<usize> = keys
        .iter()
        .filter_map(|k| env.app.kv_get("default", k).map(|v| v.len()))
        .collect();
    let biggest = sizes.iter().max().copied().unwrap_or(0);
    let bytes: usize = sizes.iter().sum();
    let copy_keys = keys
        .iter()
        .filter(|k| k.starts_with("assets/") || k.starts_with("assignments/"))
        .count();
    println!(
        "full refresh of {total}: {:.1} s, {} slices, Apple calls {} (assignment pages {}, minimum {}); by kind {calls:?}",
        refresh_all.as_secs_f64(),
        job["slices"],
        calls.values().sum::<usize>(),
        calls.get("assignments").copied().unwrap_or(0),
        total.div_ceil(1000),
    );
    println!(
        "  key-value: {} keys ({} of them the copy), {:.1} MiB stored, largest value {} KiB",
        keys.len(),
        copy_keys,
        mib(bytes),
        biggest / 1024
    );
    println!("  peak memory per invocation: {}", peak_memory(&env));

    // 4. Incremental refresh of 100 changes.
    let specs = (0..100)
        .map(|i| {
            apple_sim::AssignmentSpec::device(
                &format!("{}", 100_000 + (i * 97) % assets),
                &format!("NEW{i:05}"),
            )
        })
        .collect();
    env.sim.add_assignments(&token, specs).expect("changes");
    let before = snapshot(&env);
    env.sim.clear_calls();
    env.app.reset_peak_memory();
    let t = Instant::now();
    let r = env
        .admin(
            "POST",
            &format!("/api/accounts/{id}/refresh?full=false"),
            None,
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let job = env.finish_job(&r.json()).await;
    let incremental = t.elapsed();
    assert_eq!(job["state"], "succeeded", "{job}");
    let after = snapshot(&env);
    let rewritten = after
        .iter()
        .filter(|(k, v)| {
            (k.starts_with("assets/") || k.starts_with("assignments/")) && before.get(*k) != Some(v)
        })
        .count();
    let calls = count_calls(&env);
    println!(
        "incremental refresh of 100 changes: {:.2} s, Apple calls {} ({calls:?}), copy values rewritten {rewritten}",
        incremental.as_secs_f64(),
        calls.values().sum::<usize>(),
    );

    // 5. Reconcile: no policy wants our 10,000.
    env.sim.clear_calls();
    env.app.reset_peak_memory();
    let t = Instant::now();
    let r = env.admin("POST", "/api/reconcile", None).await;
    assert!(r.status == 202 || r.status == 200, "{}", r.text());
    let body = r.json();
    let job = if body["id"].is_string() {
        env.finish_job(&body).await
    } else {
        body["job"].clone()
    };
    let reconcile = t.elapsed();
    let calls = count_calls(&env);
    let disassociate = calls.get("assets/disassociate").copied().unwrap_or(0);
    println!(
        "reconcile of {ours} unused among {total}: {:.1} s, {} disassociate calls (minimum {}: {OUR_ASSETS} assets x {OURS_PER_ASSET} serials at 1,000 per request), job {}",
        reconcile.as_secs_f64(),
        disassociate,
        OUR_ASSETS * OURS_PER_ASSET.div_ceil(1000),
        job["state"],
    );
    println!("  peak memory per invocation: {}", peak_memory(&env));

    // 6. Reads beside the floor, interleaved rounds so both see the same machine.
    env.app.reset_peak_memory();
    let first = env
        .call(
            "GET",
            &format!("/api/licenses?accountId={id}"),
            None,
            Some(ADMIN_KEY),
        )
        .await
        .json();
    let cursor = first["nextCursor"].as_str().unwrap_or("").to_string();
    let routes: Vec<(&str, String)> = vec![
        (
            "floor: GET /api/settings (one key-value read)",
            "/api/settings".into(),
        ),
        (
            "GET /api/licenses?accountId= (first page)",
            format!("/api/licenses?accountId={id}"),
        ),
        (
            "GET /api/licenses?accountId=&cursor= (a later page)",
            format!("/api/licenses?accountId={id}&cursor={}", urlencode(&cursor)),
        ),
        (
            "GET /api/licenses?accountId=&limit=50 (a page of 50 rows)",
            format!("/api/licenses?accountId={id}&limit=50"),
        ),
        (
            "GET /api/licenses/{acct}/{adam}/assignments (a page)",
            format!("/api/licenses/{id}/100000/assignments"),
        ),
        (
            "GET /api/licenses/{acct}/{adam}/assignments (an asset without ours)",
            format!("/api/licenses/{id}/100010/assignments"),
        ),
        ("GET /api/accounts", "/api/accounts".into()),
        ("GET /api/accounts/{id}", format!("/api/accounts/{id}")),
    ];
    let mut lat: Vec<Vec<f64>> = vec![Vec::new(); routes.len()];
    for _ in 0..10 {
        for (i, (_, path)) in routes.iter().enumerate() {
            lat[i].extend(timed(&env, path, 10).await);
        }
    }
    for l in lat.iter_mut() {
        l.sort_by(|a, b| a.total_cmp(b));
    }
    let floor = pct(&lat[0], 0.5);
    for (i, (name, _)) in routes.iter().enumerate() {
        println!(
            "{name}: p50 {:.2} ms, p95 {:.2} ms, {:.2}x the floor's throughput",
            pct(&lat[i], 0.5),
            pct(&lat[i], 0.95),
            floor / pct(&lat[i], 0.5)
        );
    }
    let rows = first["licenses"].as_array().map(Vec::len).unwrap_or(0);
    println!("  (a page of the list holds {rows} rows)");
    println!("  peak memory of the reads: {}", peak_memory(&env));
    env.app.reset_peak_memory();
    let t = Instant::now();
    let csv = env
        .call(
            "GET",
            &format!("/api/licenses?accountId={id}&format=csv"),
            None,
            Some(ADMIN_KEY),
        )
        .await;
    assert_eq!(csv.status, 200);
    println!(
        "CSV export of every row: {:.1} ms, {} lines, {} KiB; peak memory {}",
        t.elapsed().as_secs_f64() * 1000.0,
        csv.text().lines().count(),
        csv.body.len() / 1024,
        peak_memory(&env)
    );
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
