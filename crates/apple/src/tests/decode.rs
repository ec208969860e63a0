//! Apple's documented example payloads (apple-api.md) decode and round-trip.

use serde_json::json;

use crate::types::*;

#[test]
fn service_config_example() {
    let v = json!({
      "limits": { "maxAssets": 25, "maxUsers": 100, "maxNotificationLength": 512,
                  "maxRevokeClientUserIds": 100, "maxClientUserIds": 1000, "maxSerialNumbers": 1000,
                  "maxRevokeSerialNumbers": 100, "maxRequestPerSecond": 15, "maxSubscriptions": 25,
                  "maxSubscriptionClientUserIds": 1000, "maxMdmNameLength": 100,
                  "maxMdmMetadataLength": 255, "maxMdmIdLength": 100 },
      "notificationTypes": ["ASSET_MANAGEMENT","USER_MANAGEMENT","USER_ASSOCIATED","ASSET_COUNT"],
      "urls": {
        "invitationEmail": "https://buy.itunes.apple.com/WebObjects/MZFinance.woa/wa/associateVPPUserWithITSAccount?inviteCode=%25inviteCode%25&mt=8",
        "clientConfig": ".../mdm/v2/client/config", "createUsers": ".../mdm/v2/users/create",
        "getAssignments": ".../mdm/v2/assignments", "revokeAssets": ".../mdm/v2/assets/revoke",
        "contentMetadataLookup": "https://uclient-api.itunes.apple.com/WebObjects/MZStorePlatform.woa/wa/lookup",
        "getUsers": ".../mdm/v2/users", "eventStatus": ".../mdm/v2/status",
        "associateAssets": ".../mdm/v2/assets/associate", "disassociateAssets": ".../mdm/v2/assets/disassociate",
        "updateUsers": ".../mdm/v2/users/update", "getAssets": ".../mdm/v2/assets", "retireUsers": ".../mdm/v2/users/retire"
      },
      "errorCodes": [ {"errorNumber": 9601, "errorMessage": "Login required."}, "..." ]
    });
    let cfg: ServiceConfig = serde_json::from_value(v).unwrap();
    assert_eq!(cfg.limits, Limits::default());
    assert_eq!(cfg.limits.max_request_per_second, 15);
    assert_eq!(cfg.notification_types.len(), 4);
    assert_eq!(cfg.notification_types[0], NotificationType::AssetManagement);
    assert_eq!(
        cfg.urls.content_metadata_lookup.as_deref(),
        Some("https://uclient-api.itunes.apple.com/WebObjects/MZStorePlatform.woa/wa/lookup")
    );
    let known = cfg.known_errors();
    assert_eq!(known.len(), 1);
    assert_eq!(known[0].error_number, 9601);
}

#[test]
fn limits_default_when_missing() {
    let cfg: ServiceConfig = serde_json::from_value(json!({"limits": {"maxAssets": 10}})).unwrap();
    assert_eq!(cfg.limits.max_assets, 10);
    assert_eq!(cfg.limits.max_serial_numbers, 1000);
    assert_eq!(cfg.limits.max_revoke_serial_numbers, 100);
    let cfg: ServiceConfig = serde_json::from_value(json!({})).unwrap();
    assert_eq!(cfg.limits, Limits::default());
}

#[test]
fn client_config_request_and_response() {
    let req = json!({ "mdmInfo": { "id": "522d5c43-44ca-4f7e-ba7a-53570cf60765", "name": "Apple Configurator 2", "metadata": "2.13.3" },
      "notificationUrl": "https://www.next.com/notification",
      "notificationAuthToken": "SUp3rS3Cr3t",
      "notificationTypes": ["ASSET_COUNT","ASSET_MANAGEMENT","USER_MANAGEMENT","USER_ASSOCIATED"] });
    let parsed: ClientConfigRequest = serde_json::from_value(req.clone()).unwrap();
    assert_eq!(serde_json::to_value(&parsed).unwrap(), req);
    assert_eq!(
        serde_json::to_value(ClientConfigRequest::default()).unwrap(),
        json!({})
    );

    let resp = json!({ "countryISO2ACode": "US", "defaultPlatform": "volumestore", "locationName": "PS01",
      "mdmInfo": { "id": "522d5c43-...", "name": "Apple Configurator 2", "metadata": "2.13.3" },
      "notificationAuthToken": "SUp3rS3Cr3t", "notificationUrl": "https://www.next.com/notification",
      "subscribedNotificationTypes": ["ASSET_COUNT","ASSET_MANAGEMENT","USER_MANAGEMENT","USER_ASSOCIATED"],
      "tokenExpirationDate": "2030-11-08T22:33:22+0000", "uId": "2049025000431439", "websiteURL": "https://school.apple.com",
      "someFutureField": {"x": 1} });
    let cfg: ClientConfig = serde_json::from_value(resp).unwrap();
    assert_eq!(cfg.country_iso2a_code.as_deref(), Some("US"));
    assert_eq!(cfg.default_platform.as_deref(), Some("volumestore"));
    assert_eq!(cfg.location_name.as_deref(), Some("PS01"));
    assert_eq!(
        cfg.mdm_info.as_ref().map(|m| m.id.as_str()),
        Some("522d5c43-...")
    );
    assert_eq!(cfg.u_id.as_deref(), Some("2049025000431439"));
    assert_eq!(cfg.website_url.as_deref(), Some("https://school.apple.com"));
    assert_eq!(cfg.subscribed_notification_types.len(), 4);
    assert!(cfg.token_expires_at().is_some());
    // A fresh location: no mdmInfo.
    let cfg: ClientConfig = serde_json::from_value(json!({"locationName": "L"})).unwrap();
    assert!(cfg.mdm_info.is_none());
}

#[test]
fn asset_and_assets_page() {
    let a = json!({ "adamId": "408709785", "assignedCount": 5000, "availableCount": 10000, "deviceAssignable": true,
      "pricingParam": "STDQ", "productType": "App", "retiredCount": 0, "revocable": true,
      "supportedPlatforms": ["iOS"], "totalCount": 15000 });
    let asset: Asset = serde_json::from_value(a.clone()).unwrap();
    assert_eq!(asset.adam_id, "408709785");
    assert_eq!(asset.pricing_param, PricingParam::Stdq);
    assert_eq!(asset.product_type, Some(ProductType::App));
    assert_eq!(asset.available_count, Some(10000));
    assert!(!asset.is_unlimited());
    assert_eq!(serde_json::to_value(&asset).unwrap(), a);

    let page: AssetsPage = serde_json::from_value(json!({
        "assets": [a, {"adamId": "1", "pricingParam": "PLUS", "productType": "Book", "totalCount": 2147483647}],
        "unlimitedAssets": [{"adamId": "2", "pricingParam": "STDQ", "productType": "App", "assignedCount": 3}],
        "currentPageIndex": 0, "nextPageIndex": 1, "size": 2, "totalPages": 2,
        "versionId": "v1", "tokenExpirationDate": "2030-11-08T22:33:22+0000", "uId": "2049025000431439"
    }))
    .unwrap();
    assert_eq!(page.assets.len(), 2);
    assert!(page.assets[1].is_unlimited());
    assert_eq!(page.assets[1].pricing_param, PricingParam::Plus);
    assert_eq!(page.unlimited_assets[0].assigned_count, Some(3));
    assert_eq!(page.next_page_index, Some(1));
    assert_eq!(page.version_id.as_deref(), Some("v1"));
}

#[test]
fn assignments_page_example() {
    let page: AssignmentsPage = serde_json::from_value(json!({ "assignments": [ {"adamId":"408709785","clientUserId":"client-1","pricingParam":"STDQ"},
                   {"adamId":"408709785","serialNumber":"serial-1","pricingParam":"STDQ"} ],
      "size": 2, "currentPageIndex": 0, "totalPages": 1, "versionId": "009061cb-...",
      "tokenExpirationDate": "2030-11-08T22:33:22+0000", "uId": "2049025000431439" }))
    .unwrap();
    assert_eq!(page.assignments.len(), 2);
    assert_eq!(
        page.assignments[0].client_user_id.as_deref(),
        Some("client-1")
    );
    assert_eq!(
        page.assignments[1].serial_number.as_deref(),
        Some("serial-1")
    );
    assert!(page.next_page_index.is_none());
    // Unknown per-assignment fields (includeUserState) are kept.
    let a: Assignment =
        serde_json::from_value(json!({"adamId": 42, "serialNumber": "S", "userState": "active"}))
            .unwrap();
    assert_eq!(a.adam_id, "42");
    assert_eq!(a.pricing_param, PricingParam::Stdq);
    assert_eq!(a.extra.get("userState"), Some(&json!("active")));
}

#[test]
fn manage_and_revoke_requests() {
    let v = json!({ "assets": [ {"adamId":"408709785","pricingParam":"STDQ"}, {"adamId":"377298193","pricingParam":"STDQ"} ],
      "clientUserIds": ["client-1","client-2"], "serialNumbers": ["serial-1","serial-2"] });
    let req: ManageAssetsRequest = serde_json::from_value(v.clone()).unwrap();
    assert_eq!(serde_json::to_value(&req).unwrap(), v);
    // Empty id lists are not sent.
    let only_serials = ManageAssetsRequest {
        assets: vec![AssetRef::new("1", PricingParam::Stdq)],
        serial_numbers: vec!["s".into()],
        ..Default::default()
    };
    assert_eq!(
        serde_json::to_value(&only_serials).unwrap(),
        json!({"assets": [{"adamId": "1", "pricingParam": "STDQ"}], "serialNumbers": ["s"]})
    );
    let r: RevokeAssetsRequest =
        serde_json::from_value(json!({"clientUserIds": ["c"], "serialNumbers": ["s"]})).unwrap();
    assert_eq!(r.client_user_ids, vec!["c"]);
    // pricingParam omitted in a request asset defaults to STDQ.
    let a: AssetRef = serde_json::from_value(json!({"adamId": "1"})).unwrap();
    assert_eq!(a.pricing_param, PricingParam::Stdq);
}

#[test]
fn event_response_and_status() {
    let ev: EventResponse = serde_json::from_value(json!({ "eventId": "ed3edfc3-e617-465e-b309-a17925266e14", "tokenExpirationDate": "2030-11-08T22:33:22+0000", "uId": "2049025000431439" })).unwrap();
    assert_eq!(ev.event_id, "ed3edfc3-e617-465e-b309-a17925266e14");
    assert!(ev.mdm_info.is_none());

    let st: EventStatus = serde_json::from_value(json!({ "eventStatus": "FAILED", "eventType": "ASSOCIATE",
      "failures": [ { "errorInfo": {"clientUserIds": ["client-4"]}, "errorNumber": 9609, "errorMessage": "Registered user not found" } ],
      "numCompleted": 14, "numRequested": 16, "tokenExpirationDate": "2030-11-08T22:33:22+0000", "uId": "2049025000431439" })).unwrap();
    assert_eq!(st.event_status, EventStatusKind::Failed);
    assert_eq!(st.event_type, Some(EventType::Associate));
    assert_eq!(st.num_completed, Some(14));
    assert_eq!(st.num_requested, Some(16));
    assert_eq!(st.failures[0].error_number, 9609);
    assert_eq!(
        st.failures[0].error_info.as_ref().unwrap().client_user_ids,
        vec!["client-4"]
    );
}

#[test]
fn users_page_and_requests() {
    let page: UsersPage = serde_json::from_value(json!({ "currentPageIndex": 0, "size": 3, "totalPages": 1, "uId": "2049025000431439",
      "tokenExpirationDate": "2030-11-08T22:33:22+0000", "versionId": "021f10a0-7035-11eb-9f67-bd1df52e1e13",
      "users": [ {"clientUserId":"client-101","email":"client-101@apple.com","inviteCode":"46bc93ea3acd41e0a4919c02db0d7d3a","status":"Registered"},
                 {"clientUserId":"client-103","email":"client-1031@apple.com","status":"Retired"} ] })).unwrap();
    assert_eq!(page.users.len(), 2);
    assert_eq!(page.users[0].status, Some(UserStatus::Registered));
    assert_eq!(page.users[1].status, Some(UserStatus::Retired));
    assert!(page.users[1].invite_code.is_none());

    let req = ManageUsersRequest {
        users: vec![
            RequestUser {
                client_user_id: "c1".into(),
                email: Some("a@b.c".into()),
                managed_apple_id: None,
            },
            RequestUser::id("c2"),
        ],
    };
    assert_eq!(
        serde_json::to_value(&req).unwrap(),
        json!({"users": [{"clientUserId": "c1", "email": "a@b.c"}, {"clientUserId": "c2"}]})
    );
}

#[test]
fn tolerant_enums_round_trip() {
    for (s, e) in [
        ("STDQ", PricingParam::Stdq),
        ("PLUS", PricingParam::Plus),
        ("FUTURE", PricingParam::Other("FUTURE".into())),
    ] {
        let parsed: PricingParam = serde_json::from_value(json!(s)).unwrap();
        assert_eq!(parsed, e);
        assert_eq!(serde_json::to_value(&parsed).unwrap(), json!(s));
        assert_eq!(parsed.to_string(), s);
    }
    let p: ProductType = serde_json::from_value(json!("Subscription")).unwrap();
    assert_eq!(p, ProductType::Other("Subscription".into()));
    assert_eq!(serde_json::to_value(&p).unwrap(), json!("Subscription"));
    let st: EventStatusKind = serde_json::from_value(json!("PENDING")).unwrap();
    assert_eq!(st, EventStatusKind::Pending);
}

#[test]
fn error_response_shape() {
    let e: ErrorResponse = serde_json::from_value(
        json!({"errorInfo":{},"errorMessage":"Bad Request","errorNumber":400}),
    )
    .unwrap();
    assert_eq!(e.error_number, 400);
    assert_eq!(e.error_info, Some(ResponseErrorInfo::default()));
    let e: ErrorResponse = serde_json::from_value(json!({"errorNumber": 9700,
        "errorInfo": {"assets": [{"adamId": "1", "pricingParam": "STDQ"}], "serialNumbers": ["s"]}})).unwrap();
    let info = e.error_info.unwrap();
    assert_eq!(info.assets[0].adam_id, "1");
    assert_eq!(info.serial_numbers, vec!["s"]);
}

fn envelope(kind: &str, notification: serde_json::Value) -> NotificationEnvelope {
    serde_json::from_value(
        json!({ "notification": notification, "notificationId": "n-1",
        "notificationType": kind, "uId": "2049025000431439" }),
    )
    .unwrap()
}

#[test]
fn notifications() {
    let n = envelope(
        "ASSET_COUNT",
        json!({"adamId":"408709785","countDelta":-12,"pricingParam":"STDQ"}),
    );
    assert_eq!(n.notification_id, "n-1");
    match n.payload().unwrap() {
        Notification::AssetCount(c) => {
            assert_eq!(c.adam_id, "408709785");
            assert_eq!(c.count_delta, -12);
        }
        other => panic!("{other:?}"),
    }

    let n = envelope(
        "ASSET_MANAGEMENT",
        json!({"assignments":[{"adamId":"1","pricingParam":"STDQ","serialNumber":"s1"}],
        "eventId":"e1","result":"FAILURE","type":"ASSOCIATE",
        "error":{"errorNumber":9709,"errorMessage":"There aren't enough assets available"}}),
    );
    match n.payload().unwrap() {
        Notification::AssetManagement(m) => {
            assert_eq!(m.event_id.as_deref(), Some("e1"));
            assert_eq!(m.result, Some(NotificationResult::Failure));
            assert_eq!(m.kind, Some(EventType::Associate));
            assert_eq!(m.assignments[0].serial_number.as_deref(), Some("s1"));
            assert_eq!(m.error.map(|e| e.error_number), Some(9709));
        }
        other => panic!("{other:?}"),
    }

    let n = envelope(
        "USER_MANAGEMENT",
        json!({"eventId":"e2","result":"SUCCESS","type":"CREATE",
        "users":[{"clientUserId":"c","email":"e@x","inviteCode":"i","status":"Registered"}]}),
    );
    match n.payload().unwrap() {
        Notification::UserManagement(u) => {
            assert_eq!(u.kind, Some(EventType::Create));
            assert_eq!(u.users[0].invite_code.as_deref(), Some("i"));
        }
        other => panic!("{other:?}"),
    }

    let n = envelope(
        "USER_ASSOCIATED",
        json!({"associatedUsers":[{"clientUserId":"c","email":"e@x","idHash":"h","inviteCode":"i","status":"Associated"}]}),
    );
    match n.payload().unwrap() {
        Notification::UserAssociated(u) => {
            assert_eq!(u.associated_users[0].status, Some(UserStatus::Associated));
            assert_eq!(u.associated_users[0].id_hash.as_deref(), Some("h"));
        }
        other => panic!("{other:?}"),
    }

    assert_eq!(
        envelope("TEST_NOTIFICATION", json!({})).payload().unwrap(),
        Notification::Test
    );

    let raw = json!({"adamId": 123, "whatever": true});
    let n = envelope("SUBSCRIPTION_COUNT", raw.clone());
    assert_eq!(
        n.payload().unwrap(),
        Notification::Other {
            notification_type: "SUBSCRIPTION_COUNT".into(),
            raw: raw.clone()
        }
    );
    let n = envelope("BRAND_NEW", raw.clone());
    assert_eq!(
        n.notification_type,
        NotificationType::Other("BRAND_NEW".into())
    );
    assert!(matches!(n.payload().unwrap(), Notification::Other { .. }));
    // The envelope round-trips.
    let back = serde_json::to_value(&n).unwrap();
    assert_eq!(back["notificationType"], json!("BRAND_NEW"));
    assert_eq!(back["notification"], raw);
}
