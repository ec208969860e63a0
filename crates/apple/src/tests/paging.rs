use serde_json::json;

use super::{client_with, path, query_value};
use crate::client::{check_owner, AssetFilter, AssignmentFilter, Ownership, UserFilter};
use crate::testing::{block_on, json as resp, FakeClock, ScriptedTransport};
use crate::types::{Limits, MdmInfo};
use crate::AppleError;

fn page_index(req: &crate::AppleRequest) -> u32 {
    query_value(req, "pageIndex")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `pages` pages of 2 assets; the version changes after the first page; `totalPages` grows.
fn assets_server(pages: u32) -> ScriptedTransport {
    ScriptedTransport::new(move |req, _| {
        assert_eq!(path(req), "assets");
        let i = page_index(req);
        let mut body = json!({
            "assets": [
                {"adamId": format!("{i}-a"), "pricingParam": "STDQ", "availableCount": 1},
                {"adamId": format!("{i}-b"), "pricingParam": "STDQ"},
            ],
            "currentPageIndex": i, "size": 2,
            "totalPages": if i == 0 { 1 } else { pages },
            "versionId": format!("version-{i}"),
            "mdmInfo": {"id": "ours", "name": "vpp-spin", "metadata": "x"},
        });
        if i + 1 < pages {
            body["nextPageIndex"] = json!(i + 1);
        }
        Ok(resp(200, body))
    })
}

#[test]
fn all_assets_reads_every_page_and_no_more() {
    let clock = FakeClock::default();
    let c = client_with(assets_server(4), clock, Limits::default());
    let all = block_on(c.all_assets(&AssetFilter::default())).unwrap();
    assert_eq!(c.transport().calls(), 4);
    assert_eq!(all.assets.len(), 8);
    assert_eq!(all.assets[7].adam_id, "3-b");
    // versionId from the first page, even though later pages report others.
    assert_eq!(all.version_id.as_deref(), Some("version-0"));
    assert!(all.next_page_index.is_none());
    let indexes: Vec<u32> = c.transport().requests().iter().map(page_index).collect();
    assert_eq!(indexes, vec![0, 1, 2, 3]);
    // The first request omits pageIndex (0 is the default).
    assert_eq!(query_value(&c.transport().requests()[0], "pageIndex"), None);
    assert_eq!(
        check_owner("ours", c.last_mdm_info().as_ref()),
        Ownership::Ours
    );
}

#[test]
fn single_page_without_next_stops() {
    let c = client_with(assets_server(1), FakeClock::default(), Limits::default());
    let all = block_on(c.all_assets(&AssetFilter::adam_id("408709785"))).unwrap();
    assert_eq!(c.transport().calls(), 1);
    assert_eq!(all.assets.len(), 2);
    assert_eq!(
        query_value(&c.transport().requests()[0], "adamId").as_deref(),
        Some("408709785")
    );
}

#[test]
fn non_advancing_next_page_is_an_error_not_a_loop() {
    let t = ScriptedTransport::new(|_, _| {
        Ok(resp(
            200,
            json!({"assets": [], "currentPageIndex": 0, "nextPageIndex": 0}),
        ))
    });
    let c = client_with(t, FakeClock::default(), Limits::default());
    let err = block_on(c.all_assets(&AssetFilter::default())).unwrap_err();
    assert!(matches!(err, AppleError::Decode(_)), "{err:?}");
    assert_eq!(c.transport().calls(), 1);
}

#[test]
fn assignments_since_version_and_filters() {
    let t = ScriptedTransport::new(|req, _| {
        assert_eq!(path(req), "assignments");
        assert_eq!(query_value(req, "sinceVersionId").as_deref(), Some("v-old"));
        assert_eq!(query_value(req, "adamId").as_deref(), Some("1"));
        assert_eq!(query_value(req, "pricingParam").as_deref(), Some("STDQ"));
        let i = page_index(req);
        let mut body = json!({
            "assignments": [{"adamId": "1", "pricingParam": "STDQ", "serialNumber": format!("s{i}")}],
            "currentPageIndex": i, "totalPages": 2, "versionId": format!("v-new-{i}"),
        });
        if i == 0 {
            body["nextPageIndex"] = json!(1);
        }
        Ok(resp(200, body))
    });
    let c = client_with(t, FakeClock::default(), Limits::default());
    let filter = AssignmentFilter {
        adam_id: Some("1".into()),
        pricing_param: Some(crate::PricingParam::Stdq),
        ..Default::default()
    };
    let all = block_on(c.all_assignments(&filter, Some("v-old"))).unwrap();
    assert_eq!(c.transport().calls(), 2);
    assert_eq!(all.assignments.len(), 2);
    assert_eq!(all.version_id.as_deref(), Some("v-new-0"));
}

#[test]
fn users_paging() {
    let t = ScriptedTransport::new(|req, _| {
        assert_eq!(path(req), "users");
        let i = page_index(req);
        let mut body = json!({"users": [{"clientUserId": format!("u{i}"), "status": "Registered"}],
            "currentPageIndex": i, "versionId": "vu"});
        if i < 2 {
            body["nextPageIndex"] = json!(i + 1);
        }
        Ok(resp(200, body))
    });
    let c = client_with(t, FakeClock::default(), Limits::default());
    let all = block_on(c.all_users(&UserFilter::default(), None)).unwrap();
    assert_eq!(c.transport().calls(), 3);
    assert_eq!(all.users.len(), 3);
    assert_eq!(
        query_value(&c.transport().requests()[0], "sinceVersionId"),
        None
    );
}

#[test]
fn error_mid_paging_is_returned() {
    let t = ScriptedTransport::new(|req, _| {
        if page_index(req) == 1 {
            return Ok(resp(
                400,
                json!({"errorNumber": 9650, "errorMessage": "bad page"}),
            ));
        }
        Ok(resp(200, json!({"assets": [], "nextPageIndex": 1})))
    });
    let c = client_with(t, FakeClock::default(), Limits::default());
    let err = block_on(c.all_assets(&AssetFilter::default())).unwrap_err();
    assert_eq!(err.number(), Some(9650));
}

#[test]
fn ownership_checks() {
    let m = |id: &str| MdmInfo {
        id: id.into(),
        name: "Other MDM".into(),
        metadata: String::new(),
    };
    assert_eq!(check_owner("me", Some(&m("me"))), Ownership::Ours);
    assert_eq!(
        check_owner("me", Some(&m("them"))),
        Ownership::Foreign {
            id: "them".into(),
            name: "Other MDM".into()
        }
    );
    assert_eq!(check_owner("me", None), Ownership::Unclaimed);
    assert_eq!(check_owner("me", Some(&m(""))), Ownership::Unclaimed);

    let t = ScriptedTransport::new(|req, _| {
        assert_eq!(path(req), "client/config");
        Ok(resp(
            200,
            json!({"locationName": "L", "mdmInfo": {"id": "them", "name": "Jamf", "metadata": ""}}),
        ))
    });
    let c = client_with(t, FakeClock::default(), Limits::default());
    assert_eq!(
        block_on(c.verify_owner("me")).unwrap(),
        Ownership::Foreign {
            id: "them".into(),
            name: "Jamf".into()
        }
    );
    assert_eq!(c.last_mdm_info().map(|m| m.id), Some("them".to_string()));
}

#[test]
fn event_status_and_decode_errors() {
    let t = ScriptedTransport::sequence(vec![
        Ok(resp(
            200,
            json!({"eventStatus": "COMPLETE", "eventType": "REVOKE", "numCompleted": 1, "numRequested": 1}),
        )),
        Ok(crate::AppleResponse::new(200, "not json")),
        Ok(resp(200, json!({"eventType": "REVOKE"}))),
    ]);
    let c = client_with(t, FakeClock::default(), Limits::default());
    let st = block_on(c.event_status("e-1")).unwrap();
    assert_eq!(st.event_status, crate::EventStatusKind::Complete);
    assert_eq!(
        query_value(&c.transport().requests()[0], "eventId").as_deref(),
        Some("e-1")
    );
    assert!(matches!(
        block_on(c.event_status("e-1")),
        Err(AppleError::Decode(_))
    ));
    assert!(matches!(
        block_on(c.event_status("e-1")),
        Err(AppleError::Decode(_))
    ));
}

/// `pages` pages of one asset each, advertising `advertised` total pages.
fn fixed_server(pages: u32, advertised: u32) -> ScriptedTransport {
    ScriptedTransport::new(move |req, _| {
        let i = page_index(req);
        if i >= pages {
            return Ok(resp(
                400,
                json!({"errorNumber": 9650, "errorMessage": "bad page index"}),
            ));
        }
        let mut body = json!({"assets": [{"adamId": format!("{i}")}], "currentPageIndex": i,
            "totalPages": advertised, "versionId": format!("v{i}")});
        if i + 1 < pages {
            body["nextPageIndex"] = json!(i + 1);
        }
        Ok(resp(200, body))
    })
}

#[test]
fn up_to_five_pages_in_flight_reads_all_and_no_more() {
    let c = client_with(fixed_server(7, 7), FakeClock::default(), Limits::default())
        .with_page_concurrency(5);
    let all = block_on(c.all_assets(&AssetFilter::default())).unwrap();
    let ids: Vec<String> = all.assets.iter().map(|a| a.adam_id.clone()).collect();
    assert_eq!(ids, vec!["0", "1", "2", "3", "4", "5", "6"]);
    assert_eq!(c.transport().calls(), 7);
    assert_eq!(all.version_id.as_deref(), Some("v0"));
    // Never above the cap.
    let c = client_with(fixed_server(3, 3), FakeClock::default(), Limits::default())
        .with_page_concurrency(50);
    block_on(c.all_assets(&AssetFilter::default())).unwrap();
    assert_eq!(c.transport().calls(), 3);
}

#[test]
fn shrinking_total_pages_is_tolerated() {
    // Apple said 6 pages but only 3 exist now: the speculative pages are dropped.
    let c = client_with(fixed_server(3, 6), FakeClock::default(), Limits::default())
        .with_page_concurrency(5);
    let all = block_on(c.all_assets(&AssetFilter::default())).unwrap();
    assert_eq!(all.assets.len(), 3);
    // Growing totals (assets_server advertises 1 on the first page) are followed too.
    let c = client_with(assets_server(4), FakeClock::default(), Limits::default())
        .with_page_concurrency(5);
    let all = block_on(c.all_assets(&AssetFilter::default())).unwrap();
    assert_eq!(all.assets.len(), 8);
    assert_eq!(c.transport().calls(), 4);
}
