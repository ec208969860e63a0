//! Issue 6: the daily work (refresh every account, poll events, reconcile, deliver notices) as a
//! resumable job behind `POST /api/daily`, called by the cron component or any scheduler.

use apple_sim::{FaultKind, FaultSpec};
use e2e::{seed_location, Env, READER_KEY, SCHEDULER_KEY};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

const ADMIN: &str = e2e::ADMIN_KEY;

fn now_ts() -> u64 {
    chrono::Utc::now().timestamp() as u64
}

/// The daily run as `GET /api/daily` shows it.
async fn daily(env: &Env) -> Value {
    let r = env.call("GET", "/api/daily", None, Some(READER_KEY)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// Fire the cron component until the daily run has finished; returns the job and the ticks.
async fn cron_until_done(env: &Env, pause: Duration) -> (Value, u32) {
    for n in 1..=200 {
        let out = env
            .app
            .run_cron("scheduler", now_ts())
            .await
            .expect("cron export ran");
        assert_eq!(out, Ok(()), "tick {n}");
        let d = daily(env).await;
        if !d["running"].as_bool().unwrap_or(true) && d["job"]["state"] != "running" {
            return (d["job"].clone(), n);
        }
        tokio::time::sleep(pause).await;
    }
    panic!("daily run did not finish: {}", daily(env).await);
}

/// POST /api/daily as the scheduler until the run has finished; returns the job and the calls.
async fn post_until_done(env: &Env, pause: Duration, between: impl Fn(u32)) -> (Value, u32) {
    for n in 1..=300 {
        let r = env
            .call("POST", "/api/daily", None, Some(SCHEDULER_KEY))
            .await;
        assert!(r.status == 200 || r.status == 202, "{}", r.text());
        let v = r.json();
        if v["status"] == "finished" {
            return (v["job"].clone(), n);
        }
        assert_ne!(v["status"], "idle", "the run vanished: {v}");
        between(n);
        tokio::time::sleep(pause).await;
    }
    panic!("daily run did not finish: {}", daily(env).await);
}

/// Job records of `kind`: running ones under `job/{id}`, finished ones in the pages
/// `jobs/done/{n}` (id → record).
fn jobs_of_kind(env: &Env, kind: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for k in env.keys() {
        let page = k.starts_with("jobs/done/");
        if !page && !k.starts_with("job/") {
            continue;
        }
        let Some(v) = env
            .app
            .kv_get("default", &k)
            .and_then(|v| serde_json::from_slice::<Value>(&v).ok())
        else {
            continue;
        };
        match v.as_object() {
            Some(m) if page => out.extend(m.values().cloned()),
            _ => out.push(v),
        }
    }
    out.retain(|j| j["kind"] == kind);
    out
}

fn outcomes(job: &Value) -> Vec<String> {
    job["result"]["accounts"]
        .as_array()
        .unwrap_or_else(|| panic!("accounts in {job}"))
        .iter()
        .map(|a| a["outcome"].as_str().unwrap_or("").to_string())
        .collect()
}

fn account_record(env: &Env, id: &str) -> Value {
    serde_json::from_slice(&env.app.kv_get("default", &format!("account/{id}")).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cron_tick_runs_the_whole_daily_work() {
    let env = Env::start().await;
    let hq = seed_location(
        &env.sim,
        "HQ",
        &[("100", 10), ("200", 5)],
        &[("100", "FOREIGN-1")],
    );
    let branch = seed_location(&env.sim, "Branch", &[("300", 3)], &[]);
    let a = env.add_account("HQ", &hq).await;
    let b = env.add_account("Branch", &branch).await;
    // Nothing ran yet, so the first tick starts a run.
    assert_eq!(daily(&env).await["running"], false);
    let (job, _) = cron_until_done(&env, Duration::from_millis(10)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["requestedBy"], "scheduler");
    assert_eq!(outcomes(&job), vec!["succeeded", "succeeded"], "{job}");
    for id in [&a, &b] {
        let acc = account_record(&env, id);
        assert!(acc["lastSynchronized"].is_string(), "{acc}");
        assert!(
            acc["lastFullRefresh"].is_string(),
            "first refresh is full: {acc}"
        );
    }
    assert_eq!(job["result"]["reconcile"]["state"], "succeeded", "{job}");
    let lic = env
        .get(&format!("/api/licenses?accountId={a}"))
        .await
        .json();
    assert_eq!(lic["licenses"].as_array().unwrap().len(), 2, "{lic}");
    // The run is listed with the other jobs, with its progress.
    let jobs = env.get("/api/jobs").await.json();
    let listed = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == job["id"])
        .cloned()
        .expect("daily job listed");
    assert_eq!(listed["progress"]["done"], 2);
    assert_eq!(listed["progress"]["total"], 2);
    // Done for today: the next tick is idle and says when the next run starts.
    let r = env
        .call("POST", "/api/daily", None, Some(SCHEDULER_KEY))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "idle");
    assert!(r.json()["nextRunAt"].is_string());

    // A license this instance assigned and no policy wants: a forced run takes it back.
    let body =
        json!({"accountId": a, "adamId": "200", "pricingParam": "STDQ", "serialNumbers": ["S1"]});
    let r = env.admin("POST", "/api/assignments", Some(&body)).await;
    assert_eq!(r.status, 202, "{}", r.text());
    let event_id = r.json()["eventId"].as_str().unwrap().to_string();
    env.sim_idle().await;
    // Polled by GET once due (5 s after it was sent): the assignment is confirmed.
    let mut ev = Value::Null;
    for _ in 0..150 {
        ev = env.get(&format!("/api/events/{event_id}")).await.json();
        if ev["state"] != "pending" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ev["state"], "complete", "{ev}");
    let r = env.admin("POST", "/api/daily?force=true", None).await;
    assert!(r.status == 200 || r.status == 202, "{}", r.text());
    assert_ne!(r.json()["job"]["id"], job["id"], "a new run");
    let (job2, _) = cron_until_done(&env, Duration::from_millis(10)).await;
    assert_eq!(job2["state"], "succeeded", "{job2}");
    assert_eq!(
        job2["result"]["reconcile"]["result"]["revoked"], 1,
        "{job2}"
    );
    let fulls: Vec<Value> = job2["result"]["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["full"].clone())
        .collect();
    assert_eq!(
        fulls,
        vec![json!(false), json!(false)],
        "incremental: {job2}"
    );
    env.sim_idle().await;
    let st = env.sim.location_state(&hq).unwrap();
    let held: Vec<Value> = serde_json::to_value(&st.assignments)
        .unwrap()
        .as_array()
        .unwrap()
        .clone();
    assert!(
        !held.iter().any(|x| x.to_string().contains("\"S1\"")),
        "S1 was taken back: {held:?}"
    );
    assert!(
        held.iter().any(|x| x.to_string().contains("FOREIGN-1")),
        "foreign untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_invocations_at_once_do_the_work_once() {
    let env = Env::start().await;
    let hq = seed_location(&env.sim, "HQ", &[("100", 10)], &[("100", "D1")]);
    let branch = seed_location(&env.sim, "Branch", &[("300", 3)], &[]);
    env.add_account("HQ", &hq).await;
    env.add_account("Branch", &branch).await;
    env.sim.clear_calls();
    // Slow Apple down a little so the two calls overlap.
    env.sim
        .inject_global_fault(FaultSpec::latency(200).on("assets").times(2));
    let (r1, r2) = tokio::join!(
        env.call("POST", "/api/daily", None, Some(SCHEDULER_KEY)),
        env.call("POST", "/api/daily", None, Some(SCHEDULER_KEY)),
    );
    let statuses: Vec<String> = [&r1, &r2]
        .iter()
        .map(|r| r.json()["status"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        statuses
            .iter()
            .filter(|s| *s == "busy" || *s == "idle")
            .count()
            == 1,
        "one worked, the other did nothing: {statuses:?} {} {}",
        r1.text(),
        r2.text()
    );
    let (job, _) = cron_until_done(&env, Duration::from_millis(10)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(jobs_of_kind(&env, "daily").len(), 1);
    // Adding each account ran its first refresh; the run made one more per account.
    let by_run = jobs_of_kind(&env, "refresh")
        .into_iter()
        .filter(|j| {
            j["requestedBy"]
                .as_str()
                .unwrap_or("")
                .starts_with("daily:")
        })
        .count();
    assert_eq!(by_run, 2, "one refresh per account");
    assert_eq!(jobs_of_kind(&env, "reconcile").len(), 1);
    let asset_reads: BTreeMap<String, usize> = env
        .sim
        .calls()
        .iter()
        .filter(|c| c.path.ends_with("assets"))
        .fold(BTreeMap::new(), |mut m, c| {
            *m.entry(c.location_uid.clone().unwrap_or_default())
                .or_default() += 1;
            m
        });
    assert_eq!(asset_reads.len(), 2, "{asset_reads:?}");
    assert!(
        asset_reads.values().all(|n| *n == 1),
        "each location's assets read once: {asset_reads:?}"
    );
}

/// What a daily run leaves behind, without timestamps or random ids, by account name.
fn final_state(env: &Env) -> BTreeMap<String, Value> {
    let ids: Vec<String> =
        serde_json::from_slice(&env.app.kv_get("default", "accounts").unwrap()).unwrap();
    let mut out = BTreeMap::new();
    for id in ids {
        let acc = account_record(env, &id);
        let name = acc["name"].as_str().unwrap().to_string();
        let copy = env.stored_copy(&id);
        let (doc, shards) = (copy.assets, copy.shards);
        let prefix = format!("assignments/{id}/{}/", copy.generation);
        let stale: Vec<String> = env
            .keys()
            .into_iter()
            .filter(|k| k.starts_with(&format!("assignments/{id}/")) && !k.starts_with(&prefix))
            .collect();
        let entry = json!({
                "assets": doc,
                "generation": copy.generation,
                "shards": shards,
                "staleShards": stale,
                "location": acc["location"],
                // The simulator makes up a new versionId per run: only that there is one.
                "hasVersion": acc["assignmentsVersion"].is_string(),
                "lastSyncOk": acc["lastSync"]["ok"],
                "lastSyncFull": acc["lastSync"]["full"],
                "synced": acc["lastSynchronized"].is_string(),
        });
        // Icon URLs name the simulator, whose port differs per run.
        let text = entry.to_string().replace(&env.sim.origin(), "SIM");
        out.insert(name, serde_json::from_str(&text).unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_between_slices_resumes_to_the_same_state() {
    async fn run(slice_calls: &str, kill: bool) -> (BTreeMap<String, Value>, Value, u32) {
        let env = Env::start_with(vec![("job_slice_apple_calls", slice_calls.into())]).await;
        env.sim.set_page_size(3);
        let serials: Vec<String> = (0..14).map(|i| format!("D{i:02}")).collect();
        let pairs: Vec<(&str, &str)> = serials
            .iter()
            .enumerate()
            .map(|(i, s)| (if i % 2 == 0 { "100" } else { "200" }, s.as_str()))
            .collect();
        let hq = seed_location(
            &env.sim,
            "HQ",
            &[("100", 20), ("200", 20), ("300", 1)],
            &pairs,
        );
        let branch = seed_location(&env.sim, "Branch", &[("400", 3)], &[("400", "B1")]);
        env.add_account("HQ", &hq).await;
        env.add_account("Branch", &branch).await;
        // Adding starts each account's first refresh; with a small slice it is still running.
        // Finish those first, so the daily runs compared below start from the same state.
        let jobs = env.get("/api/jobs").await.json();
        for j in jobs["jobs"].as_array().unwrap() {
            assert_eq!(env.finish_job(j).await["state"], "succeeded");
        }
        let kv = &env.app;
        let (job, calls) = post_until_done(&env, Duration::from_millis(5), |n| {
            if kill && n % 3 == 0 {
                // The invocation holding the daily lease died: its lease is left behind
                // (expired), as are the account leases of the jobs it ran.
                let past = (chrono::Utc::now() - chrono::Duration::seconds(1)).to_rfc3339();
                let lease = json!({"holder": "killed-invocation", "until": past});
                kv.kv_set("default", "lease/daily", lease.to_string().as_bytes());
            }
        })
        .await;
        (final_state(&env), job, calls)
    }
    let (whole, job_a, calls_a) = run("1000", false).await;
    // One Apple call per slice: the refresh reads few pages (names are looked up in batches).
    let (resumed, job_b, calls_b) = run("1", true).await;
    assert_eq!(calls_a, 1, "one invocation without a limit");
    assert!(calls_b > 5, "interrupted many times: {calls_b}");
    assert_eq!(job_a["state"], "succeeded", "{job_a}");
    assert_eq!(job_b["state"], "succeeded", "{job_b}");
    assert!(job_b["slices"].as_u64().unwrap() > 5, "{job_b}");
    assert_eq!(outcomes(&job_a), outcomes(&job_b));
    assert_eq!(whole, resumed);
    let total: usize = whole["HQ"]["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s[1].as_object().unwrap().len())
        .sum();
    assert_eq!(total, 14);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_delays_the_run_and_it_still_completes() {
    let env = Env::start().await;
    let hq = seed_location(&env.sim, "HQ", &[("100", 10)], &[("100", "D1")]);
    let branch = seed_location(&env.sim, "Branch", &[("300", 3)], &[]);
    let a = env.add_account("HQ", &hq).await;
    let b = env.add_account("Branch", &branch).await;
    // Six 429s on HQ's assets: more than the Apple component retries in one call.
    env.sim
        .inject_fault(
            &hq,
            FaultSpec::new(FaultKind::RateLimited)
                .on("assets")
                .times(6)
                .retry_after(1),
        )
        .unwrap();
    let first = env
        .call("POST", "/api/daily", None, Some(SCHEDULER_KEY))
        .await;
    assert_eq!(
        first.status,
        202,
        "still running after the first slice: {}",
        first.text()
    );
    let j = &first.json()["job"];
    assert_eq!(
        j["checkpoint"]["queue"],
        json!([a]),
        "HQ waits at the end: {j}"
    );
    assert_eq!(j["checkpoint"]["accounts"][0]["accountId"], json!(b), "{j}");
    let (job, ticks) = cron_until_done(&env, Duration::from_millis(1100)).await;
    assert!(ticks >= 1);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(outcomes(&job), vec!["succeeded", "succeeded"], "{job}");
    let limited = env.sim.calls().iter().filter(|c| c.status == 429).count();
    assert!(limited >= 6, "{limited}");
    let acc = account_record(&env, &a);
    assert_eq!(acc["lastSync"]["ok"], true, "{acc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_route_requires_its_key() {
    let env = Env::start().await;
    let r = env.call("POST", "/api/daily", None, None).await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.code(), "unauthorized");
    let r = env
        .call("POST", "/api/daily", None, Some("not-the-scheduler-key"))
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.code(), "unauthorized");
    let r = env.call("POST", "/api/daily", None, Some(READER_KEY)).await;
    assert_eq!(r.status, 403, "a reader may not run it: {}", r.text());
    assert_eq!(r.code(), "forbidden");
    let r = env
        .call("POST", "/api/daily?force=true", None, Some(SCHEDULER_KEY))
        .await;
    assert_eq!(r.status, 403, "force is for the admin: {}", r.text());
    assert!(jobs_of_kind(&env, "daily").is_empty(), "nothing ran");
    // GET needs an API key like any read.
    assert_eq!(env.call("GET", "/api/daily", None, None).await.status, 401);
    let r = env
        .call("POST", "/api/daily", None, Some(SCHEDULER_KEY))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "finished", "no accounts: done at once");
    let r = env
        .call("POST", "/api/daily?force=true", None, Some(ADMIN))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "finished");
    assert_eq!(
        env.call("PUT", "/api/daily", None, Some(ADMIN))
            .await
            .status,
        405
    );
    // The audit log names the scheduler.
    let audit = env.get("/api/audit").await.json();
    let actors: Vec<&str> = audit["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "POST /api/daily")
        .map(|r| r["actor"].as_str().unwrap())
        .collect();
    assert!(actors.contains(&"scheduler"), "{audit}");
    assert!(actors.iter().any(|a| a.starts_with("admin:")), "{audit}");
}
