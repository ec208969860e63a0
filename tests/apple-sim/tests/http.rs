//! HTTP-level tests: the simulator over real sockets with a plain blocking client.

use std::time::Duration;

use apple_sim::client::{get, post_json, request, Receiver};
use apple_sim::{
    AssetSpec, AssignmentSpec, FaultKind, FaultSpec, LocationSpec, Simulator, TakeOver,
};
use serde_json::{json, Value};

fn sim() -> (Simulator, String) {
    let sim = Simulator::start().expect("start");
    sim.set_event_delay(Duration::from_millis(50));
    let t = sim.add_location(LocationSpec::named("HTTP"));
    sim.add_assets(
        &t,
        vec![AssetSpec::app("100", 2), AssetSpec::book("200", 5)],
    )
    .unwrap();
    (sim, t)
}

#[test]
fn service_config_and_auth() {
    let (sim, t) = sim();
    let r = get(&format!("{}/service/config", sim.base_url()), None).unwrap();
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["limits"]["maxRequestPerSecond"], 15);
    assert_eq!(
        v["urls"]["getAssets"],
        format!("{}/mdm/v2/assets", sim.origin())
    );
    assert!(v["urls"]["contentMetadataLookup"]
        .as_str()
        .unwrap()
        .starts_with(&sim.origin()));
    let r = get(&format!("{}/assets", sim.base_url()), None).unwrap();
    assert_eq!(
        (r.status, r.json()["errorNumber"].clone()),
        (401, json!(9722))
    );
    let r = get(&format!("{}/assets", sim.base_url()), Some("nope")).unwrap();
    assert_eq!(
        (r.status, r.json()["errorNumber"].clone()),
        (401, json!(9601))
    );
    let r = get(&format!("{}/assets", sim.base_url()), Some(&t)).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().contains("json"));
    assert_eq!(r.json()["assets"].as_array().unwrap().len(), 2);
    // the call log
    let calls = sim.calls();
    assert_eq!(calls.len(), 4);
    assert_eq!(calls[3].path, "/mdm/v2/assets");
    assert_eq!(calls[3].token.as_deref(), Some(t.as_str()));
    assert_eq!(calls[3].location_uid, sim.location_uid(&t));
    assert_eq!(calls[2].error_number, Some(9601));
    assert_eq!(sim.calls_for(&t).len(), 1);
    sim.clear_calls();
    assert!(sim.calls().is_empty());
}

#[test]
fn associate_status_and_notifications_over_http() {
    let (sim, t) = sim();
    let rx = Receiver::start().unwrap();
    let cfg = post_json(
        &format!("{}/client/config", sim.base_url()),
        Some(&t),
        &json!({"mdmInfo": {"id": "us", "name": "vpp-spin", "metadata": "test"},
                "notificationUrl": rx.url(), "notificationAuthToken": "hook-secret",
                "notificationTypes": ["ASSET_MANAGEMENT"]}),
    )
    .unwrap();
    assert_eq!(cfg.status, 200, "{}", cfg.json());
    assert_eq!(cfg.json()["notificationUrl"], rx.url());
    let got = rx.received();
    assert_eq!(
        got.len(),
        1,
        "TEST_NOTIFICATION delivered before the answer"
    );
    assert_eq!(got[0].authorization.as_deref(), Some("Bearer hook-secret"));
    assert_eq!(got[0].body["notificationType"], "TEST_NOTIFICATION");

    let r = post_json(
        &format!("{}/assets/associate", sim.base_url()),
        Some(&t),
        &json!({"assets": [{"adamId": "100", "pricingParam": "STDQ"}], "serialNumbers": ["S1", "S2", "S3"]}),
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let ev = r.json()["eventId"].as_str().unwrap().to_string();
    assert_eq!(r.json()["mdmInfo"]["id"], "us");
    let st = get(&format!("{}/status?eventId={ev}", sim.base_url()), Some(&t))
        .unwrap()
        .json();
    assert_eq!(st["eventStatus"], "PENDING");
    assert!(sim.wait_for_events(Duration::from_secs(5)));
    let st = get(&format!("{}/status?eventId={ev}", sim.base_url()), Some(&t))
        .unwrap()
        .json();
    assert_eq!(st["eventStatus"], "FAILED");
    assert_eq!(st["numCompleted"], 2);
    assert_eq!(st["failures"][0]["errorNumber"], 9709);
    let got = rx.wait_for(3, Duration::from_secs(5));
    assert_eq!(got.len(), 3);
    let results: Vec<&Value> = got[1..]
        .iter()
        .map(|g| &g.body["notification"]["result"])
        .collect();
    assert_eq!(results, [&json!("SUCCESS"), &json!("FAILURE")]);
    assert!(got
        .iter()
        .all(|g| g.body["uId"] == json!(sim.location_uid(&t).unwrap())));
    // The receiver answers before the simulator records the delivery: wait for the record.
    assert!(sim.wait_idle(Duration::from_secs(5)));
    assert_eq!(sim.notifications().len(), 3);
    assert!(sim.notifications().iter().all(|n| n.delivered));
}

#[test]
fn failed_test_notification_rejects_config() {
    let (sim, t) = sim();
    let rx = Receiver::start().unwrap();
    rx.set_status(500);
    let r = post_json(
        &format!("{}/client/config", sim.base_url()),
        Some(&t),
        &json!({"notificationUrl": rx.url(), "notificationAuthToken": "s", "notificationTypes": ["ASSET_COUNT"]}),
    )
    .unwrap();
    assert_eq!(
        (r.status, r.json()["errorNumber"].clone()),
        (400, json!(9728))
    );
    assert!(sim
        .location_state(&t)
        .unwrap()
        .client_config
        .get("notificationUrl")
        .is_none());
    // unreachable URL too
    let r = post_json(
        &format!("{}/client/config", sim.base_url()),
        Some(&t),
        &json!({"notificationUrl": "http://127.0.0.1:1/x", "notificationAuthToken": "s"}),
    )
    .unwrap();
    assert_eq!(r.json()["errorNumber"], 9728);
}

#[test]
fn duplicate_notifications_share_the_id_and_retries_happen() {
    let (sim, t) = sim();
    sim.configure(|c| c.notification_retry_delay_ms = 10);
    let rx = Receiver::start().unwrap();
    post_json(
        &format!("{}/client/config", sim.base_url()),
        Some(&t),
        &json!({"notificationUrl": rx.url(), "notificationAuthToken": "s", "notificationTypes": ["ASSET_COUNT"]}),
    )
    .unwrap();
    sim.set_duplicate_notifications(true);
    sim.change_asset_count(&t, "100", "STDQ", 4).unwrap();
    let got = rx.wait_for(3, Duration::from_secs(5));
    assert_eq!(got.len(), 3);
    assert_eq!(got[1].body["notificationId"], got[2].body["notificationId"]);
    assert_eq!(got[1].body["notification"]["countDelta"], 4);
    // a failing receiver gets 3 attempts
    sim.set_duplicate_notifications(false);
    rx.set_status(503);
    sim.change_asset_count(&t, "100", "STDQ", -1).unwrap();
    assert!(sim.wait_for_notifications(Duration::from_secs(5), |n| n.len() == 4));
    let last = sim.notifications().pop().unwrap();
    assert_eq!(
        (last.attempts, last.delivered, last.last_status),
        (3, false, Some(503))
    );
    assert_eq!(rx.received().len(), 6);
}

#[test]
fn faults_and_rate_limit_over_http() {
    let (sim, t) = sim();
    let url = format!("{}/assets", sim.base_url());
    sim.inject_fault(
        &t,
        FaultSpec::new(FaultKind::Unavailable)
            .on("assets")
            .times(1)
            .retry_after(2),
    )
    .unwrap();
    let r = get(&url, Some(&t)).unwrap();
    assert_eq!((r.status, r.header("retry-after")), (503, Some("2")));
    sim.inject_fault(&t, FaultSpec::new(FaultKind::Invalid200).times(1))
        .unwrap();
    let r = get(&url, Some(&t)).unwrap();
    assert_eq!(
        (r.status, r.json()["errorNumber"].clone()),
        (200, json!(9622))
    );
    sim.inject_fault(&t, FaultSpec::latency(200).times(1))
        .unwrap();
    let start = std::time::Instant::now();
    assert_eq!(get(&url, Some(&t)).unwrap().status, 200);
    assert!(start.elapsed() >= Duration::from_millis(200));
    // rate limit: 15 per second per token
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(get(&url, Some(&t)).unwrap().status);
    }
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert!(limited >= 1, "{statuses:?}");
    let r = get(&url, Some(&t)).unwrap();
    if r.status == 429 {
        assert_eq!(r.json()["errorNumber"], 9646);
        assert!(r.header("retry-after").is_some());
    }
}

#[test]
fn paging_and_incremental_over_http() {
    let (sim, t) = sim();
    sim.set_page_size(2);
    sim.add_assets(&t, vec![AssetSpec::app("300", 10)]).unwrap();
    sim.add_assignments(
        &t,
        (0..5)
            .map(|i| AssignmentSpec::device("300", &format!("S{i}")))
            .collect(),
    )
    .unwrap();
    let base = format!("{}/assignments", sim.base_url());
    let mut all = Vec::new();
    let mut idx = 0;
    let mut version = None;
    loop {
        let v = get(&format!("{base}?pageIndex={idx}"), Some(&t))
            .unwrap()
            .json();
        version.get_or_insert(v["versionId"].clone());
        all.extend(v["assignments"].as_array().unwrap().clone());
        match v["nextPageIndex"].as_u64() {
            Some(n) => idx = n,
            None => break,
        }
    }
    assert_eq!(all.len(), 5);
    assert_eq!(sim.calls().len(), 3);
    let r = get(&format!("{base}?pageIndex=3"), Some(&t)).unwrap();
    assert_eq!(r.json()["errorNumber"], 9650);
    sim.add_assignments(&t, vec![AssignmentSpec::device("300", "NEW")])
        .unwrap();
    let since = version.unwrap();
    let v = get(
        &format!("{base}?sinceVersionId={}", since.as_str().unwrap()),
        Some(&t),
    )
    .unwrap()
    .json();
    assert_eq!(
        v["assignments"],
        json!([{"adamId": "300", "pricingParam": "STDQ", "serialNumber": "NEW"}])
    );
}

#[test]
fn control_api_round_trip() {
    let sim = Simulator::start().unwrap();
    let c = format!("{}/control", sim.origin());
    let r = post_json(
        &format!("{c}/locations"),
        None,
        &json!({"locationName": "Ctl", "orgName": "Org"}),
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let token = r.json()["token"].as_str().unwrap().to_string();
    let uid = r.json()["uId"].as_str().unwrap().to_string();
    let ok = |r: apple_sim::client::HttpResponse| {
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body))
    };
    ok(post_json(
        &format!("{c}/locations/{uid}/assets"),
        None,
        &json!([{"adamId": "1", "totalCount": 3}]),
    )
    .unwrap());
    ok(post_json(
        &format!("{c}/locations/{uid}/assignments"),
        None,
        &json!({"adamId": "1", "serialNumber": "S"}),
    )
    .unwrap());
    ok(post_json(
        &format!("{c}/config"),
        None,
        &json!({"pageSize": 7, "eventDelayMs": 0}),
    )
    .unwrap());
    assert_eq!(sim.config().page_size, 7);
    ok(post_json(
        &format!("{c}/locations/{uid}/faults"),
        None,
        &json!({"kind": "revoked", "count": 1}),
    )
    .unwrap());
    let r = get(&format!("{}/client/config", sim.base_url()), Some(&token)).unwrap();
    assert_eq!(r.json()["errorNumber"], 9625);
    ok(post_json(
        &format!("{c}/locations/{uid}/take-over"),
        None,
        &json!({"mdmInfo": {"id": "x", "name": "Jamf", "metadata": "1"}}),
    )
    .unwrap());
    let state = get(&format!("{c}/locations/{uid}"), None).unwrap().json();
    assert_eq!(state["mdmInfo"]["name"], "Jamf");
    assert_eq!(state["assets"][0]["assignedCount"], 1);
    assert_eq!(state["assignments"][0]["serialNumber"], "S");
    let calls = get(&format!("{c}/calls"), None).unwrap().json();
    assert_eq!(calls.as_array().unwrap().len(), 1);
    assert_eq!(calls[0]["status"], 401);
    ok(request("DELETE", &format!("{c}/calls"), &[], None).unwrap());
    assert!(sim.calls().is_empty());
    let r = get(&format!("{c}/locations/nope"), None).unwrap();
    assert_eq!(r.status, 404);
    // the token itself works as a key too (URL-encoded)
    let enc = token
        .replace('/', "%2F")
        .replace('+', "%2B")
        .replace('=', "%3D");
    assert_eq!(
        get(&format!("{c}/locations/{enc}"), None).unwrap().json()["uId"],
        json!(uid)
    );
}

#[test]
fn take_over_and_lookup_from_rust() {
    let (sim, t) = sim();
    sim.take_over(
        &t,
        TakeOver {
            assignments: vec![AssignmentSpec::device("100", "X")],
            ..Default::default()
        },
    )
    .unwrap();
    let v = get(&format!("{}/assets", sim.base_url()), Some(&t))
        .unwrap()
        .json();
    assert_eq!(v["mdmInfo"]["id"], "other-mdm-0000");
    let l = get(
        &format!("{}/WebObjects/MZStorePlatform.woa/wa/lookup?version=2&id=100,200&p=mdm-lockup&caller=MDM&platform=enterprisestore&cc=us", sim.origin()),
        None,
    )
    .unwrap()
    .json();
    assert_eq!(l["results"]["200"]["kind"], "epubBook");
    assert!(l["results"]["100"]["name"].is_string());
}

#[tokio::test(flavor = "current_thread")]
async fn usable_inside_a_tokio_runtime() {
    // Every Rust-API call is synchronous and never blocks on the caller's runtime.
    let sim = Simulator::start().unwrap();
    sim.set_event_delay(Duration::ZERO);
    let t = sim.add_location(LocationSpec::default());
    sim.add_assets(&t, vec![AssetSpec::app("1", 1)]).unwrap();
    sim.inject_fault(&t, FaultSpec::new(FaultKind::RateLimited).times(1))
        .unwrap();
    let base = sim.base_url();
    let t2 = t.clone();
    let statuses = tokio::task::spawn_blocking(move || {
        let a = get(&format!("{base}/assets"), Some(&t2)).unwrap().status;
        let b = post_json(
            &format!("{base}/assets/associate"),
            Some(&t2),
            &json!({"assets": [{"adamId": "1"}], "serialNumbers": ["S"]}),
        )
        .unwrap()
        .status;
        (a, b)
    })
    .await
    .unwrap();
    assert_eq!(statuses, (429, 200));
    assert_eq!(sim.location_state(&t).unwrap().assets[0].assigned_count, 1);
    assert_eq!(sim.calls().len(), 2);
    drop(sim); // stopping from inside a runtime is fine too
}

#[test]
fn demo_data_is_usable() {
    let sim = Simulator::start().unwrap();
    let demo = sim.seed_demo();
    assert_eq!(demo.len(), 2);
    for (_, token) in &demo {
        let v = get(&format!("{}/assets", sim.base_url()), Some(token))
            .unwrap()
            .json();
        assert!(v["assets"].as_array().unwrap().len() >= 4, "{v}");
        let a = get(&format!("{}/assignments", sim.base_url()), Some(token))
            .unwrap()
            .json();
        assert!(!a["assignments"].as_array().unwrap().is_empty());
    }
}

#[test]
fn flush_events_applies_pending_writes_now() {
    let (sim, t) = sim();
    sim.set_event_delay(Duration::from_secs(60));
    let r = post_json(
        &format!("{}/assets/associate", sim.base_url()),
        Some(&t),
        &json!({"assets": [{"adamId": "100"}], "serialNumbers": ["S1"]}),
    )
    .unwrap();
    let ev = r.json()["eventId"].as_str().unwrap().to_string();
    assert_eq!(sim.pending_events(), 1);
    let flushed = post_json(
        &format!("{}/control/events/flush", sim.origin()),
        None,
        &json!({}),
    )
    .unwrap();
    assert_eq!(flushed.status, 200);
    assert_eq!(sim.pending_events(), 0);
    assert_eq!(
        sim.event(&ev).unwrap().event_status,
        apple_sim::EventStatus::Complete
    );
    assert_eq!(sim.location_state(&t).unwrap().assets[0].assigned_count, 1);
}

#[test]
fn wait_idle_covers_events_and_deliveries() {
    let (sim, t) = sim();
    let rx = Receiver::start().unwrap();
    post_json(
        &format!("{}/client/config", sim.base_url()),
        Some(&t),
        &json!({"notificationUrl": rx.url(), "notificationAuthToken": "s", "notificationTypes": ["ASSET_MANAGEMENT"]}),
    )
    .unwrap();
    post_json(
        &format!("{}/assets/associate", sim.base_url()),
        Some(&t),
        &json!({"assets": [{"adamId": "100"}], "serialNumbers": ["S1"]}),
    )
    .unwrap();
    assert!(!sim.is_idle());
    assert!(sim.wait_idle(Duration::from_secs(5)));
    assert_eq!(rx.received().len(), 2);
}
