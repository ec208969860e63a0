use serde_json::json;

use super::{client_with, path};
use crate::client::{split_manage, split_revoke, split_users};
use crate::testing::{block_on, json as resp, FakeClock, ScriptedTransport};
use crate::types::*;

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

fn events_server() -> ScriptedTransport {
    ScriptedTransport::new(|_, n| Ok(resp(200, json!({"eventId": format!("ev-{n}")}))))
}

fn body<T: serde::de::DeserializeOwned>(req: &crate::AppleRequest) -> T {
    serde_json::from_slice(req.body.as_deref().unwrap_or_default()).unwrap()
}

#[test]
fn associate_2500_serials_makes_3_requests() {
    let c = client_with(events_server(), FakeClock::default(), Limits::default());
    let req = ManageAssetsRequest {
        assets: vec![AssetRef::new("408709785", PricingParam::Stdq)],
        serial_numbers: ids("S", 2500),
        ..Default::default()
    };
    let events = block_on(c.associate(&req)).unwrap();
    assert_eq!(events.len(), 3);
    let reqs = c.transport().requests();
    assert_eq!(reqs.len(), 3);
    let sizes: Vec<usize> = reqs
        .iter()
        .map(|r| {
            assert_eq!(path(r), "assets/associate");
            assert_eq!(r.method, crate::Method::Post);
            body::<ManageAssetsRequest>(r).serial_numbers.len()
        })
        .collect();
    assert_eq!(sizes, vec![1000, 1000, 500]);
    // Every serial sent exactly once.
    let mut sent: Vec<String> = reqs
        .iter()
        .flat_map(|r| body::<ManageAssetsRequest>(r).serial_numbers)
        .collect();
    sent.sort();
    let mut want = ids("S", 2500);
    want.sort();
    assert_eq!(sent, want);
    assert_eq!(events[2].event_id, "ev-2");
}

#[test]
fn revoke_250_serials_makes_3_requests_of_at_most_100() {
    let c = client_with(events_server(), FakeClock::default(), Limits::default());
    let events = block_on(c.revoke(&RevokeAssetsRequest {
        serial_numbers: ids("S", 250),
        ..Default::default()
    }))
    .unwrap();
    assert_eq!(events.len(), 3);
    let sizes: Vec<usize> = c
        .transport()
        .requests()
        .iter()
        .map(|r| {
            assert_eq!(path(r), "assets/revoke");
            body::<RevokeAssetsRequest>(r).serial_numbers.len()
        })
        .collect();
    assert_eq!(sizes, vec![100, 100, 50]);
}

#[test]
fn manage_split_by_assets_and_kind() {
    let limits = Limits::default();
    let req = ManageAssetsRequest {
        assets: (0..30)
            .map(|i| AssetRef::new(i.to_string(), PricingParam::Stdq))
            .collect(),
        serial_numbers: ids("S", 1001),
        client_user_ids: ids("U", 10),
    };
    let parts = split_manage(&req, &limits);
    // 2 asset chunks (25 + 5) × (2 serial chunks + 1 user chunk).
    assert_eq!(parts.len(), 6);
    for p in &parts {
        assert!(p.assets.len() <= 25);
        assert!(p.serial_numbers.len() <= 1000);
        assert!(p.client_user_ids.len() <= 1000);
        // One kind of id per request.
        assert!(p.serial_numbers.is_empty() != p.client_user_ids.is_empty());
    }
    // Duplicates are dropped.
    let dup = ManageAssetsRequest {
        assets: vec![AssetRef::new("1", PricingParam::Stdq); 3],
        serial_numbers: vec!["s".into(), "s".into()],
        ..Default::default()
    };
    let parts = split_manage(&dup, &limits);
    assert_eq!(parts.len(), 1);
    assert_eq!(parts[0].assets.len(), 1);
    assert_eq!(parts[0].serial_numbers, vec!["s"]);
    // No ids at all: one request still goes out, so Apple answers 9719.
    let none = ManageAssetsRequest {
        assets: vec![AssetRef::new("1", PricingParam::Stdq)],
        ..Default::default()
    };
    assert_eq!(split_manage(&none, &limits).len(), 1);
    // A zero limit from Apple cannot make an infinite loop.
    let zero = Limits {
        max_serial_numbers: 0,
        ..Limits::default()
    };
    assert_eq!(split_manage(&dup, &zero).len(), 1);
}

#[test]
fn revoke_users_and_serials_split_separately() {
    let parts = split_revoke(
        &RevokeAssetsRequest {
            client_user_ids: ids("U", 150),
            serial_numbers: ids("S", 20),
        },
        &Limits::default(),
    );
    assert_eq!(parts.len(), 3);
    assert_eq!(parts[0].serial_numbers.len(), 20);
    assert_eq!(parts[1].client_user_ids.len(), 100);
    assert_eq!(parts[2].client_user_ids.len(), 50);
}

#[test]
fn users_split_by_max_users() {
    let users: Vec<RequestUser> = ids("U", 250).into_iter().map(RequestUser::id).collect();
    let parts = split_users(&users, &Limits::default());
    assert_eq!(
        parts.iter().map(|p| p.users.len()).collect::<Vec<_>>(),
        vec![100, 100, 50]
    );

    let c = client_with(events_server(), FakeClock::default(), Limits::default());
    let events = block_on(c.retire_users(&ids("U", 150))).unwrap();
    assert_eq!(events.len(), 2);
    let reqs = c.transport().requests();
    assert!(reqs.iter().all(|r| path(r) == "users/retire"));
    let first: serde_json::Value = body(&reqs[0]);
    assert_eq!(first["users"][0], json!({"clientUserId": "U0"}));
    block_on(c.create_users(&users)).unwrap();
    block_on(c.update_users(&users[..1])).unwrap();
    let reqs = c.transport().requests();
    assert_eq!(reqs.len(), 2 + 3 + 1);
    assert_eq!(path(&reqs[5]), "users/update");
}

#[test]
fn partial_failure_reports_submitted_events() {
    let t = ScriptedTransport::new(|_, n| {
        if n == 1 {
            Ok(resp(
                400,
                json!({"errorNumber": 9702, "errorMessage": "too many"}),
            ))
        } else {
            Ok(resp(200, json!({"eventId": format!("ev-{n}")})))
        }
    });
    let c = client_with(t, FakeClock::default(), Limits::default());
    let err = block_on(c.disassociate(&ManageAssetsRequest {
        assets: vec![AssetRef::new("1", PricingParam::Stdq)],
        serial_numbers: ids("S", 2500),
        ..Default::default()
    }))
    .unwrap_err();
    assert_eq!(err.submitted.len(), 1);
    assert_eq!(err.submitted[0].event_id, "ev-0");
    assert_eq!(err.error.number(), Some(9702));
    // Stops at the first failure.
    assert_eq!(c.transport().calls(), 2);
    let as_apple: crate::AppleError = err.into();
    assert_eq!(as_apple.code(), "apple_validation");
}

#[test]
fn limits_come_from_service_config() {
    // No injected config: the client reads service/config first and uses its limits.
    let t = ScriptedTransport::new(|req, n| {
        if path(req) == "service/config" {
            assert_eq!(n, 0);
            return Ok(resp(
                200,
                json!({"limits": {"maxSerialNumbers": 10, "maxRequestPerSecond": 3}}),
            ));
        }
        Ok(resp(200, json!({"eventId": "e"})))
    });
    let c = crate::Client::new(t, FakeClock::default());
    let events = block_on(c.associate(&ManageAssetsRequest {
        assets: vec![AssetRef::new("1", PricingParam::Stdq)],
        serial_numbers: ids("S", 25),
        ..Default::default()
    }))
    .unwrap();
    assert_eq!(events.len(), 3);
    assert_eq!(c.pacer().max_per_second(), 3);
    // Cached: a second call does not re-read service/config.
    block_on(c.revoke(&RevokeAssetsRequest {
        serial_numbers: ids("S", 1),
        ..Default::default()
    }))
    .unwrap();
    let config_reads = c
        .transport()
        .requests()
        .iter()
        .filter(|r| path(r) == "service/config")
        .count();
    assert_eq!(config_reads, 1);
}

#[test]
fn service_config_is_reread_after_five_minutes() {
    let t = ScriptedTransport::new(|_, _| Ok(resp(200, json!({"limits": {}}))));
    let clock = FakeClock::default();
    let c = crate::Client::new(t, clock.clone());
    block_on(c.service_config()).unwrap();
    clock.advance(std::time::Duration::from_secs(299));
    block_on(c.service_config()).unwrap();
    assert_eq!(c.transport().calls(), 1);
    clock.advance(std::time::Duration::from_secs(2));
    block_on(c.service_config()).unwrap();
    assert_eq!(c.transport().calls(), 2);
}
