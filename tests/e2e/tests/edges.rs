//! Issue 9 (edges): reclaim with notifications on, one refresh job per account, the first
//! refresh started by adding an account, reader requests that stay local, users created in
//! batches, webhook destinations, the apple component's internal secret, settings merged under
//! concurrency, non-ASCII instance names. End to end over the real components and the simulator.

use e2e::{seed_location, Env, Resp, ADMIN_KEY, READER_KEY};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

/// Item 5: with notifications on, Apple sends its test notification with the new secret before
/// it answers the reclaim; it must be accepted, and later notifications with the new secret too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reclaim_with_notifications_on_switches_the_notification_secret() {
    let env = Env::start_with(vec![("apple_notifications", "on".into())]).await;
    let token = seed_location(&env.sim, "HQ", &[("100", 5)], &[]);
    let id = env.add_account("HQ", &token).await;
    let a = env.get(&format!("/api/accounts/{id}")).await.json();
    assert_eq!(a["notifications"], true, "{a}");
    let first_secret = apple_secret(&env, &token).expect("Apple holds our notification secret");

    let r = env
        .admin("POST", &format!("/api/accounts/{id}/reclaim"), None)
        .await;
    assert_eq!(r.status, 200, "reclaim: {}", r.text());
    let new_secret = apple_secret(&env, &token).expect("still subscribed");
    assert_ne!(new_secret, first_secret, "a fresh secret");
    let tests: Vec<_> = env
        .sim
        .notifications()
        .into_iter()
        .filter(|n| n.notification_type == "TEST_NOTIFICATION")
        .collect();
    assert_eq!(tests.len(), 2, "one test notification per claim");
    assert!(
        tests
            .iter()
            .all(|n| n.delivered && n.last_status == Some(200)),
        "{tests:?}"
    );

    // Apple's next notification carries the new secret: accepted and applied; the old secret
    // is no longer accepted.
    env.sim.clear_notifications();
    env.sim
        .change_asset_count(&token, "100", "STDQ", 3)
        .unwrap();
    let mut sent = None;
    for _ in 0..200 {
        sent = env
            .sim
            .notifications()
            .into_iter()
            .find(|n| n.notification_type == "ASSET_COUNT" && (n.delivered || n.attempts >= 3));
        if sent.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sent = sent.expect("asset count notification");
    assert!(sent.delivered && sent.last_status == Some(200), "{sent:?}");
    let old = env
        .call(
            "POST",
            &format!("/api/apple/notifications/{id}"),
            Some(&sent.envelope),
            Some(&first_secret),
        )
        .await;
    assert_eq!(old.status, 401, "{}", old.text());
}

/// The notification secret Apple holds for a location.
fn apple_secret(env: &Env, token: &str) -> Option<String> {
    let st = env.sim.location_state(token).unwrap();
    st.client_config["notificationAuthToken"]
        .as_str()
        .map(str::to_string)
}

/// Send the same request `n` times at once (each on its own task) and collect the answers.
async fn at_once(
    env: &Arc<Env>,
    n: usize,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Vec<Resp> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let env = env.clone();
            let (method, path, body) = (method.to_string(), path.to_string(), body.clone());
            tokio::spawn(async move { env.admin(&method, &path, body.as_ref()).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("request task"));
    }
    out
}

/// Item 9: concurrent `POST /api/accounts/{id}/refresh` start one job; every caller gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_refresh_requests_share_one_job() {
    let env = Arc::new(Env::start_with(vec![("job_slice_apple_calls", "1".into())]).await);
    let token = seed_location(&env.sim, "HQ", &[("100", 5), ("200", 5)], &[]);
    let id = env.add_account("HQ", &token).await;
    let first = env.admin("GET", "/api/jobs", None).await.json();
    let known: BTreeSet<String> = first["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect();
    // Let the add's own refresh finish first, so the requests below race to create a new one.
    for j in first["jobs"].as_array().unwrap() {
        env.finish_job(j).await;
    }
    for round in 0..3 {
        let path = format!("/api/accounts/{id}/refresh");
        let answers = at_once(&env, 6, "POST", &path, None).await;
        let ids: BTreeSet<String> = answers
            .iter()
            .map(|r| {
                assert_eq!(r.status, 202, "{}", r.text());
                r.json()["id"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(ids.len(), 1, "round {round}: one job for all: {ids:?}");
        let jobs = env.admin("GET", "/api/jobs", None).await.json();
        let refreshes: Vec<&Value> = jobs["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|j| j["kind"] == "refresh" && !known.contains(j["id"].as_str().unwrap()))
            .filter(|j| j["state"] == "running")
            .collect();
        assert_eq!(refreshes.len(), 1, "round {round}: {jobs}");
        let done = env.finish_job(refreshes[0]).await;
        assert_eq!(done["state"], "succeeded", "{done}");
    }
}

/// Item 13: adding an account starts its first full refresh as a job and links to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_an_account_starts_its_first_refresh() {
    let env = Env::start().await;
    let token = seed_location(
        &env.sim,
        "HQ",
        &[("100", 5), ("200", 2)],
        &[("100", "FOREIGN-1")],
    );
    let r = env
        .admin(
            "POST",
            "/api/accounts",
            Some(&json!({"name": "HQ", "token": token})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let body = r.json();
    let id = body["id"].as_str().unwrap().to_string();
    let job_id = body["refreshJob"]["id"].as_str().expect("refreshJob");
    let href = body["refreshJob"]["href"].as_str().unwrap();
    assert!(href.ends_with(&format!("/api/jobs/{job_id}")), "{href}");
    let link = r.headers.get("link").unwrap().to_str().unwrap();
    assert!(
        link.contains(&format!("/api/jobs/{job_id}>")) && link.contains("rel=\"refresh-job\""),
        "{link}"
    );
    let job = env.get(&format!("/api/jobs/{job_id}")).await.json();
    assert_eq!(job["kind"], "refresh");
    assert_eq!(job["accountId"], id.as_str());
    let job = env.finish_job(&job).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    // No manual refresh: the licenses are there.
    let list = env
        .get(&format!("/api/licenses?accountId={id}"))
        .await
        .json();
    let rows = list["licenses"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{list}");
    let a = env.get(&format!("/api/accounts/{id}")).await.json();
    assert_eq!(a["status"]["code"], "healthy", "{a}");
    assert!(a["lastSynchronized"].is_string(), "{a}");
}

/// Item 10: a reader's user lookups never reach Apple; an admin's may re-read a user that is
/// still being created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_user_requests_stay_local() {
    let env = Env::start().await;
    let token = seed_location(&env.sim, "HQ", &[("100", 5)], &[]);
    let id = env.add_account("HQ", &token).await;
    env.refresh(&id).await;
    let r = env
        .admin(
            "POST",
            &format!("/api/accounts/{id}/users"),
            Some(&json!({"clientUserId": "u-1", "email": "u1@example.com"})),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    env.sim.clear_calls();
    let env = &env;
    let reader = |path: String| async move { env.call("GET", &path, None, Some(READER_KEY)).await };
    let unknown = reader(format!("/api/accounts/{id}/users/nobody")).await;
    assert_eq!(unknown.status, 404, "{}", unknown.text());
    let known = reader(format!("/api/accounts/{id}/users/u-1")).await;
    assert_eq!(known.status, 200, "{}", known.text());
    let list = reader(format!("/api/accounts/{id}/users")).await;
    assert_eq!(list.status, 200, "{}", list.text());
    assert!(
        env.sim.calls().is_empty(),
        "reader requests reached Apple: {:?}",
        env.sim
            .calls()
            .iter()
            .map(|c| format!("{} {}", c.method, c.path))
            .collect::<Vec<_>>()
    );
    // The admin's lookup of the user being created asks Apple.
    let r = env
        .call(
            "GET",
            &format!("/api/accounts/{id}/users/u-1"),
            None,
            Some(ADMIN_KEY),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(env.sim.calls().iter().any(|c| c.path.contains("users")));
}

/// Item 11: when a later batch of a users `create` fails, the users of the batches Apple
/// already accepted are kept (Apple creates them), and the answer says which users failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_create_keeps_the_batches_apple_accepted() {
    let env = Env::start().await;
    env.sim.set_limits(apple_sim::Limits {
        max_users: 2,
        ..apple_sim::Limits::default()
    });
    let token = seed_location(&env.sim, "HQ", &[("100", 5)], &[]);
    let id = env.add_account("HQ", &token).await;
    env.refresh(&id).await;
    // The second batch holds an address Apple refuses (9717).
    let users = json!({"users": [
        {"clientUserId": "u-1", "email": "u1@example.com"},
        {"clientUserId": "u-2", "email": "u2@example.com"},
        {"clientUserId": "u-3", "email": "u3@example.com"},
        {"clientUserId": "u-4", "email": "u4@example."},
        {"clientUserId": "u-5", "email": "u5@example.com"},
    ]});
    let r = env
        .admin("POST", &format!("/api/accounts/{id}/users"), Some(&users))
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let body = r.json();
    let accepted: Vec<&str> = body["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["clientUserId"].as_str().unwrap())
        .collect();
    assert_eq!(accepted, ["u-1", "u-2"], "{body}");
    let failed: Vec<&str> = body["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["clientUserId"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["u-3", "u-4", "u-5"], "{body}");
    assert_eq!(body["failed"][0]["outcome"], "rejected");
    assert_eq!(body["error"]["code"], "apple_rejected", "{body}");
    for u in ["u-1", "u-2"] {
        let r = env.get(&format!("/api/accounts/{id}/users/{u}")).await;
        assert_eq!(r.status, 200, "{u}: {}", r.text());
    }
    let r = env.get(&format!("/api/accounts/{id}/users/u-3")).await;
    assert_eq!(r.status, 404, "{}", r.text());
}

/// Item 11: the webhook may not point inside the platform, and must be https unless the
/// operator allows the host for http.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_destinations_inside_the_platform_are_refused() {
    let env = Env::start_with(vec![(
        "notice_webhook_http_hosts",
        "hooks.corp.test".into(),
    )])
    .await;
    let secret = "0123456789abcdef0123";
    for url in [
        "https://127.0.0.1/hook",
        "https://localhost:8443/hook",
        "https://10.0.0.7/hook",
        "https://169.254.169.254/latest",
        "https://[::1]/hook",
        "https://apple.spin.internal/accounts",
        "http://hooks.example.com/hook",
    ] {
        let r = env
            .admin(
                "PUT",
                "/api/settings",
                Some(&json!({"noticeWebhookUrl": url, "noticeWebhookSecret": secret})),
            )
            .await;
        // Of the OpenAPI document's URL form, but not a URL this app calls: 422.
        assert_eq!(
            (r.status, r.code().as_str()),
            (422, "unprocessable"),
            "{url}: {}",
            r.text()
        );
    }
    let s = env.get("/api/settings").await.json();
    assert!(s["noticeWebhookUrl"].is_null(), "nothing stored: {s}");
    for url in ["https://hooks.example.com/hook", "http://hooks.corp.test/n"] {
        let r = env
            .admin(
                "PUT",
                "/api/settings",
                Some(&json!({"noticeWebhookUrl": url, "noticeWebhookSecret": secret})),
            )
            .await;
        assert_eq!(r.status, 200, "{url}: {}", r.text());
    }
}

/// Item 11: concurrent `PUT /api/settings` of different fields all stick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_settings_puts_keep_every_field() {
    let env = Arc::new(Env::start().await);
    for round in 0..8 {
        let on = round % 2 == 0;
        let threshold = 10 + round;
        let a = json!({"licenseRemovalNotification": on});
        let b = json!({"lowLicenseThreshold": threshold});
        let (ra, rb) = tokio::join!(
            at_once(&env, 1, "PUT", "/api/settings", Some(a)),
            at_once(&env, 1, "PUT", "/api/settings", Some(b)),
        );
        for r in ra.iter().chain(&rb) {
            assert_eq!(r.status, 200, "{}", r.text());
        }
        let s = env.get("/api/settings").await.json();
        assert_eq!(s["licenseRemovalNotification"], on, "round {round}: {s}");
        assert_eq!(s["lowLicenseThreshold"], threshold, "round {round}: {s}");
    }
}

/// Writers that race to create one key (here the settings and the audit page of a fresh app)
/// all succeed and no change is lost. On Spin's SQLite store a swap from an absent key is an
/// unconditional upsert and `increment` on a document panics the host (and poisons its
/// connection), so creation goes through a claim only `increment` touches: a writer that arrives
/// after the key was created takes the ordinary compare-and-swap path instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_racing_to_create_a_key_all_succeed() {
    for app in 0..4 {
        let env = Arc::new(Env::start().await);
        let on = app % 2 == 0;
        let threshold = 20 + app;
        let a = json!({"licenseRemovalNotification": on});
        let b = json!({"lowLicenseThreshold": threshold});
        let (ra, rb) = tokio::join!(
            at_once(&env, 3, "PUT", "/api/settings", Some(a)),
            at_once(&env, 3, "PUT", "/api/settings", Some(b)),
        );
        for r in ra.iter().chain(&rb) {
            assert_eq!(r.status, 200, "app {app}: {}", r.text());
        }
        let s = env.get("/api/settings").await.json();
        assert_eq!(s["licenseRemovalNotification"], on, "app {app}: {s}");
        assert_eq!(s["lowLicenseThreshold"], threshold, "app {app}: {s}");
        // Every claim was released: only the keys themselves are left.
        let claims: Vec<String> = env
            .keys()
            .into_iter()
            .filter(|k| k.starts_with("creating/"))
            .collect();
        assert!(claims.is_empty(), "app {app}: claims left {claims:?}");
    }
}

/// The apple component's route rebound to a public path, as on a platform without service
/// chaining, but mounted at the root so paths carry no `/internal/apple` prefix.
/// The console, which has the root otherwise, moves aside to `/console/...`.
fn apple_public_at_root(manifest: &str) -> String {
    manifest
        .replace(
            "route = \"/...\"\ncomponent = \"console\"",
            "route = \"/console/...\"\ncomponent = \"console\"",
        )
        .replace(
            "route = { private = true }\ncomponent = \"apple\"",
            "route = \"/...\"\ncomponent = \"apple\"",
        )
}

/// Item 11: with `internal_secret` set, the apple component answers only requests that carry
/// it, whatever the path; the other components send it, so the app works as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apple_component_requires_the_internal_secret_on_every_request() {
    let secret = "internal-secret-0123456789";
    let env = Env::start_edited(
        vec![("internal_secret", secret.into())],
        apple_public_at_root,
    )
    .await;
    let token = seed_location(&env.sim, "HQ", &[("100", 5)], &[]);
    let id = env.add_account("HQ", &token).await;
    let job = env.refresh(&id).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    env.sim.clear_calls();
    for path in [
        "/health".to_string(),
        format!("/accounts/{id}/mdm/v2/assets"),
        "/service-config".to_string(),
    ] {
        let r = env.call("GET", &path, None, None).await;
        assert_eq!(r.status, 401, "{path}: {}", r.text());
        let r = env.call("GET", &path, None, Some("not-the-secret")).await;
        assert_eq!(r.status, 401, "{path}: {}", r.text());
    }
    assert!(env.sim.calls().is_empty(), "nothing reached Apple");
    // The header, not a bearer, carries it; with it the component answers.
    let ok = env
        .app
        .handle(
            http::Request::builder()
                .method("GET")
                .uri("/health")
                .header("x-vpp-internal", secret)
                .body(Vec::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

/// Item 11: an instance name in any script, longer than Apple takes, is cut by characters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_non_ascii_instance_name_is_cut_without_failing() {
    let name = format!("Ärztekammer {}", "é".repeat(120));
    let env = Env::start_with(vec![("instance_name", name.clone())]).await;
    let token = seed_location(&env.sim, "HQ", &[("100", 5)], &[]);
    let id = env.add_account("HQ", &token).await;
    let st = env.sim.location_state(&token).unwrap();
    let written = st.mdm_info.expect("claimed").name;
    assert_eq!(written.chars().count(), 100);
    assert!(name.starts_with(&written));
    let r = env
        .admin("POST", &format!("/api/accounts/{id}/reclaim"), None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
}
