//! Issue 5: licenses, assignments, events, policies, reconcile, settings, notices and Apple's
//! notifications, end to end over the real components and the simulator.

use apple_sim::client::Receiver;
use apple_sim::{AssignmentSpec, MdmInfo, TakeOver};
use e2e::{seed_location, Env, READER_KEY};
use serde_json::{json, Value};
use std::time::Duration;

/// An environment where the instance subscribes to Apple's notifications (the simulator
/// delivers them over plain http to the app) and may POST notices to a local webhook.
async fn env_with_notifications() -> Env {
    Env::start_with(vec![
        ("apple_notifications", "on".into()),
        ("notice_webhook_hosts", "http://127.0.0.1:*".into()),
        ("notice_webhook_http_hosts", "127.0.0.1".into()),
    ])
    .await
}

/// Add and refresh an account; returns its id.
async fn account(env: &Env, name: &str, token: &str) -> String {
    let id = env.add_account(name, token).await;
    let job = env.refresh(&id).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    id
}

fn row<'a>(list: &'a Value, adam: &str) -> &'a Value {
    list["licenses"]
        .as_array()
        .and_then(|l| l.iter().find(|r| r["adamId"] == adam))
        .unwrap_or_else(|| panic!("asset {adam} listed: {list}"))
}

async fn licenses(env: &Env, account: &str) -> Value {
    let r = env.get(&format!("/api/licenses?accountId={account}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// Wait until Apple applied the event and its notifications reached us, then read the event.
async fn settled_event(env: &Env, id: &str) -> Value {
    env.settled_event(id).await
}

fn sim_assignments(env: &Env, token: &str) -> Vec<Value> {
    let st = env.sim.location_state(token).unwrap();
    serde_json::to_value(&st.assignments)
        .unwrap()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn holds(list: &[Value], adam: &str, serial: &str) -> bool {
    list.iter()
        .any(|a| a["adamId"] == adam && a["serialNumber"] == serial)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_csv_export_streams_every_row_of_many_pages() {
    // 2,600 assets: the export is written one page of the list (at most 1,000 rows) at a time.
    let env = Env::start().await;
    let ids: Vec<String> = (0..2_600).map(|i| format!("{}", 500_000 + i)).collect();
    let assets: Vec<(&str, u64)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), 10 + (i % 7) as u64))
        .collect();
    let token = seed_location(&env.sim, "Big", &assets, &[(&ids[0], "SER-1")]);
    let id = account(&env, "Big", &token).await;
    // The JSON list, walked by cursor, is what the CSV must hold.
    let mut listed: Vec<Value> = Vec::new();
    let mut cursor = String::new();
    loop {
        let r = env
            .get(&format!(
                "/api/licenses?accountId={id}&limit=1000&cursor={cursor}"
            ))
            .await
            .json();
        listed.extend(r["licenses"].as_array().unwrap().iter().cloned());
        match r["nextCursor"].as_str() {
            Some(c) => cursor = c.replace('~', "%7E"),
            None => break,
        }
    }
    assert_eq!(listed.len(), 2_600);
    let csv = env
        .get(&format!("/api/licenses?accountId={id}&format=csv"))
        .await;
    assert_eq!(csv.status, 200);
    assert_eq!(
        csv.headers.get("content-disposition").unwrap(),
        "attachment; filename=\"licenses.csv\""
    );
    let text = csv.text();
    assert!(text.ends_with("\r\n"));
    let mut lines = text.split("\r\n").filter(|l| !l.is_empty());
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(header[0], "accountId");
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 2_600, "every row once");
    for (r, want) in rows.iter().zip(&listed) {
        assert_eq!(r[col("adamId")], want["adamId"].as_str().unwrap());
        assert_eq!(r[col("total")], want["total"].to_string());
        assert_eq!(r[col("inUse")], want["inUse"].to_string());
        assert_eq!(r[col("available")], want["available"].to_string());
        assert_eq!(r[col("name")], want["name"].as_str().unwrap_or(""));
    }
    // An unknown account is a clean JSON error, not a broken stream.
    let bad = env.get("/api/licenses?accountId=nope&format=csv").await;
    assert_eq!(bad.status, 404);
    assert_eq!(bad.code(), "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn licenses_list_search_csv_and_assignments_page() {
    let env = Env::start().await;
    let token = seed_location(
        &env.sim,
        "Main",
        &[("100", 10), ("200", 3)],
        &[("100", "FOREIGN-1")],
    );
    let id = account(&env, "Main", &token).await;
    let list = licenses(&env, &id).await;
    let r100 = row(&list, "100");
    assert_eq!(
        (
            r100["total"].as_i64(),
            r100["inUse"].as_i64(),
            r100["available"].as_i64()
        ),
        (Some(10), Some(1), Some(9))
    );
    assert_eq!(r100["accountId"], id.as_str());
    assert_eq!(r100["pricingParam"], "STDQ");
    // Names come from Apple's metadata lookup at refresh.
    if !r100["name"].is_null() {
        assert_eq!(r100["name"], "App 100");
        let r = env.get("/api/licenses?search=app%20100").await.json();
        assert_eq!(r["licenses"].as_array().unwrap().len(), 1);
    }
    assert_eq!(
        row(&list, "200")["lowLicenses"],
        true,
        "3 left, threshold 5"
    );
    assert_eq!(r100["lowLicenses"], false);
    // Search by name, and the reader key may read.
    let r = env
        .call("GET", "/api/licenses?search=200", None, Some(READER_KEY))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["licenses"].as_array().unwrap().len(), 1);
    assert_eq!(
        env.get("/api/licenses?accountId=nope").await.code(),
        "not_found"
    );
    assert_eq!(
        env.get("/api/licenses?format=xml").await.code(),
        "invalid_request"
    );

    // CSV, by query and by Accept, parsed back.
    let csv = env
        .get(&format!("/api/licenses?accountId={id}&format=csv"))
        .await;
    assert_eq!(csv.status, 200);
    assert!(csv
        .headers
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("text/csv"));
    let text = csv.text();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 2);
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let r = rows.iter().find(|r| r[col("adamId")] == "100").unwrap();
    assert_eq!(
        (r[col("total")], r[col("available")], r[col("inUse")]),
        ("10", "9", "1")
    );
    let mut b = http::Request::builder()
        .method("GET")
        .uri(format!("/api/licenses?accountId={id}"));
    b = b
        .header("authorization", format!("Bearer {}", e2e::ADMIN_KEY))
        .header("accept", "text/csv");
    let resp = env.app.handle(b.body(Vec::new()).unwrap()).await.unwrap();
    assert!(String::from_utf8_lossy(resp.body()).starts_with("accountId,"));

    // Assignments of one asset, with who made them.
    let page = env
        .get(&format!("/api/licenses/{id}/100/assignments"))
        .await;
    assert_eq!(page.status, 200, "{}", page.text());
    let page = page.json();
    assert_eq!(page["assignments"][0]["serialNumber"], "FOREIGN-1");
    assert_eq!(page["assignments"][0]["madeBy"], "foreign");
    assert_eq!(
        env.get(&format!("/api/licenses/{id}/999/assignments"))
            .await
            .code(),
        "not_found"
    );
    assert_eq!(
        env.get(&format!("/api/licenses/{id}/100/assignments?page=9"))
            .await
            .code(),
        "not_found"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assign_confirmed_once_when_notifications_arrive_twice() {
    let env = env_with_notifications().await;
    env.sim.set_duplicate_notifications(true);
    let token = seed_location(&env.sim, "Main", &[("100", 10)], &[]);
    let id = account(&env, "Main", &token).await;
    let body = json!({"accountId": id, "adamId": "100", "pricingParam": "STDQ", "serialNumbers": ["S1", "S2", "S3"]});
    let r = env.admin("POST", "/api/assignments", Some(&body)).await;
    assert_eq!(r.status, 202, "{}", r.text());
    let event_id = r.json()["eventId"].as_str().unwrap().to_string();
    let ev = settled_event(&env, &event_id).await;
    assert_eq!(ev["state"], "complete", "{ev}");
    assert!(
        ev["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["state"] == "succeeded"),
        "{ev}"
    );
    // Every notification came twice; the counts moved once.
    let dupes = env
        .sim
        .notifications()
        .iter()
        .filter(|n| n.notification_type == "ASSET_MANAGEMENT")
        .count();
    assert!(dupes >= 2, "the simulator delivered duplicates");
    let r100 = row(&licenses(&env, &id).await, "100").clone();
    assert_eq!(
        (
            r100["inUse"].as_i64(),
            r100["available"].as_i64(),
            r100["pending"].as_i64()
        ),
        (Some(3), Some(7), Some(0)),
        "{r100}"
    );
    for s in ["S1", "S2", "S3"] {
        assert!(holds(&sim_assignments(&env, &token), "100", s));
    }
    // Ours in the assignments page; a full refresh agrees with the counts.
    let page = env
        .get(&format!("/api/licenses/{id}/100/assignments"))
        .await
        .json();
    assert!(
        page["assignments"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["madeBy"] == "thisInstance"),
        "{page}"
    );
    env.refresh(&id).await;
    let r100 = row(&licenses(&env, &id).await, "100").clone();
    assert_eq!(r100["inUse"], 3);
    // Assigning again changes nothing and does not call Apple.
    env.sim.clear_calls();
    let again = env.admin("POST", "/api/assignments", Some(&body)).await;
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(again.json()["alreadyAssigned"].as_array().unwrap().len(), 3);
    assert!(env
        .sim
        .calls()
        .iter()
        .all(|c| !c.path.contains("associate")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_license_available_is_409_without_calling_apple() {
    let env = Env::start().await;
    let token = seed_location(&env.sim, "Main", &[("100", 2)], &[("100", "F1")]);
    let id = account(&env, "Main", &token).await;
    env.sim.clear_calls();
    let r = env
        .admin(
            "POST",
            "/api/assignments",
            Some(&json!({"accountId": id, "adamId": "100", "serialNumbers": ["A", "B"]})),
        )
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (409, "no_licenses_available"),
        "{}",
        r.text()
    );
    assert_eq!(r.json()["error"]["details"]["available"], 1);
    assert!(
        env.sim
            .calls()
            .iter()
            .all(|c| !c.path.contains("assets/associate")),
        "Apple not called"
    );
    // Bad input: clear errors; reader key may not assign.
    for (b, code) in [
        (
            json!({"accountId": id, "adamId": "x1", "serialNumbers": ["A"]}),
            "invalid_request",
        ),
        (json!({"accountId": id, "adamId": "100"}), "invalid_request"),
        (
            json!({"accountId": id, "adamId": "100", "serialNumbers": ["A"], "extra": 1}),
            "invalid_json",
        ),
        (
            json!({"accountId": "nope", "adamId": "100", "serialNumbers": ["A"]}),
            "not_found",
        ),
    ] {
        assert_eq!(
            env.admin("POST", "/api/assignments", Some(&b)).await.code(),
            code,
            "{b}"
        );
    }
    let reader = env
        .call(
            "POST",
            "/api/assignments",
            Some(&json!({"accountId": id, "adamId": "100", "serialNumbers": ["A"]})),
            Some(READER_KEY),
        )
        .await;
    assert_eq!(reader.status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_failure_for_one_device_out_of_many() {
    let env = env_with_notifications().await;
    let token = seed_location(&env.sim, "Main", &[("100", 3)], &[]);
    let id = account(&env, "Main", &token).await;
    // Someone takes a license at Apple behind our back: we think 3 are free, Apple has 2.
    env.sim
        .add_assignments(&token, vec![AssignmentSpec::device("100", "ELSEWHERE")])
        .unwrap();
    let r = env
        .admin(
            "POST",
            "/api/assignments",
            Some(&json!({"accountId": id, "adamId": "100", "serialNumbers": ["A", "B", "C"]})),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let ev = settled_event(&env, r.json()["eventId"].as_str().unwrap()).await;
    assert_eq!(ev["state"], "failed", "{ev}");
    let results = ev["results"].as_array().unwrap();
    let failed: Vec<&Value> = results.iter().filter(|r| r["state"] == "failed").collect();
    assert_eq!(failed.len(), 1, "{ev}");
    assert_eq!(failed[0]["error"]["appleErrorNumber"], 9709);
    assert_eq!(
        results.iter().filter(|r| r["state"] == "succeeded").count(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_takes_one_asset_and_yields_a_notice() {
    let env = env_with_notifications().await;
    let token = seed_location(
        &env.sim,
        "Main",
        &[("100", 5), ("200", 5)],
        &[("200", "S1")],
    );
    let id = account(&env, "Main", &token).await;
    env.notices_on().await;
    let r = env
        .admin(
            "POST",
            "/api/assignments",
            Some(&json!({"accountId": id, "adamId": "100", "serialNumbers": ["S1"]})),
        )
        .await;
    settled_event(&env, r.json()["eventId"].as_str().unwrap()).await;
    let r = env
        .admin(
            "POST",
            "/api/assignments/revoke",
            Some(&json!({"accountId": id, "adamId": "100", "serialNumbers": ["S1"]})),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let ev = settled_event(&env, r.json()["eventId"].as_str().unwrap()).await;
    assert_eq!(ev["state"], "complete", "{ev}");
    let held = sim_assignments(&env, &token);
    assert!(!holds(&held, "100", "S1"));
    assert!(
        holds(&held, "200", "S1"),
        "disassociate, not revoke: the other asset stays"
    );
    let notices = env.get("/api/notices").await.json();
    let list = notices["notices"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{notices}");
    assert_eq!(list[0]["serialNumber"], "S1");
    assert_eq!(list[0]["adamId"], "100");
    assert_eq!(row(&licenses(&env, &id).await, "100")["inUse"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_bearer_is_401_and_changes_nothing() {
    let env = env_with_notifications().await;
    let token = seed_location(&env.sim, "Main", &[("100", 5)], &[]);
    let id = account(&env, "Main", &token).await;
    let before: Vec<String> = env
        .keys()
        .into_iter()
        .filter(|k| !k.starts_with("audit"))
        .collect();
    let body = json!({"notificationId": "n-1", "notificationType": "ASSET_COUNT", "notification": {"adamId": "100", "countDelta": 7, "pricingParam": "STDQ"}});
    for key in [None, Some("wrong-secret"), Some(e2e::ADMIN_KEY)] {
        let r = env
            .call(
                "POST",
                &format!("/api/apple/notifications/{id}"),
                Some(&body),
                key,
            )
            .await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (401, "unauthorized"),
            "{}",
            r.text()
        );
    }
    let after: Vec<String> = env
        .keys()
        .into_iter()
        .filter(|k| !k.starts_with("audit"))
        .collect();
    assert_eq!(after, before);
    assert_eq!(row(&licenses(&env, &id).await, "100")["total"], 5);
    // Apple's own ASSET_COUNT (with the right secret) moves the counts.
    env.sim
        .change_asset_count(&token, "100", "STDQ", 4)
        .unwrap();
    env.sim_idle().await;
    let mut total = 0;
    for _ in 0..50 {
        total = row(&licenses(&env, &id).await, "100")["total"]
            .as_i64()
            .unwrap();
        if total == 9 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(total, 9);
}

async fn put_policy(env: &Env, id: &str, account: &str, serials: &[&str]) -> Value {
    let r = env
        .admin(
            "PUT",
            &format!("/api/policies/{id}"),
            Some(
                &json!({"name": format!("Policy {id}"), "accountId": account,
                "assets": [{"adamId": "100", "pricingParam": "STDQ"}], "serialNumbers": serials}),
            ),
        )
        .await;
    assert!(r.status == 200 || r.status == 201, "{}", r.text());
    r.json()
}

async fn wait_assignments(env: &Env, token: &str, want: &[&str], not: &[&str]) {
    for _ in 0..100 {
        env.sim_idle().await;
        let held = sim_assignments(env, token);
        if want.iter().all(|s| holds(&held, "100", s))
            && not.iter().all(|s| !holds(&held, "100", s))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("assignments at Apple: {:?}", sim_assignments(env, token));
}

async fn reconcile(env: &Env) -> Value {
    let r = env.admin("POST", "/api/reconcile", None).await;
    assert_eq!(r.status, 202, "{}", r.text());
    let job = r.json();
    let mut current = job.clone();
    for _ in 0..50 {
        if current["state"] != "running" {
            return current;
        }
        current = env
            .get(&format!("/api/jobs/{}", job["id"].as_str().unwrap()))
            .await
            .json();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("reconcile did not finish: {current}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_shortfall_edit_and_reconcile_with_foreign_and_foreign_owned_accounts() {
    let env = env_with_notifications().await;
    let token = seed_location(&env.sim, "Main", &[("100", 4)], &[("100", "FOREIGN")]);
    let id = account(&env, "Main", &token).await;
    let p = put_policy(&env, "lab", &id, &["A", "B", "C", "D"]).await;
    let a = &p["assignments"][0];
    assert_eq!(
        (a["requested"].as_i64(), a["shortfall"].as_i64()),
        (Some(3), Some(1)),
        "{p}"
    );
    assert_eq!(a["shortfallSubjects"][0]["serialNumber"], "D");
    wait_assignments(&env, &token, &["A", "B", "C", "FOREIGN"], &[]).await;
    let list = env.get("/api/policies").await.json();
    assert_eq!(
        list["policies"][0]["serialNumbers"]
            .as_array()
            .unwrap()
            .len(),
        4
    );

    // A second account owned by another MDM, with one of our assignments in its ledger history.
    let other = seed_location(&env.sim, "Other", &[("100", 2)], &[]);
    let other_id = account(&env, "Other", &other).await;
    put_policy(&env, "other", &other_id, &["X"]).await;
    wait_assignments(&env, &other, &["X"], &[]).await;
    let r = env.admin("DELETE", "/api/policies/other", None).await;
    assert_eq!(r.status, 204);
    env.sim
        .take_over(
            &other,
            TakeOver {
                mdm_info: MdmInfo {
                    id: "other-mdm".into(),
                    name: "Other MDM".into(),
                    metadata: "x".into(),
                },
                ..Default::default()
            },
        )
        .unwrap();
    env.refresh(&other_id).await;

    // Edit: B leaves the policy; reconcile takes B only, never FOREIGN, and skips the other account.
    put_policy(&env, "lab", &id, &["A", "C", "D"]).await;
    let job = reconcile(&env).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["result"]["revoked"], 1, "{job}");
    assert_eq!(
        job["result"]["skipped"][0]["accountId"],
        other_id.as_str(),
        "{job}"
    );
    wait_assignments(&env, &token, &["A", "C", "FOREIGN"], &["B"]).await;
    assert!(
        holds(&sim_assignments(&env, &other), "100", "X"),
        "foreign-owned account untouched"
    );
    let calls = env.sim.calls();
    assert!(
        calls.iter().all(|c| !c.path.contains("assets/revoke")),
        "disassociate only"
    );
    // Deleting the policy: the account may not be deleted while it is used; then reconcile takes the rest.
    let del = env
        .admin("DELETE", &format!("/api/accounts/{id}"), None)
        .await;
    assert_eq!(
        del.code(),
        "account_in_use",
        "{} {}",
        del.status,
        del.text()
    );
    assert_eq!(
        env.admin("DELETE", "/api/policies/lab", None).await.status,
        204
    );
    assert_eq!(
        env.admin("DELETE", "/api/policies/lab", None).await.code(),
        "not_found"
    );
    reconcile(&env).await;
    wait_assignments(&env, &token, &["FOREIGN"], &["A", "C"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_validation_and_webhook_down_then_up_delivers_once() {
    let env = env_with_notifications().await;
    let hook = Receiver::start().unwrap();
    hook.set_status(503);
    for bad in [
        json!({"lowLicenseThreshold": -1}),
        json!({"noticeWebhookUrl": "ftp://x"}),
        json!({"unknown": true}),
    ] {
        let r = env.admin("PUT", "/api/settings", Some(&bad)).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }
    // Well-formed, but no secret is stored to sign with: 422, and nothing changes.
    let bad = json!({"noticeWebhookUrl": hook.url()});
    let r = env.admin("PUT", "/api/settings", Some(&bad)).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (422, "unprocessable"),
        "{}",
        r.text()
    );
    assert_eq!(
        env.get("/api/settings").await.json()["noticeWebhookUrl"],
        Value::Null
    );
    let r = env
        .admin(
            "PUT",
            "/api/settings",
            Some(
                &json!({"licenseRemovalNotification": true, "lowLicenseThreshold": 1,
            "noticeWebhookUrl": hook.url(), "noticeWebhookSecret": "0123456789abcdef0123"}),
            ),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let s = env.get("/api/settings").await.json();
    assert_eq!(s["lowLicenseThreshold"], 1);
    assert_eq!(s["noticeWebhookSecretSet"], true);
    assert!(s.get("noticeWebhookSecret").is_none());

    let token = seed_location(&env.sim, "Main", &[("100", 5)], &[]);
    let id = account(&env, "Main", &token).await;
    let r = env
        .admin(
            "POST",
            "/api/assignments",
            Some(&json!({"accountId": id, "adamId": "100", "serialNumbers": ["S1", "S2"]})),
        )
        .await;
    settled_event(&env, r.json()["eventId"].as_str().unwrap()).await;
    let r = env
        .admin(
            "POST",
            "/api/assignments/revoke",
            Some(&json!({"accountId": id, "adamId": "100", "serialNumbers": ["S1", "S2"]})),
        )
        .await;
    settled_event(&env, r.json()["eventId"].as_str().unwrap()).await;
    assert_eq!(env.get("/api/notices").await.json()["undelivered"], 2);

    // Down: kept. Up: delivered, once.
    let r = env.admin("POST", "/api/notices/deliver", None).await.json();
    assert_eq!(r["delivered"], 0, "{r}");
    assert!(r["error"].as_str().unwrap_or("").contains("503"), "{r}");
    hook.set_status(200);
    let r = env.admin("POST", "/api/notices/deliver", None).await.json();
    assert_eq!(r["delivered"], 2, "{r}");
    let r = env.admin("POST", "/api/notices/deliver", None).await.json();
    assert_eq!(r["delivered"], 0);
    let got = hook.received();
    let delivered: Vec<&Value> = got
        .iter()
        .filter(|g| g.body.get("notices").is_some())
        .flat_map(|g| g.body["notices"].as_array().unwrap().iter())
        .collect();
    // The 503 attempt also reached the receiver; only the accepted one counts as delivery.
    let ok_ids: std::collections::BTreeSet<&str> = delivered
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(ok_ids.len(), 2);
    assert_eq!(env.get("/api/notices").await.json()["undelivered"], 0);
}

/// Served by the accounts component through `vpp_licensing::users::handle`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_users_create_invite_link_associate_and_retire() {
    let env = env_with_notifications().await;
    let token = seed_location(&env.sim, "Main", &[("100", 5)], &[]);
    let id = account(&env, "Main", &token).await;
    let bad = env
        .admin(
            "POST",
            &format!("/api/accounts/{id}/users"),
            Some(&json!({"clientUserId": "u1", "email": "nope"})),
        )
        .await;
    assert_eq!(bad.code(), "invalid_request", "{}", bad.text());
    let r = env
        .admin(
            "POST",
            &format!("/api/accounts/{id}/users"),
            Some(&json!({"clientUserId": "u1", "email": "u1@example.org"})),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    env.sim_idle().await;
    let u = env.get(&format!("/api/accounts/{id}/users/u1")).await;
    assert_eq!(u.status, 200, "{}", u.text());
    let u = u.json();
    assert_eq!(u["status"], "Registered", "{u}");
    let code = u["inviteCode"].as_str().expect("invite code");
    assert!(u["invitationUrl"].as_str().unwrap().contains(code), "{u}");
    env.sim.associate_user(&token, "u1").unwrap();
    env.sim_idle().await;
    let mut status = Value::Null;
    for _ in 0..50 {
        let list = env.get(&format!("/api/accounts/{id}/users")).await.json();
        status = list["users"][0]["status"].clone();
        if status == "Associated" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, "Associated");
    let r = env
        .admin("POST", &format!("/api/accounts/{id}/users/u1/retire"), None)
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    env.sim_idle().await;
    let st = env.sim.location_state(&token).unwrap();
    let users = serde_json::to_value(&st.users).unwrap();
    assert_eq!(users[0]["status"], "Retired", "{users}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_too_large_to_store_is_refused_and_changes_nothing() {
    let env = Env::start().await;
    let token = seed_location(&env.sim, "Main", &[("100", 10)], &[]);
    let id = account(&env, "Main", &token).await;
    put_policy(&env, "small", &id, &["A"]).await;
    let before = env.get("/api/policies").await.json();
    // 5,000 serial numbers of 100 characters: a 530 KB body, under the request limit, over
    // what one policy may take stored.
    let serials: Vec<String> = (0..5_000).map(|s| format!("{s:0100}")).collect();
    let r = env
        .admin(
            "PUT",
            "/api/policies/big",
            Some(&json!({"name": "Big", "accountId": id,
                "assets": [{"adamId": "100", "pricingParam": "STDQ"}], "serialNumbers": serials})),
        )
        .await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.code(), "payload_too_large");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("split it"));
    assert_eq!(env.get("/api/policies/big").await.status, 404);
    assert_eq!(env.get("/api/policies").await.json(), before);
    env.sim_idle().await;
    let associates = env
        .sim
        .calls()
        .iter()
        .filter(|c| c.path.contains("assets/associate"))
        .count();
    assert_eq!(associates, 1, "only the small policy's");
}
