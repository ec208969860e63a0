//! Every error shape Apple produces, classified.

use std::time::Duration;

use chrono::{TimeZone, Utc};
use serde_json::json;

use crate::error::{parse_retry_after, AppleError};
use crate::testing::json as resp;
use crate::transport::AppleResponse;

fn now() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap()
}

fn classify(r: &AppleResponse) -> Option<AppleError> {
    AppleError::from_response(r, now())
}

#[test]
fn success_has_no_error() {
    assert_eq!(classify(&resp(200, json!({"eventId": "e"}))), None);
    assert_eq!(classify(&AppleResponse::new(204, "")), None);
    // A failures[] entry deep inside a status response is not a top-level error.
    assert_eq!(
        classify(&resp(
            200,
            json!({"eventStatus": "FAILED", "failures": [{"errorNumber": 9709}]})
        )),
        None
    );
}

#[test]
fn error_body_on_200() {
    let e = classify(&resp(
        200,
        json!({"errorNumber": 9622, "errorMessage": "Invalid authentication token"}),
    ))
    .unwrap();
    assert_eq!(e, AppleError::TokenInvalid { number: Some(9622) });
    assert_eq!(e.code(), "apple_token_invalid");
    assert!(!e.is_retryable());
    assert!(e.is_token_error());

    let e = classify(&resp(
        200,
        json!({"errorMessage": "Too many requests", "errorNumber": 9646}),
    ))
    .unwrap();
    assert_eq!(e, AppleError::RateLimited { retry_after: None });
    assert!(e.is_retryable());
}

#[test]
fn token_codes_on_401() {
    let cases = [
        (9621, AppleError::TokenExpired, "apple_token_expired"),
        (9625, AppleError::TokenRevoked, "apple_token_revoked"),
        (
            9601,
            AppleError::TokenInvalid { number: Some(9601) },
            "apple_token_invalid",
        ),
        (
            9622,
            AppleError::TokenInvalid { number: Some(9622) },
            "apple_token_invalid",
        ),
        (
            9722,
            AppleError::TokenInvalid { number: Some(9722) },
            "apple_token_invalid",
        ),
        (
            1234,
            AppleError::TokenInvalid { number: Some(1234) },
            "apple_token_invalid",
        ),
    ];
    for (n, want, code) in cases {
        let e = classify(&resp(401, json!({"errorNumber": n, "errorMessage": "x"}))).unwrap();
        assert_eq!(e, want, "{n}");
        assert_eq!(e.code(), code);
        assert!(!e.is_retryable());
        assert!(e.is_token_error());
    }
    // 401 without a body.
    assert_eq!(
        classify(&AppleResponse::new(401, "")),
        Some(AppleError::TokenInvalid { number: None })
    );
    // Token codes win over a misleading status.
    assert_eq!(
        classify(&resp(400, json!({"errorNumber": 9621}))),
        Some(AppleError::TokenExpired)
    );
}

#[test]
fn rate_limited_429_with_retry_after() {
    let e = classify(&AppleResponse::new(429, "").with_retry_after("7")).unwrap();
    assert_eq!(
        e,
        AppleError::RateLimited {
            retry_after: Some(Duration::from_secs(7))
        }
    );
    assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
    assert_eq!(e.code(), "apple_rate_limited");
    let e = classify(&resp(429, json!({"errorNumber": 9646})).with_retry_after("3")).unwrap();
    assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
}

#[test]
fn unavailable_503_with_retry_after_seconds_and_date() {
    let e =
        classify(&AppleResponse::new(503, "Service Unavailable").with_retry_after("120")).unwrap();
    assert_eq!(
        e,
        AppleError::Unavailable {
            status: 503,
            number: None,
            retry_after: Some(Duration::from_secs(120))
        }
    );
    assert!(e.is_retryable());
    assert_eq!(e.code(), "apple_unavailable");

    // HTTP-date 90 s after "now".
    let e = classify(
        &resp(503, json!({"errorNumber": 9729})).with_retry_after("Wed, 01 Jan 2025 00:01:30 GMT"),
    )
    .unwrap();
    assert_eq!(e.retry_after(), Some(Duration::from_secs(90)));
    assert_eq!(e.number(), Some(9729));

    // 500 with 9603; 9644 maintenance on 200.
    let e = classify(&resp(
        500,
        json!({"errorNumber": 9603, "errorMessage": "Internal error"}),
    ))
    .unwrap();
    assert!(matches!(
        e,
        AppleError::Unavailable {
            status: 500,
            number: Some(9603),
            ..
        }
    ));
    let e = classify(&resp(200, json!({"errorNumber": 9644}))).unwrap();
    assert!(matches!(
        e,
        AppleError::Unavailable {
            number: Some(9644),
            ..
        }
    ));
    // 502 from a proxy with HTML.
    let e = classify(&AppleResponse::new(502, "<html>bad gateway</html>")).unwrap();
    assert!(matches!(
        e,
        AppleError::Unavailable {
            status: 502,
            number: None,
            retry_after: None
        }
    ));
}

#[test]
fn validation_with_error_info() {
    let e = classify(&resp(
        400,
        json!({"errorNumber": 9702, "errorMessage": "Too many serial numbers",
        "errorInfo": {"serialNumbers": ["a", "b"]}}),
    ))
    .unwrap();
    match &e {
        AppleError::Validation {
            status,
            number,
            message,
            info,
        } => {
            assert_eq!(*status, 400);
            assert_eq!(*number, Some(9702));
            assert_eq!(message, "Too many serial numbers");
            assert_eq!(info.as_ref().unwrap().serial_numbers, vec!["a", "b"]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(e.code(), "apple_validation");
    assert!(!e.is_retryable());
    // Fleet's mock: {"errorInfo":{},"errorMessage":"Bad Request","errorNumber":400}
    let e = classify(&resp(
        400,
        json!({"errorInfo":{},"errorMessage":"Bad Request","errorNumber":400}),
    ))
    .unwrap();
    assert_eq!(e.number(), Some(400));
    // 9708: unknown event id.
    let e = classify(&resp(
        400,
        json!({"errorNumber": 9708, "errorMessage": "Unable to find eventId"}),
    ))
    .unwrap();
    assert!(matches!(
        e,
        AppleError::Validation {
            number: Some(9708),
            ..
        }
    ));
    // errorNumber as a string still counts.
    let e = classify(&resp(400, json!({"errorNumber": "9718"}))).unwrap();
    assert_eq!(e.number(), Some(9718));
}

#[test]
fn non_json_bodies() {
    let e = classify(&AppleResponse::new(404, "Not Found")).unwrap();
    match e {
        AppleError::Validation {
            status: 404,
            number: None,
            message,
            info: None,
        } => {
            assert_eq!(message, "Not Found")
        }
        other => panic!("{other:?}"),
    }
    // 200 with a non-JSON body is not an Apple error (the decoder reports it).
    assert_eq!(classify(&AppleResponse::new(200, "<html>")), None);
}

#[test]
fn retry_after_parsing() {
    assert_eq!(
        parse_retry_after("120", now()),
        Some(Duration::from_secs(120))
    );
    assert_eq!(
        parse_retry_after(" 5 ", now()),
        Some(Duration::from_secs(5))
    );
    assert_eq!(
        parse_retry_after("Wed, 01 Jan 2025 00:00:10 GMT", now()),
        Some(Duration::from_secs(10))
    );
    // A date in the past means now.
    assert_eq!(
        parse_retry_after("Tue, 31 Dec 2024 23:00:00 GMT", now()),
        Some(Duration::ZERO)
    );
    assert_eq!(parse_retry_after("soon", now()), None);
}

#[test]
fn codes_are_distinct_snake_case() {
    let all = [
        AppleError::TokenExpired,
        AppleError::TokenRevoked,
        AppleError::TokenInvalid { number: None },
        AppleError::RateLimited { retry_after: None },
        AppleError::Unavailable {
            status: 500,
            number: None,
            retry_after: None,
        },
        AppleError::Validation {
            status: 400,
            number: None,
            message: String::new(),
            info: None,
        },
        AppleError::Transport("x".into()),
        AppleError::Decode("x".into()),
    ];
    let codes: std::collections::HashSet<_> = all.iter().map(|e| e.code()).collect();
    assert_eq!(codes.len(), all.len());
    for c in codes {
        assert!(
            c.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_'),
            "{c}"
        );
    }
}
