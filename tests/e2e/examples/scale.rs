//! Scale benchmark: an account of 2,000 assets and 100,000 assignments in the simulator,
//! refreshed through the real components in spin-host, then API reads timed.
//! Run: `bash scripts/bench` (builds the components, then `cargo run -p e2e --example scale`).
//! Prints figures; asserts nothing about time.

use e2e::{Env, ADMIN_KEY};
use std::time::Instant;

const ASSETS: usize = 2_000;
const ASSIGNMENTS: usize = 100_000;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

async fn run() {
    let env = Env::start_with(vec![
        ("job_slice_apple_calls", "100000".into()),
        ("job_slice_seconds", "3600".into()),
    ])
    .await;
    env.sim.set_page_size(1000);
    env.sim.set_rate_limit_enabled(false);
    let token = env
        .sim
        .add_location(apple_sim::LocationSpec::named("Scale"));
    let assets = (0..ASSETS)
        .map(|i| apple_sim::AssetSpec {
            adam_id: format!("{}", 100_000 + i),
            total_count: 1_000,
            ..Default::default()
        })
        .collect();
    env.sim.add_assets(&token, assets).expect("assets");
    let assignments = (0..ASSIGNMENTS)
        .map(|i| {
            apple_sim::AssignmentSpec::device(
                &format!("{}", 100_000 + (i % ASSETS)),
                &format!("SER{i:06}"),
            )
        })
        .collect();
    env.sim
        .add_assignments(&token, assignments)
        .expect("assignments");
    let id = env.add_account("Scale", &token).await;
    env.sim.clear_calls();

    let t = Instant::now();
    let job = env.refresh(&id).await;
    let refresh = t.elapsed();
    assert_eq!(job["state"], "succeeded", "{job}");
    let apple_calls = env.sim.calls().len();
    let keys = env.keys().len();
    let biggest = env
        .keys()
        .iter()
        .filter_map(|k| env.app.kv_get("default", k).map(|v| v.len()))
        .max()
        .unwrap_or(0);

    let mut lat = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let r = env
            .call(
                "GET",
                &format!("/api/licenses?accountId={id}"),
                None,
                Some(ADMIN_KEY),
            )
            .await;
        assert_eq!(r.status, 200);
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let mut page = Vec::new();
    for i in 0..50 {
        let t = Instant::now();
        let r = env
            .call(
                "GET",
                &format!("/api/licenses/{id}/{}/assignments", 100_000 + i),
                None,
                Some(ADMIN_KEY),
            )
            .await;
        assert_eq!(r.status, 200);
        page.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    page.sort_by(|a, b| a.total_cmp(b));
    println!("scale: {ASSETS} assets, {ASSIGNMENTS} assignments");
    println!(
        "full refresh: {:.1} s, {} Apple calls, {} slices",
        refresh.as_secs_f64(),
        apple_calls,
        job["slices"]
    );
    println!(
        "key-value: {keys} keys, largest value {} KiB",
        biggest / 1024
    );
    println!(
        "GET /api/licenses?accountId: p50 {:.1} ms, p95 {:.1} ms",
        lat[25], lat[47]
    );
    println!(
        "GET /api/licenses/{{acct}}/{{adam}}/assignments: p50 {:.1} ms, p95 {:.1} ms",
        page[25], page[47]
    );
}
