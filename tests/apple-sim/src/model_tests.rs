//! Unit tests of the model: no HTTP, no runtime.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::model::*;

fn model() -> (Model, String) {
    let mut m = Model::new("http://sim.test");
    m.config.event_delay_ms = 0;
    // Tests fire many requests at once; the rate limiter has its own test.
    m.config.rate_limit_enabled = false;
    let t = m.add_location(LocationSpec::named("Loc"));
    (m, t)
}

fn get(m: &mut Model, t: &str, path: &str, q: &[(&str, &str)]) -> ApiResponse {
    m.handle_api(&ApiRequest::get(path, t, q), Instant::now())
        .response
}

fn post(m: &mut Model, t: &str, path: &str, body: Value) -> ApiOutcome {
    m.handle_api(&ApiRequest::post(path, t, body), Instant::now())
}

fn status(m: &mut Model, t: &str, event_id: &str) -> Value {
    get(m, t, "status", &[("eventId", event_id)]).body
}

fn event_id(o: &ApiOutcome) -> String {
    o.response.body["eventId"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn token_file_is_base64_json_with_apple_fields() {
    use base64::Engine;
    let (m, t) = model();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&t)
        .unwrap();
    let v: Value = serde_json::from_slice(&raw).unwrap();
    assert!(v["token"].is_string());
    assert_eq!(v["orgName"], "Simulated Org");
    let exp = v["expDate"].as_str().unwrap();
    assert!(exp.ends_with("+0000"), "{exp}");
    assert!(chrono::DateTime::parse_from_str(exp, "%Y-%m-%dT%H:%M:%S%z").is_ok());
    assert_eq!(m.locations.len(), 1);
}

#[test]
fn auth_errors() {
    let (mut m, t) = model();
    let mut r = ApiRequest::get("assets", &t, &[]);
    r.authorization = None;
    assert_eq!(
        m.handle_api(&r, Instant::now()).response.error_number(),
        Some(9722)
    );
    r.authorization = Some(format!("Basic {t}"));
    assert_eq!(m.handle_api(&r, Instant::now()).response.status, 401);
    let resp = get(&mut m, "bogus", "assets", &[]);
    assert_eq!((resp.status, resp.error_number()), (401, Some(9601)));
    m.config.unknown_token_http200 = true;
    let resp = get(&mut m, "bogus", "assets", &[]);
    assert_eq!((resp.status, resp.error_number()), (200, Some(9622)));
    // service config needs no token
    let mut sc = ApiRequest::get("service/config", "", &[]);
    sc.authorization = None;
    let resp = m.handle_api(&sc, Instant::now()).response;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body["limits"]["maxRequestPerSecond"], 15);
    assert_eq!(resp.body["limits"]["maxAssets"], 25);
    assert_eq!(
        resp.body["urls"]["getAssets"],
        "http://sim.test/mdm/v2/assets"
    );
    assert_eq!(
        resp.body["urls"]["contentMetadataLookup"],
        format!("http://sim.test{LOOKUP_PATH}")
    );
    // expired and revoked tokens
    let exp = m.add_location(LocationSpec {
        exp_date: Some(chrono::Utc::now() - chrono::Duration::days(1)),
        ..Default::default()
    });
    let resp = get(&mut m, &exp, "client/config", &[]);
    assert_eq!((resp.status, resp.error_number()), (401, Some(9621)));
    m.set_token_state(&t, None, Some(true)).unwrap();
    assert_eq!(get(&mut m, &t, "assets", &[]).error_number(), Some(9625));
}

#[test]
fn common_fields_and_client_config() {
    let (mut m, t) = model();
    let r = get(&mut m, &t, "client/config", &[]);
    assert_eq!(r.status, 200);
    for f in [
        "uId",
        "tokenExpirationDate",
        "locationName",
        "countryISO2ACode",
        "defaultPlatform",
        "websiteURL",
    ] {
        assert!(r.body.get(f).is_some(), "missing {f}: {}", r.body);
    }
    assert!(r.body.get("mdmInfo").is_none());
    let o = post(
        &mut m,
        &t,
        "client/config",
        json!({"mdmInfo": {"id": "ours", "name": "vpp-spin", "metadata": "1.0"}}),
    );
    assert_eq!(o.response.body["mdmInfo"]["id"], "ours");
    assert!(o.pending_config.is_none());
    // mdmInfo now on every response
    assert_eq!(get(&mut m, &t, "assets", &[]).body["mdmInfo"]["id"], "ours");
    assert_eq!(
        get(&mut m, &t, "users", &[]).body["mdmInfo"]["name"],
        "vpp-spin"
    );
    // takeover
    m.take_over(&t, TakeOver::default()).unwrap();
    assert_eq!(
        get(&mut m, &t, "client/config", &[]).body["mdmInfo"]["id"],
        "other-mdm-0000"
    );
}

#[test]
fn client_config_validation_and_test_notification() {
    let (mut m, t) = model();
    let err = |m: &mut Model, b: Value| post(m, &t, "client/config", b).response.error_number();
    assert_eq!(
        err(&mut m, json!({"mdmInfo": {"id": "x", "name": "y"}})),
        Some(9723)
    );
    assert_eq!(
        err(
            &mut m,
            json!({"mdmInfo": {"id": "x".repeat(101), "name": "y", "metadata": "z"}})
        ),
        Some(9724)
    );
    assert_eq!(
        err(
            &mut m,
            json!({"mdmInfo": {"id": "x", "name": "y".repeat(101), "metadata": "z"}})
        ),
        Some(9725)
    );
    assert_eq!(
        err(
            &mut m,
            json!({"mdmInfo": {"id": "x", "name": "y", "metadata": "z".repeat(256)}})
        ),
        Some(9713)
    );
    assert_eq!(
        err(&mut m, json!({"notificationUrl": "https://a.example/n"})),
        Some(9710)
    );
    assert_eq!(
        err(
            &mut m,
            json!({"notificationUrl": format!("https://a.example/{}", "n".repeat(600)), "notificationAuthToken": "s"})
        ),
        Some(9711)
    );
    assert_eq!(
        err(
            &mut m,
            json!({"notificationUrl": "ftp://a", "notificationAuthToken": "s"})
        ),
        Some(9712)
    );
    assert_eq!(
        err(&mut m, json!({"notificationTypes": ["NOPE"]})),
        Some(9602)
    );
    m.config.require_https_notification_url = true;
    assert_eq!(
        err(
            &mut m,
            json!({"notificationUrl": "http://a.example/n", "notificationAuthToken": "s"})
        ),
        Some(9712)
    );
    m.config.require_https_notification_url = false;

    let o = post(
        &mut m,
        &t,
        "client/config",
        json!({"notificationUrl": "http://a.example/n", "notificationAuthToken": "s3cr3t",
               "notificationTypes": ["ASSET_MANAGEMENT"]}),
    );
    let p = o.pending_config.expect("waits on a test notification");
    assert_eq!(p.test.notification_type, "TEST_NOTIFICATION");
    assert_eq!(p.test.auth_token, "s3cr3t");
    assert_eq!(p.test.envelope["notification"], json!({}));
    assert_eq!(p.test.envelope["notificationType"], "TEST_NOTIFICATION");
    assert!(p.test.envelope["notificationId"].is_string());
    assert_eq!(p.test.envelope["uId"], json!(m.locations[0].uid));
    // failed delivery: rejected, nothing stored
    assert_eq!(m.finish_client_config(&p, false).error_number(), Some(9728));
    assert!(m.locations[0].notification_url.is_none());
    // delivered: stored
    let r = m.finish_client_config(&p, true);
    assert_eq!(r.body["notificationUrl"], "http://a.example/n");
    assert_eq!(
        r.body["subscribedNotificationTypes"],
        json!(["ASSET_MANAGEMENT"])
    );
}

#[test]
fn paging_is_zero_based_with_next_index_only_when_more() {
    let (mut m, t) = model();
    m.config.page_size = 2;
    m.add_assets(
        &t,
        (1..=5).map(|i| AssetSpec::app(&i.to_string(), 3)).collect(),
    )
    .unwrap();
    let p0 = get(&mut m, &t, "assets", &[]).body;
    assert_eq!(
        (p0["currentPageIndex"].clone(), p0["nextPageIndex"].clone()),
        (json!(0), json!(1))
    );
    assert_eq!(
        (p0["size"].clone(), p0["totalPages"].clone()),
        (json!(2), json!(3))
    );
    let p2 = get(&mut m, &t, "assets", &[("pageIndex", "2")]).body;
    assert_eq!(p2["currentPageIndex"], 2);
    assert!(p2.get("nextPageIndex").is_none());
    assert_eq!(p2["assets"].as_array().unwrap().len(), 1);
    assert_eq!(p2["assets"][0]["adamId"], "5");
    for bad in ["3", "-1", "x"] {
        let r = get(&mut m, &t, "assets", &[("pageIndex", bad)]);
        assert_eq!((r.status, r.error_number()), (400, Some(9650)), "{bad}");
    }
    // an empty set is one empty page
    let e = get(&mut m, &t, "assignments", &[]).body;
    assert_eq!(
        (e["totalPages"].clone(), e["size"].clone()),
        (json!(1), json!(0))
    );
}

#[test]
fn asset_filters_and_unlimited() {
    let (mut m, t) = model();
    m.add_assets(
        &t,
        vec![
            AssetSpec::app("1", 5),
            AssetSpec {
                pricing_param: "PLUS".into(),
                ..AssetSpec::app("2", 1)
            },
            AssetSpec::book("3", 4),
            AssetSpec {
                unlimited: true,
                ..AssetSpec::app("4", 0)
            },
        ],
    )
    .unwrap();
    m.add_assignments(
        &t,
        vec![
            AssignmentSpec::device("1", "S1"),
            AssignmentSpec::device("1", "S2"),
        ],
    )
    .unwrap();
    let ids = |m: &mut Model, q: &[(&str, &str)]| -> Vec<String> {
        let b = get(m, &t, "assets", q).body;
        let key = if b["unlimitedAssets"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
        {
            "unlimitedAssets"
        } else {
            "assets"
        };
        b[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["adamId"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(&mut m, &[("productType", "Book")]), ["3"]);
    assert_eq!(ids(&mut m, &[("pricingParam", "PLUS")]), ["2"]);
    assert_eq!(ids(&mut m, &[("adamId", "1")]), ["1"]);
    assert_eq!(ids(&mut m, &[("revocable", "false")]), ["3"]);
    assert_eq!(ids(&mut m, &[("deviceAssignable", "false")]), ["3"]);
    assert_eq!(ids(&mut m, &[("minAssignedCount", "1")]), ["1"]);
    assert_eq!(
        ids(
            &mut m,
            &[("maxAvailableCount", "3"), ("unlimited", "false")]
        ),
        ["1", "2"]
    );
    assert_eq!(ids(&mut m, &[("unlimited", "true")]), ["4"]);
    assert_eq!(ids(&mut m, &[("unlimited", "false")]), ["1", "2", "3"]);
    let b = get(&mut m, &t, "assets", &[("adamId", "1")]).body;
    assert_eq!(b["assets"][0]["assignedCount"], 2);
    assert_eq!(b["assets"][0]["availableCount"], 3);
    let u = get(&mut m, &t, "assets", &[("adamId", "4")]).body;
    assert_eq!(u["assets"][0]["totalCount"], 2147483647);
    let un = get(&mut m, &t, "assets", &[("unlimited", "true")]).body;
    assert!(un["unlimitedAssets"][0].get("availableCount").is_none());
    assert_eq!(
        get(&mut m, &t, "assets", &[("revocable", "maybe")]).error_number(),
        Some(9602)
    );
}

#[test]
fn version_ids_and_incremental_reads() {
    let (mut m, t) = model();
    m.add_assets(&t, vec![AssetSpec::app("1", 10), AssetSpec::app("2", 10)])
        .unwrap();
    m.add_assignments(
        &t,
        vec![
            AssignmentSpec::device("1", "OLD1"),
            AssignmentSpec::device("1", "OLD2"),
        ],
    )
    .unwrap();
    let v1 = get(&mut m, &t, "assignments", &[]).body["versionId"]
        .as_str()
        .unwrap()
        .to_string();
    // nothing changed: empty, same versionId
    let same = get(&mut m, &t, "assignments", &[("sinceVersionId", &v1)]).body;
    assert_eq!(same["assignments"], json!([]));
    assert_eq!(same["versionId"], json!(v1));
    let o = post(
        &mut m,
        &t,
        "assets/associate",
        json!({"assets": [{"adamId": "2", "pricingParam": "STDQ"}], "serialNumbers": ["NEW"]}),
    );
    assert_eq!(o.response.status, 200);
    let since = get(&mut m, &t, "assignments", &[("sinceVersionId", &v1)]).body;
    assert_eq!(
        since["assignments"],
        json!([{"adamId": "2", "pricingParam": "STDQ", "serialNumber": "NEW"}])
    );
    let v2 = since["versionId"].as_str().unwrap().to_string();
    assert_ne!(v1, v2);
    // a removal changes the versionId but is invisible to incremental reads
    post(
        &mut m,
        &t,
        "assets/disassociate",
        json!({"assets": [{"adamId": "1"}], "serialNumbers": ["OLD1"]}),
    );
    let after = get(&mut m, &t, "assignments", &[("sinceVersionId", &v2)]).body;
    assert_eq!(after["assignments"], json!([]));
    assert_ne!(after["versionId"], json!(v2));
    assert_eq!(
        get(&mut m, &t, "assignments", &[]).body["assignments"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // users
    let u1 = get(&mut m, &t, "users", &[]).body["versionId"]
        .as_str()
        .unwrap()
        .to_string();
    post(
        &mut m,
        &t,
        "users/create",
        json!({"users": [{"clientUserId": "u1", "email": "u1@x.example"}]}),
    );
    let us = get(&mut m, &t, "users", &[("sinceVersionId", &u1)]).body;
    assert_eq!(us["users"].as_array().unwrap().len(), 1);
    assert_eq!(us["users"][0]["status"], "Registered");
    assert!(us["users"][0]["inviteCode"].is_string());
    let r = get(&mut m, &t, "assignments", &[("sinceVersionId", "nope")]);
    assert_eq!((r.status, r.error_number()), (400, Some(9721)));
    assert_eq!(
        get(&mut m, &t, "users", &[("sinceVersionId", "nope")]).error_number(),
        Some(9721)
    );
}

#[test]
fn assignment_filters() {
    let (mut m, t) = model();
    m.add_assets(
        &t,
        vec![
            AssetSpec::app("1", 10),
            AssetSpec {
                pricing_param: "PLUS".into(),
                ..AssetSpec::app("2", 10)
            },
        ],
    )
    .unwrap();
    m.add_assignments(
        &t,
        vec![
            AssignmentSpec::device("1", "S1"),
            AssignmentSpec::user("1", "u1"),
            AssignmentSpec {
                pricing_param: Some("PLUS".into()),
                ..AssignmentSpec::device("2", "S1")
            },
        ],
    )
    .unwrap();
    let n = |m: &mut Model, q: &[(&str, &str)]| {
        get(m, &t, "assignments", q).body["assignments"]
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(n(&mut m, &[]), 3);
    assert_eq!(n(&mut m, &[("adamId", "1")]), 2);
    assert_eq!(n(&mut m, &[("serialNumber", "S1")]), 2);
    assert_eq!(n(&mut m, &[("clientUserId", "u1")]), 1);
    assert_eq!(n(&mut m, &[("pricingParam", "PLUS")]), 1);
}

#[test]
fn associate_partial_failure_9709_after_delay() {
    let (mut m, t) = model();
    m.config.event_delay_ms = 500;
    m.add_assets(&t, vec![AssetSpec::app("1", 2)]).unwrap();
    let o = post(
        &mut m,
        &t,
        "assets/associate",
        json!({"assets": [{"adamId": "1", "pricingParam": "STDQ"}], "serialNumbers": ["A", "B", "C"]}),
    );
    let id = event_id(&o);
    assert!(matches!(
        o.effects.as_slice(),
        [Effect::Schedule { delay_ms: 500, .. }]
    ));
    assert_eq!(o.response.body["uId"], json!(m.locations[0].uid));
    assert!(o.response.body["tokenExpirationDate"].is_string());
    let s = status(&mut m, &t, &id);
    assert_eq!(s["eventStatus"], "PENDING");
    assert_eq!(s["eventType"], "ASSOCIATE");
    m.apply_event(&id);
    let s = status(&mut m, &t, &id);
    assert_eq!(s["eventStatus"], "FAILED");
    assert_eq!(
        (s["numCompleted"].clone(), s["numRequested"].clone()),
        (json!(2), json!(3))
    );
    assert_eq!(s["failures"][0]["errorNumber"], 9709);
    assert_eq!(s["failures"][0]["errorInfo"]["serialNumbers"], json!(["C"]));
    let a = get(&mut m, &t, "assets", &[]).body;
    assert_eq!(
        (
            a["assets"][0]["assignedCount"].clone(),
            a["assets"][0]["availableCount"].clone()
        ),
        (json!(2), json!(0))
    );
    // applying twice is a no-op
    assert!(m.apply_event(&id).is_empty());
    assert_eq!(
        get(&mut m, &t, "status", &[("eventId", "nope")]).error_number(),
        Some(9708)
    );
    // associating an already-assigned pair succeeds without using a license
    let o = post(
        &mut m,
        &t,
        "assets/associate",
        json!({"assets": [{"adamId": "1"}], "serialNumbers": ["A"]}),
    );
    let id2 = event_id(&o);
    m.apply_event(&id2);
    assert_eq!(status(&mut m, &t, &id2)["eventStatus"], "COMPLETE");
}

#[test]
fn associate_users_need_registered_users() {
    let (mut m, t) = model();
    m.add_assets(&t, vec![AssetSpec::book("9", 5)]).unwrap();
    m.add_users(
        &t,
        vec![UserSpec {
            client_user_id: "u1".into(),
            ..Default::default()
        }],
    )
    .unwrap();
    let o = post(
        &mut m,
        &t,
        "assets/associate",
        json!({"assets": [{"adamId": "9"}], "clientUserIds": ["u1", "ghost"]}),
    );
    let s = status(&mut m, &t, &event_id(&o));
    assert_eq!(s["numCompleted"], 1);
    assert_eq!(s["failures"][0]["errorNumber"], 9609);
    assert_eq!(
        s["failures"][0]["errorInfo"]["clientUserIds"],
        json!(["ghost"])
    );
}

#[test]
fn manage_assets_validation() {
    let (mut m, t) = model();
    m.add_assets(&t, vec![AssetSpec::app("1", 5), AssetSpec::book("2", 5)])
        .unwrap();
    let err = |m: &mut Model, b: Value| post(m, &t, "assets/associate", b).response.error_number();
    assert_eq!(err(&mut m, json!({"serialNumbers": ["A"]})), Some(9718));
    assert_eq!(
        err(&mut m, json!({"assets": [{"adamId": "1"}]})),
        Some(9719)
    );
    let many: Vec<Value> = (0..26).map(|i| json!({"adamId": i.to_string()})).collect();
    assert_eq!(
        err(&mut m, json!({"assets": many, "serialNumbers": ["A"]})),
        Some(9700)
    );
    let serials: Vec<String> = (0..1001).map(|i| format!("S{i}")).collect();
    assert_eq!(
        err(
            &mut m,
            json!({"assets": [{"adamId": "1"}], "serialNumbers": serials})
        ),
        Some(9702)
    );
    let users: Vec<String> = (0..1001).map(|i| format!("U{i}")).collect();
    assert_eq!(
        err(
            &mut m,
            json!({"assets": [{"adamId": "1"}], "clientUserIds": users})
        ),
        Some(9701)
    );
    assert_eq!(
        err(
            &mut m,
            json!({"assets": [{"adamId": "1"}, {"adamId": "1", "pricingParam": "STDQ"}], "serialNumbers": ["A"]})
        ),
        Some(9703)
    );
    assert_eq!(
        err(
            &mut m,
            json!({"assets": [{"adamId": "1"}], "clientUserIds": ["u", "u"]})
        ),
        Some(9704)
    );
    assert_eq!(
        err(
            &mut m,
            json!({"assets": [{"adamId": "1"}], "serialNumbers": ["A", "A"]})
        ),
        Some(9705)
    );
    assert_eq!(
        err(
            &mut m,
            json!({"assets": [{"adamId": "2"}], "serialNumbers": ["A"]})
        ),
        Some(9707)
    );
    assert_eq!(
        err(
            &mut m,
            json!({"assets": [{"adamId": "404"}], "serialNumbers": ["A"]})
        ),
        Some(9602)
    );
    // malformed body: 400 9602, never a panic
    let mut r = ApiRequest::post("assets/associate", &t, json!({}));
    r.body = b"{not json".to_vec();
    let resp = m.handle_api(&r, Instant::now()).response;
    assert_eq!((resp.status, resp.error_number()), (400, Some(9602)));
    r.body = br#"{"assets": "x"}"#.to_vec();
    assert_eq!(
        m.handle_api(&r, Instant::now()).response.error_number(),
        Some(9602)
    );
    r.content_type = Some("text/plain".into());
    assert_eq!(
        m.handle_api(&r, Instant::now()).response.error_number(),
        Some(9727)
    );
    // wrong method
    let mut g = ApiRequest::get("assets/associate", &t, &[]);
    g.method = "GET".into();
    assert_eq!(m.handle_api(&g, Instant::now()).response.status, 405);
    // no event was created by any failed request
    assert!(m.events.is_empty());
}

#[test]
fn revoke_frees_revocable_assets_only() {
    let (mut m, t) = model();
    m.add_assets(
        &t,
        vec![
            AssetSpec::app("1", 5),
            AssetSpec {
                revocable: false,
                ..AssetSpec::app("2", 5)
            },
        ],
    )
    .unwrap();
    m.add_assignments(
        &t,
        vec![
            AssignmentSpec::device("1", "S1"),
            AssignmentSpec::device("2", "S1"),
            AssignmentSpec::device("1", "S2"),
            AssignmentSpec::user("1", "u1"),
        ],
    )
    .unwrap();
    let o = post(
        &mut m,
        &t,
        "assets/revoke",
        json!({"serialNumbers": ["S1"], "clientUserIds": ["u1"]}),
    );
    let s = status(&mut m, &t, &event_id(&o));
    assert_eq!(s["eventType"], "REVOKE");
    assert_eq!(s["eventStatus"], "COMPLETE");
    let left: Vec<(String, Option<String>)> = m.locations[0]
        .assignments
        .iter()
        .map(|a| (a.adam_id.clone(), a.serial_number.clone()))
        .collect();
    assert_eq!(
        left,
        vec![
            ("2".to_string(), Some("S1".to_string())),
            ("1".to_string(), Some("S2".to_string()))
        ]
    );
    assert_eq!(
        post(&mut m, &t, "assets/revoke", json!({}))
            .response
            .error_number(),
        Some(9719)
    );
    let serials: Vec<String> = (0..101).map(|i| format!("S{i}")).collect();
    assert_eq!(
        post(
            &mut m,
            &t,
            "assets/revoke",
            json!({"serialNumbers": serials})
        )
        .response
        .error_number(),
        Some(9702)
    );
}

#[test]
fn users_lifecycle_and_validation() {
    let (mut m, t) = model();
    let err = |m: &mut Model, p: &str, b: Value| post(m, &t, p, b).response.error_number();
    assert_eq!(
        err(&mut m, "users/create", json!({"users": []})),
        Some(9720)
    );
    let many: Vec<Value> = (0..101)
        .map(|i| json!({"clientUserId": format!("u{i}")}))
        .collect();
    assert_eq!(
        err(&mut m, "users/create", json!({"users": many})),
        Some(9714)
    );
    assert_eq!(
        err(
            &mut m,
            "users/create",
            json!({"users": [{"clientUserId": "a"}, {"clientUserId": "a"}]})
        ),
        Some(9715)
    );
    assert_eq!(
        err(
            &mut m,
            "users/create",
            json!({"users": [{"clientUserId": "a", "email": "nope"}]})
        ),
        Some(9717)
    );
    let o = post(
        &mut m,
        &t,
        "users/create",
        json!({"users": [{"clientUserId": "a", "email": "a@x.example"},
        {"clientUserId": "b", "managedAppleId": "b@corp.example"}]}),
    );
    assert_eq!(status(&mut m, &t, &event_id(&o))["eventStatus"], "COMPLETE");
    // duplicate create fails asynchronously with 9716
    let o = post(
        &mut m,
        &t,
        "users/create",
        json!({"users": [{"clientUserId": "a"}]}),
    );
    let s = status(&mut m, &t, &event_id(&o));
    assert_eq!(
        (
            s["eventStatus"].clone(),
            s["failures"][0]["errorNumber"].clone()
        ),
        (json!("FAILED"), json!(9716))
    );
    let o = post(
        &mut m,
        &t,
        "users/update",
        json!({"users": [{"clientUserId": "a", "email": "new@x.example"}, {"clientUserId": "zz"}]}),
    );
    let s = status(&mut m, &t, &event_id(&o));
    assert_eq!(s["numCompleted"], 1);
    assert_eq!(s["failures"][0]["errorNumber"], 9609);
    m.add_assets(&t, vec![AssetSpec::book("9", 5)]).unwrap();
    m.add_assignments(&t, vec![AssignmentSpec::user("9", "a")])
        .unwrap();
    post(
        &mut m,
        &t,
        "users/retire",
        json!({"users": [{"clientUserId": "a"}]}),
    );
    assert!(
        m.locations[0].assignments.is_empty(),
        "retire frees the user's licenses"
    );
    let users = |m: &mut Model, q: &[(&str, &str)]| -> Vec<String> {
        get(m, &t, "users", q).body["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["clientUserId"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(users(&mut m, &[]), ["a", "b"]);
    assert_eq!(users(&mut m, &[("activeOnly", "true")]), ["b"]);
    assert_eq!(users(&mut m, &[("retiredOnly", "true")]), ["a"]);
    assert_eq!(users(&mut m, &[("clientUserId", "b")]), ["b"]);
    let b = get(&mut m, &t, "users", &[("clientUserId", "b")]).body;
    assert_eq!(b["users"][0]["status"], "Associated");
    assert!(b["users"][0]["idHash"].is_string());
}

fn subscribe(m: &mut Model, t: &str, types: &[&str]) {
    let o = post(
        m,
        t,
        "client/config",
        json!({"notificationUrl": "http://n.example/hook", "notificationAuthToken": "tok",
        "notificationTypes": types}),
    );
    let p = o.pending_config.unwrap();
    m.finish_client_config(&p, true);
}

#[test]
fn asset_management_notifications_split_at_100() {
    let (mut m, t) = model();
    m.add_assets(&t, vec![AssetSpec::app("1", 120)]).unwrap();
    subscribe(&mut m, &t, &["ASSET_MANAGEMENT"]);
    let serials: Vec<String> = (0..150).map(|i| format!("S{i:03}")).collect();
    let o = post(
        &mut m,
        &t,
        "assets/associate",
        json!({"assets": [{"adamId": "1"}], "serialNumbers": serials}),
    );
    let [Effect::Notify(notes)] = o.effects.as_slice() else {
        panic!("{:?}", o.effects)
    };
    // 120 successes → 100 + 20; 30 failures → one FAILURE notification
    assert_eq!(notes.len(), 3);
    for n in notes {
        assert_eq!(n.auth_token, "tok");
        assert_eq!(n.notification_type, "ASSET_MANAGEMENT");
        assert_eq!(n.envelope["notificationType"], "ASSET_MANAGEMENT");
        assert_eq!(n.envelope["notification"]["eventId"], json!(event_id(&o)));
        assert_eq!(n.envelope["notification"]["type"], "ASSOCIATE");
        assert!(
            n.envelope["notification"]["assignments"]
                .as_array()
                .unwrap()
                .len()
                <= 100
        );
    }
    let sizes: Vec<usize> = notes
        .iter()
        .map(|n| {
            n.envelope["notification"]["assignments"]
                .as_array()
                .unwrap()
                .len()
        })
        .collect();
    assert_eq!(sizes, [100, 20, 30]);
    assert_eq!(notes[2].envelope["notification"]["result"], "FAILURE");
    assert_eq!(
        notes[2].envelope["notification"]["error"]["errorNumber"],
        9709
    );
    // not subscribed: nothing
    let o = post(
        &mut m,
        &t,
        "users/create",
        json!({"users": [{"clientUserId": "u"}]}),
    );
    assert!(o.effects.is_empty());
    // duplicate flag
    m.config.duplicate_notification_chance = 1.0;
    let o = post(
        &mut m,
        &t,
        "assets/disassociate",
        json!({"assets": [{"adamId": "1"}], "serialNumbers": ["S000"]}),
    );
    let [Effect::Notify(notes)] = o.effects.as_slice() else {
        panic!()
    };
    assert_eq!(notes[0].copies, 2);
}

#[test]
fn user_and_count_notifications() {
    let (mut m, t) = model();
    m.add_assets(&t, vec![AssetSpec::app("1", 10)]).unwrap();
    subscribe(
        &mut m,
        &t,
        &["USER_MANAGEMENT", "USER_ASSOCIATED", "ASSET_COUNT"],
    );
    let o = post(
        &mut m,
        &t,
        "users/create",
        json!({"users": [{"clientUserId": "u", "email": "u@x.example"}]}),
    );
    let [Effect::Notify(notes)] = o.effects.as_slice() else {
        panic!()
    };
    let n = &notes[0].envelope["notification"];
    assert_eq!(
        (n["type"].clone(), n["result"].clone()),
        (json!("CREATE"), json!("SUCCESS"))
    );
    assert_eq!(n["users"][0]["clientUserId"], "u");
    let notes = m.associate_user(&t, "u").unwrap();
    assert_eq!(
        notes[0].envelope["notification"]["associatedUsers"][0]["status"],
        "Associated"
    );
    let notes = m.change_asset_count(&t, "1", "STDQ", -3).unwrap();
    assert_eq!(
        notes[0].envelope["notification"],
        json!({"adamId": "1", "countDelta": -3, "pricingParam": "STDQ"})
    );
    assert_eq!(
        get(&mut m, &t, "assets", &[]).body["assets"][0]["totalCount"],
        7
    );
}

#[test]
fn rate_limit_sliding_window() {
    let (mut m, t) = model();
    m.config.rate_limit_enabled = true;
    let t0 = Instant::now();
    let r = ApiRequest::get("client/config", &t, &[]);
    for i in 0..15 {
        assert_eq!(
            m.handle_api(&r, t0 + Duration::from_millis(i * 10))
                .response
                .status,
            200
        );
    }
    let resp = m.handle_api(&r, t0 + Duration::from_millis(500)).response;
    assert_eq!((resp.status, resp.error_number()), (429, Some(9646)));
    assert!(resp.headers.iter().any(|(k, _)| k == "Retry-After"));
    // another token is not affected
    let t2 = m.add_location(LocationSpec::named("Other"));
    assert_eq!(
        m.handle_api(
            &ApiRequest::get("client/config", &t2, &[]),
            t0 + Duration::from_millis(500)
        )
        .response
        .status,
        200
    );
    // one second after the first request a slot frees up
    assert_eq!(
        m.handle_api(&r, t0 + Duration::from_millis(1000))
            .response
            .status,
        200
    );
    assert_eq!(
        m.handle_api(&r, t0 + Duration::from_millis(1001))
            .response
            .status,
        429
    );
    m.config.rate_limit_enabled = false;
    assert_eq!(
        m.handle_api(&r, t0 + Duration::from_millis(1002))
            .response
            .status,
        200
    );
}

#[test]
fn faults_per_endpoint_count_and_kinds() {
    let (mut m, t) = model();
    m.add_fault(
        Some(&t),
        FaultSpec::new(FaultKind::RateLimited)
            .on("assets")
            .times(2)
            .retry_after(3),
    )
    .unwrap();
    let r = get(&mut m, &t, "assets", &[]);
    assert_eq!((r.status, r.error_number()), (429, Some(9646)));
    assert_eq!(
        r.headers,
        vec![("Retry-After".to_string(), "3".to_string())]
    );
    assert_eq!(get(&mut m, &t, "users", &[]).status, 200);
    assert_eq!(get(&mut m, &t, "assets", &[]).status, 429);
    assert_eq!(get(&mut m, &t, "assets", &[]).status, 200);
    let cases = [
        (FaultKind::Unavailable, 503, 9729),
        (FaultKind::InternalError, 500, 9603),
        (FaultKind::Expired, 401, 9621),
        (FaultKind::Revoked, 401, 9625),
        (FaultKind::Invalid, 401, 9601),
        (FaultKind::Invalid200, 200, 9622),
    ];
    for (kind, st, n) in cases {
        m.add_fault(Some(&t), FaultSpec::new(kind).times(1))
            .unwrap();
        let r = get(&mut m, &t, "client/config", &[]);
        assert_eq!((r.status, r.error_number()), (st, Some(n)), "{kind:?}");
        assert_eq!(get(&mut m, &t, "client/config", &[]).status, 200);
    }
    let r = {
        m.add_fault(Some(&t), FaultSpec::new(FaultKind::Unavailable).times(1))
            .unwrap();
        get(&mut m, &t, "assets", &[])
    };
    assert!(r
        .headers
        .iter()
        .any(|(k, v)| k == "Retry-After" && v == "1"));
    // until cleared, method-qualified endpoint
    m.add_fault(
        Some(&t),
        FaultSpec::new(FaultKind::InternalError).on("POST client/config"),
    )
    .unwrap();
    for _ in 0..3 {
        assert_eq!(
            post(&mut m, &t, "client/config", json!({})).response.status,
            500
        );
    }
    assert_eq!(get(&mut m, &t, "client/config", &[]).status, 200);
    m.clear_faults(Some(&t)).unwrap();
    assert_eq!(
        post(&mut m, &t, "client/config", json!({})).response.status,
        200
    );
    // latency
    m.add_fault(Some(&t), FaultSpec::latency(250).times(1))
        .unwrap();
    let o = m.handle_api(&ApiRequest::get("assets", &t, &[]), Instant::now());
    assert_eq!((o.response.status, o.latency_ms), (200, 250));
    // global faults hit service config too
    m.add_fault(
        None,
        FaultSpec::new(FaultKind::Unavailable)
            .on("service/config")
            .times(1),
    )
    .unwrap();
    let mut sc = ApiRequest::get("service/config", "", &[]);
    sc.authorization = None;
    assert_eq!(m.handle_api(&sc, Instant::now()).response.status, 503);
    assert_eq!(m.handle_api(&sc, Instant::now()).response.status, 200);
}

#[test]
fn take_over_with_foreign_assignments() {
    let (mut m, t) = model();
    m.add_assets(&t, vec![AssetSpec::app("1", 3)]).unwrap();
    subscribe(&mut m, &t, &["ASSET_MANAGEMENT"]);
    m.take_over(
        &t,
        TakeOver {
            assignments: vec![AssignmentSpec::device("1", "FOREIGN")],
            ..Default::default()
        },
    )
    .unwrap();
    let s = m.location_state(&t).unwrap();
    assert_eq!(s.mdm_info.unwrap().name, "Other MDM");
    assert_eq!(s.assets[0].assigned_count, 1);
    assert!(s.client_config.get("notificationUrl").is_none());
}

#[test]
fn lookup_answers_like_the_legacy_endpoint() {
    let (mut m, t) = model();
    m.add_assets(
        &t,
        vec![
            AssetSpec {
                name: Some("Pages".into()),
                ..AssetSpec::app("361309726", 1)
            },
            AssetSpec::book("7", 1),
        ],
    )
    .unwrap();
    let v = m.lookup(&[
        ("id".into(), "361309726,7,404".into()),
        ("p".into(), "mdm-lockup".into()),
    ]);
    assert_eq!(v["results"]["361309726"]["name"], "Pages");
    assert_eq!(v["results"]["7"]["kind"], "epubBook");
    assert!(v["results"].get("404").is_none());
    assert!(v["results"]["361309726"]["artwork"]["url"].is_string());
}

#[test]
fn version_ids_change_on_every_write() {
    let (mut m, t) = model();
    m.add_assets(&t, vec![AssetSpec::app("1", 3)]).unwrap();
    let v = |m: &mut Model| get(m, &t, "assets", &[]).body["versionId"].clone();
    let a = v(&mut m);
    post(
        &mut m,
        &t,
        "assets/associate",
        json!({"assets": [{"adamId": "1"}], "serialNumbers": ["S"]}),
    );
    let b = v(&mut m);
    assert_ne!(a, b);
    m.change_asset_count(&t, "1", "STDQ", 5).unwrap();
    assert_ne!(b, v(&mut m));
}

#[test]
fn applied_then_error_applies_the_request_and_answers_a_bare_500() {
    let (mut m, t) = model();
    m.add_assets(&t, vec![AssetSpec::app("100", 5)]).unwrap();
    m.add_fault(
        Some(&t),
        FaultSpec::new(FaultKind::AppliedThenError)
            .on("POST assets/associate")
            .times(1),
    )
    .unwrap();
    let out = post(
        &mut m,
        &t,
        "assets/associate",
        json!({"assets": [{"adamId": "100"}], "serialNumbers": ["S1"]}),
    );
    assert_eq!(out.response.status, 500);
    assert_eq!(out.response.error_number(), None);
    // Apple accepted it all the same: the event exists and assigns the license.
    m.flush_events();
    let st = m.location_state(&t).unwrap();
    assert!(st
        .assignments
        .iter()
        .any(|a| a.serial_number.as_deref() == Some("S1")));
}
