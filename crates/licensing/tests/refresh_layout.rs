//! Refresh into the size-bounded copy against a scripted Apple: structural bounds that do not
//! grow with the number of assets, the fewest Apple calls for a full and an incremental read,
//! an incremental refresh rewriting only what changed, and a full read during which Apple's
//! data changes never dropping our own licenses.

use chrono::{TimeZone, Utc};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use vpp_apple::testing::{block_on, json as apple_json, FakeClock, ScriptedTransport};
use vpp_apple::{AppleRequest, Client, Clock, Method, Target};
use vpp_licensing::job::{Budget, Job};
use vpp_licensing::model::*;
use vpp_licensing::refresh::{self, SliceEnd};
use vpp_licensing::{copy, licenses};
use vpp_store::{get_json, keys, set_json, Kv, KvError, MemoryKv};

const ACCOUNT: &str = "acc1";

/// A change to Apple's data made while a read is under way.
type Change = Box<dyn FnOnce(&mut Location) + Send>;

/// A location at Apple: assets (adamId → assigned count is derived), assignments with the
/// version that last changed them.
#[derive(Default)]
struct Location {
    assets: Vec<String>,
    /// (adamId, serial, modified at version).
    assignments: Vec<(String, String, u64)>,
    version: u64,
    page_size: usize,
    /// Run once after the assignments page with this index was served (a change mid-read).
    after_page: Option<(u32, Change)>,
    calls: Vec<String>,
}

impl Location {
    fn assigned(&self, adam: &str) -> usize {
        self.assignments.iter().filter(|a| a.0 == adam).count()
    }
}

type Apple = Arc<Mutex<Location>>;

fn query<'a>(q: &'a [(String, String)], k: &str) -> Option<&'a str> {
    q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
}

fn page_of<T: Clone>(items: &[T], size: usize, index: usize) -> (Vec<T>, Option<usize>) {
    let start = index * size;
    let page = items.iter().skip(start).take(size).cloned().collect();
    let next = (start + size < items.len()).then_some(index + 1);
    (page, next)
}

fn client(apple: &Apple) -> Client<ScriptedTransport, FakeClock> {
    let a = apple.clone();
    let t = ScriptedTransport::new(move |req: &AppleRequest, _n| {
        let mut loc = a.lock().unwrap();
        let (path, q) = match &req.target {
            Target::Api { path, query } => (path.clone(), query.clone()),
            Target::Absolute(url) => {
                loc.calls.push("lookup".into());
                let ids = url
                    .split("id=")
                    .nth(1)
                    .unwrap_or("")
                    .split('&')
                    .next()
                    .unwrap_or("");
                let results: serde_json::Map<String, Value> = ids
                    .split(',')
                    .filter(|i| !i.is_empty())
                    .map(|i| (i.to_string(), json!({"name": format!("App {i}")})))
                    .collect();
                return Ok(apple_json(200, json!({ "results": results })));
            }
        };
        loc.calls.push(path.clone());
        let index: usize = query(&q, "pageIndex")
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let version = format!("v{}", loc.version);
        match (req.method, path.as_str()) {
            (Method::Get, "service/config") => Ok(apple_json(
                200,
                json!({"limits": {"maxSerialNumbers": 1000}, "urls": {}}),
            )),
            (Method::Get, "client/config") => Ok(apple_json(
                200,
                json!({"locationName": "Main", "countryISO2ACode": "US"}),
            )),
            (Method::Get, "assets") => {
                let (page, next) = page_of(&loc.assets, loc.page_size, index);
                let assets: Vec<Value> = page
                    .iter()
                    .map(|id| {
                        let used = loc.assigned(id) as i64;
                        json!({"adamId": id, "pricingParam": "STDQ", "productType": "App",
                            "assignedCount": used, "availableCount": 1_000_000 - used,
                            "totalCount": 1_000_000, "retiredCount": 0,
                            "deviceAssignable": true, "revocable": true})
                    })
                    .collect();
                let mut body = json!({"assets": assets, "versionId": version});
                if let Some(n) = next {
                    body["nextPageIndex"] = json!(n);
                }
                Ok(apple_json(200, body))
            }
            (Method::Get, "assignments") => {
                let since: Option<u64> = query(&q, "sinceVersionId")
                    .and_then(|v| v.trim_start_matches('v').parse().ok());
                let items: Vec<(String, String, u64)> = loc
                    .assignments
                    .iter()
                    .filter(|a| since.is_none_or(|s| a.2 > s))
                    .cloned()
                    .collect();
                let (page, next) = page_of(&items, loc.page_size, index);
                let list: Vec<Value> = page
                    .iter()
                    .map(|(adam, serial, _)| {
                        json!({"adamId": adam, "pricingParam": "STDQ", "serialNumber": serial})
                    })
                    .collect();
                let mut body = json!({"assignments": list, "versionId": version});
                if let Some(n) = next {
                    body["nextPageIndex"] = json!(n);
                }
                if loc
                    .after_page
                    .as_ref()
                    .is_some_and(|(p, _)| *p as usize == index)
                {
                    if let Some((_, f)) = loc.after_page.take() {
                        f(&mut loc);
                    }
                }
                Ok(apple_json(200, body))
            }
            (Method::Get, "users") => Ok(apple_json(
                200,
                json!({"users": [], "versionId": format!("u{}", loc.version)}),
            )),
            _ => Ok(apple_json(
                400,
                json!({"errorNumber": 9602, "errorMessage": "unexpected"}),
            )),
        }
    });
    Client::new(t, FakeClock::at(clock_start()))
        .with_policy(vpp_apple::RetryPolicy::none())
        .with_pacer(vpp_apple::Pacer::unlimited())
}

/// Where every client's fake clock stands (each invocation makes a fresh client).
fn clock_start() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 6, 1, 0, 0, 0).unwrap()
}

fn location(assets: usize, assignments: usize, page_size: usize) -> Apple {
    let mut loc = Location {
        page_size,
        version: 1,
        ..Location::default()
    };
    loc.assets = (0..assets).map(|i| format!("{}", 100_000 + i)).collect();
    loc.assignments = (0..assignments)
        .map(|i| (format!("{}", 100_000 + i % assets), format!("SER{i:07}"), 1))
        .collect();
    Arc::new(Mutex::new(loc))
}

fn account(kv: &impl Kv) {
    let account = json!({
        "id": ACCOUNT, "name": "School", "organization": "Org", "location": "Main",
        "locationId": "uid1", "country": "US", "defaultPlatform": "volumestore",
        "websiteUrl": null, "tokenExpiresAt": "2030-01-01T00:00:00Z",
        "createdAt": "2025-01-01T00:00:00Z", "updatedAt": "2025-01-01T00:00:00Z",
    });
    let account: Account = serde_json::from_value(account).unwrap();
    set_json(kv, &keys::account(ACCOUNT), &account).unwrap();
    set_json(kv, &keys::accounts(), &vec![ACCOUNT.to_string()]).unwrap();
}

/// Run a refresh job to its end in slices of `calls` Apple calls; returns the job.
fn run_refresh(kv: &impl Kv, apple: &Apple, full: bool, calls: u32) -> Job {
    let acc: Account = get_json(kv, &keys::account(ACCOUNT)).unwrap().unwrap();
    let now = clock_start();
    let mut job = Job::new("job1", "refresh", Some(ACCOUNT), "test", now);
    job.checkpoint =
        serde_json::to_value(refresh::initial_state(kv, &acc, full, now).unwrap()).unwrap();
    for _ in 0..10_000 {
        // A new invocation each slice: a fresh client, as the components make.
        let c = client(apple);
        let mut budget = Budget::new(c.clock().now(), 3600, calls);
        match block_on(refresh::run_slice(kv, &c, &mut job, "our-mdm", &mut budget)).unwrap() {
            SliceEnd::Paused => continue,
            SliceEnd::Done => return job,
            SliceEnd::Failed(f) => panic!("refresh failed: {f:?}"),
        }
    }
    panic!("refresh did not finish");
}

fn largest_value(kv: &MemoryKv) -> usize {
    kv.keys()
        .iter()
        .filter_map(|k| kv.get(k).unwrap().map(|v| v.len()))
        .max()
        .unwrap_or(0)
}

fn total_bytes(kv: &MemoryKv) -> usize {
    kv.keys()
        .iter()
        .filter_map(|k| kv.get(k).unwrap().map(|v| v.len()))
        .sum()
}

/// Structural bounds after a full refresh: few keys, each well filled and under the limit.
fn scenario(assets: usize, assignments: usize) -> (usize, usize, usize, Vec<String>) {
    scenario_in_slices(assets, assignments, 200)
}

/// [`scenario`] with at most `calls` Apple calls per invocation.
fn scenario_in_slices(
    assets: usize,
    assignments: usize,
    calls: u32,
) -> (usize, usize, usize, Vec<String>) {
    let kv = MemoryKv::default();
    account(&kv);
    let apple = location(assets, assignments, 1000);
    let job = run_refresh(&kv, &apple, true, calls);
    assert_eq!(
        job.result.as_ref().unwrap()["assignments"],
        assignments as u64
    );
    let calls = apple.lock().unwrap().calls.clone();
    (kv.keys().len(), largest_value(&kv), total_bytes(&kv), calls)
}

#[test]
fn the_copy_grows_with_bytes_not_with_assets_and_a_full_read_makes_the_fewest_calls() {
    let (keys_a, big_a, bytes_a, calls_a) = scenario(1_000, 40_000);
    let (keys_b, big_b, bytes_b, calls_b) = scenario(4_000, 40_000);
    for (keys, big, bytes) in [(keys_a, big_a, bytes_a), (keys_b, big_b, bytes_b)] {
        assert!(big < keys::VALUE_LIMIT / 2, "largest value {big}");
        // Keys ≈ bytes / shard size: on average every key holds at least 12 KiB (copy shards
        // of at least keys::COPY_SHARD_MIN_ENTRIES entries, ~20 KiB; asset pages ~30 KiB).
        assert!(
            keys <= bytes / (12 * 1024) + 8,
            "{keys} keys for {bytes} bytes"
        );
    }
    // Four times the assets, the same assignments: the keys added hold the records added
    // (small asset pages, ~100 records each), not a key per asset.
    assert!(
        keys_b <= keys_a + (bytes_b - bytes_a) / (16 * 1024) + 8,
        "{keys_a} -> {keys_b} keys for {bytes_a} -> {bytes_b} bytes"
    );
    assert!(keys_b < keys_a + 3_000 / 20, "{keys_a} -> {keys_b} keys");
    // The fewest Apple calls: one client config, the asset and assignment pages, one users
    // page, the service config (for the lookup URL) and one lookup per 100 unnamed assets.
    let count = |calls: &[String], what: &str| calls.iter().filter(|c| *c == what).count();
    for (calls, assets) in [(&calls_a, 1_000usize), (&calls_b, 4_000)] {
        assert_eq!(count(calls, "client/config"), 1, "{calls:?}");
        assert_eq!(count(calls, "assets"), assets.div_ceil(1000));
        assert_eq!(count(calls, "assignments"), 40);
        assert_eq!(count(calls, "users"), 1);
        assert_eq!(count(calls, "lookup"), assets.div_ceil(100));
        assert!(count(calls, "service/config") <= 1);
    }
}

#[test]
fn a_full_refresh_in_many_invocations_makes_exactly_the_minimum_calls() {
    // 3,000 assets and 20,000 assignments in slices of 4 Apple calls: every invocation is a new
    // client, and the name lookups come several invocations after the client config was read.
    let (_, _, _, calls) = scenario_in_slices(3_000, 20_000, 4);
    let count = |what: &str| calls.iter().filter(|c| *c == what).count();
    assert_eq!(count("client/config"), 1, "{calls:?}");
    assert_eq!(count("assets"), 3);
    assert_eq!(count("assignments"), 20);
    assert_eq!(count("users"), 1);
    assert_eq!(count("lookup"), 30);
    // Nothing else but the service config, which a direct client (no apple component to cache
    // it) reads for the lookup URL; through the apple component it is that component's
    // five-minute read (Apple's rule), not the job's.
    let minimum = 1 + 3 + 20 + 1 + 30;
    assert_eq!(
        calls.iter().filter(|c| *c != "service/config").count(),
        minimum,
        "{calls:?}"
    );
}

/// A store that records which keys were written.
#[derive(Default)]
struct Recording {
    inner: MemoryKv,
    written: Mutex<BTreeSet<String>>,
}

impl Kv for Recording {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        self.inner.get(key)
    }
    fn set(&self, key: &str, value: &[u8]) -> Result<(), KvError> {
        self.written.lock().unwrap().insert(key.to_string());
        self.inner.set(key, value)
    }
    fn delete(&self, key: &str) -> Result<(), KvError> {
        self.written.lock().unwrap().insert(key.to_string());
        self.inner.delete(key)
    }
    fn swap(&self, key: &str, expected: Option<&[u8]>, new: &[u8]) -> Result<bool, KvError> {
        self.written.lock().unwrap().insert(key.to_string());
        self.inner.swap(key, expected, new)
    }
}

#[test]
fn an_incremental_refresh_of_100_changes_makes_three_calls_and_rewrites_only_their_shards() {
    let kv = Recording::default();
    account(&kv);
    let apple = location(2_000, 60_000, 1000);
    run_refresh(&kv, &apple, true, 500);
    let before = copy::index(&kv, ACCOUNT).unwrap();
    assert!(before.copy_shards > 5, "{before:?}");
    // 100 new assignments at Apple, on 5 assets.
    {
        let mut loc = apple.lock().unwrap();
        loc.version = 2;
        for i in 0..100 {
            let adam = format!("{}", 100_000 + i % 5);
            loc.assignments.push((adam, format!("NEW{i:03}"), 2));
        }
        loc.calls.clear();
    }
    kv.written.lock().unwrap().clear();
    let job = run_refresh(&kv, &apple, false, 500);
    assert_eq!(job.result.as_ref().unwrap()["full"], false);
    let calls = apple.lock().unwrap().calls.clone();
    assert!(calls.len() <= 3, "{calls:?}");
    assert!(!calls.contains(&"lookup".to_string()));
    let written = kv.written.lock().unwrap().clone();
    let shards: BTreeSet<&String> = written
        .iter()
        .filter(|k| k.starts_with("assignments/"))
        .collect();
    let pages: BTreeSet<&String> = written
        .iter()
        .filter(|k| k.starts_with(&format!("assets/{ACCOUNT}/")))
        .collect();
    // 5 assets: at most 5 copy shards (each asset's new subjects fall on its own shards) and
    // the pages of those 5 assets.
    assert!(shards.len() <= 5, "{shards:?}");
    assert!(pages.len() <= 5, "{pages:?}");
    // The new assignments are in the copy and in the counts.
    let (_, a) = copy::asset(&kv, ACCOUNT, "100000:STDQ").unwrap();
    assert_eq!(a.unwrap().in_use, 30 + 20);
    let all = copy::all_of_asset(&kv, ACCOUNT, "100000:STDQ").unwrap();
    assert_eq!(all.len(), 50);
    assert!(all.contains_key("s:NEW000"));
}

#[test]
fn an_incremental_refresh_adding_many_entries_to_one_asset_spreads_it_over_more_shards() {
    let kv = MemoryKv::default();
    account(&kv);
    let apple = location(2_000, 60_000, 1000);
    run_refresh(&kv, &apple, true, 500);
    let ix = copy::index(&kv, ACCOUNT).unwrap();
    let ak = "100000:STDQ";
    let (_, a) = copy::asset(&kv, ACCOUNT, ak).unwrap();
    assert_eq!(a.unwrap().shards, 1);
    // 6,000 new assignments at Apple, all on one asset that had 30.
    {
        let mut loc = apple.lock().unwrap();
        loc.version = 2;
        for i in 0..6_000 {
            loc.assignments
                .push(("100000".into(), format!("BIG{i:05}"), 2));
        }
    }
    run_refresh(&kv, &apple, false, 500);
    let (doc, a) = copy::asset(&kv, ACCOUNT, ak).unwrap();
    let a = a.unwrap();
    assert_eq!(a.in_use, 6_030);
    assert!(a.shards >= 6, "{} shards", a.shards);
    // No shard holds more than about a page of the asset's entries (it would hold all 6,030
    // on one shard without the split).
    for n in 0..ix.copy_shards {
        let shard: copy::CopyShard = get_json(&kv, &keys::copy_shard(ACCOUNT, ix.generation, n))
            .unwrap()
            .unwrap_or_default();
        let mine = shard.get(ak).map(BTreeMap::len).unwrap_or(0);
        assert!(
            mine <= 2 * keys::ASSET_COPY_PAGE,
            "shard {n}: {mine} entries"
        );
    }
    // Every entry is where readers look: each page once, all of them.
    let mut seen = BTreeSet::new();
    for p in 0..a.shards {
        for (tag, _) in copy::asset_assignments(&kv, ACCOUNT, &doc, &a, p).unwrap() {
            assert!(seen.insert(tag), "twice");
        }
    }
    assert_eq!(seen.len(), 6_030);
    let subjects = [
        Subject::SerialNumber("BIG00042".into()),
        Subject::SerialNumber("SER0000000".into()),
    ];
    assert_eq!(
        copy::held(&kv, ACCOUNT, &doc, &a, &subjects).unwrap().len(),
        2
    );
    assert!(largest_value(&kv) < keys::VALUE_LIMIT / 2);
}

#[test]
fn apple_changing_between_pages_never_drops_our_licenses() {
    // Issue 9, item 6. Our confirmed license sits at index 1000 of Apple's list: after page 0
    // is served, a foreign assignment before it goes away, everything shifts down by one, and
    // page 1 starts past ours. A refresh that trusts this read would find ours gone, take it
    // out of the ledger and send a false removal notice.
    let kv = MemoryKv::default();
    account(&kv);
    let apple = location(10, 2_000, 1000);
    run_refresh(&kv, &apple, true, 500);
    let ours = Subject::SerialNumber("SER0001000".into());
    let ak = asset_key("100000", "STDQ");
    let mut shard = LedgerShard::new();
    shard.entry(ak.clone()).or_default().insert(
        ours.tag(),
        LedgerEntry {
            state: LedgerState::Confirmed,
            event_id: Some("ev1".into()),
            at: Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap(),
            error: None,
            asked: None,
        },
    );
    set_json(
        &kv,
        &keys::ledger_shard(ACCOUNT, ledger_shard_of(&ak, &ours)),
        &shard,
    )
    .unwrap();
    {
        let mut loc = apple.lock().unwrap();
        loc.after_page = Some((
            0,
            Box::new(|loc: &mut Location| {
                loc.assignments.remove(5);
                loc.version += 1;
            }),
        ));
    }
    let job = run_refresh(&kv, &apple, true, 500);
    assert_eq!(job.result.as_ref().unwrap()["dataChangedDuringRead"], true);
    let l: LedgerShard = get_json(
        &kv,
        &keys::ledger_shard(ACCOUNT, ledger_shard_of(&ak, &ours)),
    )
    .unwrap()
    .unwrap_or_default();
    assert!(
        l.get(&ak).is_some_and(|m| m.contains_key(&ours.tag())),
        "our license was dropped from the ledger"
    );
    let notices: Option<Value> = get_json(&kv, &keys::notices_page(0)).unwrap();
    assert!(
        notices
            .as_ref()
            .is_none_or(|n| !n.to_string().contains("SER0001000")),
        "a false removal notice: {notices:?}"
    );
    // The next full read, on unchanged data, does judge what is really gone.
    apple
        .lock()
        .unwrap()
        .assignments
        .retain(|a| a.1 != "SER0001000");
    let job = run_refresh(&kv, &apple, true, 500);
    assert_eq!(job.result.as_ref().unwrap()["dataChangedDuringRead"], false);
    let l: LedgerShard = get_json(
        &kv,
        &keys::ledger_shard(ACCOUNT, ledger_shard_of(&ak, &ours)),
    )
    .unwrap()
    .unwrap_or_default();
    assert!(!l.get(&ak).is_some_and(|m| m.contains_key(&ours.tag())));
}

#[test]
fn a_refresh_stamps_the_clients_clock_not_the_machines() {
    // Issue 9: `started_at`, `synced_at` and the notices of what a refresh found gone came from
    // the machine's clock, so a refresh under a test's (or host's) clock mixed two timelines.
    let kv = MemoryKv::default();
    account(&kv);
    vpp_licensing::settings::put(&kv, br#"{"licenseRemovalNotification": true}"#).unwrap();
    let apple = location(3, 10, 1000);
    run_refresh(&kv, &apple, true, 500);
    // A license of ours that Apple no longer lists: the next full read finds it gone.
    let gone = Subject::SerialNumber("SERGONE".into());
    let ak = asset_key("100000", "STDQ");
    let mut shard = LedgerShard::new();
    shard.entry(ak.clone()).or_default().insert(
        gone.tag(),
        LedgerEntry {
            state: LedgerState::Confirmed,
            event_id: Some("ev1".into()),
            at: clock_start() - chrono::Duration::days(3),
            error: None,
            asked: None,
        },
    );
    set_json(
        &kv,
        &keys::ledger_shard(ACCOUNT, ledger_shard_of(&ak, &gone)),
        &shard,
    )
    .unwrap();
    let job = run_refresh(&kv, &apple, true, 500);
    let t = clock_start();
    assert_eq!(job.checkpoint["startedAt"], json!(t), "started_at");
    assert_eq!(
        copy::index(&kv, ACCOUNT).unwrap().synced_at,
        Some(t),
        "synced_at"
    );
    let acc: Account = get_json(&kv, &keys::account(ACCOUNT)).unwrap().unwrap();
    assert_eq!(acc.last_synchronized, Some(t));
    let notices: Vec<Value> = get_json(&kv, &keys::notices_page(0)).unwrap().unwrap();
    let n = notices
        .iter()
        .find(|n| n["serialNumber"] == "SERGONE")
        .expect("a notice for the license found gone");
    assert_eq!(n["reason"], "refresh");
    assert_eq!(n["at"], json!(t), "notice time");
    // An incremental refresh stamps the client's clock too.
    let job = run_refresh(&kv, &apple, false, 500);
    assert_eq!(job.result.as_ref().unwrap()["full"], false);
    assert_eq!(copy::index(&kv, ACCOUNT).unwrap().synced_at, Some(t));
}

#[test]
fn the_licenses_list_pages_with_a_cursor_through_every_asset() {
    let kv = MemoryKv::default();
    account(&kv);
    let apple = location(1_200, 3_000, 1000);
    run_refresh(&kv, &apple, true, 500);
    let filter = licenses::Filter::default();
    let mut seen = BTreeMap::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = licenses::list_page(&kv, &filter, cursor.as_deref(), 250).unwrap();
        assert!(page.rows.len() <= 250);
        for r in page.rows {
            assert!(seen.insert(r.adam_id.clone(), r.in_use).is_none(), "twice");
        }
        pages += 1;
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen.len(), 1_200);
    assert!(pages >= 5);
    assert_eq!(seen["100000"], 3);
    assert!(licenses::list_page(&kv, &filter, Some("nonsense"), 10).is_err());
}

/// Keys of the store whose name starts with `prefix`.
fn count_prefix(kv: &MemoryKv, prefix: &str) -> usize {
    kv.keys().iter().filter(|k| k.starts_with(prefix)).count()
}

/// Fill every ring of the app to (past) its bound, through the code that writes it: jobs
/// (finished and one running per kind and scope), events (ended and pending), audit, notices,
/// notified ids, users, policies, leases.
fn fill_every_ring(kv: &MemoryKv, pending_events: usize, policy_bytes: usize) {
    use vpp_licensing::{audit, event, job, notice, settings, users};
    let t = Utc.with_ymd_and_hms(2025, 6, 1, 0, 0, 0).unwrap();
    // Jobs: twice the finished jobs kept, then one running job per kind and scope.
    for i in 0..2 * keys::KEPT_JOBS {
        let mut j = Job::new(&format!("done{i:04}"), "refresh", Some(ACCOUNT), "test", t);
        j.checkpoint = json!({"phase": "x".repeat(300)});
        job::create(kv, &j).unwrap();
        j.succeed(json!({"assets": i, "assignments": i * 10}), t);
        job::save(kv, &j).unwrap();
    }
    for kind in ["cleanup", "ledger", "refresh"] {
        let j = Job::new(&format!("run-{kind}"), kind, Some(ACCOUNT), "test", t);
        assert!(job::start(kv, &j).unwrap().created());
    }
    for kind in ["daily", "reconcile"] {
        let j = Job::new(&format!("run-{kind}"), kind, None, "test", t);
        assert!(job::start(kv, &j).unwrap().created());
    }
    for scope in [ACCOUNT, "daily", "reconcile"] {
        assert!(job::acquire_lease(kv, scope, "holder", t).unwrap());
    }
    // Events: more ended than the ring keeps, and `pending_events` pending.
    let asset = vpp_apple::AssetRef::new("100000", vpp_apple::PricingParam::Stdq);
    let ended = keys::EVENTS_DONE_KEPT + 50;
    for i in 0..ended + pending_events {
        let subjects = (0..20)
            .map(|s| Subject::SerialNumber(format!("SER{i:05}{s:03}")))
            .collect();
        let r = event::new_record(
            &format!("ev-{i:05}-0000-4000-8000-000000000000"),
            ACCOUNT,
            EventKind::Associate,
            "api",
            vec![asset.clone()],
            subjects,
            t,
        );
        event::track(kv, &r).unwrap();
        if i < ended {
            let done = event::Terminal {
                state: EventState::Complete,
                num_requested: Some(20),
                num_completed: Some(20),
                failures: Vec::new(),
            };
            event::apply_outcome(
                kv,
                ACCOUNT,
                EventKind::Associate,
                Some(&r.id),
                &[],
                Some(done),
                t,
            )
            .unwrap();
        }
    }
    // Audit: the ring full (its pages as the code fills them), then one more page move.
    let rec = |i: usize| audit::AuditRecord {
        at: t,
        actor: "admin:1a2b3c4d".into(),
        action: "POST /api/assignments".into(),
        target: Some(format!("{ACCOUNT}-{i}")),
        status: 202,
        error: None,
    };
    let full: Vec<audit::AuditRecord> = (0..keys::AUDIT_PAGE).map(rec).collect();
    let head = keys::AUDIT_PAGES_KEPT + 3;
    for p in 0..=head {
        set_json(kv, &keys::audit_page(p), &full).unwrap();
    }
    set_json(kv, &keys::audit_head(), &json!({"page": head})).unwrap();
    audit::record(kv, &rec(0)).unwrap();
    // Notices: more removals than the ring keeps, with no webhook (nothing delivered).
    settings::put(kv, br#"{"licenseRemovalNotification": true}"#).unwrap();
    let removed: Vec<(String, Subject)> = (0..(keys::NOTICE_PAGES_KEPT as usize + 2)
        * keys::NOTICE_PAGE)
        .map(|i| {
            (
                "100000:STDQ".to_string(),
                Subject::SerialNumber(format!("GONE{i:07}")),
            )
        })
        .collect();
    notice::record_removals(kv, ACCOUNT, &removed, "reconcile", t).unwrap();
    // Notified ids: the dedupe ring full.
    let ids: Vec<String> = (0..keys::NOTIFIED_IDS)
        .map(|i| format!("{i:08}-aaaa-4bbb-8ccc-dddddddddddd"))
        .collect();
    set_json(kv, &keys::notified(ACCOUNT), &json!({ "ids": ids })).unwrap();
    // Users: every shard written.
    let list: Vec<vpp_apple::User> = (0..20_000)
        .map(|i| {
            serde_json::from_value(json!({
                "clientUserId": format!("user-{i:06}"), "email": format!("u{i}@school.example"),
                "status": "Registered", "idHash": format!("{i:040}"),
            }))
            .unwrap()
        })
        .collect();
    users::apply_from_apple(kv, ACCOUNT, &list, false, false, None, t).unwrap();
    assert_eq!(
        count_prefix(kv, &format!("users/{ACCOUNT}/")),
        keys::USER_SHARDS as usize
    );
    // Policies: the supported bytes, each at its largest (20,000 subjects, ~300 KB), stored
    // through the code that stores them (packed in pages).
    let t = Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap();
    let mut stored = 0;
    for p in 0.. {
        let id = format!("policy-{p:03}");
        let serials: Vec<String> = (0..20_000).map(|s| format!("C02{p:03}{s:06}")).collect();
        let policy: vpp_licensing::policy::Policy = serde_json::from_value(json!({
            "id": id, "name": id, "accountId": ACCOUNT,
            "assets": [{"adamId": "100000", "pricingParam": "STDQ"}],
            "serialNumbers": serials, "clientUserIds": [],
            "createdAt": t, "updatedAt": t}))
        .unwrap();
        let bytes = serde_json::to_vec(&policy).unwrap().len();
        if stored + bytes > policy_bytes {
            break;
        }
        vpp_licensing::policy::store(kv, &policy, t).unwrap();
        stored += bytes;
    }
    assert!(stored * 10 > policy_bytes * 9, "{stored}");
    assert!(count_prefix(kv, "policies/page/") <= keys::policy_pages_for(stored));
}

/// A full refresh of `assets` and `assignments` with every ring full, then a second full
/// refresh in invocations of a few calls (two generations of the copy at once): the most keys
/// seen after any invocation, and the largest value.
fn peak_with_every_ring_full(assets: usize, assignments: usize) -> (usize, usize, keys::Shape) {
    let kv = MemoryKv::default();
    account(&kv);
    let apple = location(assets, assignments, 1000);
    // The runner saves a job when its slice ends (a finished one goes to its page).
    let first = run_refresh(&kv, &apple, true, 500);
    vpp_licensing::job::save(&kv, &first).unwrap();
    let shape = keys::Shape {
        accounts: 1,
        assets,
        assignments,
        pending_events: keys::SUPPORTED_PENDING_EVENTS,
        policy_bytes: keys::SUPPORTED_POLICY_BYTES,
    };
    fill_every_ring(&kv, shape.pending_events, shape.policy_bytes);
    // Each ring holds what its line of the budget says.
    let jobs = count_prefix(&kv, "job/");
    assert_eq!(jobs, keys::RUNNING_JOBS_PER_ACCOUNT + 2, "running jobs");
    assert!(count_prefix(&kv, "jobs/done/") <= keys::JOB_DONE_PAGES as usize);
    assert_eq!(
        count_prefix(&kv, "event/"),
        keys::EVENTS_DONE_KEPT + shape.pending_events
    );
    assert!(count_prefix(&kv, "audit/") <= keys::AUDIT_PAGES_KEPT as usize + 1);
    // Notice pages, and the outbox.
    assert!(count_prefix(&kv, "notices/") <= keys::NOTICE_PAGES_KEPT as usize + 2);
    let mut peak = kv.keys().len();
    let mut largest = largest_value(&kv);
    // The second full refresh, invocation by invocation.
    {
        let mut loc = apple.lock().unwrap();
        loc.version = 2;
    }
    let acc: Account = get_json(&kv, &keys::account(ACCOUNT)).unwrap().unwrap();
    let now = Utc.with_ymd_and_hms(2025, 6, 2, 0, 0, 0).unwrap();
    let mut job = Job::new("job2", "refresh", Some(ACCOUNT), "test", now);
    job.checkpoint =
        serde_json::to_value(refresh::initial_state(&kv, &acc, true, now).unwrap()).unwrap();
    let mut done = false;
    for _ in 0..10_000 {
        let c = client(&apple);
        let mut budget = Budget::new(c.clock().now(), 3600, 5);
        let end = block_on(refresh::run_slice(
            &kv,
            &c,
            &mut job,
            "our-mdm",
            &mut budget,
        ))
        .unwrap();
        peak = peak.max(kv.keys().len());
        largest = largest.max(largest_value(&kv));
        match end {
            SliceEnd::Paused => continue,
            SliceEnd::Done => {
                done = true;
                break;
            }
            SliceEnd::Failed(f) => panic!("refresh failed: {f:?}"),
        }
    }
    assert!(done, "the second full refresh did not finish");
    (peak, largest, shape)
}

#[test]
fn every_ring_full_on_a_full_refresh_stays_within_the_key_budget() {
    // The supported shape (10,000 assets, 1,000,000 assignments, one account) by the formula.
    let supported = keys::key_budget(&keys::SUPPORTED);
    assert!(supported <= keys::CLOUD_KEYS, "{supported}");
    let (peak_a, largest_a, shape_a) = peak_with_every_ring_full(1_000, 40_000);
    let (peak_b, largest_b, shape_b) = peak_with_every_ring_full(4_000, 40_000);
    for (peak, largest, shape) in [(peak_a, largest_a, shape_a), (peak_b, largest_b, shape_b)] {
        let budget = keys::key_budget(&shape);
        assert!(
            peak <= budget,
            "{peak} keys at the peak, budget {budget} for {shape:?}"
        );
        assert!(peak <= keys::CLOUD_KEYS, "{peak} keys");
        assert!(largest < keys::VALUE_LIMIT, "largest value {largest}");
        eprintln!(
            "{shape:?}: {peak} keys at the peak (budget {budget}), largest value {largest} B"
        );
    }
    // Four times the assets add no more keys than the copy's formula says (its bytes / page).
    let grown = keys::copy_peak_keys(4_000, 40_000) - keys::copy_peak_keys(1_000, 40_000);
    assert!(
        peak_b <= peak_a + grown,
        "{peak_a} -> {peak_b} keys; the copy's formula allows {grown} more"
    );
}

#[test]
fn assets_added_between_full_refreshes_split_their_pages() {
    // A copy built for 50 assets (one page), then 3,000 new assets at Apple read by an
    // incremental refresh: before, all went to that one page (~1 MB); now the pages split.
    let kv = MemoryKv::default();
    account(&kv);
    let apple = location(50, 500, 1000);
    run_refresh(&kv, &apple, true, 500);
    assert_eq!(copy::index(&kv, ACCOUNT).unwrap().asset_pages, 1);
    {
        let mut loc = apple.lock().unwrap();
        loc.version = 2;
        for i in 0..3_000 {
            loc.assets.push(format!("{}", 500_000 + i));
        }
    }
    run_refresh(&kv, &apple, false, 500);
    let ix = copy::index(&kv, ACCOUNT).unwrap();
    assert!(
        ix.asset_pages >= 3_050 / keys::ASSET_PAGE_SPLIT as u32,
        "{ix:?}"
    );
    let mut seen = BTreeSet::new();
    for p in 0..ix.asset_pages {
        // As stored (copy::page keeps only the page's own records).
        let page: copy::AssetPage = get_json(&kv, &keys::asset_page(ACCOUNT, ix.generation, p))
            .unwrap()
            .unwrap_or_default();
        assert!(
            page.len() <= keys::ASSET_PAGE_SPLIT,
            "page {p}: {}",
            page.len()
        );
        for k in page.keys() {
            assert_eq!(ix.page_of(k), p, "{k} is on the page the index names");
            assert!(seen.insert(k.clone()));
        }
    }
    assert_eq!(seen.len(), 3_050, "every asset once");
    assert!(largest_value(&kv) < keys::VALUE_LIMIT / 4);
    // Reads and writes find every asset on its page.
    let all = copy::all_assets(&kv, ACCOUNT).unwrap();
    assert_eq!(all.assets.len(), 3_050);
    let some: Vec<String> = (0..3_000)
        .step_by(7)
        .map(|i| format!("{}:STDQ", 500_000 + i))
        .collect();
    let found = copy::update_assets(&kv, ACCOUNT, &some, |a| a.in_use += 1).unwrap();
    assert_eq!(found.len(), some.len());
    // The next full refresh keeps the base the pages split from (a walk of the list by cursor
    // goes on across it), with the page count the key budget counts.
    run_refresh(&kv, &apple, true, 500);
    let full = copy::index(&kv, ACCOUNT).unwrap();
    assert!(full.generation > ix.generation);
    assert_eq!(
        (full.asset_pages, full.base_pages),
        (keys::asset_pages_for(3_050), 1),
        "{full:?}"
    );
    let all = copy::all_assets(&kv, ACCOUNT).unwrap();
    assert_eq!(all.assets.len(), 3_050);
    for p in 0..full.asset_pages {
        for k in copy::page(&kv, ACCOUNT, &full, p).unwrap().keys() {
            assert_eq!(full.page_of(k), p);
        }
    }
}

#[test]
fn after_every_page_split_reads_and_writes_find_each_record_once() {
    let kv = MemoryKv::default();
    account(&kv);
    let apple = location(300, 300, 1000);
    run_refresh(&kv, &apple, true, 500);
    let before = copy::index(&kv, ACCOUNT).unwrap();
    // Split every page once.
    for _ in 0..before.asset_pages {
        let ix = copy::index(&kv, ACCOUNT).unwrap();
        copy::split_next_page(&kv, ACCOUNT, &keys::assets(ACCOUNT), &ix).unwrap();
    }
    let after = copy::index(&kv, ACCOUNT).unwrap();
    assert_eq!(after.asset_pages, 2 * before.asset_pages);
    let moved: Vec<String> = (0..300)
        .map(|i| format!("{}:STDQ", 100_000 + i))
        .filter(|k| before.page_of(k) != after.page_of(k))
        .collect();
    assert!(!moved.is_empty());
    // A record moved by a split is found on its new page by reads and writes.
    let found = copy::update_assets(&kv, ACCOUNT, &moved, |a| a.in_use = 7).unwrap();
    assert_eq!(found.len(), moved.len());
    let doc = copy::all_assets(&kv, ACCOUNT).unwrap();
    assert_eq!(doc.assets.len(), 300);
    assert_eq!(
        doc.assets.iter().filter(|a| a.in_use == 7).count(),
        moved.len()
    );
}
