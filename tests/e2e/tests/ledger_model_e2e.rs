//! Issue 9: the ledger's model test end to end. Random sequences of assign, revoke, policy put
//! and delete, refresh (full and incremental), reconcile, clean up, the daily route, time passing
//! and another MDM assigning, sent as HTTP to the real built components (`tests/spin-host`) with
//! the Apple simulator behind them, under the faults the simulator and the host can inject: 429,
//! 503 + Retry-After, 500 after Apple applied the request (a lost answer), an invocation killed
//! between two key-value writes, Apple's notifications sent twice. After each run everything is
//! settled (the daily route until nothing is open) and our books are checked against the
//! simulator: what Apple holds of ours is what our assignments pages show as ours and nothing
//! more, nothing is left pending, counts equal Apple's, no foreign license was touched except by
//! clean up, and every license of ours Apple took away while notices were on has a notice
//! (`LEDGER_E2E_NOTICES=exact` checks exactly one per removal).
//!
//! Seeded and reproducible: each run prints its seed; `LEDGER_E2E_SEED=<seed>` replays one,
//! `LEDGER_E2E_SEEDS=<n>` runs n seeds from it, `LEDGER_E2E_STEPS=<n>` sets the length.
//! CI runs a few fixed seeds. A seed replays exactly: time is the test's alone. The components'
//! time of day is frozen and moved only by the test (`App::freeze_clock`, `advance_clock`), the
//! simulator applies events on its own clock moved with it (`Simulator::set_manual_clock`,
//! `advance_clock`) and delivers their notifications before the next step, its random source
//! is seeded, and its wall-clock rate limit and the components' pacing are out of the way (429s
//! come as faults).

use apple_sim::{AssignmentSpec, FaultKind, FaultSpec};
use e2e::{request, seed_location, Env, SCHEDULER_KEY};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const ASSETS: [(&str, u64); 2] = [("100", 6), ("200", 4)];
const DEVICES: u64 = 8;
const FOREIGN: [&str; 2] = ["F0", "F1"];
/// Seeds CI runs (each ~7 s of 40 steps).
const CI_SEEDS: [u64; 4] = [3, 11, 42, 2026];
const CI_STEPS: usize = 40;

use apple_sim::rng::Rng;

/// Where the components' frozen time of day starts (2026-06-01T00:00:00Z).
const FROZEN_AT: i64 = 1_780_272_000;
/// How long Apple takes to apply an event, on the test's clock.
const EVENT_DELAY: Duration = Duration::from_secs(10);

struct Run {
    env: Env,
    token: String,
    account: String,
    rng: Rng,
    log: Vec<String>,
    /// Event ids our API answered with.
    events: BTreeSet<String>,
    /// Foreign (adamId, serial) pairs another MDM made, and whether a clean up finished since.
    foreign: BTreeSet<(String, String)>,
    cleaned: bool,
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

impl Run {
    async fn new(seed: u64) -> Run {
        let env = Env::start().await;
        env.sim.seed(seed);
        env.sim.set_manual_clock(true);
        // Rate limits come as faults: the simulator's limiter and the components' pacing both
        // count requests per second of a clock, which here stands still between the test's steps.
        env.sim.set_rate_limit_enabled(false);
        env.sim
            .configure(|c| c.limits.max_request_per_second = 1_000_000);
        env.app.freeze_clock(FROZEN_AT);
        // Apple applies what it accepted within seconds to minutes of the test's time.
        env.sim.set_event_delay(EVENT_DELAY);
        env.sim.set_duplicate_notification_chance(0.3);
        let token = seed_location(&env.sim, "Model", &ASSETS, &[]);
        let account = env.add_account("Model", &token).await;
        // The add starts the first full refresh as a job: run it to its end.
        let r = env.admin("GET", "/api/jobs", None).await;
        for j in r.json()["jobs"].as_array().cloned().unwrap_or_default() {
            if j["state"] == "running" {
                env.finish_job(&j).await;
            }
        }
        env.notices_on().await;
        Run {
            env,
            token,
            account,
            rng: Rng(seed.max(1)),
            log: Vec::new(),
            events: BTreeSet::new(),
            foreign: BTreeSet::new(),
            cleaned: false,
        }
    }

    /// Time passes for the components and for Apple alike; the events Apple applies meanwhile
    /// have their notifications delivered (in order) before anything else happens.
    async fn advance(&mut self, secs: u64) {
        self.env.app.advance_clock(secs);
        self.env.sim.advance_clock(Duration::from_secs(secs));
        self.env.sim_idle().await;
    }

    fn subjects(&mut self) -> Vec<String> {
        let n = 1 + self.rng.below(3);
        let mut out = BTreeSet::new();
        for _ in 0..n {
            out.insert(format!("D{}", self.rng.below(DEVICES)));
        }
        out.into_iter().collect()
    }

    fn asset(&mut self) -> &'static str {
        ASSETS[self.rng.below(ASSETS.len() as u64) as usize].0
    }

    fn note(&mut self, what: String, r: &e2e::Resp) {
        let body = r.json();
        if let Some(id) = body["eventId"].as_str() {
            self.events.insert(id.to_string());
        }
        for id in body["events"].as_array().into_iter().flatten() {
            if let Some(id) = id.as_str().or_else(|| id["eventId"].as_str()) {
                self.events.insert(id.to_string());
            }
        }
        let text = r.text();
        let short: String = text
            .chars()
            .take(
                std::env::var("LEDGER_E2E_WIDE")
                    .map(|_| 20_000)
                    .unwrap_or(160),
            )
            .collect();
        self.log.push(format!("{what}: {} {short}", r.status));
    }

    /// A fault for this step only (the simulator's, or a kill in the host).
    fn fault(&mut self) {
        if !self.rng.chance(30) {
            return;
        }
        let endpoint = [
            "assets/associate",
            "assets/disassociate",
            "assets",
            "assignments",
        ][self.rng.below(4) as usize];
        let f = match self.rng.below(5) {
            0 => FaultSpec::new(FaultKind::RateLimited)
                .retry_after(1)
                .times(1),
            1 => FaultSpec::new(FaultKind::Unavailable)
                .retry_after(1)
                .times(1 + self.rng.below(2) as u32),
            2 | 3 => FaultSpec::new(FaultKind::AppliedThenError)
                .on(if endpoint.starts_with("assets/") {
                    endpoint
                } else {
                    "assets/associate"
                })
                .times(1 + self.rng.below(3) as u32),
            _ => {
                let n = self.rng.below(14) as u32;
                self.env.app.kill_after_writes(n);
                self.log
                    .push(format!("fault: killed after {n} key-value writes"));
                return;
            }
        };
        let f = if f.endpoint.is_none() {
            f.on(endpoint)
        } else {
            f
        };
        self.log.push(format!("fault: {f:?}"));
        self.env.sim.inject_fault(&self.token, f).expect("fault");
    }

    fn clear_faults(&mut self) {
        self.env
            .sim
            .clear_faults(&self.token)
            .expect("clear faults");
        if self.env.app.kill_pending() {
            self.env.app.cancel_kill();
        } else if self.log.last().is_some_and(|l| l.contains("killed after")) {
            self.log.push("(the kill came)".into());
        }
    }

    async fn admin(&self, method: &str, path: &str, body: Option<&Value>) -> e2e::Resp {
        self.env.admin(method, path, body).await
    }

    /// Resume a job a few times (it may stay running: settling finishes it); its last state.
    async fn drive(&mut self, job: &Value, times: usize) -> Value {
        let Some(id) = job["id"].as_str() else {
            return Value::Null;
        };
        let mut state = job["state"].clone();
        for _ in 0..times {
            if state != "running" {
                break;
            }
            let r = self
                .admin("POST", &format!("/api/jobs/{id}/resume"), None)
                .await;
            if r.status == 200 || r.status == 202 {
                state = r.json()["state"].clone();
            }
            self.log
                .push(format!("  resume {id}: {} {state}", r.status));
        }
        state
    }

    async fn step(&mut self) {
        self.fault();
        let account = self.account.clone();
        match self.rng.below(100) {
            0..=21 => {
                let (adam, s) = (self.asset(), self.subjects());
                let body = json!({"accountId": account, "adamId": adam, "serialNumbers": s});
                let r = self.admin("POST", "/api/assignments", Some(&body)).await;
                self.note(format!("assign {adam} {s:?}"), &r);
            }
            22..=33 => {
                let (adam, s) = (self.asset(), self.subjects());
                let body = json!({"accountId": account, "adamId": adam, "serialNumbers": s});
                let r = self
                    .admin("POST", "/api/assignments/revoke", Some(&body))
                    .await;
                self.note(format!("revoke {adam} {s:?}"), &r);
            }
            34..=45 => {
                let (adam, s) = (self.asset(), self.subjects());
                let id = format!("p{}", self.rng.below(2));
                let body = json!({"name": id, "accountId": account,
                    "assets": [{"adamId": adam, "pricingParam": "STDQ"}], "serialNumbers": s});
                let r = self
                    .admin("PUT", &format!("/api/policies/{id}"), Some(&body))
                    .await;
                self.note(format!("policy put {id} {adam} {s:?}"), &r);
            }
            46..=49 => {
                let id = format!("p{}", self.rng.below(2));
                let r = self
                    .admin("DELETE", &format!("/api/policies/{id}"), None)
                    .await;
                self.note(format!("policy delete {id}"), &r);
            }
            50..=59 => {
                let full = self.rng.chance(50);
                let r = self
                    .admin(
                        "POST",
                        &format!("/api/accounts/{account}/refresh?full={full}"),
                        None,
                    )
                    .await;
                self.note(format!("refresh full={full}"), &r);
                let times = self.rng.below(4) as usize;
                self.drive(&r.json(), times).await;
            }
            60..=67 => {
                let r = self.admin("POST", "/api/reconcile", None).await;
                self.note("reconcile".into(), &r);
                let times = self.rng.below(3) as usize;
                self.drive(&r.json(), times).await;
            }
            68..=71 => {
                let r = self
                    .admin("POST", &format!("/api/accounts/{account}/cleanup"), None)
                    .await;
                self.note("clean up".into(), &r);
                let state = self.drive(&r.json(), 20).await;
                if state == "succeeded" {
                    self.cleaned = true;
                }
                self.log.push(format!("  clean up: {state}"));
            }
            72..=79 => {
                // The daily route, as the scheduler calls it (a new run once a day).
                if self.rng.chance(30) {
                    self.advance(86_400).await;
                    self.log.push("a day passes".into());
                }
                for _ in 0..(1 + self.rng.below(3)) {
                    let r = request(
                        &self.env.app,
                        "POST",
                        "/api/daily",
                        None,
                        Some(SCHEDULER_KEY),
                    )
                    .await;
                    self.note("daily tick".into(), &r);
                }
            }
            80..=85 => {
                // Another MDM assigns a license here.
                let f = FOREIGN[self.rng.below(FOREIGN.len() as u64) as usize];
                let adam = self.asset();
                if self
                    .env
                    .sim
                    .add_assignments(&self.token, vec![AssignmentSpec::device(adam, f)])
                    .is_ok()
                {
                    self.foreign.insert((adam.to_string(), f.to_string()));
                    self.cleaned = false;
                    self.log.push(format!("foreign assigns {adam} to {f}"));
                }
            }
            86..=92 => {
                // An event read (polls it when due).
                let n = self.events.len() as u64;
                if let Some(id) = self.events.iter().nth(self.rng.below(n) as usize).cloned() {
                    let r = self.admin("GET", &format!("/api/events/{id}"), None).await;
                    self.note(format!("event {id}"), &r);
                }
            }
            _ => {
                let secs = 5 + self.rng.below(120);
                self.advance(secs).await;
                self.log.push(format!("{secs} s pass"));
            }
        }
        self.clear_faults();
        let secs = 1 + self.rng.below(20);
        self.advance(secs).await;
    }

    /// Faults off; Apple finishes; the daily route runs (forced, then ticked to its end) with
    /// time moving on until nothing is open; then one more full refresh.
    async fn settle(&mut self) {
        self.env.sim.clear_faults(&self.token).expect("clear");
        self.env.app.cancel_kill();
        for round in 0..8 {
            self.env.sim_idle().await;
            self.advance(16 * 60).await;
            let r = self.admin("POST", "/api/daily?force=true", None).await;
            assert!(r.status == 200 || r.status == 202, "{}", r.text());
            let mut finished = false;
            for _ in 0..300 {
                let r = request(
                    &self.env.app,
                    "POST",
                    "/api/daily",
                    None,
                    Some(SCHEDULER_KEY),
                )
                .await;
                assert!(r.status == 200 || r.status == 202, "{}", r.text());
                match r.json()["status"].as_str() {
                    Some("finished") | Some("idle") => {
                        finished = true;
                        break;
                    }
                    // A lease a killed invocation left: it expires.
                    Some("busy") => self.advance(60).await,
                    _ => {}
                }
                self.env.sim_idle().await;
            }
            assert!(finished, "the daily run finished");
            self.env.sim_idle().await;
            if round >= 1 && self.open().await.is_empty() {
                break;
            }
        }
        let r = self
            .admin(
                "POST",
                &format!("/api/accounts/{}/refresh?full=true", self.account),
                None,
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.text());
        let job = self.env.finish_job(&r.json()).await;
        assert_eq!(job["state"], "succeeded", "{job}");
    }

    /// Open ledger entries, per asset, as the assignments pages show them.
    async fn open(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for (adam, _) in ASSETS {
            let r = self
                .admin(
                    "GET",
                    &format!("/api/licenses/{}/{adam}/assignments", self.account),
                    None,
                )
                .await;
            assert_eq!(r.status, 200, "{}", r.text());
            out.extend(r.json()["pending"].as_array().cloned().unwrap_or_default());
        }
        out
    }

    /// (serial → madeBy) for an asset, over every page of its assignments.
    async fn listed(&self, adam: &str) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let mut page = 0;
        loop {
            let r = self
                .admin(
                    "GET",
                    &format!(
                        "/api/licenses/{}/{adam}/assignments?page={page}",
                        self.account
                    ),
                    None,
                )
                .await;
            assert_eq!(r.status, 200, "{}", r.text());
            let v = r.json();
            for a in v["assignments"].as_array().into_iter().flatten() {
                if let Some(s) = a["serialNumber"].as_str() {
                    out.insert(s.to_string(), a["madeBy"].as_str().unwrap_or("").into());
                }
            }
            match v["nextPage"].as_u64() {
                Some(n) => page = n,
                None => break,
            }
        }
        out
    }

    async fn check(&self, seed: u64) -> Result<(), String> {
        let mut problems = Vec::new();
        let st = self.env.sim.location_state(&self.token).expect("location");
        let held: BTreeSet<(String, String)> = st
            .assignments
            .iter()
            .filter_map(|a| a.serial_number.clone().map(|s| (a.adam_id.clone(), s)))
            .collect();
        // 1. Ours at Apple are ours in our books, and nothing more; foreign ones are foreign.
        for (adam, _) in ASSETS {
            let listed = self.listed(adam).await;
            for (s, by) in &listed {
                let at_apple = held.contains(&(adam.to_string(), s.clone()));
                let foreign = s.starts_with('F');
                if !at_apple {
                    problems.push(format!(
                        "{adam}/{s} listed ({by}) but Apple does not hold it"
                    ));
                } else if foreign && by != "foreign" {
                    problems.push(format!("foreign {adam}/{s} listed as {by}"));
                } else if !foreign && by != "thisInstance" {
                    problems.push(format!("our {adam}/{s} listed as {by}"));
                }
            }
            for (a, s) in held.iter().filter(|(a, _)| a == adam) {
                if !listed.contains_key(s) {
                    problems.push(format!("Apple holds {a}/{s}; our books do not list it"));
                }
            }
        }
        // 2. Nothing open after settling (reservations equal the open entries: none).
        for o in self.open().await {
            problems.push(format!("still open after settling: {o}"));
        }
        // 3. Counts equal Apple's.
        let list = self
            .admin(
                "GET",
                &format!("/api/licenses?accountId={}", self.account),
                None,
            )
            .await
            .json();
        for a in &st.assets {
            let row = list["licenses"]
                .as_array()
                .and_then(|l| l.iter().find(|r| r["adamId"] == a.adam_id.as_str()));
            let Some(row) = row else {
                problems.push(format!("{} not listed: {list}", a.adam_id));
                continue;
            };
            let ours = (
                row["inUse"].as_u64(),
                row["available"].as_u64(),
                row["pending"].as_u64(),
            );
            if ours != (Some(a.assigned_count), Some(a.available_count), Some(0)) {
                problems.push(format!(
                    "counts of {}: ours {ours:?}, Apple in use {} available {}",
                    a.adam_id, a.assigned_count, a.available_count
                ));
            }
        }
        // 4. Every event we were told about has ended.
        for id in &self.events {
            let r = self.admin("GET", &format!("/api/events/{id}"), None).await;
            if r.status == 200 && r.json()["state"] == "pending" {
                problems.push(format!("event {id} still pending: {}", r.text()));
            }
        }
        // 5. No foreign license was taken except by a clean up.
        if !self.cleaned {
            for (adam, f) in &self.foreign {
                let taken = !held.contains(&(adam.clone(), f.clone()));
                let any_cleanup = self.log.iter().any(|l| l.starts_with("  clean up:"));
                if taken && !any_cleanup {
                    problems.push(format!("foreign {adam}/{f} gone without a clean up"));
                }
            }
        }
        // 6. Every license Apple took away (notices were on throughout) has exactly one notice.
        let mut removed: BTreeMap<(String, String), usize> = BTreeMap::new();
        for (adam, s, _) in self.env.sim.removals_for(&self.token) {
            if let Some(s) = s {
                *removed.entry((adam, s)).or_default() += 1;
            }
        }
        let mut noticed: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        let mut page: Option<u64> = None;
        loop {
            let path = match page {
                Some(p) => format!("/api/notices?page={p}"),
                None => "/api/notices".to_string(),
            };
            let v = self.admin("GET", &path, None).await.json();
            for n in v["notices"].as_array().into_iter().flatten() {
                let key = (
                    n["adamId"].as_str().unwrap_or("").to_string(),
                    n["serialNumber"].as_str().unwrap_or("").to_string(),
                );
                let reason = n["reason"].as_str().unwrap_or("").to_string();
                noticed.entry(key).or_default().push(reason);
            }
            match v["nextPage"].as_u64() {
                Some(p) => page = Some(p),
                None => break,
            }
        }
        // By default: none missing for a license of ours. `LEDGER_E2E_NOTICES=exact`: exactly one
        // per removal, ours and foreign, none for a license never taken away. At 40 steps it
        // holds on all of seeds 1..=80 (58 and 65 were a revoke over an assignment whose answer
        // was lost: `ledger::verify_before_removal`; 48 a revoke sent while such an associate
        // was still pending at Apple, which now waits, then a late revoke outcome taking the
        // assignment a later revoke was taking: see the native model test's
        // `a_late_revoke_outcome_does_not_take_an_unknown_assignment_confirmed_after_it`).
        let exact = std::env::var("LEDGER_E2E_NOTICES").is_ok_and(|v| v == "exact");
        let pairs: BTreeSet<&(String, String)> = removed.keys().chain(noticed.keys()).collect();
        for pair in pairs {
            let n = removed.get(pair).copied().unwrap_or(0);
            let reasons = noticed.get(pair).cloned().unwrap_or_default();
            let wrong = if exact {
                reasons.len() != n
            } else {
                !pair.1.starts_with('F') && reasons.len() < n
            };
            if wrong {
                problems.push(format!(
                    "{}/{}: Apple took it away {n} time(s), notices {reasons:?}",
                    pair.0, pair.1
                ));
            }
        }
        if problems.is_empty() {
            return Ok(());
        }
        let keep = env_u64("LEDGER_E2E_LOG").unwrap_or(60) as usize;
        let tail: Vec<&str> = self
            .log
            .iter()
            .rev()
            .take(keep)
            .map(String::as_str)
            .collect();
        Err(format!(
            "seed {seed} (replay: LEDGER_E2E_SEED={seed}): {} problem(s):\n  {}\nlast steps (newest first):\n  {}",
            problems.len(),
            problems.join("\n  "),
            tail.join("\n  ")
        ))
    }
}

/// What a run did, as the test saw it, with the components' random identifiers (accounts, jobs:
/// 32 hex digits) masked: equal for two runs of one seed.
fn trace(run: &Run) -> Vec<String> {
    run.log.iter().map(|l| mask_ids(l)).collect()
}

/// `line` with every identifier of 32 lowercase hex digits replaced by `<id>`, and local ports
/// (each run has its own) by `<port>`.
fn mask_ids(line: &str) -> String {
    let mut line = line.to_string();
    let host = "127.0.0.1:";
    let mut from = 0;
    while let Some(at) = line[from..].find(host) {
        let start = from + at + host.len();
        let end = start
            + line[start..]
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(line.len() - start);
        line.replace_range(start..end, "<port>");
        from = start;
    }
    let mut out = String::new();
    let mut hex = String::new();
    for c in line.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_hexdigit() && !c.is_ascii_uppercase() {
            hex.push(c);
            continue;
        }
        out.push_str(if hex.len() == 32 { "<id>" } else { &hex });
        hex.clear();
        out.push(c);
    }
    out.pop();
    out
}

/// A seed replays exactly: the same requests get the same answers, Apple ends in the same state
/// and the same notices are sent (the simulator's events wait on the test's clock, not on timers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_replays_exactly() {
    let seed = env_u64("LEDGER_E2E_SEED").unwrap_or(CI_SEEDS[0]);
    let steps = env_u64("LEDGER_E2E_STEPS").unwrap_or(20) as usize;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let mut run = Run::new(seed).await;
        for _ in 0..steps {
            run.step().await;
        }
        run.settle().await;
        let state = run.env.sim.location_state(&run.token).expect("location");
        let held: BTreeSet<(String, Option<String>)> = state
            .assignments
            .iter()
            .map(|a| (a.adam_id.clone(), a.serial_number.clone()))
            .collect();
        let notices = run.admin("GET", "/api/notices", None).await.json()["notices"]
            .as_array()
            .map(|n| {
                n.iter()
                    .map(|n| format!("{} {} {}", n["adamId"], n["serialNumber"], n["reason"]))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        // Every call Apple received, in order, with its answer.
        let calls: Vec<String> = run
            .env
            .sim
            .calls_for(&run.token)
            .iter()
            .map(|c| {
                let body = c.body.as_ref().map(Value::to_string).unwrap_or_default();
                mask_ids(&format!(
                    "{} {}?{} {} {body}",
                    c.method, c.path, c.query, c.status
                ))
            })
            .collect();
        seen.push((
            trace(&run),
            held,
            notices,
            run.env.sim.removals_for(&run.token),
            calls,
        ));
    }
    let (a, b) = (&seen[0], &seen[1]);
    if let Some(i) = (0..a.4.len().max(b.4.len())).find(|i| a.4.get(*i) != b.4.get(*i)) {
        panic!(
            "seed {seed}: Apple's call {i} differs:\n  first:  {:?}\n  second: {:?}",
            a.4.get(i),
            b.4.get(i)
        );
    }
    if let Some(i) = (0..a.0.len().max(b.0.len())).find(|i| a.0.get(*i) != b.0.get(*i)) {
        panic!(
            "seed {seed}: step log differs at line {i}:\n  first:  {:?}\n  second: {:?}",
            a.0.get(i),
            b.0.get(i)
        );
    }
    assert_eq!(a.1, b.1, "seed {seed}: Apple's assignments differ");
    assert_eq!(a.2, b.2, "seed {seed}: notices differ");
    assert_eq!(a.3, b.3, "seed {seed}: Apple's removals differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn books_match_apple_after_random_http_operations_and_faults() {
    let steps = env_u64("LEDGER_E2E_STEPS").unwrap_or(CI_STEPS as u64) as usize;
    let seeds: Vec<u64> = match env_u64("LEDGER_E2E_SEED") {
        Some(s) => (0..env_u64("LEDGER_E2E_SEEDS").unwrap_or(1))
            .map(|i| s + i)
            .collect(),
        None => CI_SEEDS.to_vec(),
    };
    let mut failures = Vec::new();
    for seed in seeds {
        println!("ledger e2e model: seed {seed}, {steps} steps (replay: LEDGER_E2E_SEED={seed})");
        let mut run = Run::new(seed).await;
        for _ in 0..steps {
            run.step().await;
        }
        run.settle().await;
        if let Err(e) = run.check(seed).await {
            println!("{e}");
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
