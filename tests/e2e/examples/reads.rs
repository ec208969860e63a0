//! Where a read's time goes: the read routes of an account of `VPP_READS_ASSETS` assets (default
//! 10,000) and `VPP_READS_ASSIGNMENTS` assignments (default 100,000), each timed beside the
//! one-key-value-read floor (`GET /api/settings`) in interleaved rounds, plus variants that
//! separate a route's fixed cost from its per-row cost (`limit=1`, `limit=50`).
//!
//! Run: `cargo run -p e2e --example reads` after building the components (scripts/bench does
//! both for the full scale scenario). Prints figures; asserts nothing about time.

use e2e::{Env, ADMIN_KEY};
use std::time::Instant;

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

fn pct(lat: &[f64], p: f64) -> f64 {
    lat[((lat.len() as f64 - 1.0) * p).round() as usize]
}

async fn run() {
    let assets = env_usize("VPP_READS_ASSETS", 10_000);
    let total = env_usize("VPP_READS_ASSIGNMENTS", 100_000);
    let env = Env::start().await;
    env.sim.set_page_size(1000);
    env.sim.set_rate_limit_enabled(false);
    let token = env
        .sim
        .add_location(apple_sim::LocationSpec::named("Reads"));
    let specs = (0..assets)
        .map(|i| apple_sim::AssetSpec {
            adam_id: format!("{}", 100_000 + i),
            total_count: 1_000_000,
            ..Default::default()
        })
        .collect();
    env.sim.add_assets(&token, specs).expect("assets");
    let specs = (0..total)
        .map(|i| {
            apple_sim::AssignmentSpec::device(
                &format!("{}", 100_000 + (i % assets)),
                &format!("SER{i:07}"),
            )
        })
        .collect();
    env.sim.add_assignments(&token, specs).expect("assignments");
    let t = Instant::now();
    let id = env.add_account("Reads", &token).await;
    let job = env.refresh(&id).await;
    println!(
        "reads: {assets} assets, {total} assignments; refreshed in {:.1} s ({})",
        t.elapsed().as_secs_f64(),
        job["state"]
    );
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
        ("floor: GET /api/settings", "/api/settings".into()),
        (
            "licenses, first page (default limit)",
            format!("/api/licenses?accountId={id}"),
        ),
        (
            "licenses, a later page by cursor",
            format!("/api/licenses?accountId={id}&cursor={}", urlencode(&cursor)),
        ),
        (
            "licenses, limit=500",
            format!("/api/licenses?accountId={id}&limit=500"),
        ),
        (
            "licenses, limit=50",
            format!("/api/licenses?accountId={id}&limit=50"),
        ),
        (
            "licenses, limit=1",
            format!("/api/licenses?accountId={id}&limit=1"),
        ),
        (
            "an asset's assignments, page 0",
            format!("/api/licenses/{id}/100000/assignments"),
        ),
        (
            "an asset's assignments with pricingParam",
            format!("/api/licenses/{id}/100001/assignments?pricingParam=STDQ"),
        ),
        ("GET /api/accounts", "/api/accounts".into()),
        ("GET /api/accounts/{id}", format!("/api/accounts/{id}")),
    ];
    let mut lat: Vec<Vec<f64>> = vec![Vec::new(); routes.len()];
    let mut bytes = vec![0usize; routes.len()];
    for _ in 0..10 {
        for (i, (_, path)) in routes.iter().enumerate() {
            for _ in 0..5 {
                let t = Instant::now();
                let r = env.call("GET", path, None, Some(ADMIN_KEY)).await;
                assert_eq!(r.status, 200, "{path}: {}", r.text());
                lat[i].push(t.elapsed().as_secs_f64() * 1000.0);
                bytes[i] = r.body.len();
            }
        }
    }
    for l in lat.iter_mut() {
        l.sort_by(|a, b| a.total_cmp(b));
    }
    let floor = pct(&lat[0], 0.5);
    for (i, (name, _)) in routes.iter().enumerate() {
        println!(
            "{name}: p50 {:.2} ms, p95 {:.2} ms, {:.2}x the floor's throughput, {} B",
            pct(&lat[i], 0.5),
            pct(&lat[i], 0.95),
            floor / pct(&lat[i], 0.5),
            bytes[i],
        );
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
