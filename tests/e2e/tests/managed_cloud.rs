//! Issue 11: the managed clouds (Fermyon Cloud, Akamai Functions), simulated by the host's
//! `Platform::ManagedCloud`: no key-value atomics (the components built with
//! `--no-default-features`), at most 1,024 keys of at most 255 bytes and values of at most 1 MB,
//! no service chaining (the apple component on `/internal/apple/...`, reached by a self-request
//! carrying `internal_secret`), 30 s per invocation, no cron trigger (the daily route driven by
//! an external scheduler). The core scenarios pass there.

use e2e::{seed_location, Env, HostSetup, INTERNAL_SECRET, SCHEDULER_KEY};
use serde_json::{json, Value};
use spin_host::{App, HostOptions, Platform};
use std::time::Duration;

async fn managed_env() -> Env {
    // Apple's notifications confirm events, as in the licenses suite.
    Env::start_on(
        vec![("apple_notifications", "on".into())],
        HostSetup {
            platform: Platform::ManagedCloud,
            ..HostSetup::default()
        },
    )
    .await
}

fn holds(env: &Env, token: &str, adam: &str, serial: &str) -> bool {
    env.sim
        .location_state(token)
        .unwrap()
        .assignments
        .iter()
        .any(|a| a.adam_id == adam && a.serial_number.as_deref() == Some(serial))
}

async fn wait_held(env: &Env, token: &str, adam: &str, serial: &str, want: bool) {
    for _ in 0..100 {
        env.sim_idle().await;
        if holds(env, token, adam, serial) == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{adam}/{serial} held at Apple should be {want}");
}

fn in_use(list: &Value, adam: &str) -> Option<i64> {
    list["licenses"]
        .as_array()?
        .iter()
        .find(|r| r["adamId"] == adam)?["inUse"]
        .as_i64()
}

/// GET a path of the apple component's public route with an `x-vpp-internal` header.
async fn internal(env: &Env, path: &str, secret: Option<&str>) -> u16 {
    let mut b = http::Request::get(path);
    if let Some(s) = secret {
        b = b.header("x-vpp-internal", s);
    }
    let resp = env.app.handle(b.body(Vec::new()).unwrap()).await.unwrap();
    resp.status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_scenarios_pass_on_the_managed_cloud_profile() {
    let env = managed_env().await;
    assert!(env.app.cron_triggers().is_empty(), "no cron trigger");
    assert!(
        env.app
            .routes()
            .iter()
            .any(|(c, r)| c == "apple" && r.starts_with("/internal/apple")),
        "{:?}",
        env.app.routes()
    );
    let token = seed_location(
        &env.sim,
        "HQ",
        &[("100", 10), ("200", 10)],
        &[("100", "F1"), ("200", "F2")],
    );

    // Add (the apple component is reached through its public route) and refresh.
    let id = env.add_account("HQ", &token).await;
    let job = env.refresh(&id).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let list = env
        .get(&format!("/api/licenses?accountId={id}"))
        .await
        .json();
    assert_eq!(in_use(&list, "100"), Some(1), "{list}");

    // The guarded route refuses a caller without the internal secret.
    let assets = format!("/internal/apple/accounts/{id}/mdm/v2/assets");
    for secret in [None, Some("wrong")] {
        assert_eq!(internal(&env, &assets, secret).await, 401, "{secret:?}");
    }
    assert_eq!(internal(&env, &assets, Some(INTERNAL_SECRET)).await, 200);

    // Assign and revoke.
    let r = env
        .admin(
            "POST",
            "/api/assignments",
            Some(&json!({"accountId": id, "adamId": "100", "serialNumbers": ["A1", "A2"]})),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let ev = env
        .settled_event(r.json()["eventId"].as_str().unwrap())
        .await;
    assert_eq!(ev["state"], "complete", "{ev}");
    assert!(holds(&env, &token, "100", "A1") && holds(&env, &token, "100", "A2"));
    let r = env
        .admin(
            "POST",
            "/api/assignments/revoke",
            Some(&json!({"accountId": id, "adamId": "100", "serialNumbers": ["A2"]})),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    env.settled_event(r.json()["eventId"].as_str().unwrap())
        .await;
    assert!(!holds(&env, &token, "100", "A2"));

    // A policy, then a smaller one and reconcile.
    let policy = |serials: &[&str]| {
        json!({"name": "Lab", "accountId": id,
               "assets": [{"adamId": "200", "pricingParam": "STDQ"}], "serialNumbers": serials})
    };
    let r = env
        .admin("PUT", "/api/policies/lab", Some(&policy(&["P1", "P2"])))
        .await;
    assert!(r.status == 200 || r.status == 201, "{}", r.text());
    wait_held(&env, &token, "200", "P2", true).await;
    let r = env
        .admin("PUT", "/api/policies/lab", Some(&policy(&["P1"])))
        .await;
    assert!(r.status == 200 || r.status == 201, "{}", r.text());
    let r = env.admin("POST", "/api/reconcile", None).await;
    assert_eq!(r.status, 202, "{}", r.text());
    let job = env.finish_job(&r.json()).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    wait_held(&env, &token, "200", "P2", false).await;
    assert!(holds(&env, &token, "200", "P1") && holds(&env, &token, "200", "F2"));

    // The daily route, driven as an external scheduler would: POST with the key until done.
    let mut finished = None;
    for _ in 0..300 {
        let r = env
            .call("POST", "/api/daily", None, Some(SCHEDULER_KEY))
            .await;
        assert!(r.status == 200 || r.status == 202, "{}", r.text());
        if r.json()["status"] == "finished" {
            finished = Some(r.json()["job"].clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let daily = finished.expect("the daily run finished");
    assert_eq!(daily["state"], "succeeded", "{daily}");

    // Clean up what another MDM left: the foreign assignments go, ours stay.
    let r = env
        .admin("POST", &format!("/api/accounts/{id}/cleanup"), None)
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let job = env.finish_job(&r.json()).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    for ev in job["result"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        env.settled_event(ev.as_str().unwrap()).await;
    }
    assert!(!holds(&env, &token, "100", "F1") && !holds(&env, &token, "200", "F2"));
    assert!(
        holds(&env, &token, "200", "P1"),
        "the policy's subject stays"
    );

    // Everything stayed within the platform's key-value limits.
    let keys = env.keys();
    assert!(keys.len() <= 1024, "{} keys", keys.len());
    for k in &keys {
        assert!(k.len() <= 255, "{k}");
        assert!(
            env.app.kv_get("default", k).unwrap().len() <= 1_000_000,
            "{k}"
        );
    }
}

/// Finished jobs cost a few keys however many are kept (`keys::JOB_DONE_PAGES` pages of
/// finished records; `keys::KEPT_JOBS` listed): more refreshes than the index keeps, through the
/// real components without atomics, leave no key per job, and every finished job listed reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_are_packed_in_a_few_keys_on_the_managed_cloud_profile() {
    // vpp_store::keys: KEPT_JOBS = 200, JOB_DONE_PAGES = 8.
    const KEPT_JOBS: usize = 200;
    const JOB_DONE_PAGES: usize = 8;
    let env = managed_env().await;
    let token = seed_location(&env.sim, "HQ", &[("100", 10)], &[("100", "F1")]);
    let id = env.add_account("HQ", &token).await;
    let mut last = Value::Null;
    for _ in 0..KEPT_JOBS + 20 {
        last = env.refresh(&id).await;
        assert_eq!(last["state"], "succeeded", "{last}");
    }
    let keys = env.keys();
    let own: Vec<&String> = keys.iter().filter(|k| k.starts_with("job/")).collect();
    assert!(
        own.is_empty(),
        "finished jobs keep no key of their own: {own:?}"
    );
    let pages = keys.iter().filter(|k| k.starts_with("jobs/done/")).count();
    assert!(pages <= JOB_DONE_PAGES, "{pages} pages");
    // The newest job reads back whole by its id, and the list shows the kept ones.
    let got = env
        .get(&format!("/api/jobs/{}", last["id"].as_str().unwrap()))
        .await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.json()["state"], "succeeded");
    assert!(keys.len() <= 1024, "{} keys", keys.len());
}

/// The default build imports `wasi:keyvalue/atomics`: it does not load on the managed clouds.
#[test]
fn the_default_build_does_not_load_there() {
    let root = e2e::workspace_root();
    let wasm = root.join("target/wasm32-wasip1/release/accounts.wasm");
    let wasm = std::env::var("VPP_WASM_DIR")
        .map(|d| std::path::PathBuf::from(d).join("accounts.wasm"))
        .unwrap_or(wasm);
    assert!(
        wasm.exists(),
        "{} missing: bash scripts/test builds it",
        wasm.display()
    );
    let dir = root.join("target/e2e");
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = dir.join(format!("spin-atomics-{}.toml", std::process::id()));
    std::fs::write(
        &manifest,
        format!(
            "spin_manifest_version = 2\n[application]\nname = \"atomics\"\n\
             [[trigger.http]]\nroute = \"/...\"\ncomponent = \"accounts\"\n\
             [component.accounts]\nsource = \"{}\"\nkey_value_stores = [\"default\"]\n",
            wasm.display()
        ),
    )
    .unwrap();
    let options = HostOptions {
        platform: Platform::ManagedCloud,
        ..HostOptions::default()
    };
    let err = match App::load(&manifest, options) {
        Ok(_) => panic!("the atomics build loaded on the managed-cloud profile"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("wasi:keyvalue/atomics"), "{err}");
    // Self-hosted, it loads.
    App::load(&manifest, HostOptions::default()).expect("loads self-hosted");
}
