use std::time::Duration;

use chrono::Utc;
use serde_json::json;

use super::{client_with, path};
use crate::retry::{send_with_retry, send_with_retry_raw, Pacer, RetryPolicy};
use crate::testing::{block_on, json as resp, FakeClock, ScriptedTransport};
use crate::transport::{AppleRequest, AppleResponse};
use crate::types::Limits;
use crate::AppleError;

fn ok() -> Result<AppleResponse, String> {
    Ok(resp(200, json!({"locationName": "L"})))
}

fn req() -> AppleRequest {
    AppleRequest::get("client/config", Vec::new())
}

#[test]
fn rate_limited_then_success() {
    let clock = FakeClock::default();
    let t = ScriptedTransport::sequence(vec![
        Ok(AppleResponse::new(429, "")),
        Ok(resp(
            200,
            json!({"errorNumber": 9646, "errorMessage": "Too many requests"}),
        )),
        ok(),
    ]);
    let c = client_with(t, clock.clone(), Limits::default());
    let cfg = block_on(c.client_config()).unwrap();
    assert_eq!(cfg.location_name.as_deref(), Some("L"));
    assert_eq!(c.transport().calls(), 3);
    // Exponential backoff with jitter 0.5: 1s × 0.75, then 2s × 0.75.
    assert_eq!(
        clock.sleeps(),
        vec![Duration::from_millis(750), Duration::from_millis(1500)]
    );
}

#[test]
fn jitter_spreads_backoff() {
    let p = RetryPolicy::default();
    let e = AppleError::RateLimited { retry_after: None };
    assert_eq!(p.delay(1, &e, 0.0), Duration::from_millis(500));
    assert_eq!(p.delay(1, &e, 1.0), Duration::from_secs(1));
    assert_eq!(p.delay(3, &e, 1.0), Duration::from_secs(4));
    // Capped.
    assert_eq!(p.delay(30, &e, 1.0), p.max_retry_after);
}

#[test]
fn unavailable_retry_after_is_honoured_and_capped() {
    let clock = FakeClock::default();
    let t = ScriptedTransport::sequence(vec![
        Ok(AppleResponse::new(503, "").with_retry_after("7")),
        Ok(resp(503, json!({"errorNumber": 9729})).with_retry_after("600")),
        ok(),
    ])
    .with_clock(clock.clone());
    let policy = RetryPolicy {
        max_attempts: 5,
        max_retry_after: Duration::from_secs(30),
        base_backoff: Duration::from_secs(1),
        max_total_wait: Duration::from_secs(120),
    };
    let c = client_with(t, clock.clone(), Limits::default()).with_policy(policy);
    block_on(c.client_config()).unwrap();
    assert_eq!(
        clock.sleeps(),
        vec![Duration::from_secs(7), Duration::from_secs(30)]
    );
    let times = c.transport().times();
    assert_eq!((times[1] - times[0]).num_seconds(), 7);
    assert_eq!((times[2] - times[1]).num_seconds(), 30);
}

#[test]
fn http_date_retry_after() {
    let clock = FakeClock::default();
    let date = (clock_now(&clock) + chrono::Duration::seconds(12)).to_rfc2822();
    let t = ScriptedTransport::sequence(vec![
        Ok(AppleResponse::new(500, "").with_retry_after(date)),
        ok(),
    ]);
    let c = client_with(t, clock.clone(), Limits::default());
    block_on(c.client_config()).unwrap();
    assert_eq!(clock.sleeps(), vec![Duration::from_secs(12)]);
}

fn clock_now(c: &FakeClock) -> chrono::DateTime<Utc> {
    crate::Clock::now(c)
}

#[test]
fn bounded_attempts_then_clear_error() {
    let clock = FakeClock::default();
    let t = ScriptedTransport::new(|_, _| Ok(AppleResponse::new(503, "").with_retry_after("1")));
    let c = client_with(t, clock.clone(), Limits::default());
    let err = block_on(c.client_config()).unwrap_err();
    assert_eq!(
        c.transport().calls(),
        RetryPolicy::default().max_attempts as usize
    );
    assert!(matches!(err, AppleError::Unavailable { status: 503, .. }));
    assert!(err.to_string().contains("503"), "{err}");
    // Never sleeps after the last attempt.
    assert_eq!(
        clock.sleeps().len(),
        RetryPolicy::default().max_attempts as usize - 1
    );
}

#[test]
fn total_wait_budget_stops_early() {
    let clock = FakeClock::default();
    let t = ScriptedTransport::new(|_, _| Ok(AppleResponse::new(503, "").with_retry_after("50")));
    let policy = RetryPolicy {
        max_attempts: 10,
        max_retry_after: Duration::from_secs(60),
        base_backoff: Duration::from_secs(1),
        max_total_wait: Duration::from_secs(120),
    };
    let done = block_on(send_with_retry_raw(
        &t,
        &clock,
        &Pacer::default(),
        &policy,
        &req(),
    ));
    // 50 + 50 fits in 120; a third wait would not.
    assert_eq!(done.attempts, 3);
    assert_eq!(done.waited, Duration::from_secs(100));
    // The raw last answer is kept for forwarding.
    let last = done.last.unwrap();
    assert_eq!(last.status, 503);
    assert_eq!(last.retry_after.as_deref(), Some("50"));
}

#[test]
fn token_and_validation_errors_are_not_retried() {
    for (status, body, code) in [
        (401, json!({"errorNumber": 9621}), "apple_token_expired"),
        (401, json!({"errorNumber": 9625}), "apple_token_revoked"),
        (200, json!({"errorNumber": 9622}), "apple_token_invalid"),
        (400, json!({"errorNumber": 9718}), "apple_validation"),
    ] {
        let clock = FakeClock::default();
        let t = ScriptedTransport::new(move |_, _| Ok(resp(status, body.clone())));
        let c = client_with(t, clock.clone(), Limits::default());
        let err = block_on(c.client_config()).unwrap_err();
        assert_eq!(err.code(), code);
        assert_eq!(c.transport().calls(), 1, "{code}");
        assert!(clock.sleeps().is_empty());
    }
}

#[test]
fn transport_errors_are_retried() {
    let clock = FakeClock::default();
    let t = ScriptedTransport::sequence(vec![Err("connection reset".into()), ok()]);
    assert!(block_on(send_with_retry(
        &t,
        &clock,
        &Pacer::default(),
        &RetryPolicy::default(),
        &req()
    ))
    .is_ok());
    assert_eq!(t.calls(), 2);
    let t = ScriptedTransport::new(|_, _| Err("dns".into()));
    let err = block_on(send_with_retry(
        &t,
        &clock,
        &Pacer::default(),
        &RetryPolicy::default(),
        &req(),
    ))
    .unwrap_err();
    assert_eq!(err, AppleError::Transport("dns".into()));
}

#[test]
fn policy_none_makes_one_attempt() {
    let clock = FakeClock::default();
    let t = ScriptedTransport::new(|_, _| Ok(AppleResponse::new(429, "").with_retry_after("5")));
    let err = block_on(send_with_retry(
        &t,
        &clock,
        &Pacer::default(),
        &RetryPolicy::none(),
        &req(),
    ))
    .unwrap_err();
    assert_eq!(
        err,
        AppleError::RateLimited {
            retry_after: Some(Duration::from_secs(5))
        }
    );
    assert_eq!(t.calls(), 1);
    assert!(clock.sleeps().is_empty());
}

#[test]
fn body_is_resent_on_every_attempt() {
    let clock = FakeClock::default();
    let t = ScriptedTransport::sequence(vec![
        Ok(AppleResponse::new(500, "")),
        Ok(resp(200, json!({"eventId": "e"}))),
    ]);
    let c = client_with(t, clock, Limits::default());
    block_on(c.revoke(&crate::RevokeAssetsRequest {
        serial_numbers: vec!["s".into()],
        ..Default::default()
    }))
    .unwrap();
    let reqs = c.transport().requests();
    assert_eq!(reqs.len(), 2);
    assert!(reqs[0].body.as_deref().is_some_and(|b| !b.is_empty()));
    assert_eq!(reqs[0].body, reqs[1].body);
    assert_eq!(path(&reqs[1]), "assets/revoke");
}

#[test]
fn pacer_never_exceeds_rate_in_any_window() {
    let clock = FakeClock::default();
    let t = ScriptedTransport::new(|_, _| Ok(resp(200, json!({"eventStatus": "PENDING"}))))
        .with_clock(clock.clone());
    let c = client_with(t, clock.clone(), Limits::default());
    for _ in 0..100 {
        block_on(c.event_status("e")).unwrap();
    }
    let times = c.transport().times();
    assert_eq!(times.len(), 100);
    for (i, start) in times.iter().enumerate() {
        let in_window = times[i..]
            .iter()
            .take_while(|t| (**t - *start) < chrono::Duration::seconds(1))
            .count();
        assert!(
            in_window <= 15,
            "{in_window} requests in the second after request {i}"
        );
    }
    // It did not simply stall: 100 requests in 6 full windows of 1.1 s.
    let span = (times[99] - times[0]).num_milliseconds();
    assert_eq!(span, 6600);
}

#[test]
fn pacer_window_semantics() {
    let p = Pacer::with_window(2, Duration::from_secs(1));
    let t0 = Utc::now();
    assert!(p.try_acquire(t0).is_ok());
    assert!(p.try_acquire(t0).is_ok());
    assert_eq!(p.try_acquire(t0), Err(Duration::from_secs(1)));
    let later = t0 + chrono::Duration::milliseconds(400);
    assert_eq!(p.try_acquire(later), Err(Duration::from_millis(600)));
    assert!(p.try_acquire(t0 + chrono::Duration::seconds(1)).is_ok());
    assert!(Pacer::unlimited().try_acquire(t0).is_ok());
    // The default window keeps a margin over one second.
    let p = Pacer::new(1);
    assert!(p.try_acquire(t0).is_ok());
    assert_eq!(
        p.try_acquire(t0 + chrono::Duration::seconds(1)),
        Err(Duration::from_millis(100))
    );
}

#[test]
fn proxied_client_makes_one_attempt_and_reports_apple_terms() {
    let clock = FakeClock::default();
    let t = ScriptedTransport::new(|_, _| Ok(AppleResponse::new(429, "").with_retry_after("30")));
    let c = crate::Client::proxied(t, clock.clone());
    let err = block_on(c.client_config()).unwrap_err();
    assert_eq!(err.retry_after(), Some(Duration::from_secs(30)));
    assert_eq!(c.transport().calls(), 1);
    assert!(clock.sleeps().is_empty());
    assert_eq!(c.pacer().max_per_second(), u32::MAX);
    c.set_service_config(crate::ServiceConfig::default());
    assert_eq!(c.pacer().max_per_second(), u32::MAX);
}

/// A write resent after an attempt whose outcome was unclear (the connection dropped after it
/// was sent, or a bare 5xx) and refused on the last attempt with an `errorNumber` ends with the
/// unclear attempt: the refusal says nothing about the first one, which Apple may have applied
/// (found by seed 502 of the licensing ledger model). A read ends with its last answer.
#[test]
fn a_write_refused_after_an_unclear_attempt_stays_unclear() {
    let refused = || {
        let mut r = resp(
            429,
            json!({"errorNumber": 9646, "errorMessage": "Too many"}),
        );
        r.retry_after = Some("1".into());
        Ok(r)
    };
    let policy = RetryPolicy {
        max_attempts: 3,
        ..RetryPolicy::default()
    };
    let post = AppleRequest::post("assets/associate", b"{}".to_vec());
    for (unclear, code) in [
        (
            Err("connection reset after sending".to_string()),
            "apple_transport",
        ),
        (
            Ok(AppleResponse::new(500, "upstream timed out")),
            "apple_unavailable",
        ),
    ] {
        let t = ScriptedTransport::sequence(vec![refused(), unclear.clone(), refused()]);
        let done = block_on(send_with_retry_raw(
            &t,
            &FakeClock::default(),
            &Pacer::default(),
            &policy,
            &post,
        ));
        assert_eq!(done.attempts, 3);
        assert_eq!(done.last, unclear, "{code}");
        let e = done.error.unwrap();
        assert_eq!((e.code(), e.number()), (code, None));
        // A read is not applied twice: its last answer stands.
        let t = ScriptedTransport::sequence(vec![unclear.clone(), refused(), refused()]);
        let done = block_on(send_with_retry_raw(
            &t,
            &FakeClock::default(),
            &Pacer::default(),
            &policy,
            &req(),
        ));
        assert_eq!(done.error.unwrap().number(), Some(9646), "{code}");
    }
}
