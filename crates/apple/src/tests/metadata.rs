use serde_json::json;

use super::{client_with, path};
use crate::client::parse_metadata;
use crate::testing::{block_on, json as resp, FakeClock, ScriptedTransport};
use crate::types::Limits;
use crate::{ServiceConfig, ServiceUrls, Target};

#[test]
fn parses_both_artwork_shapes() {
    let body = json!({"results": {
        "361309726": {"name": "Pages", "kind": "iosSoftware", "bundleId": "com.apple.Pages",
            "artwork": [{"url": "https://x/60.png", "width": 60}, {"url": "https://x/512.png", "width": 512}, {"url": "https://x/100.png", "width": 100}]},
        "2": {"name": "Book", "kind": "epubBook",
            "artwork": {"url": "https://y/{w}x{h}bb.{f}", "width": 1024, "height": 1024}}
    }, "isAuthenticated": false});
    let mut m = parse_metadata(&body);
    m.sort_by(|a, b| a.adam_id.cmp(&b.adam_id));
    assert_eq!(m[0].adam_id, "2");
    assert_eq!(m[0].icon_url.as_deref(), Some("https://y/512x512bb.png"));
    assert_eq!(m[0].kind.as_deref(), Some("epubBook"));
    assert_eq!(m[1].name.as_deref(), Some("Pages"));
    assert_eq!(m[1].icon_url.as_deref(), Some("https://x/512.png"));
    assert_eq!(m[1].bundle_id.as_deref(), Some("com.apple.Pages"));
    assert!(parse_metadata(&json!({"results": {}})).is_empty());
    assert!(parse_metadata(&json!({})).is_empty());
}

#[test]
fn lookup_url_and_cache() {
    let t = ScriptedTransport::new(|req, _| match &req.target {
        Target::Api { path, .. } if path == "client/config" => Ok(resp(
            200,
            json!({"countryISO2ACode": "GB", "defaultPlatform": "enterprisestore"}),
        )),
        Target::Absolute(url) => {
            assert!(url.starts_with("https://lookup.example/wa/lookup?version=2&p=mdm-lockup&caller=MDM&platform=enterprisestore&cc=gb&id="), "{url}");
            Ok(resp(
                200,
                json!({"results": {"1": {"name": "One"}, "2": {"name": "Two"}}}),
            ))
        }
        other => panic!("{other:?}"),
    });
    let c = client_with(t, FakeClock::default(), Limits::default());
    c.set_service_config(ServiceConfig {
        urls: ServiceUrls {
            content_metadata_lookup: Some("https://lookup.example/wa/lookup".into()),
            ..Default::default()
        },
        ..Default::default()
    });
    let ids: Vec<String> = vec!["1".into(), "2".into(), "3".into()];
    let m = block_on(c.metadata(&ids)).unwrap();
    assert_eq!(
        m.iter()
            .map(|m| m.name.clone().unwrap())
            .collect::<Vec<_>>(),
        vec!["One", "Two"]
    );
    let lookup = &c.transport().requests()[1];
    assert!(path(lookup).ends_with("id=1,2,3"), "{}", path(lookup));
    // Cached: asking again for known ids makes no call.
    let before = c.transport().calls();
    let m = block_on(c.metadata(&ids[..2])).unwrap();
    assert_eq!(m.len(), 2);
    assert_eq!(c.transport().calls(), before);
}
