//! Model-based test of the ledger (issue 9): random sequences of operations (assign, revoke,
//! policy put and delete, refresh full and incremental, reconcile, clean up, the daily work,
//! Apple's notifications late or twice, Apple applying events) against the Apple simulator's
//! model, with random faults (429, 503 + Retry-After, 500 after Apple applied the request, a
//! dropped connection before or after Apple applied it, an invocation killed between two
//! key-value writes, another MDM assigning licenses). After each sequence settles, the books
//! are checked against the simulator's state.
//!
//! Seeded and reproducible: every run prints its seed; `LEDGER_MODEL_SEED=<seed>` replays one,
//! `LEDGER_MODEL_SEEDS=<n>` runs n seeds from it, `LEDGER_MODEL_STEPS=<n>` sets the length
//! (`scripts/soak` runs it longer).

use apple_sim::model::{
    ApiRequest as SimRequest, AssetSpec, AssignmentSpec, Effect, LocationSpec, MdmInfo, Model,
    Outgoing, TakeOver,
};
use chrono::{DateTime, Duration, Utc};
use serde_json::json;
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vpp_apple::testing::{block_on, FakeClock, ScriptedTransport};
use vpp_apple::{AppleRequest, AppleResponse, Client, Method, Target};
use vpp_licensing::assignment::{self, AssignBody};
use vpp_licensing::job::{Budget, Job};
use vpp_licensing::model::*;
use vpp_licensing::{
    cleanup, copy, event, ledger, notice, notification, policy, reconcile, refresh, settings,
};
use vpp_store::{get_json, keys, set_json, Kv, KvError, MemoryKv};

const ACCOUNT: &str = "acc1";
const OUR_ID: &str = "inst-1";
const SECRET: &str = "model-notification-secret";
const ASSETS: [(&str, u64); 2] = [("100", 6), ("200", 4)];
const DEVICES: usize = 10;
const FOREIGN: [&str; 3] = ["F0", "F1", "F2"];
/// Apple applies an event it accepted within this long (it is resent after ten minutes).
const APPLE_HORIZON: Duration = Duration::minutes(8);

use apple_sim::rng::Rng;

/// What Apple (the simulator's model) does to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    RateLimited,
    Unavailable,
    /// Applied, then the answer is a bare 500 (a timed-out proxy).
    AppliedThen500,
    /// Applied, then the connection dropped.
    AppliedThenDropped,
    /// Dropped before Apple saw it.
    Dropped,
}

struct World {
    model: Model,
    token: String,
    rng: Rng,
    /// Percent of requests that get a fault.
    fault_rate: u64,
    /// Events Apple accepted, not yet applied (oldest first).
    scheduled: Vec<String>,
    /// The test's time (Apple stamps the events it accepts with it).
    now: DateTime<Utc>,
    /// When each scheduled event was accepted.
    accepted_at: BTreeMap<String, DateTime<Utc>>,
    /// Notifications Apple sent, not yet delivered.
    notes: Vec<Outgoing>,
    /// Faults for the next write requests, before any random one.
    forced: std::collections::VecDeque<Fault>,
    log: Vec<String>,
    /// Write requests Apple received (asked to change something).
    posts: usize,
    /// What Apple held at the last look, (adamId, serial number).
    held: BTreeSet<(String, String)>,
    /// How often Apple took each (adamId, serial number) away: the notices owed.
    removals: BTreeMap<(String, String), u32>,
}

impl World {
    /// Note what Apple took away since the last look (called after everything that may change
    /// Apple's assignments, so a removal and a new assignment of one pair are both seen).
    fn observe(&mut self) -> Vec<(String, String)> {
        let Ok(st) = self.model.location_state(&self.token) else {
            return Vec::new();
        };
        let now: BTreeSet<(String, String)> = st
            .assignments
            .iter()
            .filter_map(|a| a.serial_number.clone().map(|s| (a.adam_id.clone(), s)))
            .collect();
        let gone: Vec<(String, String)> = self.held.difference(&now).cloned().collect();
        for pair in &gone {
            *self.removals.entry(pair.clone()).or_default() += 1;
        }
        self.held = now;
        gone
    }

    /// Apple applies every event it accepted, in the order it accepted them.
    fn apply_scheduled(&mut self) {
        for id in std::mem::take(&mut self.scheduled) {
            self.apply(&id);
        }
    }

    /// Apple applies one event it accepted.
    fn apply(&mut self, id: &str) {
        let notes = self.model.apply_event(id);
        self.notes.extend(notes);
        let gone = self.observe();
        if !gone.is_empty() {
            self.log.push(format!("apple takes away {gone:?} ({id})"));
        }
    }
}

type Shared = Arc<Mutex<World>>;

fn sim_request(req: &AppleRequest, token: &str) -> Option<SimRequest> {
    let Target::Api { path, query } = &req.target else {
        return None;
    };
    Some(SimRequest {
        method: match req.method {
            Method::Get => "GET".into(),
            _ => "POST".into(),
        },
        path: path.clone(),
        query: query.clone(),
        authorization: Some(format!("Bearer {token}")),
        content_type: Some("application/json".into()),
        body: req.body.clone().unwrap_or_default(),
    })
}

fn transport(world: Shared) -> ScriptedTransport {
    ScriptedTransport::new(move |req: &AppleRequest, _n| {
        let mut w = world.lock().unwrap();
        let Some(sreq) = sim_request(req, &w.token) else {
            // The metadata lookup: nothing known.
            return Ok(AppleResponse::new(200, json!({"results": {}}).to_string()));
        };
        let write = sreq.method == "POST";
        let rate = w.fault_rate;
        let forced = if write { w.forced.pop_front() } else { None };
        let fault = if let Some(f) = forced {
            f
        } else if w.rng.chance(rate) && sreq.path != "service/config" {
            match w.rng.below(if write { 5 } else { 2 }) {
                0 => Fault::RateLimited,
                1 => Fault::Unavailable,
                2 => Fault::AppliedThen500,
                3 => Fault::AppliedThenDropped,
                _ => Fault::Dropped,
            }
        } else {
            Fault::None
        };
        if fault != Fault::None {
            w.log
                .push(format!("fault {fault:?} on {} {}", sreq.method, sreq.path));
        }
        match fault {
            Fault::RateLimited => {
                let mut r = AppleResponse::new(
                    429,
                    json!({"errorNumber": 9646, "errorMessage": "Too many requests"}).to_string(),
                );
                r.retry_after = Some("1".into());
                return Ok(r);
            }
            Fault::Unavailable => {
                let mut r = AppleResponse::new(
                    503,
                    json!({"errorNumber": 9729, "errorMessage": "Unavailable"}).to_string(),
                );
                r.retry_after = Some("2".into());
                return Ok(r);
            }
            Fault::Dropped => return Err("connection reset before sending".into()),
            _ => {}
        }
        if write {
            w.posts += 1;
        }
        let out = w.model.handle_api(&sreq, Instant::now());
        let gone = w.observe();
        if !gone.is_empty() {
            w.log.push(format!("apple takes away {gone:?} (at once)"));
        }
        for e in out.effects {
            match e {
                Effect::Schedule { event_id, .. } => {
                    let at = w.now;
                    w.accepted_at.insert(event_id.clone(), at);
                    w.scheduled.push(event_id)
                }
                Effect::Notify(n) => w.notes.extend(n),
            }
        }
        match fault {
            Fault::AppliedThen500 => Ok(AppleResponse::new(500, "upstream timed out")),
            Fault::AppliedThenDropped => Err("connection reset after sending".into()),
            _ => {
                let mut r = AppleResponse::new(
                    out.response.status,
                    serde_json::to_vec(&out.response.body).unwrap_or_default(),
                );
                r.retry_after = out
                    .response
                    .headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
                    .map(|(_, v)| v.clone());
                Ok(r)
            }
        }
    })
}

/// A store whose writes start failing after a countdown: the invocation was killed there.
#[derive(Default)]
struct KillableKv {
    inner: MemoryKv,
    /// Writes left before the kill (`None`: no kill planned).
    left: Cell<Option<u32>>,
}

impl KillableKv {
    fn write(&self) -> Result<(), KvError> {
        match self.left.get() {
            None => Ok(()),
            Some(0) => Err(KvError("invocation killed".into())),
            Some(n) => {
                self.left.set(Some(n - 1));
                Ok(())
            }
        }
    }
}

impl Kv for KillableKv {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        self.inner.get(key)
    }
    fn set(&self, key: &str, value: &[u8]) -> Result<(), KvError> {
        self.write()?;
        self.inner.set(key, value)
    }
    fn delete(&self, key: &str) -> Result<(), KvError> {
        self.write()?;
        self.inner.delete(key)
    }
    fn swap(&self, key: &str, expected: Option<&[u8]>, new: &[u8]) -> Result<bool, KvError> {
        self.write()?;
        self.inner.swap(key, expected, new)
    }
}

struct Run {
    world: Shared,
    kv: KillableKv,
    clock: FakeClock,
    rng: Rng,
    next_job: u32,
    /// Foreign (asset, subject) pairs another MDM made; `cleaned` once a clean up finished after.
    foreign: BTreeSet<(String, String)>,
    cleaned_since_foreign: bool,
    /// Another MDM took the location over; settling takes it back (as reclaim does).
    taken_over: bool,
    /// Counts found wrong once settling had read every outcome, before its last refresh (which
    /// would put them right and hide a drift).
    counts_before_refresh: Vec<String>,
}

/// Where every run's clocks start: a fixed time, so a seed replays exactly (the time of day
/// and the date decide, e.g., when the daily work is due).
fn model_epoch() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-30T08:00:00Z")
        .expect("a fixed time")
        .with_timezone(&Utc)
}

fn sha256(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Run {
    fn new(seed: u64) -> Run {
        let mut model = Model::new("http://127.0.0.1:1");
        model.rng = apple_sim::model::Rng::from_seed(seed);
        // Time here is the test's: the simulator's own (wall-clock) rate limit stays out of it;
        // rate limits come as faults. Small pages make refreshes page.
        model.config.rate_limit_enabled = false;
        model.config.page_size = 4;
        let token = model.add_location(LocationSpec {
            mdm_info: Some(MdmInfo {
                id: OUR_ID.into(),
                name: "vpp-spin".into(),
                metadata: "model".into(),
            }),
            ..LocationSpec::default()
        });
        model
            .add_assets(
                &token,
                ASSETS.iter().map(|(a, n)| AssetSpec::app(a, *n)).collect(),
            )
            .unwrap();
        claim(&mut model, &token);
        let world = Arc::new(Mutex::new(World {
            model,
            token,
            rng: Rng(seed ^ 0x9e37_79b9_7f4a_7c15),
            fault_rate: 0,
            scheduled: Vec::new(),
            now: model_epoch(),
            accepted_at: BTreeMap::new(),
            notes: Vec::new(),
            forced: Default::default(),
            log: Vec::new(),
            posts: 0,
            held: BTreeSet::new(),
            removals: BTreeMap::new(),
        }));
        world.lock().unwrap().observe();
        let kv = KillableKv::default();
        let start = model_epoch() - Duration::days(30);
        let account: Account = serde_json::from_value(json!({
            "id": ACCOUNT, "name": "School", "organization": "Org", "location": "Main",
            "locationId": null, "country": "US", "defaultPlatform": "volumestore",
            "websiteUrl": null, "tokenExpiresAt": "2035-01-01T00:00:00Z",
            "createdAt": start, "updatedAt": start,
            "notificationSecretSha256": sha256(SECRET),
        }))
        .unwrap();
        set_json(&kv, &keys::account(ACCOUNT), &account).unwrap();
        set_json(&kv, &keys::accounts(), &vec![ACCOUNT.to_string()]).unwrap();
        // License removal notices on from the start: every removal owes one.
        settings::put(&kv, br#"{"licenseRemovalNotification": true}"#).unwrap();
        let mut run = Run {
            world,
            kv,
            clock: FakeClock::at(start),
            rng: Rng(seed.max(1)),
            next_job: 0,
            foreign: BTreeSet::new(),
            cleaned_since_foreign: false,
            taken_over: false,
            counts_before_refresh: Vec::new(),
        };
        run.refresh(true);
        run
    }

    fn now(&self) -> DateTime<Utc> {
        vpp_apple::Clock::now(&self.clock)
    }

    fn client(&self) -> Client<ScriptedTransport, FakeClock> {
        Client::new(
            transport(self.world.clone()).with_clock(self.clock.clone()),
            self.clock.clone(),
        )
        .with_pacer(vpp_apple::Pacer::unlimited())
    }

    /// A client whose retries are spent (the proxy's retries exhausted): one attempt.
    fn client_once(&self) -> Client<ScriptedTransport, FakeClock> {
        self.client().with_policy(vpp_apple::RetryPolicy::none())
    }

    fn budget(&self) -> Budget {
        Budget::new(self.now(), 20, 40)
    }

    fn log(&self, s: String) {
        let at = self.now().format("%H:%M:%S");
        self.world.lock().unwrap().log.push(format!("{at} {s}"));
    }

    fn subjects(&mut self) -> Vec<String> {
        let n = 1 + self.rng.below(3) as usize;
        let mut out = BTreeSet::new();
        for _ in 0..n {
            out.insert(format!("D{}", self.rng.below(DEVICES as u64)));
        }
        out.into_iter().collect()
    }

    fn asset(&mut self) -> &'static str {
        ASSETS[self.rng.below(ASSETS.len() as u64) as usize].0
    }

    fn job(&mut self, kind: &str) -> Job {
        self.next_job += 1;
        Job::new(
            &format!("job-{}", self.next_job),
            kind,
            Some(ACCOUNT),
            "model",
            self.now(),
        )
    }

    fn refresh(&mut self, full: bool) {
        let account: Account = get_json(&self.kv, &keys::account(ACCOUNT))
            .unwrap()
            .unwrap();
        let Ok(st) = refresh::initial_state(&self.kv, &account, full, self.now()) else {
            return;
        };
        let mut j = self.job("refresh");
        j.checkpoint = serde_json::to_value(&st).unwrap();
        let client = self.client();
        for _ in 0..30 {
            let mut b = self.budget();
            match block_on(refresh::run_slice(
                &self.kv, &client, &mut j, OUR_ID, &mut b,
            )) {
                Ok(refresh::SliceEnd::Done) | Ok(refresh::SliceEnd::Failed(_)) | Err(_) => break,
                Ok(refresh::SliceEnd::Paused) => {
                    self.clock.advance(std::time::Duration::from_secs(2))
                }
            }
        }
    }

    /// Apple applies what it accepted within minutes: events older than [`APPLE_HORIZON`] are
    /// applied now, oldest first.
    fn apple_catches_up(&mut self) {
        let now = self.now();
        let mut w = self.world.lock().unwrap();
        w.now = now;
        while let Some(id) = w.scheduled.first().cloned() {
            let at = w.accepted_at.get(&id).copied().unwrap_or(now);
            if now - at < APPLE_HORIZON {
                break;
            }
            w.scheduled.remove(0);
            w.apply(&id);
            w.log.push(format!("apple applies {id} (in time)"));
        }
    }

    fn step(&mut self) {
        self.apple_catches_up();
        let now = self.now();
        let client = self.client();
        let mut b = self.budget();
        match self.rng.below(100) {
            0..=24 => {
                let adam = self.asset();
                let subjects = self.subjects();
                let body = assign_body(adam, &subjects);
                let r = block_on(assignment::assign(&self.kv, &client, &body, now, &mut b));
                self.log(format!("assign {adam} {subjects:?}: {}", summary(&r)));
            }
            25..=34 => {
                let adam = self.asset();
                let subjects = self.subjects();
                let body = assign_body(adam, &subjects);
                let r = block_on(assignment::revoke(&self.kv, &client, &body, now, &mut b));
                self.log(format!("revoke {adam} {subjects:?}: {}", summary(&r)));
            }
            35..=44 => {
                let adam = self.asset();
                let subjects = self.subjects();
                let id = format!("p{}", self.rng.below(2));
                let body: policy::PolicyBody = serde_json::from_value(json!({
                    "name": id, "accountId": ACCOUNT,
                    "assets": [{"adamId": adam, "pricingParam": "STDQ"}],
                    "serialNumbers": subjects,
                }))
                .unwrap();
                let r = block_on(policy::put(&self.kv, &client, &id, &body, now, &mut b));
                self.log(format!(
                    "policy put {id} {adam} {subjects:?}: ok={}",
                    r.is_ok()
                ));
            }
            45..=48 => {
                let id = format!("p{}", self.rng.below(2));
                let r = policy::delete(&self.kv, &id);
                self.log(format!("policy delete {id}: ok={}", r.is_ok()));
            }
            49..=56 => {
                let full = self.rng.chance(50);
                self.log(format!("refresh full={full}"));
                self.refresh(full);
            }
            57..=62 => {
                let id = format!("rec-{}", self.next_job);
                self.next_job += 1;
                if let Ok((mut j, _)) = reconcile::start(&self.kv, &id, "model", now) {
                    let r = block_on(reconcile::run_slice(
                        &self.kv,
                        &mut j,
                        |_| self.client(),
                        now,
                        &mut b,
                    ));
                    self.log(format!("reconcile: {:?}", r.map(|_| j.result.clone())));
                }
            }
            63..=65 => {
                if let Ok(st) = cleanup::initial_state(&self.kv, ACCOUNT) {
                    let mut j = self.job("cleanup");
                    j.checkpoint = serde_json::to_value(&st).unwrap();
                    let mut done = false;
                    for _ in 0..5 {
                        let mut b = self.budget();
                        match block_on(cleanup::run_slice(&self.kv, &client, &mut j, &mut b)) {
                            Ok(refresh::SliceEnd::Done) => {
                                done = true;
                                break;
                            }
                            Ok(refresh::SliceEnd::Paused) => continue,
                            _ => break,
                        }
                    }
                    if done {
                        self.cleaned_since_foreign = true;
                    }
                    self.log(format!("cleanup done={done}"));
                }
            }
            66..=71 => {
                let p = block_on(event::poll_due(&self.kv, |_| self.client(), now, &mut b));
                let s = block_on(ledger::settle_all(&self.kv, |_| self.client(), now, &mut b));
                self.log(format!(
                    "daily: poll ok={} settle ok={}",
                    p.is_ok(),
                    s.is_ok()
                ));
            }
            72..=83 => {
                // Apple applies the oldest event it accepted (in the order it accepted them).
                let mut w = self.world.lock().unwrap();
                if !w.scheduled.is_empty() {
                    let id = w.scheduled.remove(0);
                    w.apply(&id);
                    w.log.push(format!("apple applies {id}"));
                }
            }
            84..=93 => {
                // A notification arrives (maybe late: any of them), sometimes twice.
                let note = {
                    let mut w = self.world.lock().unwrap();
                    if w.notes.is_empty() {
                        None
                    } else {
                        let len = w.notes.len() as u64;
                        let i = w.rng.below(len) as usize;
                        let twice = w.rng.chance(30);
                        let n = if twice {
                            w.notes[i].clone()
                        } else {
                            w.notes.remove(i)
                        };
                        Some(n)
                    }
                };
                if let Some(n) = note {
                    let r = deliver(&self.kv, &n, now);
                    self.log(format!(
                        "notification {}: ok={r} {}",
                        n.notification_id, n.envelope["notification"]
                    ));
                    if !r {
                        // Not taken (an error answer): Apple sends it again later.
                        self.world.lock().unwrap().notes.push(n);
                    }
                }
            }
            94 if self.rng.chance(40) => {
                // Another MDM takes the location over (and assigns a license).
                let f = FOREIGN[self.rng.below(FOREIGN.len() as u64) as usize];
                let adam = self.asset();
                let mut w = self.world.lock().unwrap();
                let token = w.token.clone();
                let t = TakeOver {
                    mdm_info: MdmInfo {
                        id: "other-mdm".into(),
                        name: "Other MDM".into(),
                        metadata: "x".into(),
                    },
                    assignments: vec![AssignmentSpec::device(adam, f)],
                    ..TakeOver::default()
                };
                if w.model.take_over(&token, t).is_ok() {
                    w.observe();
                    self.foreign.insert((adam.to_string(), f.to_string()));
                    self.cleaned_since_foreign = false;
                    self.taken_over = true;
                    w.log
                        .push(format!("another MDM takes over (assigns {adam} to {f})"));
                }
            }
            94..=96 => {
                // Another MDM assigns a license here.
                let f = FOREIGN[self.rng.below(FOREIGN.len() as u64) as usize];
                let adam = self.asset();
                let mut w = self.world.lock().unwrap();
                let token = w.token.clone();
                if w.model
                    .add_assignments(&token, vec![AssignmentSpec::device(adam, f)])
                    .is_ok()
                {
                    w.observe();
                    self.foreign.insert((adam.to_string(), f.to_string()));
                    self.cleaned_since_foreign = false;
                    w.log.push(format!("foreign assigns {adam} to {f}"));
                }
            }
            _ => {
                let n = self.rng.below(12) as u32;
                self.kv.left.set(Some(n));
                self.log(format!("next invocation killed after {n} writes"));
                return;
            }
        }
        self.kv.left.set(None);
        let secs = 1 + self.rng.below(90);
        self.clock.advance(std::time::Duration::from_secs(secs));
    }

    /// Faults off; let Apple finish, every notification arrive, the daily work and refreshes
    /// run until nothing is open.
    fn settle(&mut self) {
        self.world.lock().unwrap().fault_rate = 0;
        if self.taken_over {
            // Reclaim: our mdmInfo and notification settings again.
            let mut w = self.world.lock().unwrap();
            let token = w.token.clone();
            claim(&mut w.model, &token);
            w.log.push("reclaimed".into());
            self.taken_over = false;
        }
        self.kv.left.set(None);
        for round in 0..12 {
            {
                let mut w = self.world.lock().unwrap();
                w.apply_scheduled();
                for id in w.model.pending_events() {
                    w.apply(&id);
                }
            }
            self.world.lock().unwrap().now = self.now();
            let notes: Vec<Outgoing> = std::mem::take(&mut self.world.lock().unwrap().notes);
            for n in &notes {
                let r = notification::handle(
                    &self.kv,
                    ACCOUNT,
                    Some(&format!("Bearer {SECRET}")),
                    &serde_json::to_vec(&n.envelope).unwrap_or_default(),
                    self.now(),
                );
                if r.is_err() {
                    // Apple sends it again later.
                    self.world.lock().unwrap().notes.push(n.clone());
                }
                let r = r.map(|v| v.to_string()).unwrap_or_else(|e| e.message);
                self.log(format!(
                    "settle: notification {}: {r} {}",
                    n.notification_id, n.envelope["notification"]
                ));
            }
            self.clock.advance(std::time::Duration::from_secs(16 * 60));
            let now = self.now();
            let mut b = Budget::new(now, 600, 1000);
            block_on(event::poll_due(&self.kv, |_| self.client(), now, &mut b)).unwrap();
            block_on(ledger::settle_all(&self.kv, |_| self.client(), now, &mut b)).unwrap();
            let open: i64 = ASSETS
                .iter()
                .map(|(a, _)| ledger::reserved(&self.kv, ACCOUNT, &format!("{a}:STDQ")).unwrap())
                .sum();
            let settled = {
                let w = self.world.lock().unwrap();
                open == 0 && w.model.pending_events().is_empty() && w.notes.is_empty()
            };
            if settled && round >= 1 {
                // Every outcome is read and the last refresh came before them: the counts the
                // outcomes left must already be Apple's (no refresh to put a drift right).
                self.counts_before_refresh = self.count_problems();
                break;
            }
            // Resumable jobs left queued work: the daily run would send it.
            self.refresh(round % 2 == 0);
        }
        self.refresh(true);
    }

    /// Assets whose counts differ from Apple's, or whose in-use differs from the entries our
    /// copy holds.
    fn count_problems(&self) -> Vec<String> {
        let w = self.world.lock().unwrap();
        let Ok(st) = w.model.location_state(&w.token) else {
            return vec!["no location at Apple".into()];
        };
        let doc: AssetsDoc = copy::all_assets(&self.kv, ACCOUNT).unwrap();
        let mut out = Vec::new();
        for v in &st.assets {
            let Some(a) = doc.find(&v.adam_id, &v.pricing_param) else {
                out.push(format!("asset {} missing from our copy", v.adam_id));
                continue;
            };
            let entries: usize = (0..a.shards.max(1))
                .map(|p| {
                    copy::asset_assignments(&self.kv, ACCOUNT, &doc, a, p)
                        .unwrap()
                        .len()
                })
                .sum();
            if a.in_use != v.assigned_count as i64
                || a.available != v.available_count as i64
                || a.in_use != entries as i64
            {
                out.push(format!(
                    "counts of {}: ours in use {} available {} (copy entries {entries}), Apple {} / {}",
                    v.adam_id, a.in_use, a.available, v.assigned_count, v.available_count
                ));
            }
        }
        out
    }

    fn check(&self, seed: u64) -> Result<(), String> {
        self.check_notices(seed, Notices::Ours)
    }

    fn check_notices(&self, seed: u64, notices: Notices) -> Result<(), String> {
        let w = self.world.lock().unwrap();
        let st = w
            .model
            .location_state(&w.token)
            .map_err(|e| e.to_string())?;
        let apple: BTreeSet<(String, String)> = st
            .assignments
            .iter()
            .filter_map(|a| a.serial_number.clone().map(|s| (a.adam_id.clone(), s)))
            .collect();
        let doc: AssetsDoc = copy::all_assets(&self.kv, ACCOUNT).unwrap();
        let mut problems: Vec<String> = self
            .counts_before_refresh
            .iter()
            .map(|p| format!("settled, before the last refresh: {p}"))
            .collect();
        // Our ledger: every settled and open entry.
        let mut ours: BTreeMap<(String, String), String> = BTreeMap::new();
        for shard in 0..LEDGER_SHARDS {
            let l: LedgerShard = get_json(&self.kv, &keys::ledger_shard(ACCOUNT, shard))
                .unwrap()
                .unwrap_or_default();
            for (ak, m) in l {
                for (tag, e) in m {
                    let adam = ak.split(':').next().unwrap_or("").to_string();
                    let s = tag.trim_start_matches("s:").to_string();
                    ours.insert((adam, s), format!("{:?}", e.state));
                }
            }
        }
        for (adam, _) in ASSETS {
            let open = ledger::open_doc(&self.kv, ACCOUNT, &format!("{adam}:STDQ")).unwrap();
            for (tag, o) in &open.entries {
                let evs: Vec<String> = open
                    .event_ids(o)
                    .iter()
                    .map(|id| {
                        let ours = event::load(&self.kv, id).ok().flatten().map(|r| {
                            format!(
                                "{:?} applied={} resent_as={:?}",
                                r.state, r.applied, r.resent_as
                            )
                        });
                        let apple = w
                            .model
                            .events
                            .get(id)
                            .map(|e| format!("{:?}", e.event_status));
                        format!("{id}: ours {ours:?} apple {apple:?}")
                    })
                    .collect();
                problems.push(format!(
                    "{adam} {tag} still open ({}) after settling; events {evs:?}",
                    o.state.name()
                ));
            }
        }
        // 1. Every license Apple holds that we assigned is in our ledger as ours.
        for (adam, s) in &apple {
            if self.foreign.contains(&(adam.clone(), s.clone())) || s.starts_with('F') {
                continue;
            }
            match ours.get(&(adam.clone(), s.clone())).map(String::as_str) {
                Some("Confirmed") | Some("Revoking") => {}
                other => {
                    let evs: Vec<String> = w
                        .model
                        .events
                        .iter()
                        .filter(|(_, e)| format!("{e:?}").contains(&format!("\"{s}\"")))
                        .map(|(id, e)| {
                            let ours = event::load(&self.kv, id).ok().flatten().map(|r| {
                                format!(
                                    "{:?} {:?} applied={} resent_as={:?}",
                                    r.kind, r.state, r.applied, r.resent_as
                                )
                            });
                            format!("{id} {:?} {:?} ours={ours:?}", e.event_type, e.event_status)
                        })
                        .collect();
                    problems.push(format!(
                        "Apple holds {adam}/{s} (ours) but the ledger has {other:?}; events {evs:#?}"
                    ))
                }
            }
        }
        // 2. Nothing in our ledger as held that Apple does not hold.
        for ((adam, s), state) in &ours {
            if (state == "Confirmed" || state == "Revoking")
                && !apple.contains(&(adam.clone(), s.clone()))
            {
                let e = ledger::entry(&self.kv, ACCOUNT, &format!("{adam}:STDQ"), &d(s)).unwrap();
                let evs: Vec<String> =
                    e.iter()
                        .flat_map(|e| e.event_ids.clone())
                        .map(|id| {
                            let ours = event::load(&self.kv, &id).ok().flatten().map(|r| {
                                format!("{:?} {:?} applied={}", r.kind, r.state, r.applied)
                            });
                            let apple = w
                                .model
                                .events
                                .get(&id)
                                .map(|e| format!("{:?}", e.event_status));
                            format!("{id}: ours {ours:?} apple {apple:?}")
                        })
                        .collect();
                problems.push(format!(
                    "ledger holds {adam}/{s} ({state}); Apple does not; {e:?} {evs:?}"
                ));
            }
        }
        // 3. Reservations equal the open entries (none after settling), counts equal Apple's.
        for v in &st.assets {
            let Some(a) = doc.find(&v.adam_id, &v.pricing_param) else {
                problems.push(format!("asset {} missing from our copy", v.adam_id));
                continue;
            };
            if a.in_use != v.assigned_count as i64 || a.available != v.available_count as i64 {
                problems.push(format!(
                    "counts of {}: ours in use {} available {}, Apple {} / {}",
                    v.adam_id, a.in_use, a.available, v.assigned_count, v.available_count
                ));
            }
            let r = ledger::reserved(&self.kv, ACCOUNT, &a.key()).unwrap();
            if r != 0 {
                problems.push(format!("{} reserves {r} after settling", v.adam_id));
            }
        }
        // 4. No foreign assignment was touched except by clean up.
        if !self.cleaned_since_foreign {
            for (adam, f) in &self.foreign {
                let cleaned_earlier = false;
                if !apple.contains(&(adam.clone(), f.clone())) && !cleaned_earlier {
                    // A clean up finished before this pair was added cannot have taken it; one
                    // may have run after it and then another foreign pair came: be exact.
                    // A clean up paused before it finished may have taken it: one of its
                    // disassociate events (our record says so) named it.
                    let by_clean_up = w.model.events.keys().any(|id| {
                        event::load(&self.kv, id).ok().flatten().is_some_and(|r| {
                            r.source == "cleanup"
                                && r.kind != EventKind::Associate
                                && r.subjects.contains(&d(f))
                                && r.assets.iter().any(|a| &a.adam_id == adam)
                        })
                    });
                    if !by_clean_up && !w.log.iter().any(|l| l.contains("cleanup done=true")) {
                        problems.push(format!("foreign {adam}/{f} is gone without a clean up"));
                    }
                }
            }
        }
        // 5. Notices (on throughout). `Ours`: every license of ours Apple took away has a notice,
        // and none is sent for a license Apple never took away.
        // `ExactlyOne`: every removal has exactly one notice, none missing, none twice, none for
        // something Apple did not take away; a foreign license only by clean up.
        let mut noticed: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        let mut noticed_at: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        let mut page = None;
        loop {
            let p = notice::list(&self.kv, page).map_err(|e| e.message.clone())?;
            for n in p.notices {
                let key = (
                    n.adam_id.clone(),
                    n.serial_number.clone().unwrap_or_default(),
                );
                noticed_at.entry(key.clone()).or_default().push(format!(
                    "{} {}{}",
                    n.reason,
                    n.at.format("%H:%M:%S"),
                    n.event_id
                        .as_deref()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                ));
                noticed.entry(key).or_default().push(n.reason.clone());
            }
            match p.next_page {
                Some(next) => page = Some(next),
                None => break,
            }
        }
        let pairs: BTreeSet<&(String, String)> = noticed.keys().chain(w.removals.keys()).collect();
        for pair in pairs {
            let removed = w.removals.get(pair).copied().unwrap_or(0) as usize;
            let reasons = noticed.get(pair).cloned().unwrap_or_default();
            let wrong = match notices {
                Notices::Ours => {
                    (!pair.1.starts_with('F') && reasons.len() < removed)
                        || (removed == 0 && !reasons.is_empty())
                }
                Notices::ExactlyOne => reasons.len() != removed,
            };
            if wrong {
                problems.push(format!(
                    "{}/{}: Apple took it away {removed} time(s), notices {:?}",
                    pair.0,
                    pair.1,
                    noticed_at.get(pair).cloned().unwrap_or_default()
                ));
            }
            if notices == Notices::ExactlyOne
                && pair.1.starts_with('F')
                && reasons.iter().any(|r| r != "cleanup")
            {
                problems.push(format!(
                    "foreign {}/{} has notices {reasons:?} (only clean up takes it)",
                    pair.0, pair.1
                ));
            }
        }
        if problems.is_empty() {
            return Ok(());
        }
        let keep = env_u64("LEDGER_MODEL_LOG").unwrap_or(60) as usize;
        let tail: Vec<&String> = w.log.iter().rev().take(keep).collect();
        Err(format!(
            "seed {seed}: {} problem(s):\n  {}\nlast steps (newest first):\n  {}",
            problems.len(),
            problems.join("\n  "),
            tail.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n  ")
        ))
    }
}

/// How strictly the model checks license-removal notices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Notices {
    /// None missing for a license of ours, none for a license never taken (what holds today).
    Ours,
    /// Exactly one per removal, ours and foreign (see `every_removal_has_exactly_one_notice`).
    ExactlyOne,
}

/// Our mdmInfo on the location, and Apple's asset notifications sent to us.
fn claim(model: &mut Model, token: &str) {
    let cfg = SimRequest {
        method: "POST".into(),
        path: "client/config".into(),
        query: Vec::new(),
        authorization: Some(format!("Bearer {token}")),
        content_type: Some("application/json".into()),
        body: json!({"mdmInfo": {"id": OUR_ID, "name": "vpp-spin", "metadata": "model"},
                     "notificationUrl": "http://127.0.0.1:1/api/apple/notifications/acc1",
                     "notificationAuthToken": SECRET,
                     "notificationTypes": ["ASSET_MANAGEMENT"]})
        .to_string()
        .into_bytes(),
    };
    let out = model.handle_api(&cfg, Instant::now());
    if let Some(p) = &out.pending_config {
        model.finish_client_config(p, true);
    }
}

fn assign_body(adam: &str, subjects: &[String]) -> AssignBody {
    serde_json::from_value(json!({
        "accountId": ACCOUNT, "adamId": adam, "pricingParam": "STDQ", "serialNumbers": subjects,
    }))
    .unwrap()
}

fn summary(r: &Result<assignment::Submitted, vpp_licensing::ApiError>) -> String {
    match r {
        Ok(s) => format!(
            "events {} unknown {} queued {} rejected {}",
            s.events.len(),
            s.unknown.len(),
            s.queued,
            s.rejected.len()
        ),
        Err(e) => format!("error {}", e.code.as_str()),
    }
}

fn deliver(kv: &impl Kv, n: &Outgoing, now: DateTime<Utc>) -> bool {
    let body = serde_json::to_vec(&n.envelope).unwrap_or_default();
    notification::handle(kv, ACCOUNT, Some(&format!("Bearer {SECRET}")), &body, now).is_ok()
}

fn run_seed(seed: u64, steps: usize) -> Result<(), String> {
    run_seed_checking(seed, steps, Notices::Ours)
}

fn run_seed_checking(seed: u64, steps: usize, notices: Notices) -> Result<(), String> {
    let mut run = Run::new(seed);
    run.world.lock().unwrap().fault_rate = 15;
    let trace = std::env::var("LEDGER_MODEL_TRACE").is_ok();
    let mut last = String::new();
    for _ in 0..steps {
        run.step();
        if trace {
            let mut now = String::new();
            for (adam, _) in ASSETS {
                let d = ledger::open_doc(&run.kv, ACCOUNT, &format!("{adam}:STDQ")).unwrap();
                now.push_str(&format!("{adam}: {:?} {:?}; ", d.events, d.entries));
            }
            if let Ok(w) = std::env::var("LEDGER_MODEL_WATCH") {
                if let Some((adam, serial)) = w.split_once(':') {
                    let e = ledger::entry(&run.kv, ACCOUNT, &format!("{adam}:STDQ"), &d(serial))
                        .unwrap();
                    let held = {
                        let w = run.world.lock().unwrap();
                        let st = w.model.location_state(&w.token).unwrap();
                        st.assignments.iter().any(|a| {
                            a.adam_id == adam && a.serial_number.as_deref() == Some(serial)
                        })
                    };
                    let copied = copy_made_by(&run, adam, serial);
                    let settled =
                        ledger::settled(&run.kv, ACCOUNT, &format!("{adam}:STDQ"), &d(serial))
                            .unwrap();
                    now.push_str(&format!(
                        "WATCH {adam}/{serial}: ledger {e:?} settled {settled:?} copy {copied:?} apple holds {held}"
                    ));
                }
            }
            if now != last {
                run.log(format!("open: {now}"));
                last = now;
            }
        }
    }
    run.settle();
    run.check_notices(seed, notices)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

#[test]
fn ledger_matches_apple_after_random_operations_and_faults() {
    let steps = env_u64("LEDGER_MODEL_STEPS").unwrap_or(150) as usize;
    let seeds: Vec<u64> = match env_u64("LEDGER_MODEL_SEED") {
        Some(s) => (0..env_u64("LEDGER_MODEL_SEEDS").unwrap_or(1))
            .map(|i| s + i)
            .collect(),
        None => vec![1, 2, 3, 5, 8, 13, 21, 34, 55, 89],
    };
    let mut failures = Vec::new();
    for seed in seeds {
        println!("ledger model: seed {seed}, {steps} steps (replay: LEDGER_MODEL_SEED={seed})");
        if let Err(e) = run_seed(seed, steps) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Seeds on which `every_removal_has_exactly_one_notice` holds at 150 steps, as CI runs them:
/// 1..=40, 51, 52, 71, 280, 517, and 407, 424, 450, 502, 743, 982 and 994 (one per cause fixed
/// in 401..=1000) (about 25 s on a loaded 2-core machine, 12 s on an idle one; seeds 19..=40 added
/// about 10 s, 71, 280 and 517 about 0.5 s each, 407, 424, 450, 502, 743 and 982 about 0.25 s
/// each on an idle one).
/// `every_removal_has_exactly_one_notice_wide` runs 1..=60.
const EXACT_NOTICE_SEEDS: [u64; 52] = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26,
    27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 51, 52, 71, 280, 517, 407, 424, 450,
    502, 743, 982, 994,
];

fn exactly_one_notice(seeds: &[u64]) {
    let steps = env_u64("LEDGER_MODEL_STEPS").unwrap_or(150) as usize;
    let mut failures = Vec::new();
    for &seed in seeds {
        println!("ledger model, notices: seed {seed} (replay: LEDGER_MODEL_SEED={seed})");
        if let Err(e) = run_seed_checking(seed, steps, Notices::ExactlyOne) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The notice invariant in full: every removal while notices were on has exactly one notice,
/// on a fixed set of seeds ([`EXACT_NOTICE_SEEDS`]; `LEDGER_MODEL_SEED`/`LEDGER_MODEL_SEEDS`
/// choose others). Fixed so far (each with a regression test above): a revoke applied after a
/// still-pending associate (either order of reading their outcomes), a stale associate
/// outcome, a clean up read after a full refresh, a clean up asked twice, an outcome killed
/// between its writes, a removal read after a later assignment of ours (a confirmed entry asked
/// since, a copy entry made by a later associate, or an open entry when the removal is an
/// event we cannot place in time), an associate stopped before it was tracked, a late
/// associate we never learned of putting a license back in the copy after its removal was
/// noticed, a revoke whose entry a new assignment took over before its outcome was read, a
/// late associate we never learned of confirming an entry a refusal of ours left failed, a
/// removal read after a later assignment of ours when the entry was a refused request's, an
/// associate's outcome killed between closing a taken entry and recording its notice, a
/// removal read after an assignment of ours admitted later whose event we did not know, a
/// confirmation killed before its close and revived after a refresh found it gone, a removal
/// killed before its notice and read again after a later assignment of ours, a twin removal
/// owing a pending one a later assignment, a write refused after an unclear attempt, a late
/// revoke outcome taking a later assignment being revoked, a late associate we never learned
/// of confirming a queued entry, a revoke sent over an assignment whose answer was lost and
/// that Apple applied after the revoke's lookup.
#[test]
fn every_removal_has_exactly_one_notice() {
    match env_u64("LEDGER_MODEL_SEED") {
        Some(first) => {
            let n = env_u64("LEDGER_MODEL_SEEDS").unwrap_or(1);
            exactly_one_notice(&(first..first + n).collect::<Vec<_>>())
        }
        None => exactly_one_notice(&EXACT_NOTICE_SEEDS),
    }
}

/// [`every_removal_has_exactly_one_notice`] over seeds 1..=60: all 60 pass (it was 32 failing,
/// then 8, then 1). Seeds 6, 11, 18, 23, 30, 51 and 52 were one cause: a late notification of
/// an associate we never learned of put a license back in the copy after a revoke of ours had
/// taken it (see `a_late_associate_we_never_learned_of_does_not_revive_a_removed_license`).
/// Seed 43 was a clean up whose answer was lost: the client sent it again, Apple accepted both,
/// and the first one's notification (an event we cannot place) gave the one notice the reason
/// `apple` (see `a_clean_up_sent_twice_after_a_lost_answer_has_one_cleanup_notice`; once
/// Apple's retry of a notification we failed was modelled, it also needed
/// `a_lost_answers_removal_killed_before_its_notice_owes_it_on_the_pending_revoke` and
/// `a_late_twin_of_a_clean_up_does_not_take_a_license_assigned_again`). Seeds 61..=200: all
/// pass (93 was `a_revoke_verified_gone_leaves_nothing_for_its_late_notification`; 71's first
/// problem `an_owed_notice_an_earlier_revoke_gave_is_not_given_twice`, its second, a refresh
/// notice for a license whose two removals both had theirs,
/// `a_late_associate_we_never_learned_of_does_not_confirm_a_failed_entry`). Seeds 201..=400:
/// all pass (280 was
/// `a_removal_read_after_a_later_assignment_takes_nothing_from_a_failed_entry`). Seeds
/// 401..=600: all pass (517 was
/// `an_associate_outcome_killed_before_its_taken_notice_keeps_it`; 407, 413 and 587
/// `a_removal_read_after_an_assignment_admitted_later_whose_event_we_did_not_know_takes_nothing`;
/// 424 `a_confirmation_killed_before_its_close_is_not_revived_after_a_refresh_found_it_gone`;
/// 450 `a_removal_killed_before_its_notice_keeps_it_after_a_later_assignment_of_ours`, which
/// needed `a_twin_removal_owes_nothing_for_an_assignment_of_ours_accepted_after_it` for 379 and
/// 511; 502 `a_refusal_after_an_applied_attempt_whose_answer_was_lost_leaves_it_unknown`; 508
/// `a_revoke_of_a_license_whose_assign_answer_was_lost_gives_its_notice`). Seeds 601..=800:
/// all pass (743 was `a_late_revoke_outcome_does_not_take_a_later_assignment_being_revoked`).
/// Seeds 801..=1000: all pass (982 was
/// `a_late_associate_we_never_learned_of_does_not_confirm_a_queued_entry`; 994
/// `a_revoke_waits_for_an_assignment_whose_answer_was_lost_that_apple_does_not_hold_yet`: an
/// assign whose answer was lost, then a revoke whose lookup came before Apple applied the
/// associate, so the revoke took a license no outcome showed; a revoke now waits for such a
/// subject until its entry settles). The e2e model test's seed 48 then needed
/// `a_late_revoke_outcome_does_not_take_an_unknown_assignment_confirmed_after_it`.
/// Not in CI (about 35 s, past what CI's budget allows); run with
/// `cargo test -p vpp-licensing --test ledger_model -- --ignored every_removal_has_exactly_one_notice_wide`.
#[ignore = "about 35 s: run by hand (CI runs EXACT_NOTICE_SEEDS)"]
#[test]
fn every_removal_has_exactly_one_notice_wide() {
    exactly_one_notice(&(1..=60).collect::<Vec<_>>())
}

/// An event Apple still holds after ten minutes is sent again; when both fail, the entry fails
/// (and releases its license); neither event is forgotten on the way.
#[test]
fn resent_events_are_all_tracked_until_they_end() {
    let mut run = Run::new(7);
    // Apple has no license of 200 left for us.
    {
        let mut w = run.world.lock().unwrap();
        let token = w.token.clone();
        w.model
            .add_assignments(
                &token,
                (0..4)
                    .map(|i| AssignmentSpec::device("200", &format!("X{i}")))
                    .collect(),
            )
            .unwrap();
    }
    run.refresh(true);
    let doc: AssetsDoc = copy::all_assets(&run.kv, ACCOUNT).unwrap();
    assert_eq!(doc.find("200", "STDQ").unwrap().available, 0);
    // Our copy still says one is free (Apple's counts moved behind our back).
    let all: Vec<String> = doc.assets.iter().map(AssetRecord::key).collect();
    copy::update_assets(&run.kv, ACCOUNT, &all, |a| a.available = 1).unwrap();
    let now = run.now();
    let mut b = run.budget();
    let out = block_on(assignment::assign(
        &run.kv,
        &run.client(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    let first = out.events[0].id.clone();
    run.clock.advance(std::time::Duration::from_secs(11 * 60));
    let now = run.now();
    let mut b = run.budget();
    let r = block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b)).unwrap();
    assert_eq!(r.resent, 1, "{r:?}");
    let e = ledger::entry(
        &run.kv,
        ACCOUNT,
        "200:STDQ",
        &Subject::SerialNumber("D1".into()),
    )
    .unwrap()
    .unwrap();
    assert_eq!(e.event_ids.len(), 2);
    assert_eq!(e.event_ids[0], first);
    run.world.lock().unwrap().model.flush_events();
    run.clock.advance(std::time::Duration::from_secs(60));
    let now = run.now();
    let mut b = run.budget();
    block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b)).unwrap();
    let e = ledger::entry(
        &run.kv,
        ACCOUNT,
        "200:STDQ",
        &Subject::SerialNumber("D1".into()),
    )
    .unwrap()
    .unwrap();
    assert_eq!(e.state, "failed", "{e:?}");
    assert_eq!(ledger::reserved(&run.kv, ACCOUNT, "200:STDQ").unwrap(), 0);
}

fn d(s: &str) -> Subject {
    Subject::SerialNumber(s.into())
}

fn state_of(run: &Run, adam: &str, serial: &str) -> Option<&'static str> {
    ledger::entry(&run.kv, ACCOUNT, &format!("{adam}:STDQ"), &d(serial))
        .unwrap()
        .map(|e| e.state)
}

fn copy_made_by(run: &Run, adam: &str, serial: &str) -> Option<MadeBy> {
    let (doc, a) = copy::asset(&run.kv, ACCOUNT, &format!("{adam}:STDQ")).unwrap();
    let a = a.unwrap();
    copy::held(&run.kv, ACCOUNT, &doc, &a, &[d(serial)])
        .unwrap()
        .remove(&d(serial).tag())
}

/// Issue 9 item 3: Apple applied the associate but the answer was lost (a bare 500 from a
/// timed-out proxy, or a dropped connection). The entry stays `unknown` (its license held), a
/// refresh counts the license as ours, clean up leaves it, and settling confirms it from Apple's
/// assignments. (Before: the entry was undone, the refresh marked the license foreign and clean
/// up took it back.)
#[test]
fn lost_answer_stays_unknown_until_apple_says_what_happened() {
    for fault in [Fault::AppliedThen500, Fault::AppliedThenDropped] {
        let mut run = Run::new(11);
        run.world.lock().unwrap().forced.push_back(fault);
        let now = run.now();
        let mut b = run.budget();
        let out = block_on(assignment::assign(
            &run.kv,
            &run.client_once(),
            &assign_body("100", &["D1".into()]),
            now,
            &mut b,
        ))
        .unwrap();
        assert_eq!((out.events.len(), out.unknown.len()), (0, 1), "{fault:?}");
        assert_eq!(state_of(&run, "100", "D1"), Some("unknown"));
        assert_eq!(ledger::reserved(&run.kv, ACCOUNT, "100:STDQ").unwrap(), 1);
        // Apple applies it; a refresh sees it and counts it as ours.
        run.world.lock().unwrap().model.flush_events();
        run.refresh(true);
        assert!(
            matches!(copy_made_by(&run, "100", "D1"), Some(MadeBy::Ours { .. })),
            "{fault:?}: {:?}",
            copy_made_by(&run, "100", "D1")
        );
        // Clean up takes only foreign licenses: D1 stays at Apple.
        let st = cleanup::initial_state(&run.kv, ACCOUNT).unwrap();
        let mut j = run.job("cleanup");
        j.checkpoint = serde_json::to_value(&st).unwrap();
        let mut b = run.budget();
        block_on(cleanup::run_slice(&run.kv, &run.client(), &mut j, &mut b)).unwrap();
        run.world.lock().unwrap().model.flush_events();
        let w = run.world.lock().unwrap();
        let held = w.model.location_state(&w.token).unwrap().assignments;
        drop(w);
        assert!(held
            .iter()
            .any(|a| a.serial_number.as_deref() == Some("D1")));
        // Settling confirms it (the refresh saw it at Apple) and releases the reservation.
        let now = run.now();
        let mut b = run.budget();
        let r = block_on(ledger::settle_all(&run.kv, |_| run.client(), now, &mut b)).unwrap();
        assert_eq!(r.confirmed, 1, "{r:?}");
        assert_eq!(state_of(&run, "100", "D1"), Some("confirmed"));
        assert_eq!(ledger::reserved(&run.kv, ACCOUNT, "100:STDQ").unwrap(), 0);
    }
}

/// Item 3: an unknown outcome is looked up at Apple for that device; a request Apple never
/// applied (the connection dropped before it) is released only after Apple's resend horizon.
#[test]
fn unknown_outcome_is_verified_at_apple_before_release() {
    let run = Run::new(12);
    run.world.lock().unwrap().forced.push_back(Fault::Dropped);
    run.world
        .lock()
        .unwrap()
        .forced
        .push_back(Fault::AppliedThenDropped);
    let now = run.now();
    let mut b = run.budget();
    for s in ["D1", "D2"] {
        let out = block_on(assignment::assign(
            &run.kv,
            &run.client_once(),
            &assign_body("100", &[s.into()]),
            now,
            &mut b,
        ))
        .unwrap();
        assert_eq!(out.unknown.len(), 1);
    }
    run.world.lock().unwrap().model.flush_events();
    // No refresh: settling asks Apple about each device.
    run.clock.advance(std::time::Duration::from_secs(60));
    let now = run.now();
    let mut b = run.budget();
    let r = block_on(ledger::settle_all(&run.kv, |_| run.client(), now, &mut b)).unwrap();
    assert_eq!((r.verified, r.confirmed, r.released), (2, 1, 0), "{r:?}");
    assert_eq!(state_of(&run, "100", "D2"), Some("confirmed"));
    assert_eq!(
        state_of(&run, "100", "D1"),
        Some("unknown"),
        "not yet given up"
    );
    run.clock.advance(std::time::Duration::from_secs(
        ledger::UNKNOWN_GIVE_UP_SECS as u64,
    ));
    let now = run.now();
    let mut b = run.budget();
    let r = block_on(ledger::settle_all(&run.kv, |_| run.client(), now, &mut b)).unwrap();
    assert_eq!(r.released, 1, "{r:?}");
    assert_eq!(state_of(&run, "100", "D1"), None);
    assert_eq!(ledger::reserved(&run.kv, ACCOUNT, "100:STDQ").unwrap(), 0);
}

/// Item 3: only an Apple error with an errorNumber is a definite "no": the license is free at
/// once and the request is reported as refused.
#[test]
fn apple_error_number_releases_at_once() {
    let run = Run::new(13);
    run.world
        .lock()
        .unwrap()
        .forced
        .push_back(Fault::RateLimited);
    let now = run.now();
    let mut b = run.budget();
    let e = block_on(assignment::assign(
        &run.kv,
        &run.client(),
        &assign_body("100", &["D1".into()]),
        now,
        &mut b,
    ));
    // The client retries a 429 (Retry-After): the second attempt goes through.
    let out = e.unwrap();
    assert_eq!(out.events.len(), 1);
    assert_eq!(ledger::reserved(&run.kv, ACCOUNT, "100:STDQ").unwrap(), 1);
}

/// Item 4: reservations are the open entries: admitting a subject already open sets nothing
/// more aside, and an entry that ends releases its license. (Before: a second reservation for
/// the same pending subject, and none released when a pending entry was removed.)
#[test]
fn reservations_are_derived_from_open_entries() {
    let run = Run::new(14);
    let now = run.now();
    let subjects = [d("D1"), d("D2")];
    for _ in 0..3 {
        ledger::admit(&run.kv, ACCOUNT, "100:STDQ", &subjects, true, now).unwrap();
    }
    assert_eq!(ledger::reserved(&run.kv, ACCOUNT, "100:STDQ").unwrap(), 2);
    let failure = Failure {
        code: "9709".into(),
        message: "none left".into(),
    };
    ledger::accepted(&run.kv, ACCOUNT, "100:STDQ", &subjects, "ev1").unwrap();
    ledger::fail(
        &run.kv,
        ACCOUNT,
        "100:STDQ",
        &[(d("D1"), failure)],
        Some("ev1"),
        now,
    )
    .unwrap();
    ledger::confirm(
        &run.kv,
        ACCOUNT,
        "100:STDQ",
        &[d("D2")],
        Some("ev1"),
        true,
        Some(now),
        now,
    )
    .unwrap();
    assert_eq!(ledger::reserved(&run.kv, ACCOUNT, "100:STDQ").unwrap(), 0);
    assert_eq!(state_of(&run, "100", "D1"), Some("failed"));
    assert_eq!(state_of(&run, "100", "D2"), Some("confirmed"));
    // Failed entries are pruned after a week (on the next write to their shard).
    let later = now + Duration::seconds(ledger::FAILED_KEEP_SECS + 1);
    ledger::fail(&run.kv, ACCOUNT, "100:STDQ", &[], None, later).unwrap();
    ledger::begin_revoke(&run.kv, ACCOUNT, "100:STDQ", &[d("D1")], later).unwrap();
    assert_eq!(state_of(&run, "100", "D1"), None);
}

/// Item 12: the availability check and the reservation are one compare-and-swap: 30 admissions
/// at once with 10 licenses left admit exactly 10.
#[test]
fn concurrent_admissions_never_take_more_than_available() {
    let kv = MemoryKv::default();
    let mut a = AssetRecord {
        adam_id: "100".into(),
        pricing_param: "STDQ".into(),
        product_type: "App".into(),
        name: None,
        icon_url: None,
        total: 12,
        available: 10,
        in_use: 2,
        retired: 0,
        device_assignable: true,
        revocable: true,
        supported_platforms: Vec::new(),
        shards: 1,
    };
    a.shards = 1;
    copy::write_generation(&kv, ACCOUNT, 1, None, vec![a]).unwrap();
    let now = Utc::now();
    let admitted = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for i in 0..30 {
            let kv = kv.clone();
            let admitted = &admitted;
            scope.spawn(move || {
                match ledger::admit(&kv, ACCOUNT, "100:STDQ", &[d(&format!("C{i}"))], true, now) {
                    Ok(ledger::Admission::Admitted { admitted: a, .. }) if a.len() == 1 => {
                        admitted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(e) => panic!("{e}"),
                }
            });
        }
    });
    assert_eq!(admitted.load(std::sync::atomic::Ordering::SeqCst), 10);
    assert_eq!(ledger::reserved(&kv, ACCOUNT, "100:STDQ").unwrap(), 10);
}

/// Item 2: work that needs more Apple calls than one request may make is not lost: what is not
/// sent stays queued in the ledger (the resume point) and the account's ledger job sends it; an
/// invocation killed between two key-value writes is resumed by the daily settling.
#[test]
fn cut_off_work_is_resumed() {
    let mut run = Run::new(15);
    run.world
        .lock()
        .unwrap()
        .model
        .config
        .limits
        .max_serial_numbers = 2;
    let now = run.now();
    // One Apple call in this request: 5 devices need 3.
    let mut b = Budget::new(now, 20, 1);
    let subjects: Vec<String> = (1..=5).map(|i| format!("D{i}")).collect();
    let out = block_on(assignment::assign(
        &run.kv,
        &run.client(),
        &assign_body("100", &subjects),
        now,
        &mut b,
    ))
    .unwrap();
    assert_eq!((out.events.len(), out.queued), (1, 3), "{out:?}");
    assert_eq!(ledger::reserved(&run.kv, ACCOUNT, "100:STDQ").unwrap(), 5);
    let (mut j, created) = ledger::start_job(&run.kv, "lj1", ACCOUNT, "test", now).unwrap();
    assert!(created);
    let mut b = run.budget();
    let end = block_on(ledger::run_slice(&run.kv, &run.client(), &mut j, &mut b)).unwrap();
    assert_eq!(end, refresh::SliceEnd::Done);
    for s in &subjects {
        assert_eq!(state_of(&run, "100", s), Some("pending"), "{s}");
    }
    // Killed between two writes in the middle of a policy put.
    run.kv.left.set(Some(3));
    let body: policy::PolicyBody = serde_json::from_value(json!({
        "name": "p", "accountId": ACCOUNT, "assets": [{"adamId": "200"}],
        "serialNumbers": ["D6", "D7", "D8"],
    }))
    .unwrap();
    let mut b = run.budget();
    let r = block_on(policy::put(&run.kv, &run.client(), "p", &body, now, &mut b));
    run.kv.left.set(None);
    let _ = r;
    // The daily run (events polled, the ledger settled) finishes it.
    run.settle();
    run.check(15).unwrap();
    let w = run.world.lock().unwrap();
    let held: BTreeSet<String> = w
        .model
        .location_state(&w.token)
        .unwrap()
        .assignments
        .iter()
        .filter_map(|a| a.serial_number.clone())
        .collect();
    for s in subjects
        .iter()
        .map(String::as_str)
        .chain(["D6", "D7", "D8"])
    {
        assert!(held.contains(s), "{s} assigned at Apple: {held:?}");
    }
}

/// Item 10: a poll made for a person's read (`GET /api/events/{id}`) never sends a request to
/// Apple again, however long the event has been pending; the jobs' polls do.
#[test]
fn reads_never_resend_events() {
    let run = Run::new(16);
    let now = run.now();
    let mut b = run.budget();
    let out = block_on(assignment::assign(
        &run.kv,
        &run.client(),
        &assign_body("100", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    let rec = out.events[0].clone();
    run.clock.advance(std::time::Duration::from_secs(20 * 60));
    let posts = |run: &Run| run.world.lock().unwrap().posts;
    let before = posts(&run);
    let r = block_on(event::poll_event(
        &run.kv,
        &run.client(),
        &rec,
        run.now(),
        false,
    ))
    .unwrap();
    assert_eq!(r.id, rec.id);
    assert_eq!(posts(&run), before, "a read sent nothing");
    let r = block_on(event::poll_event(
        &run.kv,
        &run.client(),
        &rec,
        run.now(),
        true,
    ))
    .unwrap();
    assert_ne!(r.id, rec.id, "the daily poll sends it again");
    assert_eq!(posts(&run), before + 1);
}

/// Every notice in the store, as (adamId, serial number, reason).
fn notices(run: &Run) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut page = None;
    loop {
        let p = notice::list(&run.kv, page).unwrap();
        for n in p.notices {
            out.push((n.adam_id, n.serial_number.unwrap_or_default(), n.reason));
        }
        match p.next_page {
            Some(next) => page = Some(next),
            None => return out,
        }
    }
}

/// Found by the notice invariant (seed 3 of `ledger_matches_apple_after_random_operations_and_faults`):
/// Apple's notification of an event arrives after a poll already applied the event (or the other
/// way round). Applying the outcome again changed the books: a late associate re-confirmed a
/// license revoked since (the ledger then held what Apple did not, and the next reconcile sent a
/// second removal notice), and a late disassociate recorded its notice twice. An applied outcome
/// now changes nothing.
#[test]
fn a_late_notification_of_an_applied_event_changes_nothing() {
    let mut run = Run::new(3);
    let poll = |run: &mut Run| {
        run.clock.advance(std::time::Duration::from_secs(60));
        let now = run.now();
        let mut b = run.budget();
        block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b)).unwrap();
    };
    let apply_all = |run: &mut Run| {
        let mut w = run.world.lock().unwrap();
        for id in w.model.pending_events() {
            w.apply(&id);
        }
    };
    // Assign D1; Apple applies it; the poll confirms it. Its notification is kept back.
    let now = run.now();
    let mut b = run.budget();
    block_on(assignment::assign(
        &run.kv,
        &run.client(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    apply_all(&mut run);
    let late_associate: Vec<Outgoing> = std::mem::take(&mut run.world.lock().unwrap().notes);
    poll(&mut run);
    assert_eq!(state_of(&run, "200", "D1"), Some("confirmed"));
    // Revoke D1; Apple applies it; the poll takes it out of the books with one notice.
    let now = run.now();
    let mut b = run.budget();
    block_on(assignment::revoke(
        &run.kv,
        &run.client(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    apply_all(&mut run);
    let late_disassociate: Vec<Outgoing> = std::mem::take(&mut run.world.lock().unwrap().notes);
    poll(&mut run);
    assert_eq!(state_of(&run, "200", "D1"), None);
    assert_eq!(notices(&run).len(), 1, "{:?}", notices(&run));
    // Now both notifications arrive, late.
    for n in late_associate.iter().chain(&late_disassociate) {
        assert!(deliver(&run.kv, n, run.now()));
    }
    assert_eq!(state_of(&run, "200", "D1"), None, "not held at Apple");
    assert_eq!(
        notices(&run),
        vec![("200".to_string(), "D1".to_string(), "api".to_string())]
    );
    let doc: AssetsDoc = copy::all_assets(&run.kv, ACCOUNT).unwrap();
    assert_eq!(doc.find("200", "STDQ").unwrap().in_use, 0);
}

/// Found by `every_removal_has_exactly_one_notice` (seeds 7, 8, 9, 10): a revoke sent while the
/// associate of the same license is still pending. Apple applies the associate, then the revoke
/// (in the order it accepted them). When the poll reads the associate's outcome first, the
/// ledger confirmed the license *after* the revoke was asked, so the revoke's outcome kept it
/// (as if it were a newer assignment): the ledger held what Apple did not, and the refresh that
/// put it right sent a second notice. An entry now remembers when its request was accepted;
/// the revoke accepted after it takes it away, with one notice.
#[test]
fn a_revoke_sent_while_its_associate_is_pending_takes_it_away_once() {
    let mut run = Run::new(5);
    let now = run.now();
    let mut b = run.budget();
    block_on(assignment::assign(
        &run.kv,
        &run.client(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    run.clock.advance(std::time::Duration::from_secs(20));
    let now = run.now();
    let mut b = run.budget();
    block_on(assignment::revoke(
        &run.kv,
        &run.client(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    {
        let mut w = run.world.lock().unwrap();
        // In the order Apple accepted them.
        w.apply_scheduled();
        w.notes.clear();
    }
    run.clock.advance(std::time::Duration::from_secs(60));
    let now = run.now();
    let mut b = run.budget();
    block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b)).unwrap();
    assert_eq!(state_of(&run, "200", "D1"), None, "Apple does not hold it");
    assert_eq!(
        notices(&run),
        vec![("200".to_string(), "D1".to_string(), "api".to_string())]
    );
    run.clock.advance(std::time::Duration::from_secs(60));
    run.refresh(true);
    assert_eq!(
        notices(&run),
        vec![("200".to_string(), "D1".to_string(), "api".to_string())],
        "one removal, one notice"
    );
}

/// A stale associate outcome (its license was revoked since) changes nothing: the event named
/// two devices, the revoke of one was applied and read before the event's own status.
#[test]
fn a_stale_associate_outcome_changes_nothing() {
    let run = Run::new(6);
    let now = run.now();
    let both = [d("D1"), d("D2")];
    ledger::admit(&run.kv, ACCOUNT, "200:STDQ", &both, true, now).unwrap();
    ledger::accepted(&run.kv, ACCOUNT, "200:STDQ", &both, "ev1").unwrap();
    let record = event::new_record(
        "ev1",
        ACCOUNT,
        EventKind::Associate,
        "api",
        vec![ledger::asset_ref("200:STDQ")],
        vec![d("D1"), d("D2")],
        now,
    );
    event::track(&run.kv, &record).unwrap();
    let item = |s: &str| event::Item {
        asset_key: "200:STDQ".into(),
        subject: d(s),
        failure: None,
    };
    // D1's outcome first (the event is not complete: D2 is still to come).
    event::apply_outcome(
        &run.kv,
        ACCOUNT,
        EventKind::Associate,
        Some("ev1"),
        &[item("D1")],
        None,
        now,
    )
    .unwrap();
    assert_eq!(state_of(&run, "200", "D1"), Some("confirmed"));
    // D1 is revoked (a later event of ours, applied and read).
    let later = now + Duration::seconds(30);
    ledger::begin_revoke(&run.kv, ACCOUNT, "200:STDQ", &[d("D1")], later).unwrap();
    let revoke = event::new_record(
        "ev2",
        ACCOUNT,
        EventKind::Disassociate,
        "api",
        vec![ledger::asset_ref("200:STDQ")],
        vec![d("D1")],
        later,
    );
    event::track(&run.kv, &revoke).unwrap();
    ledger::revoke_accepted(&run.kv, ACCOUNT, "200:STDQ", &[d("D1")], "ev2", later).unwrap();
    event::apply_outcome(
        &run.kv,
        ACCOUNT,
        EventKind::Disassociate,
        Some("ev2"),
        &[item("D1")],
        None,
        later,
    )
    .unwrap();
    assert_eq!(state_of(&run, "200", "D1"), None);
    let before = copy::all_assets(&run.kv, ACCOUNT).unwrap();
    // Now ev1's full outcome (D1 and D2) is read.
    event::apply_outcome(
        &run.kv,
        ACCOUNT,
        EventKind::Associate,
        Some("ev1"),
        &[item("D1"), item("D2")],
        None,
        later + Duration::seconds(30),
    )
    .unwrap();
    assert_eq!(
        state_of(&run, "200", "D1"),
        None,
        "revoked since: unchanged"
    );
    let after = copy::all_assets(&run.kv, ACCOUNT).unwrap();
    assert_eq!(
        before.find("200", "STDQ").unwrap().in_use + 1,
        after.find("200", "STDQ").unwrap().in_use,
        "only D2 counts"
    );
    assert!(copy_made_by(&run, "200", "D1").is_none());
}

/// Run one clean up to its end (test helper).
fn clean_up(run: &mut Run) {
    let st = cleanup::initial_state(&run.kv, ACCOUNT).unwrap();
    let mut j = run.job("cleanup");
    j.checkpoint = serde_json::to_value(&st).unwrap();
    let client = run.client();
    let mut b = run.budget();
    let end = block_on(cleanup::run_slice(&run.kv, &client, &mut j, &mut b)).unwrap();
    assert_eq!(end, refresh::SliceEnd::Done);
}

/// Found by `every_removal_has_exactly_one_notice` (seed 1): a foreign license taken by clean
/// up whose outcome is read only after a full refresh replaced the copy (which no longer lists
/// it) got no notice: the outcome found nothing to remove from the copy, and the refresh sends
/// none for foreign licenses. The clean up's outcome owns the notice; a second clean up while
/// the first one's disassociate is pending does not ask again (a second notice).
#[test]
fn a_clean_up_read_after_a_full_refresh_has_one_notice() {
    let mut run = Run::new(8);
    {
        let mut w = run.world.lock().unwrap();
        let token = w.token.clone();
        w.model
            .add_assignments(&token, vec![AssignmentSpec::device("100", "F0")])
            .unwrap();
        w.observe();
    }
    run.refresh(true);
    assert_eq!(copy_made_by(&run, "100", "F0"), Some(MadeBy::Foreign));
    clean_up(&mut run);
    run.clock.advance(std::time::Duration::from_secs(20));
    clean_up(&mut run);
    assert_eq!(
        run.world.lock().unwrap().model.pending_events().len(),
        1,
        "asked once"
    );
    {
        let mut w = run.world.lock().unwrap();
        for id in w.model.pending_events() {
            w.apply(&id);
        }
        w.notes.clear();
    }
    run.clock.advance(std::time::Duration::from_secs(20));
    run.refresh(true);
    assert_eq!(copy_made_by(&run, "100", "F0"), None);
    assert!(notices(&run).is_empty(), "the refresh sends none for it");
    run.clock.advance(std::time::Duration::from_secs(60));
    let now = run.now();
    let mut b = run.budget();
    block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b)).unwrap();
    assert_eq!(
        notices(&run),
        vec![("100".to_string(), "F0".to_string(), "cleanup".to_string())]
    );
    let doc: AssetsDoc = copy::all_assets(&run.kv, ACCOUNT).unwrap();
    let w = run.world.lock().unwrap();
    let st = w.model.location_state(&w.token).unwrap();
    let apple = st.assets.iter().find(|a| a.adam_id == "100").unwrap();
    assert_eq!(
        doc.find("100", "STDQ").unwrap().in_use,
        apple.assigned_count as i64
    );
}

/// The other order of `a_revoke_sent_while_its_associate_is_pending_takes_it_away_once`: the
/// revoke's outcome (a notification) is read before the associate's. Apple applied the associate
/// first, so the revoke took what it gave: the associate's success confirms nothing (the ledger
/// held what Apple did not until a refresh, which sent the notice late) and owes the revoke's
/// notice, once.
#[test]
fn a_revoke_read_before_its_pending_associate_takes_it_away_once() {
    let mut run = Run::new(9);
    let now = run.now();
    let mut b = run.budget();
    block_on(assignment::assign(
        &run.kv,
        &run.client(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    run.clock.advance(std::time::Duration::from_secs(20));
    let now = run.now();
    let mut b = run.budget();
    block_on(assignment::revoke(
        &run.kv,
        &run.client(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    let notes: Vec<Outgoing> = {
        let mut w = run.world.lock().unwrap();
        // In the order Apple accepted them.
        w.apply_scheduled();
        std::mem::take(&mut w.notes)
    };
    assert_eq!(
        run.world
            .lock()
            .unwrap()
            .removals
            .get(&("200".into(), "D1".into())),
        Some(&1),
        "Apple gave it, then took it away"
    );
    // The revoke's notification only (the last one Apple sent).
    let revoke_note = notes.last().unwrap();
    assert!(deliver(&run.kv, revoke_note, run.now()));
    assert!(notices(&run).is_empty(), "nothing it knew of was taken yet");
    run.clock.advance(std::time::Duration::from_secs(60));
    let now = run.now();
    let mut b = run.budget();
    block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b)).unwrap();
    assert_eq!(state_of(&run, "200", "D1"), None, "Apple does not hold it");
    assert_eq!(copy_made_by(&run, "200", "D1"), None);
    assert_eq!(
        notices(&run),
        vec![("200".to_string(), "D1".to_string(), "api".to_string())]
    );
    run.clock.advance(std::time::Duration::from_secs(60));
    run.refresh(true);
    assert_eq!(notices(&run).len(), 1, "{:?}", notices(&run));
    let doc: AssetsDoc = copy::all_assets(&run.kv, ACCOUNT).unwrap();
    let w = run.world.lock().unwrap();
    let st = w.model.location_state(&w.token).unwrap();
    let apple = st.assets.iter().find(|a| a.adam_id == "200").unwrap();
    assert_eq!(
        doc.find("200", "STDQ").unwrap().in_use,
        apple.assigned_count as i64
    );
}

/// As above, with a full refresh between the two (seed 2): the copy listed the license when the
/// revoke's outcome was read, so the revoke sent the notice; the associate's success later must
/// not send a second one.
#[test]
fn a_revoke_that_knew_the_license_sends_its_notice_once() {
    let mut run = Run::new(10);
    let now = run.now();
    let mut b = run.budget();
    block_on(assignment::assign(
        &run.kv,
        &run.client(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    run.clock.advance(std::time::Duration::from_secs(20));
    let now = run.now();
    let mut b = run.budget();
    block_on(assignment::revoke(
        &run.kv,
        &run.client(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    let (associate, revoke) = {
        let mut w = run.world.lock().unwrap();
        let ids = std::mem::take(&mut w.scheduled);
        (ids[0].clone(), ids[1].clone())
    };
    run.world.lock().unwrap().apply(&associate);
    run.world.lock().unwrap().notes.clear();
    run.clock.advance(std::time::Duration::from_secs(20));
    run.refresh(true);
    assert!(copy_made_by(&run, "200", "D1").is_some(), "Apple holds it");
    let notes: Vec<Outgoing> = {
        let mut w = run.world.lock().unwrap();
        w.apply(&revoke);
        std::mem::take(&mut w.notes)
    };
    for n in &notes {
        assert!(deliver(&run.kv, n, run.now()));
    }
    assert_eq!(
        notices(&run),
        vec![("200".to_string(), "D1".to_string(), "api".to_string())]
    );
    run.clock.advance(std::time::Duration::from_secs(60));
    let now = run.now();
    let mut b = run.budget();
    block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b)).unwrap();
    assert_eq!(state_of(&run, "200", "D1"), None, "Apple does not hold it");
    assert_eq!(notices(&run).len(), 1, "{:?}", notices(&run));
}

/// Found by `every_removal_has_exactly_one_notice` (seeds 4, 47; seed 4 of
/// `ledger_matches_apple_after_random_operations_and_faults`): an invocation killed between an
/// outcome's writes (ledger, copy, notice, event record). Read again, the outcome found nothing
/// left to take and the notice was lost, or (killed after the notice) sent it again. A removal
/// now writes the notices it owes on its event record before it moves anything, and notices are
/// recorded once per (event, asset, subject). Killed after every possible write count in turn,
/// the revoke's outcome ends with exactly one notice.
#[test]
fn an_outcome_killed_between_its_writes_has_one_notice() {
    for kill_after in 0..12 {
        let mut run = Run::new(4);
        let poll = |run: &mut Run| {
            run.clock.advance(std::time::Duration::from_secs(60));
            let now = run.now();
            let mut b = run.budget();
            block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b))
        };
        let apply_all = |run: &mut Run| {
            let mut w = run.world.lock().unwrap();
            for id in w.model.pending_events() {
                w.apply(&id);
            }
        };
        let now = run.now();
        let mut b = run.budget();
        block_on(assignment::assign(
            &run.kv,
            &run.client(),
            &assign_body("200", &["D8".into()]),
            now,
            &mut b,
        ))
        .unwrap();
        apply_all(&mut run);
        poll(&mut run).unwrap();
        assert_eq!(state_of(&run, "200", "D8"), Some("confirmed"));
        let now = run.now();
        let mut b = run.budget();
        block_on(assignment::revoke(
            &run.kv,
            &run.client(),
            &assign_body("200", &["D8".into()]),
            now,
            &mut b,
        ))
        .unwrap();
        apply_all(&mut run);
        run.world.lock().unwrap().notes.clear();
        // The poll that reads the revoke's outcome is killed after `kill_after` writes.
        run.kv.left.set(Some(kill_after));
        let _ = poll(&mut run);
        run.kv.left.set(None);
        // Read again (and again: a second reading changes nothing).
        poll(&mut run).unwrap();
        poll(&mut run).unwrap();
        assert_eq!(
            state_of(&run, "200", "D8"),
            None,
            "killed after {kill_after}"
        );
        assert_eq!(
            notices(&run),
            vec![("200".to_string(), "D8".to_string(), "api".to_string())],
            "killed after {kill_after} writes"
        );
        // The daily settling puts the counts right (a kill between the copy and the counts).
        run.settle();
        run.check(4).unwrap();
        assert_eq!(notices(&run).len(), 1, "killed after {kill_after} writes");
    }
}

/// Issue 9: an outcome wrote the copy and then the counts, two values; killed between them,
/// in-use stayed one off until a refresh (and reading the outcome again found the copy already
/// changed, so it moved nothing). Counts are now recounted from the copy's entries. Killed
/// after every possible write count in turn, an associate's and a revoke's outcome, read again
/// with no refresh, leave in-use and available equal to Apple's and to the copy's entries.
#[test]
fn an_outcome_killed_between_the_copy_and_the_counts_leaves_no_drift() {
    let poll = |run: &mut Run| {
        run.clock.advance(std::time::Duration::from_secs(60));
        let now = run.now();
        let mut b = run.budget();
        block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b))
    };
    let apply_all = |run: &mut Run| {
        let mut w = run.world.lock().unwrap();
        for id in w.model.pending_events() {
            w.apply(&id);
        }
    };
    for revoking in [false, true] {
        let what = if revoking { "revoke" } else { "associate" };
        let mut kills = 0;
        for kill_after in 0.. {
            let mut run = Run::new(4);
            let now = run.now();
            let mut b = run.budget();
            block_on(assignment::assign(
                &run.kv,
                &run.client(),
                &assign_body("200", &["D8".into()]),
                now,
                &mut b,
            ))
            .unwrap();
            apply_all(&mut run);
            if revoking {
                poll(&mut run).unwrap();
                assert_eq!(state_of(&run, "200", "D8"), Some("confirmed"));
                let now = run.now();
                let mut b = run.budget();
                block_on(assignment::revoke(
                    &run.kv,
                    &run.client(),
                    &assign_body("200", &["D8".into()]),
                    now,
                    &mut b,
                ))
                .unwrap();
                apply_all(&mut run);
            }
            run.world.lock().unwrap().notes.clear();
            // The poll that reads the outcome is killed after `kill_after` writes.
            run.kv.left.set(Some(kill_after));
            let _ = poll(&mut run);
            let killed = run.kv.left.get() == Some(0);
            run.kv.left.set(None);
            // Read again (and again: a second reading changes nothing); no refresh.
            poll(&mut run).unwrap();
            poll(&mut run).unwrap();
            let want = if revoking { None } else { Some("confirmed") };
            assert_eq!(
                state_of(&run, "200", "D8"),
                want,
                "{what} killed after {kill_after}"
            );
            let problems = run.count_problems();
            assert!(
                problems.is_empty(),
                "{what} outcome killed after {kill_after} writes: {problems:?}"
            );
            if !killed {
                break;
            }
            kills += 1;
        }
        assert!(
            kills >= 3,
            "{what}: the outcome made too few writes to test ({kills})"
        );
    }
}

/// Found by the notice checks (seeds 31, 42, 56, 95 of
/// `ledger_matches_apple_after_random_operations_and_faults`): a revoke of a device Apple did
/// not hold was applied (nothing taken), then an associate of ours gave it the license, and a
/// full refresh put it in the copy. The revoke's outcome, read late, took it out of the copy and
/// sent a notice for a removal that never happened. A removal accepted before the assignment
/// the copy records (or before a confirmed entry's request) takes nothing.
#[test]
fn a_removal_read_after_a_later_assignment_takes_nothing() {
    let mut run = Run::new(11);
    let now = run.now();
    let mut b = run.budget();
    block_on(assignment::revoke(
        &run.kv,
        &run.client(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    run.clock.advance(std::time::Duration::from_secs(20));
    let now = run.now();
    let mut b = run.budget();
    block_on(assignment::assign(
        &run.kv,
        &run.client(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    {
        let mut w = run.world.lock().unwrap();
        // In the order Apple accepted them: the revoke finds nothing, the associate assigns.
        w.apply_scheduled();
        w.notes.clear();
    }
    run.clock.advance(std::time::Duration::from_secs(30));
    run.refresh(true);
    assert!(
        copy_made_by(&run, "200", "D1").is_some(),
        "the copy shows it"
    );
    run.clock.advance(std::time::Duration::from_secs(60));
    let now = run.now();
    let mut b = run.budget();
    block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b)).unwrap();
    assert!(notices(&run).is_empty(), "{:?}", notices(&run));
    assert!(
        copy_made_by(&run, "200", "D1").is_some(),
        "still in the copy"
    );
    assert_eq!(state_of(&run, "200", "D1"), Some("confirmed"));
}

/// Found by the notice checks (seed 100 of `ledger_matches_apple_after_random_operations_and_faults`):
/// a request stopped after Apple accepted its associate and after the event was recorded, but
/// before the entry named it, left an `unknown` entry that nothing connected to the event. A
/// revoke accepted after it took the license away; the entry was then released as never
/// applied and the removal had no notice. The entry now names the event first; an event named
/// on an entry whose record was never written is tracked again by settling.
#[test]
fn an_associate_stopped_before_it_was_tracked_keeps_its_removal_notice() {
    let mut run = Run::new(12);
    let now = run.now();
    let mut b = run.budget();
    let r = block_on(assignment::assign(
        &run.kv,
        &run.client(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    let id = r.events[0].id.clone();
    // Stopped between naming the event on the entry and tracking it.
    run.kv.delete(&keys::event(&id)).unwrap();
    run.kv.set(&keys::account_events(ACCOUNT), b"[]").unwrap();
    run.clock.advance(std::time::Duration::from_secs(60));
    let now = run.now();
    let mut b = run.budget();
    block_on(ledger::settle_all(&run.kv, |_| run.client(), now, &mut b)).unwrap();
    assert!(
        event::load(&run.kv, &id).unwrap().is_some(),
        "tracked again"
    );
    {
        let mut w = run.world.lock().unwrap();
        w.apply_scheduled();
        w.notes.clear();
    }
    run.clock.advance(std::time::Duration::from_secs(20));
    let now = run.now();
    let mut b = run.budget();
    block_on(assignment::revoke(
        &run.kv,
        &run.client(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    {
        let mut w = run.world.lock().unwrap();
        w.apply_scheduled();
        w.notes.clear();
    }
    for _ in 0..3 {
        run.clock.advance(std::time::Duration::from_secs(16 * 60));
        let now = run.now();
        let mut b = run.budget();
        block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b)).unwrap();
        block_on(ledger::settle_all(&run.kv, |_| run.client(), now, &mut b)).unwrap();
    }
    run.refresh(true);
    assert_eq!(state_of(&run, "200", "D1"), None, "Apple does not hold it");
    assert_eq!(
        notices(&run).len(),
        1,
        "one removal, one notice: {:?}",
        notices(&run)
    );
}

/// Found by the notice checks (seed 177 of `ledger_matches_apple_after_random_operations_and_faults`):
/// the notification of an associate whose answer was lost (we never learned its event id)
/// arrived long after Apple applied it, while a revoke of ours was pending and a new associate
/// of ours was open: it confirmed the entry over the revoke, and the revoke's removal lost its
/// notice. An associate we cannot place in time settles only the entry whose answer was lost;
/// what waits on events of ours is left to them.
#[test]
fn a_late_associate_we_never_learned_of_does_not_undo_a_pending_revoke() {
    let mut run = Run::new(13);
    let step = |run: &mut Run, secs: u64| {
        run.clock.advance(std::time::Duration::from_secs(secs));
        (run.now(), run.budget())
    };
    let apply_all = |run: &Run| {
        let mut w = run.world.lock().unwrap();
        w.apply_scheduled();
        w.notes.clear();
    };
    let (now, mut b) = step(&mut run, 0);
    block_on(assignment::assign(
        &run.kv,
        &run.client(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    apply_all(&run);
    let (now, mut b) = step(&mut run, 60);
    block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b)).unwrap();
    assert_eq!(state_of(&run, "200", "D1"), Some("confirmed"));
    // Revoked (Apple applies it: the removal), then assigned again (open, not yet applied).
    let (now, mut b) = step(&mut run, 10);
    block_on(assignment::revoke(
        &run.kv,
        &run.client(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    apply_all(&run);
    // A full refresh sees it gone (the revoke's outcome is not read yet).
    run.clock.advance(std::time::Duration::from_secs(10));
    run.refresh(true);
    let (now, mut b) = step(&mut run, 10);
    block_on(assignment::assign(
        &run.kv,
        &run.client(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    assert_eq!(state_of(&run, "200", "D1"), Some("pending"), "open again");
    // A late notification of an associate we never learned of (applied long ago).
    let body = json!({
        "notification": {
            "assignments": [{"adamId": "200", "pricingParam": "STDQ", "serialNumber": "D1"}],
            "eventId": "lost-answer-1", "result": "SUCCESS", "type": "ASSOCIATE"
        },
        "notificationId": "late-1", "notificationType": "ASSET_MANAGEMENT", "uId": "1"
    });
    let (now, _) = step(&mut run, 5);
    notification::handle(
        &run.kv,
        ACCOUNT,
        Some(&format!("Bearer {SECRET}")),
        body.to_string().as_bytes(),
        now,
    )
    .unwrap();
    apply_all(&run);
    for _ in 0..3 {
        let (now, mut b) = step(&mut run, 16 * 60);
        block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b)).unwrap();
        block_on(ledger::settle_all(&run.kv, |_| run.client(), now, &mut b)).unwrap();
    }
    run.refresh(true);
    assert_eq!(
        state_of(&run, "200", "D1"),
        Some("confirmed"),
        "assigned again"
    );
    assert_eq!(
        notices(&run),
        vec![("200".to_string(), "D1".to_string(), "api".to_string())],
        "the revoke's removal, once"
    );
}

/// Found by the notice checks (seeds 31, 42, 56 of
/// `ledger_matches_apple_after_random_operations_and_faults`): the notification of a revoke
/// whose answer was lost (we never learned its event id) arrived after Apple had applied it and
/// after an associate of ours gave the device the license again. It took the license out of the
/// copy and sent a notice for a removal Apple never made of it. A removal we cannot place in
/// time leaves a confirmed (or open) entry of ours, its copy entry and its notice to the next
/// full refresh, which sees what Apple holds.
#[test]
fn a_late_removal_we_never_learned_of_does_not_take_a_license_of_ours() {
    let mut run = Run::new(14);
    let now = run.now();
    let mut b = run.budget();
    block_on(assignment::assign(
        &run.kv,
        &run.client(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    {
        let mut w = run.world.lock().unwrap();
        w.apply_scheduled();
        w.notes.clear();
    }
    run.clock.advance(std::time::Duration::from_secs(60));
    let now = run.now();
    let mut b = run.budget();
    block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b)).unwrap();
    run.refresh(true);
    assert_eq!(state_of(&run, "200", "D1"), Some("confirmed"));
    let body = json!({
        "notification": {
            "assignments": [{"adamId": "200", "pricingParam": "STDQ", "serialNumber": "D1"}],
            "eventId": "lost-answer-2", "result": "SUCCESS", "type": "DISASSOCIATE"
        },
        "notificationId": "late-2", "notificationType": "ASSET_MANAGEMENT", "uId": "1"
    });
    notification::handle(
        &run.kv,
        ACCOUNT,
        Some(&format!("Bearer {SECRET}")),
        body.to_string().as_bytes(),
        run.now(),
    )
    .unwrap();
    assert!(notices(&run).is_empty(), "{:?}", notices(&run));
    assert!(
        copy_made_by(&run, "200", "D1").is_some(),
        "still in the copy"
    );
    assert_eq!(state_of(&run, "200", "D1"), Some("confirmed"));
    run.clock.advance(std::time::Duration::from_secs(60));
    run.refresh(true);
    assert!(
        notices(&run).is_empty(),
        "Apple holds it: {:?}",
        notices(&run)
    );
}

/// Found by `every_removal_has_exactly_one_notice_wide` (seeds 6, 11, 18, 23, 30, 51, 52): the
/// notification of an associate whose answer was lost (we never learned its event id) arrived
/// long after a revoke of ours had taken the license away and sent its notice. Taken for
/// another MDM's new assignment, it put the license back in the copy; a later report of a
/// removal (a tracked revoke, or one we never learned of) then found it there and sent a second
/// notice for the one removal. An assignment we cannot place in time, of a subject we hold no
/// claim on and whose removal we reported lately, is left to the next refresh.
#[test]
fn a_late_associate_we_never_learned_of_does_not_revive_a_removed_license() {
    let mut run = Run::new(15);
    let step = |run: &mut Run, secs: u64| {
        run.clock.advance(std::time::Duration::from_secs(secs));
        (run.now(), run.budget())
    };
    let apply_all = |run: &Run| {
        let mut w = run.world.lock().unwrap();
        w.apply_scheduled();
        w.notes.clear();
    };
    let (now, mut b) = step(&mut run, 0);
    block_on(assignment::assign(
        &run.kv,
        &run.client(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    apply_all(&run);
    let (now, mut b) = step(&mut run, 60);
    block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b)).unwrap();
    assert_eq!(state_of(&run, "200", "D1"), Some("confirmed"));
    let (now, mut b) = step(&mut run, 10);
    block_on(assignment::revoke(
        &run.kv,
        &run.client(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    apply_all(&run);
    let (now, mut b) = step(&mut run, 60);
    block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b)).unwrap();
    assert_eq!(state_of(&run, "200", "D1"), None);
    let once = vec![("200".to_string(), "D1".to_string(), "api".to_string())];
    assert_eq!(notices(&run), once);
    // Late: an associate and then a removal of D1 we never learned of (both applied long ago,
    // before the revoke: a request of ours whose answer was lost, and its resend).
    for (id, kind) in [
        ("lost-answer-3", "ASSOCIATE"),
        ("lost-answer-4", "DISASSOCIATE"),
    ] {
        let body = json!({
            "notification": {
                "assignments": [{"adamId": "200", "pricingParam": "STDQ", "serialNumber": "D1"}],
                "eventId": id, "result": "SUCCESS", "type": kind
            },
            "notificationId": format!("late-{id}"), "notificationType": "ASSET_MANAGEMENT",
            "uId": "1"
        });
        let (now, _) = step(&mut run, 5);
        notification::handle(
            &run.kv,
            ACCOUNT,
            Some(&format!("Bearer {SECRET}")),
            body.to_string().as_bytes(),
            now,
        )
        .unwrap();
        assert!(
            copy_made_by(&run, "200", "D1").is_none(),
            "Apple does not hold it (after {kind})"
        );
    }
    assert_eq!(notices(&run), once, "the revoke's removal, once");
    run.clock.advance(std::time::Duration::from_secs(60));
    run.refresh(true);
    assert_eq!(notices(&run), once);
    let doc: AssetsDoc = copy::all_assets(&run.kv, ACCOUNT).unwrap();
    assert_eq!(doc.find("200", "STDQ").unwrap().in_use, 0);
}

/// Found by `ledger_matches_apple_after_random_operations_and_faults` (seed 113): a revoke of a
/// license we held, still outstanding when the device was assigned the license again. Apple
/// applied the revoke (it took the license), then the new associate. When the associate's
/// outcome was read first, it confirmed the entry over the revoke's, and the revoke's outcome
/// then found an entry newer than itself and kept it: the removal had no notice. The newer
/// request taking the entry over writes the notice the revoke owes on its record.
#[test]
fn a_revoke_overtaken_by_a_new_assignment_keeps_its_notice() {
    let mut run = Run::new(16);
    let step = |run: &mut Run, secs: u64| {
        run.clock.advance(std::time::Duration::from_secs(secs));
        (run.now(), run.budget())
    };
    let (now, mut b) = step(&mut run, 0);
    block_on(assignment::assign(
        &run.kv,
        &run.client(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    {
        let mut w = run.world.lock().unwrap();
        w.apply_scheduled();
        w.notes.clear();
    }
    let (now, mut b) = step(&mut run, 60);
    block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b)).unwrap();
    assert_eq!(state_of(&run, "200", "D1"), Some("confirmed"));
    // Revoked; Apple applies the revoke (its outcome is not read yet) and a full refresh sees
    // the license gone; the device is assigned it again, and Apple applies that too.
    let apply = |run: &Run| {
        let mut w = run.world.lock().unwrap();
        w.apply_scheduled();
    };
    let body = assign_body("200", &["D1".into()]);
    let (now, mut b) = step(&mut run, 10);
    block_on(assignment::revoke(
        &run.kv,
        &run.client(),
        &body,
        now,
        &mut b,
    ))
    .unwrap();
    apply(&run);
    run.clock.advance(std::time::Duration::from_secs(10));
    run.refresh(true);
    assert_eq!(state_of(&run, "200", "D1"), Some("revoking"));
    let (now, mut b) = step(&mut run, 10);
    block_on(assignment::assign(
        &run.kv,
        &run.client(),
        &body,
        now,
        &mut b,
    ))
    .unwrap();
    assert_eq!(state_of(&run, "200", "D1"), Some("pending"));
    apply(&run);
    // The associate's outcome is read first.
    let notes: Vec<Outgoing> = std::mem::take(&mut run.world.lock().unwrap().notes);
    assert_eq!(notes.len(), 2);
    for n in notes.iter().rev() {
        let (now, _) = step(&mut run, 5);
        assert!(deliver(&run.kv, n, now));
    }
    assert_eq!(
        state_of(&run, "200", "D1"),
        Some("confirmed"),
        "assigned again"
    );
    let once = vec![("200".to_string(), "D1".to_string(), "api".to_string())];
    assert_eq!(notices(&run), once, "the revoke's removal, once");
    run.clock.advance(std::time::Duration::from_secs(60));
    run.refresh(true);
    assert_eq!(notices(&run), once);
    assert_eq!(state_of(&run, "200", "D1"), Some("confirmed"));
}

/// `notification::handle` remembered a `notificationId` before applying it: an invocation
/// killed between the two lost the notification for good (Apple's retry was answered as a
/// duplicate, and an outcome only a notification reports was never applied). Now it is
/// remembered after it was applied to its end: killed after any number of writes, Apple's
/// retry applies it, once (one notice), and a retry after that is a duplicate.
#[test]
fn a_notification_killed_after_any_write_is_applied_by_apples_retry() {
    let mut killed_once = false;
    for n in 0..16 {
        let mut run = Run::new(8);
        {
            let mut w = run.world.lock().unwrap();
            let token = w.token.clone();
            w.model
                .add_assignments(&token, vec![AssignmentSpec::device("100", "F0")])
                .unwrap();
            w.observe();
        }
        run.refresh(true);
        clean_up(&mut run);
        let notes: Vec<Outgoing> = {
            let mut w = run.world.lock().unwrap();
            for id in w.model.pending_events() {
                w.apply(&id);
            }
            std::mem::take(&mut w.notes)
        };
        assert_eq!(notes.len(), 1, "the clean up's notification");
        let body = serde_json::to_vec(&notes[0].envelope).unwrap();
        let handle = |run: &Run| {
            notification::handle(
                &run.kv,
                ACCOUNT,
                Some(&format!("Bearer {SECRET}")),
                &body,
                run.now(),
            )
        };
        run.kv.left.set(Some(n));
        let first = handle(&run);
        run.kv.left.set(None);
        killed_once |= first.is_err();
        if first.is_err() {
            // Apple retries a notification we did not take.
            let retry = handle(&run).expect("the retry is applied");
            assert!(retry.get("applied").is_some(), "kill after {n}: {retry}");
        }
        let again = handle(&run).unwrap();
        assert_eq!(again["duplicate"], true, "kill after {n}: {again}");
        assert_eq!(copy_made_by(&run, "100", "F0"), None, "kill after {n}");
        assert_eq!(
            notices(&run),
            vec![("100".to_string(), "F0".to_string(), "cleanup".to_string())],
            "kill after {n}"
        );
        let doc: AssetsDoc = copy::all_assets(&run.kv, ACCOUNT).unwrap();
        assert_eq!(doc.find("100", "STDQ").unwrap().in_use, 0, "kill after {n}");
    }
    assert!(killed_once);
}

/// Found by `every_removal_has_exactly_one_notice_wide` (seed 43): a clean up's disassociate
/// whose answer was lost is sent again by the client, and Apple accepts both (we learn only the
/// second event's id). The first one takes the foreign license; its notification, read first,
/// is of an event we cannot place, and the one notice had the reason `apple` (only a clean up
/// takes a foreign license). The removal is now the pending clean up's: its reason, keyed by
/// its event, and reading the clean up's own outcome adds no second notice.
#[test]
fn a_clean_up_sent_twice_after_a_lost_answer_has_one_cleanup_notice() {
    let mut run = Run::new(8);
    {
        let mut w = run.world.lock().unwrap();
        let token = w.token.clone();
        w.model
            .add_assignments(&token, vec![AssignmentSpec::device("100", "F0")])
            .unwrap();
        w.observe();
    }
    run.refresh(true);
    assert_eq!(copy_made_by(&run, "100", "F0"), Some(MadeBy::Foreign));
    run.world
        .lock()
        .unwrap()
        .forced
        .push_back(Fault::AppliedThenDropped);
    clean_up(&mut run);
    let mut events = run.world.lock().unwrap().model.pending_events();
    assert_eq!(
        events.len(),
        2,
        "asked twice: the answer to the first was lost"
    );
    // Apple applies both in order (the one we never learned of first); its notification
    // arrives first.
    events.sort_by_key(|id| event::load(&run.kv, id).unwrap().is_some());
    assert!(event::load(&run.kv, &events[0]).unwrap().is_none());
    assert!(event::load(&run.kv, &events[1]).unwrap().is_some());
    let notes: Vec<Outgoing> = {
        let mut w = run.world.lock().unwrap();
        for id in &events {
            w.apply(id);
        }
        std::mem::take(&mut w.notes)
    };
    assert_eq!(notes.len(), 2);
    for n in &notes {
        assert!(deliver(&run.kv, n, run.now()));
    }
    assert_eq!(copy_made_by(&run, "100", "F0"), None);
    assert_eq!(
        notices(&run),
        vec![("100".to_string(), "F0".to_string(), "cleanup".to_string())]
    );
    // The clean up's own outcome, polled, adds nothing.
    run.clock.advance(std::time::Duration::from_secs(60));
    let now = run.now();
    let mut b = run.budget();
    block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b)).unwrap();
    run.refresh(true);
    assert_eq!(notices(&run).len(), 1, "{:?}", notices(&run));
}

/// Our license D1, confirmed; a revoke whose answer is lost, sent again by the client: Apple
/// accepts both (we know only the second). Returns the two events, the unknown one first.
fn revoke_sent_twice(run: &mut Run) -> Vec<String> {
    let now = run.now();
    let mut b = run.budget();
    block_on(assignment::assign(
        &run.kv,
        &run.client(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    {
        let mut w = run.world.lock().unwrap();
        w.apply_scheduled();
        w.notes.clear();
    }
    run.clock.advance(std::time::Duration::from_secs(60));
    let now = run.now();
    let mut b = run.budget();
    block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b)).unwrap();
    assert_eq!(state_of(run, "200", "D1"), Some("confirmed"));
    run.world
        .lock()
        .unwrap()
        .forced
        .push_back(Fault::AppliedThen500);
    let now = run.now();
    let mut b = run.budget();
    block_on(assignment::revoke(
        &run.kv,
        &run.client(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    let mut events = run.world.lock().unwrap().model.pending_events();
    assert_eq!(
        events.len(),
        2,
        "asked twice: the answer to the first was lost"
    );
    events.sort_by_key(|id| event::load(&run.kv, id).unwrap().is_some());
    assert!(event::load(&run.kv, &events[0]).unwrap().is_none());
    events
}

/// Found by `every_removal_has_exactly_one_notice_wide` (seed 43, once Apple's retry of a
/// notification we failed was modelled): the notification of a removal we cannot place (a
/// revoke's first sending, whose answer was lost) was killed after it took the ledger entry
/// and before its notice; a full refresh then dropped the license from the copy, and neither
/// its retry nor the revoke's own outcome found anything held: no notice. The notice is now
/// owed on the pending revoke's record before anything moves.
#[test]
fn a_lost_answers_removal_killed_before_its_notice_owes_it_on_the_pending_revoke() {
    let mut failed_before_notice = 0;
    for n in 0..12 {
        let mut run = Run::new(14);
        let events = revoke_sent_twice(&mut run);
        let notes: Vec<Outgoing> = {
            let mut w = run.world.lock().unwrap();
            for id in &events {
                w.apply(id);
            }
            std::mem::take(&mut w.notes)
        };
        let unknown = notes
            .iter()
            .find(|n| n.envelope["notification"]["eventId"] == events[0].as_str())
            .unwrap();
        run.kv.left.set(Some(n));
        let ok = deliver(&run.kv, unknown, run.now());
        run.kv.left.set(None);
        if !ok && notices(&run).is_empty() {
            failed_before_notice += 1;
        }
        // A full refresh before anything else: Apple holds nothing of D1.
        run.clock.advance(std::time::Duration::from_secs(20));
        run.refresh(true);
        assert_eq!(copy_made_by(&run, "200", "D1"), None);
        // Apple's retry, the revoke's own notification, and its poll.
        for note in &notes {
            deliver(&run.kv, note, run.now());
        }
        run.clock.advance(std::time::Duration::from_secs(60));
        let now = run.now();
        let mut b = run.budget();
        block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b)).unwrap();
        run.refresh(true);
        assert_eq!(
            notices(&run),
            vec![("200".to_string(), "D1".to_string(), "api".to_string())],
            "killed after {n} writes"
        );
    }
    assert!(failed_before_notice > 0, "some kill came before the notice");
}

/// The other half of `a_clean_up_sent_twice_after_a_lost_answer_has_one_cleanup_notice`: the
/// clean up's own outcome is read first (its notice), another MDM assigns the license again,
/// a refresh lists it as foreign, and then the late notification of the clean up's first
/// sending arrives. It took the license away from the copy (Apple holds it) with a second
/// notice (`apple`). A foreign license a removal of ours reported taking lately, named by a
/// removal we cannot place, is now left to a refresh.
#[test]
fn a_late_twin_of_a_clean_up_does_not_take_a_license_assigned_again() {
    let mut run = Run::new(8);
    let foreign = |run: &mut Run| {
        let mut w = run.world.lock().unwrap();
        let token = w.token.clone();
        w.model
            .add_assignments(&token, vec![AssignmentSpec::device("100", "F0")])
            .unwrap();
        w.observe();
    };
    foreign(&mut run);
    run.refresh(true);
    run.world
        .lock()
        .unwrap()
        .forced
        .push_back(Fault::AppliedThenDropped);
    clean_up(&mut run);
    let mut events = run.world.lock().unwrap().model.pending_events();
    assert_eq!(events.len(), 2);
    events.sort_by_key(|id| event::load(&run.kv, id).unwrap().is_some());
    let notes: Vec<Outgoing> = {
        let mut w = run.world.lock().unwrap();
        for id in &events {
            w.apply(id);
        }
        std::mem::take(&mut w.notes)
    };
    run.clock.advance(std::time::Duration::from_secs(60));
    let now = run.now();
    let mut b = run.budget();
    block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b)).unwrap();
    assert_eq!(
        notices(&run),
        vec![("100".to_string(), "F0".to_string(), "cleanup".to_string())]
    );
    foreign(&mut run);
    run.clock.advance(std::time::Duration::from_secs(60));
    run.refresh(true);
    assert_eq!(copy_made_by(&run, "100", "F0"), Some(MadeBy::Foreign));
    for n in &notes {
        assert!(deliver(&run.kv, n, run.now()));
    }
    assert_eq!(copy_made_by(&run, "100", "F0"), Some(MadeBy::Foreign));
    assert_eq!(
        notices(&run),
        vec![("100".to_string(), "F0".to_string(), "cleanup".to_string())]
    );
    let doc: AssetsDoc = copy::all_assets(&run.kv, ACCOUNT).unwrap();
    assert_eq!(doc.find("100", "STDQ").unwrap().in_use, 1);
}

/// Found by `every_removal_has_exactly_one_notice` (seed 93 of 61..200): a revoke whose answer
/// was lost (the proxy's retries spent) stays `revoking` without an event; settling verified at
/// Apple that the license is gone and sent the notice (`reconcile`), but left it in the copy.
/// The late notification of the revoke Apple did apply then found it there and sent a second
/// notice (`apple`). Settling now takes it out of the copy too.
#[test]
fn a_revoke_verified_gone_leaves_nothing_for_its_late_notification() {
    let run = Run::new(14);
    let now = run.now();
    let mut b = run.budget();
    block_on(assignment::assign(
        &run.kv,
        &run.client(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    {
        let mut w = run.world.lock().unwrap();
        w.apply_scheduled();
        w.notes.clear();
    }
    run.clock.advance(std::time::Duration::from_secs(60));
    let now = run.now();
    let mut b = run.budget();
    block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b)).unwrap();
    assert_eq!(state_of(&run, "200", "D1"), Some("confirmed"));
    run.world
        .lock()
        .unwrap()
        .forced
        .push_back(Fault::AppliedThen500);
    let now = run.now();
    let mut b = run.budget();
    let r = block_on(assignment::revoke(
        &run.kv,
        &run.client_once(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    assert_eq!(r.unknown.len(), 1, "the answer was lost");
    let notes: Vec<Outgoing> = {
        let mut w = run.world.lock().unwrap();
        for id in w.model.pending_events() {
            w.apply(&id);
        }
        std::mem::take(&mut w.notes)
    };
    assert_eq!(notes.len(), 1);
    // Settling verifies at Apple: gone, one notice, and out of the copy.
    run.clock.advance(std::time::Duration::from_secs(120));
    let now = run.now();
    let mut b = run.budget();
    block_on(ledger::settle_all(&run.kv, |_| run.client(), now, &mut b)).unwrap();
    assert_eq!(state_of(&run, "200", "D1"), None);
    assert_eq!(copy_made_by(&run, "200", "D1"), None);
    let doc: AssetsDoc = copy::all_assets(&run.kv, ACCOUNT).unwrap();
    assert_eq!(doc.find("200", "STDQ").unwrap().in_use, 0);
    // The revoke's late notification adds nothing.
    assert!(deliver(&run.kv, &notes[0], run.now()));
    assert_eq!(
        notices(&run),
        vec![("200".to_string(), "D1".to_string(), "reconcile".to_string())]
    );
}

/// Found by `every_removal_has_exactly_one_notice` (seed 71 of 61..200): the associate's
/// outcome was read partly (killed after it confirmed the entry, before it closed the open
/// one), a revoke R1 sent while it was pending took the license at Apple, and a second revoke
/// R3, asked after that partial reading, marked the entry `revoking`. Reading the associate
/// again owed R3 the notice (it took the entry over); R1's outcome gave its own. Two notices
/// for one removal. An owed notice that a removal of ours accepted earlier reported since is
/// that one's.
#[test]
fn an_owed_notice_an_earlier_revoke_gave_is_not_given_twice() {
    let mut reproduced = false;
    for n in 0..16 {
        let mut run = Run::new(16);
        let step = |run: &mut Run, secs: u64| {
            run.clock.advance(std::time::Duration::from_secs(secs));
            (run.now(), run.budget())
        };
        let apply = |run: &Run| {
            let mut w = run.world.lock().unwrap();
            w.apply_scheduled();
            w.notes.clear();
        };
        let body = assign_body("200", &["D1".into()]);
        let (now, mut b) = step(&mut run, 0);
        block_on(assignment::assign(
            &run.kv,
            &run.client(),
            &body,
            now,
            &mut b,
        ))
        .unwrap();
        apply(&run);
        run.clock.advance(std::time::Duration::from_secs(10));
        run.refresh(true);
        let (now, mut b) = step(&mut run, 10);
        block_on(assignment::revoke(
            &run.kv,
            &run.client(),
            &body,
            now,
            &mut b,
        ))
        .unwrap();
        // The associate's outcome, read partly.
        let (now, mut b) = step(&mut run, 60);
        run.kv.left.set(Some(n));
        let _ = block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b));
        run.kv.left.set(None);
        let settled = ledger::settled(&run.kv, ACCOUNT, "200:STDQ", &d("D1")).unwrap();
        let open = ledger::open_subjects(&run.kv, ACCOUNT, "200:STDQ").unwrap();
        if !(settled.is_some_and(|e| e.state == LedgerState::Confirmed) && open.contains("s:D1")) {
            continue;
        }
        reproduced = true;
        apply(&run); // R1 takes the license.
        let (now, mut b) = step(&mut run, 10);
        block_on(assignment::revoke(
            &run.kv,
            &run.client(),
            &body,
            now,
            &mut b,
        ))
        .unwrap();
        apply(&run); // R3: nothing left to take.
        for _ in 0..3 {
            let (now, mut b) = step(&mut run, 60);
            block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b)).unwrap();
        }
        run.refresh(true);
        let removals = run.world.lock().unwrap().removals.clone();
        assert_eq!(removals.values().sum::<u32>(), 1, "Apple took it once");
        assert_eq!(
            notices(&run),
            vec![("200".to_string(), "D1".to_string(), "api".to_string())],
            "killed after {n} writes"
        );
    }
    assert!(reproduced, "a kill left the entry confirmed and still open");
}

/// Apple's notification of an associate we never learned the event of (a request of ours
/// whose answer was lost), kept back until now.
fn late_associate(run: &Run, id: &str, serial: &str, result: &str) {
    let mut n = json!({
        "assignments": [{"adamId": "200", "pricingParam": "STDQ", "serialNumber": serial}],
        "eventId": id, "result": result, "type": "ASSOCIATE"
    });
    if result == "FAILURE" {
        n["error"] = json!({"errorNumber": 9709,
            "errorMessage": "There aren't enough assets available to complete this association."});
    }
    let body = json!({
        "notification": n, "notificationId": format!("late-{id}"),
        "notificationType": "ASSET_MANAGEMENT", "uId": "1"
    });
    notification::handle(
        &run.kv,
        ACCOUNT,
        Some(&format!("Bearer {SECRET}")),
        body.to_string().as_bytes(),
        run.now(),
    )
    .unwrap();
}

/// Another MDM takes every license of 200 Apple has left (our copy does not know yet).
fn others_take_every_license_of_200(run: &Run) {
    let mut w = run.world.lock().unwrap();
    let token = w.token.clone();
    let free = w
        .model
        .location_state(&token)
        .unwrap()
        .assets
        .iter()
        .find(|a| a.adam_id == "200")
        .map(|a| a.available_count)
        .unwrap();
    let specs = (0..free)
        .map(|i| AssignmentSpec::device("200", &format!("F{i}")))
        .collect();
    w.model.add_assignments(&token, specs).unwrap();
    w.observe();
}

/// Found by `every_removal_has_exactly_one_notice` (seed 71 of 61..200, its second problem):
/// an associate of ours whose answer was lost (Apple accepted it twice: we know only the
/// resend's event) was applied, a revoke took the license away with its notice, and a later
/// request of ours for the device failed (Apple had no license left): the entry was `failed`.
/// Then the notification of the lost answer's event arrived, late: an assignment we cannot
/// place in time turned the failed entry `confirmed`, so the ledger held what Apple did not,
/// and the next full refresh found it gone and sent a second notice for the one removal. A
/// refusal of a request of ours is what Apple applied last (the lost answer's twin came before
/// it): such an assignment changes nothing.
#[test]
fn a_late_associate_we_never_learned_of_does_not_confirm_a_failed_entry() {
    let mut run = Run::new(17);
    let step = |run: &mut Run, secs: u64| {
        run.clock.advance(std::time::Duration::from_secs(secs));
        (run.now(), run.budget())
    };
    let apply_all = |run: &Run| {
        let mut w = run.world.lock().unwrap();
        w.apply_scheduled();
        w.notes.clear();
    };
    let body = assign_body("200", &["D1".into()]);
    let (now, mut b) = step(&mut run, 0);
    block_on(assignment::assign(
        &run.kv,
        &run.client(),
        &body,
        now,
        &mut b,
    ))
    .unwrap();
    apply_all(&run);
    let (now, mut b) = step(&mut run, 60);
    block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b)).unwrap();
    assert_eq!(state_of(&run, "200", "D1"), Some("confirmed"));
    let (now, mut b) = step(&mut run, 10);
    block_on(assignment::revoke(
        &run.kv,
        &run.client(),
        &body,
        now,
        &mut b,
    ))
    .unwrap();
    apply_all(&run);
    let (now, mut b) = step(&mut run, 60);
    block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b)).unwrap();
    assert_eq!(state_of(&run, "200", "D1"), None);
    let once = vec![("200".to_string(), "D1".to_string(), "api".to_string())];
    assert_eq!(notices(&run), once);
    // D1 asked for again; Apple has no license left for it: the entry fails.
    others_take_every_license_of_200(&run);
    let (now, mut b) = step(&mut run, 10);
    block_on(assignment::assign(
        &run.kv,
        &run.client(),
        &body,
        now,
        &mut b,
    ))
    .unwrap();
    apply_all(&run);
    let (now, mut b) = step(&mut run, 60);
    block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b)).unwrap();
    assert_eq!(state_of(&run, "200", "D1"), Some("failed"));
    // Late: the success of the first associate's lost-answer twin (applied before the revoke).
    step(&mut run, 30);
    late_associate(&run, "lost-answer-5", "D1", "SUCCESS");
    assert_eq!(
        state_of(&run, "200", "D1"),
        Some("failed"),
        "the refusal came after it"
    );
    assert!(copy_made_by(&run, "200", "D1").is_none());
    run.clock.advance(std::time::Duration::from_secs(60));
    run.refresh(true);
    assert_eq!(notices(&run), once, "the revoke's removal, once");
    let removals = run.world.lock().unwrap().removals.clone();
    assert_eq!(removals.values().sum::<u32>(), 1, "Apple took it once");
}

/// The other side of `a_late_associate_we_never_learned_of_does_not_confirm_a_failed_entry`:
/// a request of ours whose answers were all lost (Apple accepted it twice, we know neither
/// event) failed in the first event we never learned of; its twin, accepted after, found a
/// license and was applied. Its success still makes the license ours (the failure was not a
/// refusal of an event we placed).
#[test]
fn a_lost_answers_twin_that_succeeds_after_its_failure_is_ours() {
    let run = Run::new(18);
    others_take_every_license_of_200(&run);
    // Our copy still shows the licenses free: D1 is admitted, the answer lost.
    run.world
        .lock()
        .unwrap()
        .forced
        .push_back(Fault::AppliedThenDropped);
    let now = run.now();
    let mut b = run.budget();
    let r = block_on(assignment::assign(
        &run.kv,
        &run.client_once(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    assert_eq!(r.unknown.len(), 1, "{}", summary(&Ok(r.clone())));
    assert_eq!(state_of(&run, "200", "D1"), Some("unknown"));
    run.clock.advance(std::time::Duration::from_secs(30));
    late_associate(&run, "lost-answer-6", "D1", "FAILURE");
    assert_eq!(state_of(&run, "200", "D1"), Some("failed"));
    run.clock.advance(std::time::Duration::from_secs(30));
    late_associate(&run, "lost-answer-7", "D1", "SUCCESS");
    assert_eq!(state_of(&run, "200", "D1"), Some("confirmed"));
}

/// Found by `every_removal_has_exactly_one_notice` (seed 280 of 201..400): a revoke sent while
/// the device's associate was pending; Apple had no license left, so it refused the associate
/// (the entry `failed`) and the revoke took nothing. The device was assigned again (Apple
/// applied it, a full refresh put it in the copy as that assignment's) before the revoke's
/// outcome was read: it found the copy entry and the failed one, took the license out of the
/// books and sent a notice, though Apple never took it away. A removal read after a later
/// assignment of ours leaves it alone also when the only entry is a refused request's.
#[test]
fn a_removal_read_after_a_later_assignment_takes_nothing_from_a_failed_entry() {
    let mut run = Run::new(19);
    let step = |run: &mut Run, secs: u64| {
        run.clock.advance(std::time::Duration::from_secs(secs));
        (run.now(), run.budget())
    };
    // Apple applies what it accepted; its notifications are returned, not delivered.
    let apply_all = |run: &Run| -> Vec<Outgoing> {
        let mut w = run.world.lock().unwrap();
        w.apply_scheduled();
        std::mem::take(&mut w.notes)
    };
    let of_event = |notes: &[Outgoing], id: &str| -> Vec<Outgoing> {
        notes
            .iter()
            .filter(|n| n.envelope["notification"]["eventId"] == id)
            .cloned()
            .collect()
    };
    let body = assign_body("200", &["D1".into()]);
    others_take_every_license_of_200(&run);
    // Our copy still shows licenses free: D1 is asked for (A), then revoked (R), both pending.
    let (now, mut b) = step(&mut run, 10);
    let a = block_on(assignment::assign(
        &run.kv,
        &run.client(),
        &body,
        now,
        &mut b,
    ))
    .unwrap();
    let a = a.events[0].id.clone();
    let (now, mut b) = step(&mut run, 10);
    let r = block_on(assignment::revoke(
        &run.kv,
        &run.client(),
        &body,
        now,
        &mut b,
    ))
    .unwrap();
    let r = r.events[0].id.clone();
    // Apple refuses A (no license left) and R takes nothing; only A's outcome is read.
    let notes = apply_all(&run);
    let (now, _) = step(&mut run, 30);
    for n in of_event(&notes, &a) {
        assert!(deliver(&run.kv, &n, now));
    }
    assert_eq!(state_of(&run, "200", "D1"), Some("failed"));
    // A license comes free; D1 is assigned again (B), Apple applies it, a full refresh sees it.
    {
        let mut w = run.world.lock().unwrap();
        let token = w.token.clone();
        w.model
            .remove_assignments(&token, vec![AssignmentSpec::device("200", "F0")])
            .unwrap();
        w.observe();
    }
    step(&mut run, 10);
    run.refresh(true);
    let (now, mut b) = step(&mut run, 10);
    block_on(assignment::assign(
        &run.kv,
        &run.client(),
        &body,
        now,
        &mut b,
    ))
    .unwrap();
    let later = apply_all(&run);
    step(&mut run, 10);
    run.refresh(true);
    assert!(copy_made_by(&run, "200", "D1").is_some(), "Apple holds it");
    // Now R's outcome: it took nothing.
    let (now, _) = step(&mut run, 30);
    for n in of_event(&notes, &r) {
        assert!(deliver(&run.kv, &n, now));
    }
    assert!(copy_made_by(&run, "200", "D1").is_some(), "Apple holds it");
    assert_eq!(notices(&run), Vec::new(), "Apple took nothing away");
    // B's outcome, and the books against Apple.
    let (now, _) = step(&mut run, 30);
    for n in &later {
        assert!(deliver(&run.kv, n, now));
    }
    assert_eq!(state_of(&run, "200", "D1"), Some("confirmed"));
    step(&mut run, 60);
    run.refresh(true);
    assert_eq!(notices(&run), Vec::new());
    let removals = run.world.lock().unwrap().removals.clone();
    assert_eq!(
        removals.get(&("200".into(), "D1".into())),
        None,
        "{removals:?}"
    );
    assert!(copy_made_by(&run, "200", "D1").is_some());
}

/// Found by `every_removal_has_exactly_one_notice` (seed 517 of 401..600): a revoke sent
/// while the device's associate was pending took the license once Apple applied both; its
/// outcome, read first, found nothing in the books to take (the associate's success owes the
/// notice). Reading the associate's outcome was killed after it closed the open entry and
/// before it recorded that notice: read again, nothing was left to owe it, and the removal
/// had none. The open entry is closed only once the notice is recorded.
#[test]
fn an_associate_outcome_killed_before_its_taken_notice_keeps_it() {
    for n in 0..16 {
        let mut run = Run::new(20);
        let step = |run: &mut Run, secs: u64| {
            run.clock.advance(std::time::Duration::from_secs(secs));
            (run.now(), run.budget())
        };
        let apply_all = |run: &Run| -> Vec<Outgoing> {
            let mut w = run.world.lock().unwrap();
            w.apply_scheduled();
            std::mem::take(&mut w.notes)
        };
        let body = assign_body("200", &["D1".into()]);
        let (now, mut b) = step(&mut run, 10);
        let a = block_on(assignment::assign(
            &run.kv,
            &run.client(),
            &body,
            now,
            &mut b,
        ))
        .unwrap();
        let a = a.events[0].id.clone();
        let (now, mut b) = step(&mut run, 10);
        block_on(assignment::revoke(
            &run.kv,
            &run.client(),
            &body,
            now,
            &mut b,
        ))
        .unwrap();
        // Apple applies the associate, then the revoke; the revoke's outcome is read first.
        let notes = apply_all(&run);
        let (now, _) = step(&mut run, 30);
        for note in notes
            .iter()
            .filter(|x| x.envelope["notification"]["eventId"] != a.as_str())
        {
            assert!(deliver(&run.kv, note, now));
        }
        assert_eq!(notices(&run), Vec::new(), "the associate's success owes it");
        // The associate's outcome, read partly, then again.
        let (now, mut b) = step(&mut run, 60);
        run.kv.left.set(Some(n));
        let _ = block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b));
        run.kv.left.set(None);
        for _ in 0..3 {
            let (now, mut b) = step(&mut run, 60);
            block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b)).unwrap();
        }
        run.refresh(true);
        let removals = run.world.lock().unwrap().removals.clone();
        assert_eq!(removals.values().sum::<u32>(), 1, "Apple took it once");
        assert_eq!(
            notices(&run),
            vec![("200".to_string(), "D1".to_string(), "api".to_string())],
            "killed after {n} writes"
        );
        assert_eq!(state_of(&run, "200", "D1"), None);
    }
}

/// The e2e model test's exact mode, seeds 58 and 65: a revoke of a license whose assignment's
/// answer was lost (Apple applied it; its notification never came) took the license with no
/// notice: the entry was `unknown`, so neither the ledger nor the copy knew Apple held it when
/// the removal's outcome was read. A removal of ours now looks an unknown entry up at Apple
/// before it is sent, and confirms it when Apple holds it.
#[test]
fn a_revoke_of_a_license_whose_assign_answer_was_lost_gives_its_notice() {
    let run = Run::new(11);
    run.world
        .lock()
        .unwrap()
        .forced
        .push_back(Fault::AppliedThen500);
    let now = run.now();
    let mut b = run.budget();
    let out = block_on(assignment::assign(
        &run.kv,
        &run.client_once(),
        &assign_body("100", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    assert_eq!(out.unknown.len(), 1);
    assert_eq!(state_of(&run, "100", "D1"), Some("unknown"));
    // Apple applies the associate; its notification is lost.
    {
        let mut w = run.world.lock().unwrap();
        w.apply_scheduled();
        w.notes.clear();
    }
    run.clock.advance(std::time::Duration::from_secs(30));
    let now = run.now();
    let mut b = run.budget();
    let out = block_on(assignment::revoke(
        &run.kv,
        &run.client(),
        &assign_body("100", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    assert_eq!(out.events.len(), 1, "{out:?}");
    let notes: Vec<Outgoing> = {
        let mut w = run.world.lock().unwrap();
        w.apply_scheduled();
        assert_eq!(
            w.removals.get(&("100".to_string(), "D1".to_string())),
            Some(&1),
            "Apple took it away"
        );
        std::mem::take(&mut w.notes)
    };
    for n in &notes {
        assert!(deliver(&run.kv, n, run.now()));
    }
    assert_eq!(
        notices(&run),
        vec![("100".to_string(), "D1".to_string(), "api".to_string())]
    );
    assert_eq!(state_of(&run, "100", "D1"), None, "Apple does not hold it");
}

/// Seed 994 of both model tests (and seed 48 of the e2e model test's exact mode): an assign
/// whose answer was lost (`unknown`: Apple accepted it and had not applied it yet), then a revoke
/// of ours. Its lookup found nothing held, so the disassociate was sent; Apple applied the
/// associate, then the disassociate, which took the license. The associate's notification
/// never came, the revoke's outcome found no claim in the ledger or the copy, and the unknown
/// entry was later released as never applied: no notice. Nothing could have told (a removal
/// of a license not held succeeds too). The revoke now waits for such a subject (`waiting`,
/// nothing sent): the entry settles first (here confirmed), and a revoke asked again takes a
/// license the books know, with its one notice.
#[test]
fn a_revoke_waits_for_an_assignment_whose_answer_was_lost_that_apple_does_not_hold_yet() {
    let run = Run::new(11);
    let pair = ("100".to_string(), "D1".to_string());
    run.world
        .lock()
        .unwrap()
        .forced
        .push_back(Fault::AppliedThen500);
    let now = run.now();
    let mut b = run.budget();
    let out = block_on(assignment::assign(
        &run.kv,
        &run.client_once(),
        &assign_body("100", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    assert_eq!(out.unknown.len(), 1);
    assert_eq!(state_of(&run, "100", "D1"), Some("unknown"));
    // Revoked before Apple applied the associate: the lookup finds nothing held.
    run.clock.advance(std::time::Duration::from_secs(30));
    let now = run.now();
    let mut b = run.budget();
    let out = block_on(assignment::revoke(
        &run.kv,
        &run.client(),
        &assign_body("100", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    assert!(out.events.is_empty(), "nothing sent: {out:?}");
    assert_eq!(out.waiting, vec![json!({"serialNumber": "D1"})]);
    // Apple applies what it accepted, in that order; the associate's notification is lost.
    let notes: Vec<Outgoing> = {
        let mut w = run.world.lock().unwrap();
        for (i, id) in std::mem::take(&mut w.scheduled).iter().enumerate() {
            w.apply(id);
            if i == 0 {
                w.notes.clear();
            }
        }
        std::mem::take(&mut w.notes)
    };
    for n in &notes {
        assert!(deliver(&run.kv, n, run.now()));
    }
    // The ledger settles the unknown entry (past the give-up time: held, or never applied).
    run.clock.advance(std::time::Duration::from_secs(16 * 60));
    let now = run.now();
    let mut b = Budget::new(now, 600, 1000);
    block_on(ledger::settle_all(&run.kv, |_| run.client(), now, &mut b)).unwrap();
    // Whatever Apple still holds is revoked again.
    if run.world.lock().unwrap().held.contains(&pair) {
        assert_eq!(state_of(&run, "100", "D1"), Some("confirmed"));
        let now = run.now();
        let mut b = run.budget();
        let out = block_on(assignment::revoke(
            &run.kv,
            &run.client(),
            &assign_body("100", &["D1".into()]),
            now,
            &mut b,
        ))
        .unwrap();
        assert_eq!(out.events.len(), 1, "{out:?}");
        let notes: Vec<Outgoing> = {
            let mut w = run.world.lock().unwrap();
            w.apply_scheduled();
            std::mem::take(&mut w.notes)
        };
        for n in &notes {
            assert!(deliver(&run.kv, n, run.now()));
        }
    }
    let removals = run.world.lock().unwrap().removals.get(&pair).copied();
    assert_eq!(removals, Some(1), "Apple took it away once");
    assert_eq!(
        notices(&run),
        vec![("100".to_string(), "D1".to_string(), "api".to_string())],
        "one notice for the one removal"
    );
    assert_eq!(state_of(&run, "100", "D1"), None, "Apple does not hold it");
}

/// The e2e model test's exact mode, seed 48 (once seed 994 was fixed): an assign whose answer
/// was lost, confirmed by a lookup and revoked (R1); assigned again, that answer lost too; Apple
/// applied R1, then the new associate. A revoke (R2) looked the unknown entry up (held) and
/// confirmed it over the `revoking` entry R1 left, keeping R1's entry's time of assignment; read
/// late, R1's outcome then took the entry R2 was revoking (its assignment looked older than R1),
/// and R2's outcome found nothing: its notice was lost. The confirmed entry records when its own
/// request was sent (after R1 was accepted): R1 takes nothing of it, and each removal has its
/// notice.
#[test]
fn a_late_revoke_outcome_does_not_take_an_unknown_assignment_confirmed_after_it() {
    let run = Run::new(11);
    let pair = ("200".to_string(), "D1".to_string());
    let body = assign_body("200", &["D1".into()]);
    let assign_lost = |run: &Run| {
        run.world
            .lock()
            .unwrap()
            .forced
            .push_back(Fault::AppliedThen500);
        let now = run.now();
        let mut b = run.budget();
        let out = block_on(assignment::assign(
            &run.kv,
            &run.client_once(),
            &body,
            now,
            &mut b,
        ))
        .unwrap();
        assert_eq!(out.unknown.len(), 1, "{out:?}");
        assert_eq!(state_of(run, "200", "D1"), Some("unknown"));
    };
    let revoke = |run: &Run| {
        run.clock.advance(std::time::Duration::from_secs(30));
        let now = run.now();
        let mut b = run.budget();
        let out = block_on(assignment::revoke(
            &run.kv,
            &run.client(),
            &body,
            now,
            &mut b,
        ))
        .unwrap();
        assert_eq!(out.events.len(), 1, "{out:?}");
    };
    assign_lost(&run);
    {
        let mut w = run.world.lock().unwrap();
        w.apply_scheduled();
        w.notes.clear();
    }
    // R1: the lookup confirms the entry, the revoke is sent; Apple has not applied it yet.
    revoke(&run);
    run.clock.advance(std::time::Duration::from_secs(30));
    assign_lost(&run);
    // Apple applies R1 (its notification waits), then the new associate (its notification is
    // lost).
    let r1_notes: Vec<Outgoing> = {
        let mut w = run.world.lock().unwrap();
        let scheduled = std::mem::take(&mut w.scheduled);
        assert_eq!(scheduled.len(), 2);
        w.apply(&scheduled[0]);
        let notes = std::mem::take(&mut w.notes);
        w.apply(&scheduled[1]);
        w.notes.clear();
        notes
    };
    assert!(run.world.lock().unwrap().held.contains(&pair));
    // R2: the lookup confirms the new assignment, the revoke is sent.
    revoke(&run);
    for n in &r1_notes {
        assert!(deliver(&run.kv, n, run.now()));
    }
    let notes: Vec<Outgoing> = {
        let mut w = run.world.lock().unwrap();
        w.apply_scheduled();
        std::mem::take(&mut w.notes)
    };
    for n in &notes {
        assert!(deliver(&run.kv, n, run.now()));
    }
    let removals = run.world.lock().unwrap().removals.get(&pair).copied();
    assert_eq!(removals, Some(2), "Apple took it away twice");
    let api = ("200".to_string(), "D1".to_string(), "api".to_string());
    assert_eq!(
        notices(&run),
        vec![api.clone(), api],
        "one notice per removal"
    );
    assert_eq!(state_of(&run, "200", "D1"), None, "Apple does not hold it");
}

/// Found by the notice invariant (seeds 407 and 413 of `every_removal_has_exactly_one_notice`):
/// a revoke of ours, then an assignment of the same license admitted after it whose event we
/// did not know when the revoke's outcome was read (its answer was lost: the entry `unknown`;
/// or the invocation stopped before the event's record was written). Apple applied them in the
/// order it accepted them: the revoke found nothing, the associate assigned. A refresh put the
/// license in the copy as ours; the revoke's outcome then took it out and gave an `api` notice,
/// and the later revoke that did take it gave a second. An open entry admitted after the
/// removal was accepted records a request Apple applied after it: the removal took nothing.
#[test]
fn a_removal_read_after_an_assignment_admitted_later_whose_event_we_did_not_know_takes_nothing() {
    for lost_answer in [true, false] {
        let mut run = Run::new(11);
        let now = run.now();
        let mut b = run.budget();
        block_on(assignment::revoke(
            &run.kv,
            &run.client(),
            &assign_body("200", &["D1".into()]),
            now,
            &mut b,
        ))
        .unwrap();
        run.clock.advance(std::time::Duration::from_secs(20));
        let now = run.now();
        let mut b = run.budget();
        if lost_answer {
            run.world
                .lock()
                .unwrap()
                .forced
                .push_back(Fault::AppliedThenDropped);
            let out = block_on(assignment::assign(
                &run.kv,
                &run.client_once(),
                &assign_body("200", &["D1".into()]),
                now,
                &mut b,
            ))
            .unwrap();
            assert_eq!(out.unknown.len(), 1, "{out:?}");
            assert_eq!(state_of(&run, "200", "D1"), Some("unknown"));
        } else {
            let out = block_on(assignment::assign(
                &run.kv,
                &run.client(),
                &assign_body("200", &["D1".into()]),
                now,
                &mut b,
            ))
            .unwrap();
            // Stopped after the entry named the event, before its record was written.
            run.kv.delete(&keys::event(&out.events[0].id)).unwrap();
            assert_eq!(state_of(&run, "200", "D1"), Some("pending"));
        }
        {
            let mut w = run.world.lock().unwrap();
            // In the order Apple accepted them: the revoke finds nothing, the associate assigns.
            w.apply_scheduled();
            w.notes.clear();
            assert!(w.removals.is_empty(), "Apple took nothing away");
        }
        run.clock.advance(std::time::Duration::from_secs(30));
        run.refresh(true);
        assert!(
            matches!(copy_made_by(&run, "200", "D1"), Some(MadeBy::Ours { .. })),
            "the copy shows it as ours: {:?}",
            copy_made_by(&run, "200", "D1")
        );
        run.clock.advance(std::time::Duration::from_secs(60));
        let now = run.now();
        let mut b = run.budget();
        block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b)).unwrap();
        assert!(
            notices(&run).is_empty(),
            "lost answer {lost_answer}: {:?}",
            notices(&run)
        );
        assert!(
            copy_made_by(&run, "200", "D1").is_some(),
            "lost answer {lost_answer}: still in the copy"
        );
    }
}

/// Found by the notice invariant (seed 424 of `every_removal_has_exactly_one_notice`): an
/// associate's outcome was read by an invocation killed after it confirmed the entry and before
/// it closed the open entry. A revoke of ours, accepted after the associate, took the license;
/// a full refresh found the confirmed entry gone (its notice). The associate's outcome, read
/// again, found the open entry still waiting on it and confirmed the license once more (the
/// ledger held what Apple did not), and the revoke's outcome then gave a second notice. A
/// refresh forgetting a confirmed entry now closes the open entry it left behind.
#[test]
fn a_confirmation_killed_before_its_close_is_not_revived_after_a_refresh_found_it_gone() {
    let mut run = Run::new(11);
    let now = run.now();
    let mut b = run.budget();
    let out = block_on(assignment::assign(
        &run.kv,
        &run.client(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    assert_eq!(out.events.len(), 1);
    run.clock.advance(std::time::Duration::from_secs(20));
    let now = run.now();
    let mut b = run.budget();
    let out = block_on(assignment::revoke(
        &run.kv,
        &run.client(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    assert_eq!(out.events.len(), 1, "{out:?}");
    // Apple applies the associate; its notification is read by an invocation killed after
    // the confirmed entry was written (the first write), before the open entry was closed.
    let notes: Vec<Outgoing> = {
        let mut w = run.world.lock().unwrap();
        let id = w.scheduled.remove(0);
        w.apply(&id);
        std::mem::take(&mut w.notes)
    };
    assert_eq!(notes.len(), 1);
    run.kv.left.set(Some(1));
    assert!(!deliver(&run.kv, &notes[0], run.now()));
    run.kv.left.set(None);
    assert_eq!(state_of(&run, "200", "D1"), Some("pending"), "left open");
    assert!(
        ledger::settled(&run.kv, ACCOUNT, "200:STDQ", &d("D1"))
            .unwrap()
            .is_some_and(|e| e.state == LedgerState::Confirmed),
        "and confirmed"
    );
    // Apple applies the revoke (its notification is lost); a full refresh finds it gone.
    {
        let mut w = run.world.lock().unwrap();
        w.apply_scheduled();
        w.notes.clear();
        assert_eq!(w.removals.len(), 1, "Apple took it away");
    }
    run.clock.advance(std::time::Duration::from_secs(60));
    run.refresh(true);
    // The associate's outcome is read again (Apple's retry), then the revoke's.
    assert!(deliver(&run.kv, &notes[0], run.now()));
    for _ in 0..2 {
        run.clock.advance(std::time::Duration::from_secs(16 * 60));
        let now = run.now();
        let mut b = run.budget();
        block_on(event::poll_due(&run.kv, |_| run.client(), now, &mut b)).unwrap();
        block_on(ledger::settle_all(&run.kv, |_| run.client(), now, &mut b)).unwrap();
    }
    assert_eq!(state_of(&run, "200", "D1"), None, "Apple does not hold it");
    assert_eq!(
        notices(&run).len(),
        1,
        "one removal, one notice: {:?}",
        notices(&run)
    );
}

/// Found by the notice invariant (seed 450 of `every_removal_has_exactly_one_notice`): a
/// revoke's outcome read by an invocation killed after it took the license out of the ledger
/// and the copy, before its notice (owed on its record). The license was then assigned again
/// by a request of ours accepted after the revoke, and the copy showed that assignment when the
/// revoke's outcome was read again: the outcome left the copy's entry alone (rightly: the
/// removal came first) and dropped the notice it owed with it. A notice owed stays owed when
/// a newer request of ours came after the removal.
#[test]
fn a_removal_killed_before_its_notice_keeps_it_after_a_later_assignment_of_ours() {
    let mut run = Run::new(11);
    let assign = |run: &mut Run| {
        let now = run.now();
        let mut b = run.budget();
        let out = block_on(assignment::assign(
            &run.kv,
            &run.client(),
            &assign_body("200", &["D1".into()]),
            now,
            &mut b,
        ))
        .unwrap();
        assert_eq!(out.events.len(), 1, "{out:?}");
        let notes: Vec<Outgoing> = {
            let mut w = run.world.lock().unwrap();
            w.apply_scheduled();
            std::mem::take(&mut w.notes)
        };
        notes
    };
    for n in assign(&mut run) {
        assert!(deliver(&run.kv, &n, run.now()));
    }
    assert_eq!(state_of(&run, "200", "D1"), Some("confirmed"));
    run.clock.advance(std::time::Duration::from_secs(30));
    let now = run.now();
    let mut b = run.budget();
    block_on(assignment::revoke(
        &run.kv,
        &run.client(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    let revoked: Vec<Outgoing> = {
        let mut w = run.world.lock().unwrap();
        w.apply_scheduled();
        std::mem::take(&mut w.notes)
    };
    assert_eq!(revoked.len(), 1);
    // Read by an invocation killed after three writes: owed on the record, out of the ledger
    // and the copy, no notice yet.
    run.kv.left.set(Some(3));
    assert!(!deliver(&run.kv, &revoked[0], run.now()));
    run.kv.left.set(None);
    assert_eq!(state_of(&run, "200", "D1"), None);
    assert_eq!(copy_made_by(&run, "200", "D1"), None);
    assert!(notices(&run).is_empty());
    // Assigned again (accepted after the revoke); a full refresh puts it in the copy.
    run.clock.advance(std::time::Duration::from_secs(30));
    let again = assign(&mut run);
    run.clock.advance(std::time::Duration::from_secs(30));
    run.refresh(true);
    assert!(copy_made_by(&run, "200", "D1").is_some());
    // Apple sends the revoke's notification again, then the new associate's.
    assert!(deliver(&run.kv, &revoked[0], run.now()));
    for n in &again {
        assert!(deliver(&run.kv, n, run.now()));
    }
    assert_eq!(
        notices(&run),
        vec![("200".to_string(), "D1".to_string(), "api".to_string())],
        "Apple took it away once"
    );
    assert_eq!(run.world.lock().unwrap().removals.len(), 1);
    assert_eq!(state_of(&run, "200", "D1"), Some("confirmed"));
    assert!(copy_made_by(&run, "200", "D1").is_some(), "Apple holds it");
}

/// Found by the model (seed 502 of `ledger_matches_apple_after_random_operations_and_faults`):
/// an associate whose first attempt Apple applied before the connection dropped, resent by the
/// client's retries and refused with an `errorNumber` (429) on the last attempt. The refusal
/// was taken as "nothing happened": the entry was released while Apple held the license, which
/// the next refresh then counted as foreign. A refusal after an unclear attempt is unclear: the
/// entry stays `unknown` until Apple's assignments say, and settling confirms it.
#[test]
fn a_refusal_after_an_applied_attempt_whose_answer_was_lost_leaves_it_unknown() {
    let run = Run::new(11);
    let client = run.client().with_policy(vpp_apple::RetryPolicy {
        max_attempts: 2,
        ..vpp_apple::RetryPolicy::default()
    });
    run.world
        .lock()
        .unwrap()
        .forced
        .extend([Fault::AppliedThenDropped, Fault::RateLimited]);
    let now = run.now();
    let mut b = run.budget();
    let out = block_on(assignment::assign(
        &run.kv,
        &client,
        &assign_body("100", &["D1".into()]),
        now,
        &mut b,
    ));
    let out = out.unwrap();
    assert_eq!(
        (out.events.len(), out.unknown.len(), out.rejected.len()),
        (0, 1, 0),
        "{out:?}"
    );
    assert_eq!(state_of(&run, "100", "D1"), Some("unknown"));
    run.world.lock().unwrap().apply_scheduled();
    run.clock.advance(std::time::Duration::from_secs(60));
    let now = run.now();
    let mut b = run.budget();
    block_on(ledger::settle_all(&run.kv, |_| run.client(), now, &mut b)).unwrap();
    assert_eq!(
        state_of(&run, "100", "D1"),
        Some("confirmed"),
        "Apple holds it"
    );
}

/// Found by re-running seeds 1..=600 after `a_removal_killed_before_its_notice_keeps_it_after_a_later_assignment_of_ours`
/// (seeds 379 and 511 of `every_removal_has_exactly_one_notice`): a revoke of a license Apple
/// did not hold was sent twice (the first answer lost) and the license was then assigned again
/// by a request of ours Apple accepted after both. The first sending's notification (an event
/// we cannot place) found that later assignment held and owed its notice on the revoke we know,
/// still pending, whose outcome then gave it though Apple took nothing. What a removal we
/// cannot place owes a pending removal of ours is now judged as that removal sees it (asked
/// when it was): an assignment of ours accepted after it is not what it takes.
#[test]
fn a_twin_removal_owes_nothing_for_an_assignment_of_ours_accepted_after_it() {
    let mut run = Run::new(11);
    run.world
        .lock()
        .unwrap()
        .forced
        .push_back(Fault::AppliedThen500);
    let now = run.now();
    let mut b = run.budget();
    block_on(assignment::revoke(
        &run.kv,
        &run.client(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    let mut events = run.world.lock().unwrap().model.pending_events();
    assert_eq!(
        events.len(),
        2,
        "asked twice: the answer to the first was lost"
    );
    events.sort_by_key(|id| event::load(&run.kv, id).unwrap().is_some());
    let (twin, ours) = (events[0].clone(), events[1].clone());
    assert!(event::load(&run.kv, &twin).unwrap().is_none());
    // Apple applies both (nothing to take), then an assignment of ours accepted after them.
    let revoked: Vec<Outgoing> = {
        let mut w = run.world.lock().unwrap();
        w.apply_scheduled();
        std::mem::take(&mut w.notes)
    };
    run.clock.advance(std::time::Duration::from_secs(30));
    let now = run.now();
    let mut b = run.budget();
    let out = block_on(assignment::assign(
        &run.kv,
        &run.client(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    assert_eq!(out.events.len(), 1);
    let assigned: Vec<Outgoing> = {
        let mut w = run.world.lock().unwrap();
        w.apply_scheduled();
        assert!(w.removals.is_empty(), "Apple took nothing away");
        std::mem::take(&mut w.notes)
    };
    run.clock.advance(std::time::Duration::from_secs(30));
    run.refresh(true);
    assert!(copy_made_by(&run, "200", "D1").is_some());
    // The twin's notification first (our revoke still pending), then ours, then the assign's.
    let by_event = |id: &str| {
        revoked
            .iter()
            .find(|n| n.envelope["notification"]["eventId"] == id)
            .cloned()
            .unwrap()
    };
    assert!(deliver(&run.kv, &by_event(&twin), run.now()));
    assert!(deliver(&run.kv, &by_event(&ours), run.now()));
    for n in &assigned {
        assert!(deliver(&run.kv, n, run.now()));
    }
    assert!(notices(&run).is_empty(), "{:?}", notices(&run));
    assert_eq!(state_of(&run, "200", "D1"), Some("confirmed"));
}

/// Found by seeds 601..=800 of `every_removal_has_exactly_one_notice` (seed 743): a revoke of
/// ours took a license; before its outcome was read, a full refresh dropped the license from
/// the copy, it was assigned again (the revoke's notice then owed on its record) and a second
/// revoke of ours was asked. The first revoke's outcome, read late, took the second one's
/// `revoking` entry and the copy's entry of the new assignment (Apple applied it after that
/// revoke): the second removal found nothing and had no notice. A removal of ours accepted
/// before the assignment a `revoking` entry records does not take it.
#[test]
fn a_late_revoke_outcome_does_not_take_a_later_assignment_being_revoked() {
    let mut run = Run::new(11);
    let revoke = |run: &mut Run| -> Outgoing {
        run.clock.advance(std::time::Duration::from_secs(30));
        let now = run.now();
        let mut b = run.budget();
        let out = block_on(assignment::revoke(
            &run.kv,
            &run.client(),
            &assign_body("200", &["D1".into()]),
            now,
            &mut b,
        ))
        .unwrap();
        assert_eq!(out.events.len(), 1, "{out:?}");
        let mut w = run.world.lock().unwrap();
        w.apply_scheduled();
        let mut notes = std::mem::take(&mut w.notes);
        assert_eq!(notes.len(), 1);
        notes.remove(0)
    };
    let assign = |run: &mut Run| {
        run.clock.advance(std::time::Duration::from_secs(30));
        let now = run.now();
        let mut b = run.budget();
        let out = block_on(assignment::assign(
            &run.kv,
            &run.client(),
            &assign_body("200", &["D1".into()]),
            now,
            &mut b,
        ))
        .unwrap();
        assert_eq!(out.events.len(), 1, "{out:?}");
        let notes: Vec<Outgoing> = {
            let mut w = run.world.lock().unwrap();
            w.apply_scheduled();
            std::mem::take(&mut w.notes)
        };
        for n in &notes {
            assert!(deliver(&run.kv, n, run.now()));
        }
        assert_eq!(state_of(run, "200", "D1"), Some("confirmed"));
    };
    assign(&mut run);
    // The first revoke takes it; its outcome is not read yet.
    let first = revoke(&mut run);
    run.clock.advance(std::time::Duration::from_secs(30));
    run.refresh(true);
    assert_eq!(copy_made_by(&run, "200", "D1"), None, "gone from the copy");
    // Assigned again, and a second revoke asked (not yet applied by Apple).
    assign(&mut run);
    run.clock.advance(std::time::Duration::from_secs(30));
    let now = run.now();
    let mut b = run.budget();
    block_on(assignment::revoke(
        &run.kv,
        &run.client(),
        &assign_body("200", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    assert_eq!(state_of(&run, "200", "D1"), Some("revoking"));
    // The first revoke's outcome, late: it took the earlier license only.
    assert!(deliver(&run.kv, &first, run.now()));
    assert_eq!(
        state_of(&run, "200", "D1"),
        Some("revoking"),
        "still being revoked"
    );
    assert!(
        copy_made_by(&run, "200", "D1").is_some(),
        "Apple still holds it"
    );
    // Apple applies the second revoke; its outcome gives the second notice.
    let second: Vec<Outgoing> = {
        let mut w = run.world.lock().unwrap();
        w.apply_scheduled();
        std::mem::take(&mut w.notes)
    };
    for n in &second {
        assert!(deliver(&run.kv, n, run.now()));
    }
    assert_eq!(
        run.world.lock().unwrap().removals.values().sum::<u32>(),
        2,
        "Apple took it away twice"
    );
    assert_eq!(
        notices(&run).len(),
        2,
        "two removals, two notices: {:?}",
        notices(&run)
    );
    assert_eq!(state_of(&run, "200", "D1"), None);
}

/// Found by seeds 801..=1000 of `every_removal_has_exactly_one_notice` (seed 982): the late
/// notification of an associate we never learned of (a request whose answer was lost, long
/// since applied, then revoked with its notice) arrived while the same license was queued
/// again, not yet sent. It confirmed the queued entry: the ledger held a license Apple did not,
/// and the next full refresh gave a second notice. An associate we cannot place settles only an
/// entry whose request was sent and whose answer was lost (`unknown`, as `ledger::fail` has it),
/// never a queued one.
#[test]
fn a_late_associate_we_never_learned_of_does_not_confirm_a_queued_entry() {
    let mut run = Run::new(11);
    run.world
        .lock()
        .unwrap()
        .forced
        .push_back(Fault::AppliedThen500);
    let now = run.now();
    let mut b = run.budget();
    let out = block_on(assignment::assign(
        &run.kv,
        &run.client_once(),
        &assign_body("100", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    assert_eq!(out.unknown.len(), 1);
    // Apple applies it; its notification comes late.
    let late: Vec<Outgoing> = {
        let mut w = run.world.lock().unwrap();
        w.apply_scheduled();
        std::mem::take(&mut w.notes)
    };
    assert_eq!(late.len(), 1);
    // A revoke looks it up (held), takes it, and gives its notice.
    run.clock.advance(std::time::Duration::from_secs(30));
    let now = run.now();
    let mut b = run.budget();
    block_on(assignment::revoke(
        &run.kv,
        &run.client(),
        &assign_body("100", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    let revoked: Vec<Outgoing> = {
        let mut w = run.world.lock().unwrap();
        w.apply_scheduled();
        std::mem::take(&mut w.notes)
    };
    for n in &revoked {
        assert!(deliver(&run.kv, n, run.now()));
    }
    assert_eq!(notices(&run).len(), 1, "{:?}", notices(&run));
    assert_eq!(state_of(&run, "100", "D1"), None);
    // Assigned again, queued (no Apple call left in this request).
    run.clock.advance(std::time::Duration::from_secs(30));
    let now = run.now();
    let mut b = Budget::new(now, 20, 0);
    let out = block_on(assignment::assign(
        &run.kv,
        &run.client(),
        &assign_body("100", &["D1".into()]),
        now,
        &mut b,
    ))
    .unwrap();
    assert_eq!(out.queued, 1, "{out:?}");
    assert_eq!(state_of(&run, "100", "D1"), Some("queued"));
    // The first associate's notification arrives now.
    assert!(deliver(&run.kv, &late[0], run.now()));
    assert_eq!(state_of(&run, "100", "D1"), Some("queued"), "not confirmed");
    run.refresh(true);
    assert_eq!(
        notices(&run).len(),
        1,
        "one removal, one notice: {:?}",
        notices(&run)
    );
}
