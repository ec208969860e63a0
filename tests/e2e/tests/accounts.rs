//! Issue 4: App Store License accounts, end to end over the real components and the simulator.

use apple_sim::{FaultKind, FaultSpec, MdmInfo, TakeOver};
use e2e::{seed_location, Env, READER_KEY};
use serde_json::{json, Value};

fn find<'a>(list: &'a Value, id: &str) -> &'a Value {
    list["accounts"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["id"] == id))
        .expect("account listed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_list_get_and_never_synced_then_healthy() {
    let env = Env::start().await;
    let token = seed_location(
        &env.sim,
        "Main Campus",
        &[("100", 10), ("200", 5)],
        &[("100", "SER-1")],
    );
    let r = env
        .admin(
            "POST",
            "/api/accounts",
            Some(&json!({"name": "  Main  ", "token": token})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let a = r.json();
    let id = a["id"].as_str().unwrap().to_string();
    assert_eq!(a["name"], "Main");
    assert_eq!(a["location"], "Main Campus");
    assert_eq!(a["organization"], "Simulated Org");
    // Adding starts the first full refresh; this small account is synced within the request.
    assert_eq!(a["refreshJob"]["state"], "succeeded", "{a}");
    assert_eq!(a["status"]["code"], "healthy", "{a}");
    assert!(a["expiryDate"].is_string());
    assert!(!r.text().contains(&token), "the token is never returned");
    // Location is absolute, built from the URL Spin saw.
    let location = r
        .headers
        .get("location")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        location.ends_with(&format!("/api/accounts/{id}")),
        "{location}"
    );

    // The instance claimed the location with its mdmInfo.
    let st = env.sim.location_state(&token).unwrap();
    assert!(st.mdm_info.is_some(), "mdmInfo written");

    let job = env.refresh(&id).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let list = env.get("/api/accounts").await.json();
    let a = find(&list, &id);
    assert_eq!(a["status"]["code"], "healthy", "{a}");
    assert_eq!(a["status"]["severity"], "ok");
    assert!(a["lastSynchronized"].is_string());
    assert!(a["policies"].is_array());

    let one = env.get(&format!("/api/accounts/{id}")).await;
    assert_eq!(one.status, 200);
    assert_eq!(one.json()["id"], id.as_str());
    assert_eq!(env.get("/api/accounts/nope").await.code(), "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_and_store_nothing() {
    let env = Env::start().await;
    let before = env.keys();
    let malformed = env
        .admin(
            "POST",
            "/api/accounts",
            Some(&json!({"name": "x", "token": "not a token"})),
        )
        .await;
    assert_eq!(
        (malformed.status, malformed.code().as_str()),
        (422, "token_malformed"),
        "{}",
        malformed.text()
    );

    let expired = env.sim.add_location(apple_sim::LocationSpec {
        exp_date: Some(chrono::Utc::now() - chrono::Duration::days(2)),
        ..apple_sim::LocationSpec::named("Old")
    });
    let r = env
        .admin(
            "POST",
            "/api/accounts",
            Some(&json!({"name": "x", "token": expired})),
        )
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (422, "token_expired"),
        "{}",
        r.text()
    );

    let missing = env
        .admin("POST", "/api/accounts", Some(&json!({"name": "x"})))
        .await;
    assert_eq!(
        (missing.status, missing.code().as_str()),
        (400, "invalid_json")
    );
    let valid = env.sim.add_location(apple_sim::LocationSpec::named("Fine"));
    let empty_name = env
        .admin(
            "POST",
            "/api/accounts",
            Some(&json!({"name": " ", "token": valid})),
        )
        .await;
    assert_eq!(empty_name.code(), "invalid_request");
    let unknown_field = env
        .admin(
            "POST",
            "/api/accounts",
            Some(&json!({"name": "x", "token": expired, "tokne": 1})),
        )
        .await;
    assert_eq!(unknown_field.code(), "invalid_json");

    // Format and expiry are checked before Apple is called.
    assert!(
        env.sim
            .calls()
            .iter()
            .all(|c| c.path.ends_with("service/config")),
        "{:?}",
        env.sim.calls()
    );
    let after: Vec<String> = env
        .keys()
        .into_iter()
        .filter(|k| !k.starts_with("audit"))
        .collect();
    let before: Vec<String> = before
        .into_iter()
        .filter(|k| !k.starts_with("audit"))
        .collect();
    assert_eq!(after, before, "nothing stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_token_of_a_location_is_a_conflict() {
    let env = Env::start().await;
    let token = seed_location(&env.sim, "HQ", &[("1", 1)], &[]);
    let id = env.add_account("HQ", &token).await;
    let again = env
        .admin(
            "POST",
            "/api/accounts",
            Some(&json!({"name": "HQ again", "token": token})),
        )
        .await;
    assert_eq!(
        (again.status, again.code().as_str()),
        (409, "duplicate_location")
    );
    assert_eq!(again.json()["error"]["details"]["accountId"], id.as_str());
    assert_eq!(
        env.get("/api/accounts").await.json()["accounts"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apple_down_during_add_stores_nothing() {
    let env = Env::start().await;
    let token = seed_location(&env.sim, "HQ", &[("1", 1)], &[]);
    env.sim
        .inject_fault(
            &token,
            FaultSpec::new(FaultKind::Unavailable)
                .on("client/config")
                .retry_after(1),
        )
        .unwrap();
    let keys_before: Vec<String> = env
        .keys()
        .into_iter()
        .filter(|k| !k.starts_with("audit"))
        .collect();
    let r = env
        .admin(
            "POST",
            "/api/accounts",
            Some(&json!({"name": "HQ", "token": token})),
        )
        .await;
    assert_eq!(r.code(), "apple_unavailable", "{}", r.text());
    assert!(r.status >= 500);
    let keys_after: Vec<String> = env
        .keys()
        .into_iter()
        .filter(|k| {
            !k.starts_with("audit")
                && !k.starts_with("apple/service-config")
                && !k.starts_with("instance")
        })
        .collect();
    let keys_before: Vec<String> = keys_before
        .into_iter()
        .filter(|k| !k.starts_with("apple/service-config") && !k.starts_with("instance"))
        .collect();
    assert_eq!(keys_after, keys_before, "nothing stored");
    assert!(env.get("/api/accounts").await.json()["accounts"]
        .as_array()
        .unwrap()
        .is_empty());
    // Apple comes back: the same token adds fine.
    env.sim.clear_faults(&token).unwrap();
    env.add_account("HQ", &token).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn location_owned_by_another_mdm_is_not_taken_over_until_reclaimed() {
    let env = Env::start().await;
    let token = env.sim.add_location(apple_sim::LocationSpec {
        mdm_info: Some(MdmInfo {
            id: "other-mdm".into(),
            name: "Other MDM".into(),
            metadata: "x".into(),
        }),
        ..apple_sim::LocationSpec::named("Taken")
    });
    let id = env.add_account("Taken", &token).await;
    let st = env.sim.location_state(&token).unwrap();
    assert_eq!(
        st.mdm_info.unwrap().id,
        "other-mdm",
        "not taken over silently"
    );
    let a = env.get(&format!("/api/accounts/{id}")).await.json();
    assert_eq!(a["status"]["code"], "owned_by_another_mdm", "{a}");
    assert!(a["status"]["description"]
        .as_str()
        .unwrap()
        .contains("Other MDM"));

    // Clean up refuses while another MDM owns the location.
    let c = env
        .admin("POST", &format!("/api/accounts/{id}/cleanup"), None)
        .await;
    assert_eq!((c.status, c.code().as_str()), (409, "owned_by_another_mdm"));

    // Readers may not reclaim; admins may, and the audit says who.
    let denied = env
        .call(
            "POST",
            &format!("/api/accounts/{id}/reclaim"),
            None,
            Some(READER_KEY),
        )
        .await;
    assert_eq!(denied.status, 403);
    let r = env
        .admin("POST", &format!("/api/accounts/{id}/reclaim"), None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_ne!(r.json()["status"]["code"], "owned_by_another_mdm");
    assert_ne!(
        env.sim.location_state(&token).unwrap().mdm_info.unwrap().id,
        "other-mdm"
    );
    let audit = env.get("/api/audit").await.json();
    let rec = audit["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["action"] == format!("POST /api/accounts/{id}/reclaim") && r["status"] == 200)
        .expect("reclaim audited");
    assert!(rec["actor"].as_str().unwrap().starts_with("admin:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_renames_and_replaces_token_of_same_location_only() {
    let env = Env::start().await;
    let token = seed_location(&env.sim, "HQ", &[("1", 1)], &[]);
    let id = env.add_account("HQ", &token).await;
    let r = env
        .admin(
            "PATCH",
            &format!("/api/accounts/{id}"),
            Some(&json!({"name": "Head office"})),
        )
        .await;
    assert_eq!(
        (r.status, r.json()["name"].clone()),
        (200, json!("Head office"))
    );

    let other = seed_location(&env.sim, "Elsewhere", &[], &[]);
    let r = env
        .admin(
            "PATCH",
            &format!("/api/accounts/{id}"),
            Some(&json!({"token": other})),
        )
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (422, "location_mismatch"),
        "{}",
        r.text()
    );

    // A renewed token of the same location: same uId, new expiry.
    let uid = env.sim.location_uid(&token).unwrap();
    let renewed = env.sim.add_location(apple_sim::LocationSpec {
        uid: Some(uid),
        exp_date: Some(chrono::Utc::now() + chrono::Duration::days(700)),
        ..apple_sim::LocationSpec::named("HQ")
    });
    let before = env.get(&format!("/api/accounts/{id}")).await.json()["expiryDate"].clone();
    let r = env
        .admin(
            "PATCH",
            &format!("/api/accounts/{id}"),
            Some(&json!({"token": renewed})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_ne!(r.json()["expiryDate"], before);
    let nothing = env
        .admin("PATCH", &format!("/api/accounts/{id}"), Some(&json!({})))
        .await;
    assert_eq!(nothing.status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_reports_each_check() {
    let env = Env::start().await;
    let token = seed_location(&env.sim, "HQ", &[("1", 1)], &[]);
    let id = env.add_account("HQ", &token).await;
    let r = env
        .admin("POST", &format!("/api/accounts/{id}/test"), None)
        .await
        .json();
    assert_eq!(r["ok"], true, "{r}");
    let names: Vec<&str> = r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "tokenWellFormed",
            "tokenNotExpired",
            "appleReachable",
            "tokenAccepted",
            "ownsLocation"
        ]
    );

    env.sim.set_token_revoked(&token, true).unwrap();
    let r = env
        .admin("POST", &format!("/api/accounts/{id}/test"), None)
        .await
        .json();
    assert_eq!(r["ok"], false);
    let accepted = r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "tokenAccepted")
        .unwrap();
    assert_eq!(accepted["ok"], false);
    let a = env.get(&format!("/api/accounts/{id}")).await.json();
    assert_eq!(a["status"]["code"], "token_rejected");
    assert!(
        a["status"]["description"]
            .as_str()
            .unwrap()
            .contains("revoked"),
        "{a}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_for_rate_limit_and_failed_sync() {
    let env = Env::start().await;
    let token = seed_location(&env.sim, "HQ", &[("1", 1)], &[]);
    let id = env.add_account("HQ", &token).await;
    env.sim
        .inject_fault(
            &token,
            FaultSpec::new(FaultKind::RateLimited)
                .on("assets")
                .retry_after(120),
        )
        .unwrap();
    let r = env
        .admin("POST", &format!("/api/accounts/{id}/refresh"), None)
        .await;
    assert_eq!(r.status, 202);
    assert_eq!(r.json()["state"], "running", "paused, not failed");
    let a = env.get(&format!("/api/accounts/{id}")).await.json();
    assert!(
        ["apple_rate_limited", "syncing"].contains(&a["status"]["code"].as_str().unwrap()),
        "{a}"
    );
    env.sim.clear_faults(&token).unwrap();

    let token2 = seed_location(&env.sim, "Two", &[("1", 1)], &[]);
    let id2 = env.add_account("Two", &token2).await;
    env.sim.set_token_revoked(&token2, true).unwrap();
    let job = env.refresh(&id2).await;
    assert_eq!(job["state"], "failed");
    assert_eq!(job["error"]["code"], "apple_token_revoked");
    let a = env.get(&format!("/api/accounts/{id2}")).await.json();
    assert_eq!(a["status"]["code"], "token_rejected");
    assert_eq!(a["lastSync"]["ok"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_mid_refresh_stops_it_and_keeps_the_previous_copy() {
    let env = Env::start_with(vec![("job_slice_apple_calls", "2".into())]).await;
    env.sim.set_page_size(2);
    let serials: Vec<String> = (0..12).map(|i| format!("S{i}")).collect();
    let pairs: Vec<(&str, &str)> = serials.iter().map(|s| ("100", s.as_str())).collect();
    let token = seed_location(&env.sim, "HQ", &[("100", 20)], &pairs);
    let id = env.add_account("HQ", &token).await;
    let first = env.refresh(&id).await;
    assert_eq!(first["state"], "succeeded");
    let before = env.app.kv_get("default", &format!("assets/{id}")).unwrap();

    let r = env
        .admin("POST", &format!("/api/accounts/{id}/refresh"), None)
        .await;
    assert_eq!(r.json()["state"], "running");
    env.sim.take_over(&token, TakeOver::default()).unwrap();
    let job = env.finish_job(&r.json()).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "owned_by_another_mdm");
    let a = env.get(&format!("/api/accounts/{id}")).await.json();
    assert_eq!(a["status"]["code"], "owned_by_another_mdm");
    assert_eq!(
        env.app.kv_get("default", &format!("assets/{id}")).unwrap(),
        before,
        "previous copy intact"
    );
    assert!(
        env.app
            .kv_get("default", &format!("assets/{id}/staging"))
            .is_none(),
        "no half copy left"
    );
}

/// The stored copy of an account: assets (without the sync time) and every assignment shard.
fn stored_copy(env: &Env, id: &str) -> (Value, Vec<(String, Value)>) {
    let copy = env.stored_copy(id);
    (copy.assets, copy.shards)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_interrupted_and_resumed_gives_the_same_copy() {
    async fn run(slice_calls: &str) -> (Value, Vec<(String, Value)>, u64) {
        let env = Env::start_with(vec![("job_slice_apple_calls", slice_calls.into())]).await;
        env.sim.set_page_size(3);
        let serials: Vec<String> = (0..25).map(|i| format!("D{i:02}")).collect();
        let mut pairs: Vec<(&str, &str)> =
            serials[..15].iter().map(|s| ("100", s.as_str())).collect();
        pairs.extend(serials[15..].iter().map(|s| ("200", s.as_str())));
        let token = seed_location(
            &env.sim,
            "HQ",
            &[("100", 30), ("200", 12), ("300", 1)],
            &pairs,
        );
        let id = env.add_account("HQ", &token).await;
        let job = env.refresh(&id).await;
        assert_eq!(job["state"], "succeeded", "{job}");
        let (doc, shards) = stored_copy(&env, &id);
        (doc, shards, job["slices"].as_u64().unwrap())
    }
    let (doc_a, shards_a, slices_a) = run("1000").await;
    let (doc_b, shards_b, slices_b) = run("1").await;
    assert_eq!(slices_a, 1);
    assert!(slices_b > 5, "interrupted many times: {slices_b}");
    assert_eq!(doc_a, doc_b);
    assert_eq!(shards_a, shards_b);
    let total: usize = shards_a
        .iter()
        .map(|(_, v)| v.as_object().unwrap().len())
        .sum();
    assert_eq!(total, 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_every_key_of_the_account() {
    let env = Env::start().await;
    let token = seed_location(
        &env.sim,
        "HQ",
        &[("100", 5), ("200", 5)],
        &[("100", "A"), ("200", "B")],
    );
    let id = env.add_account("HQ", &token).await;
    env.refresh(&id).await;
    assert!(env.keys_of(&id).len() > 3, "{:?}", env.keys_of(&id));
    let denied = env
        .call(
            "DELETE",
            &format!("/api/accounts/{id}"),
            None,
            Some(READER_KEY),
        )
        .await;
    assert_eq!(denied.status, 403);
    let r = env
        .admin("DELETE", &format!("/api/accounts/{id}"), None)
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(env.keys_of(&id), Vec::<String>::new());
    assert_eq!(env.get(&format!("/api/accounts/{id}")).await.status, 404);
    assert_eq!(
        env.admin("DELETE", &format!("/api/accounts/{id}"), None)
            .await
            .status,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_revokes_foreign_assignments_and_leaves_ours_alone() {
    let env = Env::start().await;
    // Foreign: F1 and F2 on app 100, F3 on app 200. Ours (made below): O1 on 100, F1 on 200.
    let token = seed_location(
        &env.sim,
        "HQ",
        &[("100", 10), ("200", 10)],
        &[("100", "F1"), ("100", "F2"), ("200", "F3")],
    );
    let id = env.add_account("HQ", &token).await;
    env.refresh(&id).await;
    for (adam, serial) in [("100", "O1"), ("200", "F1")] {
        let r = env
            .admin(
                "POST",
                "/api/assignments",
                Some(&json!({"accountId": id, "adamId": adam, "serialNumbers": [serial]})),
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.text());
        let ev = env
            .settled_event(r.json()["eventId"].as_str().unwrap())
            .await;
        assert_eq!(ev["state"], "complete", "{ev}");
    }
    env.refresh(&id).await;
    let page = env
        .get(&format!("/api/licenses/{id}/100/assignments"))
        .await
        .json();
    let text = page.to_string();
    assert!(text.contains("F1") && text.contains("O1"), "{text}");

    let r = env
        .admin("POST", &format!("/api/accounts/{id}/cleanup"), None)
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let job = env.finish_job(&r.json()).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["result"]["released"], 3, "{job}");
    for ev in job["result"]["events"].as_array().unwrap() {
        env.settled_event(ev.as_str().unwrap()).await;
    }
    let st = env.sim.location_state(&token).unwrap();
    let mut left: Vec<(String, String)> = st
        .assignments
        .iter()
        .map(|a| {
            let v = serde_json::to_value(a).unwrap();
            (
                v["adamId"].as_str().unwrap().to_string(),
                v["serialNumber"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    left.sort();
    assert_eq!(
        left,
        vec![
            ("100".to_string(), "O1".to_string()),
            ("200".to_string(), "F1".to_string())
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_expiring_soon_and_apple_unreachable() {
    let env = Env::start().await;
    let soon = env.sim.add_location(apple_sim::LocationSpec {
        exp_date: Some(chrono::Utc::now() + chrono::Duration::days(10)),
        ..apple_sim::LocationSpec::named("Soon")
    });
    let id = env.add_account("Soon", &soon).await;
    env.refresh(&id).await;
    let a = env.get(&format!("/api/accounts/{id}")).await.json();
    assert_eq!(a["status"]["code"], "expiring_soon", "{a}");
    assert_eq!(a["status"]["severity"], "warning");

    let token = seed_location(&env.sim, "Down", &[("1", 1)], &[]);
    let id = env.add_account("Down", &token).await;
    env.sim
        .inject_fault(
            &token,
            FaultSpec::new(FaultKind::InternalError).on("client/config"),
        )
        .unwrap();
    let r = env
        .admin("POST", &format!("/api/accounts/{id}/refresh"), None)
        .await;
    assert_eq!(
        r.json()["state"],
        "running",
        "paused until Apple is back: {}",
        r.text()
    );
    let a = env.get(&format!("/api/accounts/{id}")).await.json();
    assert!(
        ["apple_unreachable", "syncing"].contains(&a["status"]["code"].as_str().unwrap()),
        "{a}"
    );
    env.sim.clear_faults(&token).unwrap();
    let job = env.finish_job(&r.json()).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(
        env.get(&format!("/api/accounts/{id}")).await.json()["status"]["code"],
        "healthy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_license_found_gone_at_refresh_yields_a_notice() {
    let env = Env::start().await;
    env.notices_on().await;
    let token = seed_location(&env.sim, "HQ", &[("100", 5)], &[]);
    let id = env.add_account("HQ", &token).await;
    env.refresh(&id).await;
    let r = env
        .admin(
            "POST",
            "/api/assignments",
            Some(&json!({"accountId": id, "adamId": "100", "serialNumbers": ["KEEP", "GONE"]})),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    env.settled_event(r.json()["eventId"].as_str().unwrap())
        .await;
    env.refresh(&id).await;
    // Someone takes a license back in Apple Business Manager, outside this instance.
    env.sim
        .remove_assignments(
            &token,
            vec![apple_sim::AssignmentSpec::device("100", "GONE")],
        )
        .unwrap();
    let job = env.refresh(&id).await;
    assert_eq!(job["state"], "succeeded");
    let notices = env.get("/api/notices").await.json();
    let text = notices.to_string();
    assert!(text.contains("GONE") && text.contains("refresh"), "{text}");
    assert!(!text.contains("KEEP"), "{text}");
    // Reconcile will not try to take back what Apple no longer has.
    let page = env
        .get(&format!("/api/licenses/{id}/100/assignments"))
        .await
        .json()
        .to_string();
    assert!(page.contains("KEEP") && !page.contains("GONE"), "{page}");
}
