//! Assign, revoke, events, notifications, policies and reconcile against a scripted Apple and
//! the in-memory store.

use chrono::{Duration, TimeZone, Utc};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use vpp_apple::testing::{block_on, json as apple_json, FakeClock, ScriptedTransport};
use vpp_apple::{AppleRequest, Client, Method, Target};
use vpp_licensing::assignment::{self, AssignBody};
use vpp_licensing::model::*;
use vpp_licensing::{
    copy, event, job, notice, notification, policy, reconcile, settings, ErrorCode,
};
use vpp_store::{get_json, keys, set_json, Kv, MemoryKv};

const ACCOUNT: &str = "acc1";
const SECRET: &str = "notification-secret-1";

/// What the fake Apple answers for `GET status?eventId=`.
type Statuses = Arc<Mutex<BTreeMap<String, Value>>>;

struct Apple {
    statuses: Statuses,
    posts: Arc<Mutex<Vec<(String, Value)>>>,
}

fn apple() -> (Apple, Client<ScriptedTransport, FakeClock>) {
    let statuses: Statuses = Arc::default();
    let posts: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
    let (s2, p2) = (statuses.clone(), posts.clone());
    let t = ScriptedTransport::new(move |req: &AppleRequest, n| {
        let Target::Api { path, query } = &req.target else {
            return Err("absolute".into());
        };
        match (req.method, path.as_str()) {
            (Method::Get, "service/config") => Ok(apple_json(
                200,
                json!({"limits": {"maxSerialNumbers": 2, "maxClientUserIds": 2}, "urls": {"invitationEmail": "https://x/?inviteCode=%25inviteCode%25"}}),
            )),
            (Method::Post, p) => {
                let body: Value =
                    serde_json::from_slice(req.body.as_deref().unwrap_or(b"{}")).unwrap();
                p2.lock().unwrap().push((p.to_string(), body));
                Ok(apple_json(200, json!({"eventId": format!("ev{n}")})))
            }
            (Method::Get, "status") => {
                let id = &query.iter().find(|(k, _)| k == "eventId").unwrap().1;
                match s2.lock().unwrap().get(id) {
                    Some(v) => Ok(apple_json(200, v.clone())),
                    None => Ok(apple_json(200, json!({"eventStatus": "PENDING"}))),
                }
            }
            _ => Ok(apple_json(
                404,
                json!({"errorNumber": 9602, "errorMessage": "no"}),
            )),
        }
    });
    let client = Client::new(t, FakeClock::default())
        .with_policy(vpp_apple::RetryPolicy::none())
        .with_pacer(vpp_apple::Pacer::unlimited());
    (Apple { statuses, posts }, client)
}

fn budget() -> job::Budget {
    job::Budget::new(t0(), 20, 200)
}

fn reserved(kv: &MemoryKv, adam: &str) -> i64 {
    vpp_licensing::ledger::reserved(kv, ACCOUNT, &format!("{adam}:STDQ")).unwrap()
}

fn t0() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap()
}

fn asset(adam: &str, total: i64, in_use: i64) -> AssetRecord {
    AssetRecord {
        adam_id: adam.into(),
        pricing_param: "STDQ".into(),
        product_type: "App".into(),
        name: Some(format!("App {adam}")),
        icon_url: None,
        total,
        available: total - in_use,
        in_use,
        retired: 0,
        device_assignable: true,
        revocable: true,
        supported_platforms: vec!["iOS".into()],
        shards: 1,
    }
}

fn setup(assets: Vec<AssetRecord>) -> MemoryKv {
    let kv = MemoryKv::default();
    let account = json!({
        "id": ACCOUNT, "name": "School", "organization": "Org", "location": "Main",
        "locationId": "uid1", "country": "US", "defaultPlatform": "volumestore",
        "websiteUrl": null, "tokenExpiresAt": "2030-01-01T00:00:00Z",
        "createdAt": "2025-01-01T00:00:00Z", "updatedAt": "2025-01-01T00:00:00Z",
        "notificationSecretSha256": sha256(SECRET),
    });
    let account: Account = serde_json::from_value(account).unwrap();
    set_json(&kv, &keys::account(ACCOUNT), &account).unwrap();
    set_json(&kv, &keys::accounts(), &vec![ACCOUNT.to_string()]).unwrap();
    copy::write_generation(&kv, ACCOUNT, 1, Some(t0()), assets).unwrap();
    kv
}

fn sha256(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn body(adam: &str, serials: &[&str]) -> AssignBody {
    AssignBody {
        account_id: ACCOUNT.into(),
        adam_id: adam.into(),
        pricing_param: None,
        serial_numbers: serials.iter().map(|s| s.to_string()).collect(),
        client_user_ids: Vec::new(),
    }
}

fn counts(kv: &MemoryKv, adam: &str) -> (i64, i64) {
    let a = copy::asset(kv, ACCOUNT, &asset_key(adam, "STDQ"))
        .unwrap()
        .1
        .unwrap();
    (a.in_use, a.available)
}

/// The ledger entry of (asset, device); open states (queued, unknown, pending) read as `Pending`.
fn ledger(kv: &MemoryKv, adam: &str, serial: &str) -> Option<LedgerEntry> {
    let s = Subject::SerialNumber(serial.into());
    let ak = asset_key(adam, "STDQ");
    let v = vpp_licensing::ledger::entry(kv, ACCOUNT, &ak, &s).unwrap()?;
    Some(LedgerEntry {
        state: match v.state {
            "confirmed" => LedgerState::Confirmed,
            "failed" => LedgerState::Failed,
            "revoking" => LedgerState::Revoking,
            _ => LedgerState::Pending,
        },
        event_id: v.event_ids.last().cloned(),
        at: v.at,
        error: v.error,
        asked: None,
    })
}

fn copy(kv: &MemoryKv, adam: &str) -> BTreeMap<String, MadeBy> {
    copy::all_of_asset(kv, ACCOUNT, &asset_key(adam, "STDQ")).unwrap()
}

fn notify(
    kv: &MemoryKv,
    id: &str,
    kind: &str,
    payload: Value,
) -> Result<Value, vpp_licensing::ApiError> {
    let env = json!({"notificationId": id, "notificationType": kind, "notification": payload});
    notification::handle(
        kv,
        ACCOUNT,
        Some(&format!("Bearer {SECRET}")),
        &serde_json::to_vec(&env).unwrap(),
        t0() + Duration::seconds(3),
    )
}

#[test]
fn assign_is_ledgered_first_and_confirmed_once_by_status_and_notification() {
    let kv = setup(vec![asset("100", 10, 0)]);
    let (apple, client) = apple();
    let out = block_on(assignment::assign(
        &kv,
        &client,
        &body("100", &["S1", "S2", "S3"]),
        t0(),
        &mut budget(),
    ))
    .unwrap();
    // maxSerialNumbers 2: two Apple requests, two events.
    assert_eq!(out.events.len(), 2);
    assert_eq!(apple.posts.lock().unwrap().len(), 2);
    let e1 = out.events[0].id.clone();
    assert_eq!(
        ledger(&kv, "100", "S1").unwrap().state,
        LedgerState::Pending
    );
    assert_eq!(
        ledger(&kv, "100", "S1").unwrap().event_id.as_deref(),
        Some(e1.as_str())
    );
    assert_eq!(reserved(&kv, "100"), 3);

    // Notification for the first event arrives twice.
    let payload = json!({"eventId": e1, "result": "SUCCESS", "type": "ASSOCIATE",
        "assignments": [{"adamId": "100", "pricingParam": "STDQ", "serialNumber": "S1"},
                        {"adamId": "100", "pricingParam": "STDQ", "serialNumber": "S2"}]});
    notify(&kv, "n1", "ASSET_MANAGEMENT", payload.clone()).unwrap();
    let dup = notify(&kv, "n1", "ASSET_MANAGEMENT", payload).unwrap();
    assert_eq!(dup["duplicate"], true);
    assert_eq!(counts(&kv, "100"), (2, 8));
    assert_eq!(
        ledger(&kv, "100", "S1").unwrap().state,
        LedgerState::Confirmed
    );
    let rec = event::load(&kv, &e1).unwrap().unwrap();
    assert_eq!(rec.state, EventState::Complete);
    // Then the status poll says the same: nothing counted twice.
    apple.statuses.lock().unwrap().insert(
        e1.clone(),
        json!({"eventStatus": "COMPLETE", "numCompleted": 2, "numRequested": 2}),
    );
    block_on(event::poll_event(
        &kv,
        &client,
        &rec,
        t0() + Duration::seconds(40),
        true,
    ))
    .unwrap();
    assert_eq!(counts(&kv, "100"), (2, 8));
    assert_eq!(reserved(&kv, "100"), 1);
    assert!(matches!(
        copy(&kv, "100").get("s:S1"),
        Some(MadeBy::Ours { .. })
    ));
    // The event index lists only the pending one.
    let pending: Vec<String> = get_json(&kv, &keys::account_events(ACCOUNT))
        .unwrap()
        .unwrap();
    assert_eq!(pending, vec![out.events[1].id.clone()]);
}

#[test]
fn event_failure_for_one_device_out_of_many() {
    let kv = setup(vec![asset("100", 10, 0)]);
    let (apple, client) = apple();
    let out = block_on(assignment::assign(
        &kv,
        &client,
        &body("100", &["A", "B"]),
        t0(),
        &mut budget(),
    ))
    .unwrap();
    let ev = out.events[0].clone();
    apple.statuses.lock().unwrap().insert(
        ev.id.clone(),
        json!({"eventStatus": "FAILED", "numCompleted": 1, "numRequested": 2, "failures": [
            {"errorNumber": 9709, "errorMessage": "not enough", "errorInfo": {"serialNumbers": ["B"]}}]}),
    );
    // Not due before the first poll delay: poll_due leaves it.
    let mut budget = job::Budget::new(t0(), 20, 10);
    let r = block_on(event::poll_due(
        &kv,
        |_| apple_client(&apple),
        t0() + Duration::seconds(1),
        &mut budget,
    ))
    .unwrap();
    assert_eq!((r.polled, r.waiting), (0, 1));
    let r = block_on(event::poll_due(
        &kv,
        |_| apple_client(&apple),
        t0() + Duration::seconds(10),
        &mut budget,
    ))
    .unwrap();
    assert_eq!(r.completed, 1);
    assert_eq!(
        ledger(&kv, "100", "A").unwrap().state,
        LedgerState::Confirmed
    );
    let b = ledger(&kv, "100", "B").unwrap();
    assert_eq!(b.state, LedgerState::Failed);
    assert_eq!(b.error.unwrap().code, "9709");
    assert_eq!(counts(&kv, "100"), (1, 9));
    assert_eq!(reserved(&kv, "100"), 0);
    let view = event::view(&event::load(&kv, &ev.id).unwrap().unwrap());
    assert_eq!(view["results"][0]["state"], "succeeded");
    assert_eq!(view["results"][1]["state"], "failed");
    assert_eq!(view["results"][1]["error"]["appleErrorNumber"], 9709);
}

fn apple_client(apple: &Apple) -> Client<ScriptedTransport, FakeClock> {
    let statuses = apple.statuses.clone();
    let t = ScriptedTransport::new(move |req: &AppleRequest, n| {
        let Target::Api { path, query } = &req.target else {
            return Err("absolute".into());
        };
        match path.as_str() {
            "service/config" => Ok(apple_json(200, json!({"limits": {}}))),
            "status" => {
                let id = &query.iter().find(|(k, _)| k == "eventId").unwrap().1;
                Ok(apple_json(
                    200,
                    statuses
                        .lock()
                        .unwrap()
                        .get(id)
                        .cloned()
                        .unwrap_or(json!({"eventStatus": "PENDING"})),
                ))
            }
            _ => Ok(apple_json(200, json!({"eventId": format!("re{n}")}))),
        }
    });
    Client::new(t, FakeClock::default())
        .with_policy(vpp_apple::RetryPolicy::none())
        .with_pacer(vpp_apple::Pacer::unlimited())
}

#[test]
fn polls_are_spaced_and_pending_events_are_resent_after_ten_minutes() {
    let kv = setup(vec![asset("100", 10, 0)]);
    let (apple, client) = apple();
    let out = block_on(assignment::assign(
        &kv,
        &client,
        &body("100", &["A"]),
        t0(),
        &mut budget(),
    ))
    .unwrap();
    let id = out.events[0].id.clone();
    let mut budget = job::Budget::new(t0(), 3600, 100);
    let r = block_on(event::poll_due(
        &kv,
        |_| apple_client(&apple),
        t0() + Duration::seconds(6),
        &mut budget,
    ))
    .unwrap();
    assert_eq!(r.polled, 1);
    let r = block_on(event::poll_due(
        &kv,
        |_| apple_client(&apple),
        t0() + Duration::seconds(20),
        &mut budget,
    ))
    .unwrap();
    assert_eq!(r.polled, 0, "30 s between polls");
    let r = block_on(event::poll_due(
        &kv,
        |_| apple_client(&apple),
        t0() + Duration::seconds(37),
        &mut budget,
    ))
    .unwrap();
    assert_eq!(r.polled, 1);
    let r = block_on(event::poll_due(
        &kv,
        |_| apple_client(&apple),
        t0() + Duration::seconds(601),
        &mut budget,
    ))
    .unwrap();
    assert_eq!(r.resent, 1);
    // Apple may still apply the first event: both stay tracked, the old one names the new one.
    let old = event::load(&kv, &id).unwrap().unwrap();
    assert_eq!(old.state, EventState::Pending);
    let pending: Vec<String> = get_json(&kv, &keys::account_events(ACCOUNT))
        .unwrap()
        .unwrap();
    assert_eq!(pending.len(), 2);
    assert_eq!(pending[0], id);
    assert_eq!(old.resent_as.as_deref(), Some(pending[1].as_str()));
    let pending = [pending[1].clone()];
    let entry =
        vpp_licensing::ledger::entry(&kv, ACCOUNT, "100:STDQ", &Subject::SerialNumber("A".into()))
            .unwrap()
            .unwrap();
    assert_eq!(entry.event_ids, vec![id.clone(), pending[0].clone()]);
    // The resent event completes: the ledger follows it.
    apple
        .statuses
        .lock()
        .unwrap()
        .insert(pending[0].clone(), json!({"eventStatus": "COMPLETE"}));
    block_on(event::poll_due(
        &kv,
        |_| apple_client(&apple),
        t0() + Duration::seconds(700),
        &mut budget,
    ))
    .unwrap();
    assert_eq!(
        ledger(&kv, "100", "A").unwrap().state,
        LedgerState::Confirmed
    );
    assert_eq!(counts(&kv, "100"), (1, 9));
}

#[test]
fn no_license_available_is_409_without_calling_apple_and_changes_nothing() {
    let kv = setup(vec![asset("100", 2, 1)]);
    let (apple, client) = apple();
    let before = kv.keys();
    let err = block_on(assignment::assign(
        &kv,
        &client,
        &body("100", &["A", "B"]),
        t0(),
        &mut budget(),
    ))
    .unwrap_err();
    assert_eq!(err.code, ErrorCode::NoLicensesAvailable);
    assert_eq!(err.status(), 409);
    assert_eq!(apple.posts.lock().unwrap().len(), 0);
    assert_eq!(kv.keys(), before);
    // One fits; then the reservation makes the next one 409 before Apple confirmed anything.
    block_on(assignment::assign(
        &kv,
        &client,
        &body("100", &["A"]),
        t0(),
        &mut budget(),
    ))
    .unwrap();
    let err = block_on(assignment::assign(
        &kv,
        &client,
        &body("100", &["B"]),
        t0(),
        &mut budget(),
    ))
    .unwrap_err();
    assert_eq!(err.code, ErrorCode::NoLicensesAvailable);
    // Already assigned subjects are not asked again.
    let out = block_on(assignment::assign(
        &kv,
        &client,
        &body("100", &["A"]),
        t0(),
        &mut budget(),
    ))
    .unwrap();
    assert!(out.events.is_empty());
    assert_eq!(out.already_assigned.len(), 1);
}

#[test]
fn bad_input_is_rejected_clearly() {
    let kv = setup(vec![asset("100", 2, 0)]);
    let (apple, client) = apple();
    for (b, code) in [
        (body("abc", &["A"]), ErrorCode::InvalidRequest),
        (body("100", &[]), ErrorCode::InvalidRequest),
        (body("100", &[""]), ErrorCode::InvalidRequest),
        (body("999", &["A"]), ErrorCode::NotFound),
        (
            AssignBody {
                account_id: "nope".into(),
                ..body("100", &["A"])
            },
            ErrorCode::NotFound,
        ),
        (
            AssignBody {
                pricing_param: Some("GOLD".into()),
                ..body("100", &["A"])
            },
            ErrorCode::InvalidRequest,
        ),
    ] {
        let e = block_on(assignment::assign(&kv, &client, &b, t0(), &mut budget())).unwrap_err();
        assert_eq!(e.code, code, "{e}");
    }
    assert!(apple.posts.lock().unwrap().is_empty());
}

#[test]
fn wrong_notification_bearer_is_401_and_changes_nothing() {
    let kv = setup(vec![asset("100", 10, 0)]);
    let before = kv.keys();
    let env = json!({"notificationId": "x", "notificationType": "ASSET_COUNT", "notification": {"adamId": "100", "countDelta": 5}});
    for auth in [None, Some("Bearer wrong"), Some(SECRET)] {
        let e = notification::handle(&kv, ACCOUNT, auth, &serde_json::to_vec(&env).unwrap(), t0())
            .unwrap_err();
        assert_eq!(e.status(), 401);
    }
    assert_eq!(kv.keys(), before);
    assert_eq!(counts(&kv, "100"), (0, 10));
    // Right bearer: the count moves, once.
    notify(
        &kv,
        "c1",
        "ASSET_COUNT",
        json!({"adamId": "100", "countDelta": 5, "pricingParam": "STDQ"}),
    )
    .unwrap();
    notify(
        &kv,
        "c1",
        "ASSET_COUNT",
        json!({"adamId": "100", "countDelta": 5, "pricingParam": "STDQ"}),
    )
    .unwrap();
    assert_eq!(counts(&kv, "100"), (0, 15));
    let t = notify(&kv, "t1", "TEST_NOTIFICATION", json!({})).unwrap();
    assert_eq!(t["type"], "TEST_NOTIFICATION");
}

#[test]
fn foreign_changes_from_notifications_and_user_notifications() {
    let kv = setup(vec![asset("100", 10, 0)]);
    notify(
        &kv,
        "f1",
        "ASSET_MANAGEMENT",
        json!({"eventId": "not-ours", "result": "SUCCESS", "type": "ASSOCIATE",
        "assignments": [{"adamId": "100", "pricingParam": "STDQ", "clientUserId": "u9"}]}),
    )
    .unwrap();
    assert_eq!(copy(&kv, "100").get("u:u9"), Some(&MadeBy::Foreign));
    assert_eq!(counts(&kv, "100"), (1, 9));
    notify(&kv, "u1", "USER_MANAGEMENT", json!({"eventId": "e", "result": "SUCCESS", "type": "CREATE",
        "users": [{"clientUserId": "u1", "email": "u1@x.org", "inviteCode": "abc", "status": "Registered"}]})).unwrap();
    notify(
        &kv,
        "u2",
        "USER_ASSOCIATED",
        json!({"associatedUsers": [{"clientUserId": "u1", "idHash": "h", "status": "Associated"}]}),
    )
    .unwrap();
    let page =
        vpp_licensing::users::list(&kv, ACCOUNT, None, Some("https://x/?c=%25inviteCode%25"))
            .unwrap();
    let users = page["users"].as_array().unwrap();
    assert_eq!(users.len(), 1);
    assert_eq!(users[0]["status"], "Associated");
    assert_eq!(users[0]["inviteCode"], "abc");
}

fn put_policy(
    kv: &MemoryKv,
    client: &Client<ScriptedTransport, FakeClock>,
    id: &str,
    serials: &[&str],
) -> Value {
    let b: policy::PolicyBody = serde_json::from_value(json!({
        "name": format!("Policy {id}"), "accountId": ACCOUNT,
        "assets": [{"adamId": "100", "pricingParam": "STDQ"}], "serialNumbers": serials,
    }))
    .unwrap();
    block_on(policy::put(kv, client, id, &b, t0(), &mut budget()))
        .unwrap()
        .1
}

fn confirm_all(kv: &MemoryKv) {
    let pending: Vec<String> = get_json(kv, &keys::account_events(ACCOUNT))
        .unwrap()
        .unwrap_or_default();
    for id in pending {
        let rec = event::load(kv, &id).unwrap().unwrap();
        let doc: AssetsDoc = copy::all_assets(kv, ACCOUNT).unwrap();
        let status: vpp_apple::EventStatus =
            serde_json::from_value(json!({"eventStatus": "COMPLETE"})).unwrap();
        let (items, terminal) = event::items_from_status(&rec, &doc, &status);
        event::apply_outcome(
            kv,
            ACCOUNT,
            rec.kind,
            Some(&id),
            &items,
            Some(terminal),
            t0(),
        )
        .unwrap();
    }
}

#[test]
fn policy_assigns_what_fits_then_edit_and_reconcile_revokes_only_ours() {
    let kv = setup(vec![asset("100", 3, 1)]);
    // A foreign assignment already at Apple.
    let doc = copy::all_assets(&kv, ACCOUNT).unwrap();
    let a = doc.assets[0].clone();
    let foreign = Subject::SerialNumber("FOREIGN".into());
    copy::edit_assignments(&kv, ACCOUNT, &doc, &[(&a, &foreign)], |_, _| {
        copy::Edit::Put(MadeBy::Foreign)
    })
    .unwrap();
    let (apple, client) = apple();
    let r = put_policy(&kv, &client, "p1", &["A", "B", "C"]);
    assert_eq!(r["assignments"][0]["requested"], 2);
    assert_eq!(r["assignments"][0]["shortfall"], 1);
    assert_eq!(
        r["assignments"][0]["shortfallSubjects"][0]["serialNumber"],
        "C"
    );
    confirm_all(&kv);
    assert_eq!(counts(&kv, "100"), (3, 0));
    assert_eq!(
        policy::names_using_account(&kv, ACCOUNT).unwrap(),
        vec!["Policy p1".to_string()]
    );
    let bad: policy::PolicyBody = serde_json::from_value(
        json!({"name": "x", "accountId": ACCOUNT, "assets": [{"adamId": "555"}]}),
    )
    .unwrap();
    assert_eq!(
        block_on(policy::put(&kv, &client, "p2", &bad, t0(), &mut budget()))
            .unwrap_err()
            .code,
        ErrorCode::Unprocessable
    );
    assert!(policy::load(&kv, "p2").unwrap().is_none());

    // Remove B from the policy; an owner check passes (not foreign); reconcile revokes B only.
    put_policy(&kv, &client, "p1", &["A"]);
    apple.posts.lock().unwrap().clear();
    let (mut j, _) = reconcile::start(&kv, "job1", "admin", t0()).unwrap();
    let mut budget = job::Budget::new(t0(), 20, 100);
    let done = block_on(reconcile::run_slice(
        &kv,
        &mut j,
        |_| apple_client(&apple),
        t0(),
        &mut budget,
    ))
    .unwrap();
    assert!(done);
    assert_eq!(j.result.as_ref().unwrap()["revoked"], 1);
    confirm_all(&kv);
    assert_eq!(ledger(&kv, "100", "B"), None);
    assert!(ledger(&kv, "100", "A").is_some());
    let c = copy(&kv, "100");
    assert!(c.contains_key("s:FOREIGN") && c.contains_key("s:A") && !c.contains_key("s:B"));
    assert_eq!(counts(&kv, "100"), (2, 1));
    // Deleting the policy and reconciling again takes A; FOREIGN is never touched.
    policy::delete(&kv, "p1").unwrap();
    let (mut j, _) = reconcile::start(&kv, "job2", "admin", t0()).unwrap();
    block_on(reconcile::run_slice(
        &kv,
        &mut j,
        |_| apple_client(&apple),
        t0(),
        &mut budget,
    ))
    .unwrap();
    confirm_all(&kv);
    assert_eq!(
        copy(&kv, "100").keys().cloned().collect::<Vec<_>>(),
        vec!["s:FOREIGN".to_string()]
    );
}

#[test]
fn reconcile_skips_accounts_owned_by_another_mdm() {
    let kv = setup(vec![asset("100", 3, 0)]);
    let (apple, client) = apple();
    put_policy(&kv, &client, "p1", &["A"]);
    confirm_all(&kv);
    policy::delete(&kv, "p1").unwrap();
    set_json(
        &kv,
        &keys::apple_state(ACCOUNT),
        &json!({"owner": {"kind": "foreign", "id": "other", "name": "Other MDM"}}),
    )
    .unwrap();
    let (mut j, _) = reconcile::start(&kv, "job1", "admin", t0()).unwrap();
    let mut budget = job::Budget::new(t0(), 20, 100);
    block_on(reconcile::run_slice(
        &kv,
        &mut j,
        |_| apple_client(&apple),
        t0(),
        &mut budget,
    ))
    .unwrap();
    let res = j.result.unwrap();
    assert_eq!(res["revoked"], 0);
    assert_eq!(res["skipped"][0]["mdmName"], "Other MDM");
    assert_eq!(
        ledger(&kv, "100", "A").unwrap().state,
        LedgerState::Confirmed
    );
}

#[test]
fn revoke_yields_notices_when_the_setting_is_on() {
    let kv = setup(vec![asset("100", 3, 0)]);
    let (_apple, client) = apple();
    settings::put(&kv, br#"{"licenseRemovalNotification": true}"#).unwrap();
    block_on(assignment::assign(
        &kv,
        &client,
        &body("100", &["A"]),
        t0(),
        &mut budget(),
    ))
    .unwrap();
    confirm_all(&kv);
    let out = block_on(assignment::revoke(
        &kv,
        &client,
        &body("100", &["A"]),
        t0(),
        &mut budget(),
    ))
    .unwrap();
    assert_eq!(out.events.len(), 1);
    assert_eq!(
        ledger(&kv, "100", "A").unwrap().state,
        LedgerState::Revoking
    );
    confirm_all(&kv);
    // Twice: still one notice.
    let rec = event::load(&kv, &out.events[0].id).unwrap().unwrap();
    let items = vec![event::Item {
        asset_key: "100:STDQ".into(),
        subject: Subject::SerialNumber("A".into()),
        failure: None,
    }];
    event::apply_outcome(&kv, ACCOUNT, rec.kind, Some(&rec.id), &items, None, t0()).unwrap();
    let page = notice::list(&kv, None).unwrap();
    assert_eq!(page.notices.len(), 1);
    assert_eq!(page.notices[0].serial_number.as_deref(), Some("A"));
    assert_eq!(page.notices[0].reason, "api");
    assert_eq!(counts(&kv, "100"), (0, 3));
}

// ---- Policies packed into pages (keys grow with their bytes, not their number) ----

fn serials(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|s| format!("{prefix}S{s:05}")).collect()
}

fn put_serials(
    kv: &MemoryKv,
    client: &Client<ScriptedTransport, FakeClock>,
    id: &str,
    serials: Vec<String>,
    at: chrono::DateTime<Utc>,
) -> Result<Value, vpp_licensing::ApiError> {
    let b: policy::PolicyBody = serde_json::from_value(json!({
        "name": format!("Policy {id}"), "accountId": ACCOUNT,
        "assets": [{"adamId": "100", "pricingParam": "STDQ"}], "serialNumbers": serials,
    }))
    .unwrap();
    block_on(policy::put(kv, client, id, &b, at, &mut budget())).map(|(_, v)| v)
}

fn policy_pages(kv: &MemoryKv) -> Vec<String> {
    kv.keys()
        .into_iter()
        .filter(|k| k.starts_with("policies/page/"))
        .collect()
}

/// Page number → the policy ids it holds.
fn page_holders(kv: &MemoryKv) -> BTreeMap<String, Vec<String>> {
    policy_pages(kv)
        .into_iter()
        .map(|k| {
            let page: BTreeMap<String, Value> = get_json(kv, &k).unwrap().unwrap();
            (k, page.into_keys().collect())
        })
        .collect()
}

fn snapshot(kv: &MemoryKv) -> MemoryKv {
    let copy = MemoryKv::default();
    for k in kv.keys() {
        copy.set(&k, &kv.get(&k).unwrap().unwrap()).unwrap();
    }
    copy
}

#[test]
fn policies_pack_into_pages_by_their_bytes() {
    // No licenses left: a put stores the policy and reports the shortfall, no Apple call.
    let kv = setup(vec![asset("100", 0, 0)]);
    let (_apple, client) = apple();
    for p in 0..80 {
        put_serials(
            &kv,
            &client,
            &format!("p{p}"),
            serials(&format!("P{p:03}"), 1_000),
            t0(),
        )
        .unwrap();
    }
    let index = policy::index(&kv).unwrap();
    let bytes: usize = index.iter().map(|s| s.bytes).sum();
    let pages = policy_pages(&kv);
    // ~13 KB each, ~1 MB in all: two pages, not 80 keys.
    assert!(bytes > 1_000_000, "{bytes}");
    assert!(pages.len() <= keys::policy_pages_for(bytes), "{pages:?}");
    assert!(pages.len() <= 3, "{pages:?}");
    assert!(kv.keys().iter().all(|k| !k.starts_with("policy/")));
    for k in &pages {
        assert!(kv.get(k).unwrap().unwrap().len() <= keys::POLICY_PAGE_BYTES);
    }
    // Each reads back as put, in order.
    let all = policy::list(&kv).unwrap();
    assert_eq!(all.len(), 80);
    assert_eq!(all[7].id, "p7");
    assert_eq!(all[7].serial_numbers, serials("P007", 1_000));
    assert_eq!(
        policy::load(&kv, "p79").unwrap().unwrap().serial_numbers,
        serials("P079", 1_000)
    );
    // Deleting frees room that the next policy reuses: no new page.
    for p in 0..40 {
        policy::delete(&kv, &format!("p{p}")).unwrap();
    }
    put_serials(&kv, &client, "new", serials("NEW", 1_000), t0()).unwrap();
    assert_eq!(policy_pages(&kv).len(), pages.len());
    assert_eq!(policy::list(&kv).unwrap().len(), 41);
    assert_eq!(policy::names_using_account(&kv, ACCOUNT).unwrap().len(), 41);
}

/// Fill page 0 close to full, with `p1` small on it; growing `p1` must move it.
fn nearly_full_page(client: &Client<ScriptedTransport, FakeClock>) -> MemoryKv {
    let kv = setup(vec![asset("100", 0, 0)]);
    put_serials(&kv, client, "p1", serials("ONE", 10), t0()).unwrap();
    // 13 KB each: 62 of them and p1 grown to 10,000 serials (130 KB) pass 900 KB.
    for p in 0..62 {
        put_serials(
            &kv,
            client,
            &format!("f{p}"),
            serials(&format!("F{p:03}"), 1_000),
            t0(),
        )
        .unwrap();
    }
    assert_eq!(policy_pages(&kv).len(), 1);
    kv
}

#[test]
fn a_policy_that_outgrows_its_page_moves_whole() {
    let (_apple, client) = apple();
    let kv = nearly_full_page(&client);
    let later = t0() + Duration::minutes(1);
    put_serials(&kv, &client, "p1", serials("ONE", 10_000), later).unwrap();
    let p1 = policy::load(&kv, "p1").unwrap().unwrap();
    assert_eq!(p1.serial_numbers, serials("ONE", 10_000));
    assert_eq!(p1.created_at, t0());
    let holders = page_holders(&kv);
    assert_eq!(holders.len(), 2);
    // Only on its new page.
    assert!(!holders["policies/page/0"].contains(&"p1".to_string()));
    assert_eq!(holders["policies/page/1"], vec!["p1".to_string()]);
    assert_eq!(policy::list(&kv).unwrap().len(), 63);
}

#[test]
fn a_put_killed_at_any_write_leaves_the_old_policy_or_the_new_and_stale_copies_go() {
    let (_apple, client) = apple();
    let base = nearly_full_page(&client);
    let old = policy::load(&base, "p1").unwrap().unwrap();
    let later = t0() + Duration::minutes(1);
    let mut outcomes = BTreeMap::new();
    for n in 0..8 {
        let kv = snapshot(&base);
        kv.fail_writes_after(n);
        let finished = put_serials(&kv, &client, "p1", serials("ONE", 10_000), later).is_ok();
        kv.heal();
        let now = policy::load(&kv, "p1").unwrap().unwrap();
        let moved = now.serial_numbers.len() == 10_000;
        assert!(
            moved || now == old,
            "kill after {n} writes: neither old nor new"
        );
        assert!(!finished || moved);
        let listed: Vec<_> = policy::list(&kv)
            .unwrap()
            .into_iter()
            .filter(|p| p.id == "p1")
            .collect();
        assert_eq!(listed.len(), 1, "kill after {n} writes");
        // A write of each page 11 minutes later drops every copy the index does not point at.
        let much_later = later + Duration::minutes(11);
        put_serials(&kv, &client, "f0", serials("F000", 1_000), much_later).unwrap();
        put_serials(&kv, &client, "big", serials("BIG", 10_000), much_later).unwrap();
        let on: Vec<String> = page_holders(&kv)
            .into_iter()
            .filter(|(_, ids)| ids.contains(&"p1".to_string()))
            .map(|(k, _)| k)
            .collect();
        assert_eq!(on.len(), 1, "kill after {n} writes: p1 on {on:?}");
        outcomes.insert(n, moved);
    }
    // Early kills keep the old policy, late ones the new: both were exercised.
    assert!(outcomes.values().any(|m| *m) && outcomes.values().any(|m| !*m));
}

#[test]
fn a_policy_of_an_earlier_version_is_read_then_moved_on_its_next_put() {
    let kv = setup(vec![asset("100", 0, 0)]);
    let (_apple, client) = apple();
    let legacy = json!({
        "id": "old", "name": "Old", "accountId": ACCOUNT,
        "assets": [{"adamId": "100", "pricingParam": "STDQ"}], "serialNumbers": ["A1"],
        "clientUserIds": [], "createdAt": "2024-06-01T00:00:00Z", "updatedAt": "2024-06-01T00:00:00Z",
    });
    set_json(&kv, &keys::policy("old"), &legacy).unwrap();
    set_json(
        &kv,
        &keys::policies(),
        &json!([{"id": "old", "name": "Old", "accountId": ACCOUNT}]),
    )
    .unwrap();
    assert_eq!(
        policy::load(&kv, "old").unwrap().unwrap().serial_numbers,
        vec!["A1"]
    );
    assert_eq!(policy::list(&kv).unwrap().len(), 1);
    assert_eq!(
        policy::names_using_account(&kv, ACCOUNT).unwrap(),
        vec!["Old"]
    );
    put_serials(&kv, &client, "old", vec!["A1".into(), "A2".into()], t0()).unwrap();
    assert!(kv.get(&keys::policy("old")).unwrap().is_none());
    let p = policy::load(&kv, "old").unwrap().unwrap();
    assert_eq!(p.serial_numbers, vec!["A1", "A2"]);
    assert_eq!(p.created_at.to_rfc3339(), "2024-06-01T00:00:00+00:00");
    // And a legacy policy is deleted with its value.
    set_json(&kv, &keys::policy("old2"), &json!({"id": "old2", "name": "Old 2", "accountId": ACCOUNT,
        "assets": [{"adamId": "100"}], "createdAt": "2024-06-01T00:00:00Z", "updatedAt": "2024-06-01T00:00:00Z"})).unwrap();
    let mut index: Vec<Value> = get_json(&kv, &keys::policies()).unwrap().unwrap();
    index.push(json!({"id": "old2", "name": "Old 2", "accountId": ACCOUNT}));
    set_json(&kv, &keys::policies(), &index).unwrap();
    policy::delete(&kv, "old2").unwrap();
    assert!(kv.get(&keys::policy("old2")).unwrap().is_none());
    assert_eq!(policy::list(&kv).unwrap().len(), 1);
}

#[test]
fn a_policy_too_large_to_store_is_refused_with_413_and_nothing_written() {
    let kv = setup(vec![asset("100", 0, 0)]);
    let (apple, client) = apple();
    // 20,000 serial numbers of 100 characters: ~2 MB stored.
    let long: Vec<String> = (0..20_000).map(|s| format!("{s:0100}")).collect();
    let before = kv.keys();
    let e = put_serials(&kv, &client, "huge", long, t0()).unwrap_err();
    assert_eq!(e.code, ErrorCode::PayloadTooLarge);
    assert_eq!(e.status(), 413);
    assert_eq!(
        e.body()["error"]["details"]["limitBytes"],
        keys::POLICY_MAX_BYTES
    );
    assert_eq!(kv.keys(), before);
    assert!(apple.posts.lock().unwrap().is_empty());
}

// ---- Pending events are bounded (one key each): sends wait, queued, for room ----

#[test]
fn sends_wait_queued_while_the_account_has_its_most_pending_events_and_the_ledger_job_makes_room() {
    let kv = setup(vec![asset("100", 1_000, 0), asset("200", 10, 0)]);
    let (apple, client) = apple();
    // A one-asset confirmed license to revoke later.
    block_on(assignment::assign(
        &kv,
        &client,
        &body("200", &["R1"]),
        t0(),
        &mut budget(),
    ))
    .unwrap();
    confirm_all(&kv);
    apple.posts.lock().unwrap().clear();
    // maxSerialNumbers 2: 204 serial numbers are 102 requests; room for 100 events.
    let many: Vec<String> = (0..204).map(|s| format!("M{s:03}")).collect();
    let many_refs: Vec<&str> = many.iter().map(String::as_str).collect();
    let out = block_on(assignment::assign(
        &kv,
        &client,
        &body("100", &many_refs),
        t0(),
        &mut job::Budget::new(t0(), 20, 500),
    ))
    .unwrap();
    assert_eq!(out.events.len(), keys::MAX_PENDING_EVENTS);
    assert_eq!(out.queued, 4);
    assert_eq!(apple.posts.lock().unwrap().len(), keys::MAX_PENDING_EVENTS);
    let pending: Vec<String> = get_json(&kv, &keys::account_events(ACCOUNT))
        .unwrap()
        .unwrap();
    assert_eq!(pending.len(), keys::MAX_PENDING_EVENTS);
    // A revoke waits too: nothing sent, the entry stays `revoking`, reported queued.
    let r = block_on(assignment::revoke(
        &kv,
        &client,
        &body("200", &["R1"]),
        t0(),
        &mut budget(),
    ))
    .unwrap();
    assert_eq!((r.events.len(), r.queued), (0, 1));
    assert_eq!(apple.posts.lock().unwrap().len(), keys::MAX_PENDING_EVENTS);
    assert_eq!(
        ledger(&kv, "200", "R1").unwrap().state,
        LedgerState::Revoking
    );

    // Apple finished every event; the account's ledger job polls them (they end, room is made)
    // and sends what waited.
    for id in &pending {
        apple.statuses.lock().unwrap().insert(
            id.clone(),
            json!({"eventStatus": "COMPLETE", "numCompleted": 2, "numRequested": 2}),
        );
    }
    client.clock().advance(std::time::Duration::from_secs(40));
    let (mut j, _) =
        vpp_licensing::ledger::start_job(&kv, "ledger-1", ACCOUNT, "admin", t0()).unwrap();
    block_on(vpp_licensing::ledger::run_slice(
        &kv,
        &client,
        &mut j,
        &mut job::Budget::new(t0() + Duration::seconds(40), 20, 500),
    ))
    .unwrap();
    let posts = apple.posts.lock().unwrap().clone();
    let sent: Vec<&Value> = posts[keys::MAX_PENDING_EVENTS..]
        .iter()
        .filter(|(p, _)| p.contains("associate") && !p.contains("dis"))
        .map(|(_, b)| b)
        .collect();
    assert_eq!(sent.len(), 2, "{posts:?}");
    let left: Vec<String> = get_json(&kv, &keys::account_events(ACCOUNT))
        .unwrap()
        .unwrap();
    assert_eq!(left.len(), 2, "the 100 ended; the 2 new ones pending");
    assert_eq!(
        ledger(&kv, "100", "M203").unwrap().state,
        LedgerState::Pending
    );
}

#[test]
fn a_clean_up_waits_for_room_among_pending_events_and_polls_to_make_it() {
    use vpp_licensing::cleanup;
    let kv = setup(vec![asset("100", 300, 210)]);
    let (apple, client) = apple();
    let doc = copy::all_assets(&kv, ACCOUNT).unwrap();
    let a = doc.assets[0].clone();
    let foreign: Vec<Subject> = (0..210)
        .map(|s| Subject::SerialNumber(format!("F{s:03}")))
        .collect();
    let pairs: Vec<(&AssetRecord, &Subject)> = foreign.iter().map(|s| (&a, s)).collect();
    copy::edit_assignments(&kv, ACCOUNT, &doc, &pairs, |_, _| {
        copy::Edit::Put(MadeBy::Foreign)
    })
    .unwrap();
    // 99 events of ours already pending: room for one more.
    for n in 0..(keys::MAX_PENDING_EVENTS - 1) {
        let rec = event::new_record(
            &format!("old{n}"),
            ACCOUNT,
            EventKind::Disassociate,
            "api",
            vec![],
            vec![],
            t0(),
        );
        event::track(&kv, &rec).unwrap();
    }
    let st = cleanup::initial_state(&kv, ACCOUNT).unwrap();
    let mut j = job::Job::new("cleanup-1", "cleanup", Some(ACCOUNT), "admin", t0());
    j.checkpoint = serde_json::to_value(&st).unwrap();
    let end = block_on(cleanup::run_slice(
        &kv,
        &client,
        &mut j,
        &mut job::Budget::new(t0(), 20, 500),
    ))
    .unwrap();
    assert_eq!(end, vpp_licensing::refresh::SliceEnd::Paused);
    let sent = || {
        apple
            .posts
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p.contains("disassociate"))
            .count()
    };
    assert_eq!(sent(), 1, "one request, then no room");
    // Apple finished them all: the next slice polls, which makes room, and goes on until the
    // account is full again.
    let pending: Vec<String> = get_json(&kv, &keys::account_events(ACCOUNT))
        .unwrap()
        .unwrap();
    for id in &pending {
        apple
            .statuses
            .lock()
            .unwrap()
            .insert(id.clone(), json!({"eventStatus": "COMPLETE"}));
    }
    client.clock().advance(std::time::Duration::from_secs(40));
    let later = t0() + Duration::seconds(40);
    let end = block_on(cleanup::run_slice(
        &kv,
        &client,
        &mut j,
        &mut job::Budget::new(later, 20, 500),
    ))
    .unwrap();
    assert_eq!(end, vpp_licensing::refresh::SliceEnd::Paused);
    assert_eq!(sent(), 1 + keys::MAX_PENDING_EVENTS);
    let pending: Vec<String> = get_json(&kv, &keys::account_events(ACCOUNT))
        .unwrap()
        .unwrap();
    assert_eq!(pending.len(), keys::MAX_PENDING_EVENTS);
}

/// Two calls running one reconcile at once: the second stays out while the first holds the
/// lease, so each license is taken back by one request and the job's record lists every event
/// (the two used to share the lease, whose holder was the job id; the one that saved last wrote
/// over the other's events).
#[test]
fn a_reconcile_run_from_two_calls_at_once_takes_back_each_license_once() {
    let kv = setup(vec![asset("100", 5, 0)]);
    let (_apple, client) = apple();
    put_policy(&kv, &client, "p1", &["A", "B", "C"]);
    confirm_all(&kv);
    put_policy(&kv, &client, "p1", &["A"]);
    let posts: Arc<Mutex<Vec<Value>>> = Arc::default();
    let make = |posts: Arc<Mutex<Vec<Value>>>| {
        let t = ScriptedTransport::new(move |req: &AppleRequest, n| match req.method {
            Method::Post => {
                let body: Value =
                    serde_json::from_slice(req.body.as_deref().unwrap_or(b"{}")).unwrap();
                posts.lock().unwrap().push(body);
                Ok(apple_json(200, json!({"eventId": format!("re{n}")})))
            }
            _ => Ok(apple_json(200, json!({"eventStatus": "PENDING"}))),
        });
        Client::new(t, FakeClock::default())
            .with_policy(vpp_apple::RetryPolicy::none())
            .with_pacer(vpp_apple::Pacer::unlimited())
    };
    let (mut j, _) = reconcile::start(&kv, "job1", "admin", t0()).unwrap();
    // The second call comes in right after the first one's first swap (its lease).
    let second: Arc<Mutex<Option<bool>>> = Arc::default();
    let (mut twin, out, theirs) = (j.clone(), second.clone(), posts.clone());
    kv.after_next_swap(move |kv| {
        let done = block_on(reconcile::run_slice(
            kv,
            &mut twin,
            |_| make(theirs.clone()),
            t0(),
            &mut budget(),
        ))
        .unwrap();
        *out.lock().unwrap() = Some(done);
    });
    let done = block_on(reconcile::run_slice(
        &kv,
        &mut j,
        |_| make(posts.clone()),
        t0(),
        &mut budget(),
    ))
    .unwrap();
    assert!(done);
    assert_eq!(
        *second.lock().unwrap(),
        Some(false),
        "the second call did not run the job"
    );
    let posts = posts.lock().unwrap().clone();
    assert_eq!(posts.len(), 1, "one disassociate: {posts:?}");
    let stored = job::load(&kv, "job1").unwrap().unwrap();
    let result = stored.result.expect("finished");
    assert_eq!(result["revoked"], 2, "{result}");
    assert_eq!(
        result["events"].as_array().map(Vec::len),
        Some(1),
        "{result}"
    );
    assert!(!kv.exists(&keys::lease("reconcile")).unwrap());
}
