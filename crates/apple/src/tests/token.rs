use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine as _;
use chrono::{TimeZone, Utc};

use crate::token::{parse_apple_date, ServerToken, TokenError};

const INNER: &str = "VFdwQmVVMVRRWFJKUldSNVdsZGpjMGxHU25Cak1taG9aR2wzWjFGdVNteGtTRkZ6U1VaT2FHTnRSbTlNUTBKQ1pGaE9NR0ZYTkQwPQ==";

fn file(json: &str) -> String {
    STANDARD.encode(json)
}

fn good_json(exp: &str) -> String {
    format!(r#"{{"token":"{INNER}","expDate":"{exp}","orgName":"ORG12345"}}"#)
}

#[test]
fn parses_documented_token() {
    let content = format!("  {}\n", file(&good_json("2030-11-08T22:33:22+0000")));
    let t = ServerToken::parse(&content).expect("parses");
    assert_eq!(t.org_name, "ORG12345");
    assert_eq!(
        t.expires_at,
        Utc.with_ymd_and_hms(2030, 11, 8, 22, 33, 22).unwrap()
    );
    assert_eq!(t.location_token(), INNER);
    // The bearer is the whole file content, trimmed, not the inner token.
    assert_eq!(t.bearer(), content.trim());
    assert_ne!(t.bearer(), INNER);
}

#[test]
fn expiry() {
    let t = ServerToken::parse(&file(&good_json("2030-11-08T22:33:22+0000"))).unwrap();
    let before = Utc.with_ymd_and_hms(2030, 11, 1, 0, 0, 0).unwrap();
    let after = Utc.with_ymd_and_hms(2030, 11, 9, 0, 0, 0).unwrap();
    assert!(!t.is_expired(before));
    assert!(t.is_expired(after));
    assert!(t.is_expired(t.expires_at));
    assert!(t.expires_within(before, 30));
    assert!(!t.expires_within(before, 5));
}

#[test]
fn expired_token_still_parses() {
    let t = ServerToken::parse(&file(&good_json("2020-01-01T00:00:00+0000"))).unwrap();
    assert!(t.is_expired(Utc::now()));
}

#[test]
fn tolerates_missing_padding_and_line_breaks() {
    let json = good_json("2030-11-08T22:33:22+0000");
    let unpadded = STANDARD_NO_PAD.encode(&json);
    assert!(ServerToken::parse(&unpadded).is_ok());
    let wrapped: String = STANDARD
        .encode(&json)
        .as_bytes()
        .chunks(60)
        .map(|c| String::from_utf8_lossy(c).to_string())
        .collect::<Vec<_>>()
        .join("\n");
    let t = ServerToken::parse(&wrapped).unwrap();
    assert_eq!(t.org_name, "ORG12345");
}

#[test]
fn date_formats() {
    let want = Utc.with_ymd_and_hms(2030, 11, 8, 22, 33, 22).unwrap();
    for s in [
        "2030-11-08T22:33:22+0000",
        "2030-11-08T22:33:22Z",
        "2030-11-08T22:33:22+00:00",
        "2030-11-08T23:33:22+0100",
        "2030-11-08T22:33:22.000Z",
        "2030-11-08T22:33:22.000+0000",
    ] {
        assert_eq!(parse_apple_date(s), Some(want), "{s}");
        let t = ServerToken::parse(&file(&good_json(s))).unwrap();
        assert_eq!(t.expires_at, want, "{s}");
    }
}

#[test]
fn errors_are_distinct() {
    let cases: Vec<(String, &str)> = vec![
        ("   ".into(), "token_empty"),
        ("not base64 at all!!".into(), "token_not_base64"),
        (file("this is not json"), "token_not_json"),
        (file("[1,2]"), "token_not_json"),
        (
            file(r#"{"expDate":"2030-11-08T22:33:22+0000","orgName":"o"}"#),
            "token_missing_field",
        ),
        (
            file(r#"{"token":"t","orgName":"o"}"#),
            "token_missing_field",
        ),
        (
            file(r#"{"token":"t","expDate":"2030-11-08T22:33:22+0000"}"#),
            "token_missing_field",
        ),
        (
            file(r#"{"token":"t","expDate":"next year","orgName":"o"}"#),
            "token_bad_date",
        ),
    ];
    for (content, code) in cases {
        let err = ServerToken::parse(&content).expect_err(&content);
        assert_eq!(err.code(), code, "{content}: {err}");
    }
    assert_eq!(
        ServerToken::parse(&file(r#"{"token":"t","orgName":"o"}"#)),
        Err(TokenError::MissingField("expDate"))
    );
}

#[test]
fn debug_hides_secret() {
    let content = file(&good_json("2030-11-08T22:33:22+0000"));
    let t = ServerToken::parse(&content).unwrap();
    let dbg = format!("{t:?}");
    assert!(!dbg.contains(INNER), "{dbg}");
    assert!(!dbg.contains(&content), "{dbg}");
    assert!(dbg.contains("ORG12345"));
}
