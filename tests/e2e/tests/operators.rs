//! Issue 12: what operators and API users rely on, end to end: `GET /api/metrics` parsed with a
//! Prometheus text parser and checked against the simulator's state; 405 answers with `Allow`;
//! the OpenAPI document's shared responses.

use apple_sim::{FaultKind, FaultSpec};
use e2e::{seed_location, Env, READER_KEY};
use prometheus_parse::{Sample, Scrape, Value as PValue};
use serde_json::json;

/// Scrape `/api/metrics` with `key` and parse it; every sample line must parse.
async fn scrape(env: &Env, key: &str) -> Scrape {
    let r = env.call("GET", "/api/metrics", None, Some(key)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let content_type = r.headers["content-type"].to_str().unwrap().to_string();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = r.text();
    let lines: Vec<std::io::Result<String>> = text.lines().map(|l| Ok(l.to_string())).collect();
    let scrape = Scrape::parse(lines.into_iter()).expect("Prometheus text format");
    let sample_lines = text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();
    // The parser skips what it cannot read: every sample line must have become a sample.
    assert_eq!(
        scrape.samples.len(),
        sample_lines,
        "unparsed lines in\n{text}"
    );
    scrape
}

fn value(s: &Sample) -> f64 {
    match s.value {
        PValue::Counter(v) | PValue::Gauge(v) | PValue::Untyped(v) => v,
        _ => panic!("unexpected sample kind {:?}", s.value),
    }
}

/// The one sample of `metric` whose labels include all of `labels`.
fn get(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect();
    assert_eq!(found.len(), 1, "{metric} {labels:?}: {found:?}");
    value(found[0])
}

fn absent(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> bool {
    !scrape
        .samples
        .iter()
        .any(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_the_simulators_state() {
    let env = Env::start().await;
    let token = seed_location(
        &env.sim,
        "HQ",
        &[("100", 10), ("200", 3)],
        &[("100", "S1"), ("100", "S2"), ("200", "S3")],
    );

    // No key: 401; the reader key may read metrics.
    let r = env.call("GET", "/api/metrics", None, None).await;
    assert_eq!(r.status, 401, "{}", r.text());
    let empty = scrape(&env, READER_KEY).await;
    assert_eq!(get(&empty, "vpp_accounts", &[]), 0.0);

    let id = env.add_account("HQ", &token).await;
    let job = env.refresh(&id).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let account = env.get(&format!("/api/accounts/{id}")).await.json();
    let acc = [("account_id", id.as_str())];

    // Apple fails every attempt of the next assets read: one failed call, errorNumber 9603.
    env.sim
        .inject_fault(
            &token,
            FaultSpec::new(FaultKind::InternalError)
                .on("assets")
                .times(3),
        )
        .unwrap();
    let failing = env
        .admin("POST", &format!("/api/accounts/{id}/refresh"), None)
        .await;
    assert!(failing.status < 500, "{}", failing.text());
    let after_failure = scrape(&env, READER_KEY).await;
    assert_eq!(
        get(&after_failure, "vpp_account_last_apple_error_number", &acc),
        9603.0
    );
    env.sim.clear_faults(&token).unwrap();
    let second = env.finish_job(&failing.json()).await;
    let second_state = second["state"].as_str().unwrap().to_string();

    let job = env.refresh(&id).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let m = scrape(&env, READER_KEY).await;
    let state = env.sim.location_state(&token).unwrap();

    assert_eq!(get(&m, "vpp_accounts", &[]), 1.0);
    assert_eq!(
        get(
            &m,
            "vpp_account_info",
            &[("account_id", &id), ("name", "HQ")]
        ),
        1.0
    );
    let since = get(&m, "vpp_account_seconds_since_last_sync", &acc);
    assert!((0.0..120.0).contains(&since), "{since}");
    let expiry: chrono::DateTime<chrono::Utc> =
        account["expiryDate"].as_str().unwrap().parse().unwrap();
    let days = (expiry - chrono::Utc::now()).num_seconds() as f64 / 86_400.0;
    let reported = get(&m, "vpp_account_token_expiry_days", &acc);
    assert!((reported - days).abs() < 0.01, "{reported} vs {days}");
    assert_eq!(
        get(
            &m,
            "vpp_account_owned",
            &[("account_id", &id), ("owner", "ours")]
        ),
        1.0
    );
    // The last call succeeded: no error number any more.
    assert_eq!(get(&m, "vpp_account_last_apple_error_number", &acc), 0.0);

    // Per asset: Apple's counts.
    for asset in &state.assets {
        let labels = |s: &'static str| {
            [
                ("account_id", id.clone()),
                ("adam_id", asset.adam_id.clone()),
                ("pricing_param", asset.pricing_param.clone()),
                ("state", s.to_string()),
            ]
        };
        let g = |s: &'static str| {
            let l = labels(s);
            let l: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
            get(&m, "vpp_asset_licenses", &l)
        };
        assert_eq!(g("total"), asset.total_count as f64, "{}", asset.adam_id);
        assert_eq!(
            g("in_use"),
            asset.assigned_count as f64,
            "{}",
            asset.adam_id
        );
        assert_eq!(
            g("available"),
            asset.available_count as f64,
            "{}",
            asset.adam_id
        );
        assert_eq!(g("pending"), 0.0);
        assert_eq!(g("retired"), asset.retired_count as f64);
    }
    // The default threshold is 5: 3 total - 1 in use = 2 available is low, 8 of 10 is not.
    assert_eq!(
        get(&m, "vpp_asset_low_licenses", &[("adam_id", "200")]),
        1.0
    );
    assert_eq!(
        get(&m, "vpp_asset_low_licenses", &[("adam_id", "100")]),
        0.0
    );

    // Apple calls, counted by the apple component, against what the simulator received.
    let assets_requests = env
        .sim
        .calls_for(&token)
        .iter()
        .filter(|c| c.path.trim_start_matches("/mdm/v2/") == "assets")
        .count();
    assert_eq!(
        get(
            &m,
            "vpp_apple_calls_total",
            &[("account_id", &id), ("endpoint", "assets")]
        ),
        assets_requests as f64
    );
    assert_eq!(
        get(
            &m,
            "vpp_apple_errors_total",
            &[
                ("account_id", &id),
                ("endpoint", "assets"),
                ("error_number", "9603")
            ]
        ),
        1.0
    );
    assert!(absent(
        &m,
        "vpp_apple_errors_total",
        &[("endpoint", "client/config")]
    ));

    // Jobs by kind and outcome, as the job list has them: the add's first refresh, the first
    // and the last refresh succeeded; the one that met Apple's error ended as its job says.
    let listed = env.get("/api/jobs").await.json();
    let succeeded = listed["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .filter(|j| j["kind"] == "refresh" && j["state"] == "succeeded")
        .count() as f64;
    let expected_min = if second_state == "succeeded" {
        4.0
    } else {
        3.0
    };
    assert!(succeeded >= expected_min, "{listed}");
    assert_eq!(
        get(
            &m,
            "vpp_jobs",
            &[("kind", "refresh"), ("state", "succeeded")]
        ),
        succeeded
    );
    if second_state != "succeeded" {
        assert_eq!(
            get(
                &m,
                "vpp_jobs",
                &[("kind", "refresh"), ("state", &second_state)]
            ),
            1.0
        );
    }
    assert_eq!(
        get(
            &m,
            "vpp_job_duration_seconds_count",
            &[("kind", "refresh"), ("outcome", "succeeded")]
        ),
        succeeded
    );
    assert!(
        get(
            &m,
            "vpp_job_duration_seconds_sum",
            &[("kind", "refresh"), ("outcome", "succeeded")]
        ) >= 0.0
    );

    // An assignment Apple has not confirmed yet is a pending event and a pending license.
    env.sim
        .set_event_delay(std::time::Duration::from_secs(3600));
    let r = env
        .admin(
            "POST",
            "/api/assignments",
            Some(&json!({"accountId": id, "adamId": "100", "serialNumbers": ["NEW1"]})),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let m = scrape(&env, READER_KEY).await;
    assert_eq!(get(&m, "vpp_pending_events", &[]), 1.0);
    assert_eq!(get(&m, "vpp_account_pending_events", &acc), 1.0);
    assert_eq!(
        get(
            &m,
            "vpp_asset_licenses",
            &[("adam_id", "100"), ("state", "pending")]
        ),
        1.0
    );
    assert_eq!(get(&m, "vpp_notices_undelivered", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_405_names_the_allowed_methods() {
    let env = Env::start().await;
    for (method, path, allow) in [
        ("DELETE", "/api/accounts", "GET, POST"),
        ("PUT", "/api/metrics", "GET"),
        ("PATCH", "/api/settings", "GET, PUT"),
        ("GET", "/api/assignments", "POST"),
        ("POST", "/api/policies/p1", "GET, PUT, DELETE"),
        ("DELETE", "/api/daily", "GET, POST"),
        ("GET", "/api/jobs/abc/resume", "POST"),
    ] {
        let r = env.admin(method, path, None).await;
        assert_eq!(r.status, 405, "{method} {path}: {}", r.text());
        assert_eq!(r.code(), "method_not_allowed");
        let header = r
            .headers
            .get("allow")
            .map(|v| v.to_str().unwrap().to_string());
        assert_eq!(header.as_deref(), Some(allow), "{method} {path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_document_declares_the_bearer_scheme_and_links() {
    let env = Env::start().await;
    let r = env.call("GET", "/api/openapi.json", None, None).await;
    assert_eq!(r.status, 200);
    let d = r.json();
    assert_eq!(d["components"]["securitySchemes"]["bearer"]["type"], "http");
    let assign = &d["paths"]["/api/assignments"]["post"]["responses"];
    assert_eq!(
        assign["202"]["links"]["GetEvent"]["parameters"]["id"],
        "$response.body#/eventId"
    );
    let refresh = &d["paths"]["/api/accounts/{id}/refresh"]["post"]["responses"];
    assert_eq!(refresh["202"]["links"]["GetJob"]["operationId"], "getJob");
    assert!(d["paths"]["/api/metrics"]["get"]["responses"]["401"].is_object());
}
