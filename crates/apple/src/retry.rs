//! Pacing (never above `maxRequestPerSecond`) and a bounded, iterative retry loop.
//!
//! Never recursive: Fleet's recursive 9646 retry ran a server out of memory (fleet#46656).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::error::AppleError;
use crate::transport::{AppleRequest, AppleResponse, Clock, Method, Transport};

/// One second plus a margin: requests leave here but Apple counts them on arrival, and latency
/// varies (against the simulator a bare 1 s window drew a 429 on the 16th request).
pub const DEFAULT_PACER_WINDOW: Duration = Duration::from_millis(1100);

/// A sliding window: at most `max_per_second` requests start in any window `[t, t + window)`,
/// with `window` at least one second.
#[derive(Debug)]
pub struct Pacer {
    state: Mutex<PacerState>,
}

#[derive(Debug)]
struct PacerState {
    max_per_second: u32,
    window: Duration,
    sent: VecDeque<DateTime<Utc>>,
}

impl Pacer {
    pub fn new(max_per_second: u32) -> Self {
        Pacer::with_window(max_per_second, DEFAULT_PACER_WINDOW)
    }

    /// A pacer with an exact window (never shorter than one second).
    pub fn with_window(max_per_second: u32, window: Duration) -> Self {
        Pacer {
            state: Mutex::new(PacerState {
                max_per_second: max_per_second.max(1),
                window: window.max(Duration::from_secs(1)),
                sent: VecDeque::new(),
            }),
        }
    }

    /// For callers whose transport paces for them (the Apple component's proxy).
    pub fn unlimited() -> Self {
        Pacer::new(u32::MAX)
    }

    pub fn max_per_second(&self) -> u32 {
        self.lock().max_per_second
    }

    /// Apply a new rate (from a fresh service config). Zero is read as one.
    pub fn set_max_per_second(&self, max_per_second: u32) {
        self.lock().max_per_second = max_per_second.max(1);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PacerState> {
        // A panic elsewhere cannot leave the window inconsistent; keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take a slot at `now`, or say how long to wait for one.
    pub fn try_acquire(&self, now: DateTime<Utc>) -> Result<(), Duration> {
        let mut st = self.lock();
        let window = st.window;
        if st.max_per_second == u32::MAX {
            return Ok(());
        }
        while let Some(front) = st.sent.front() {
            let age = (now - *front).to_std().unwrap_or(Duration::ZERO);
            if age >= window {
                st.sent.pop_front();
            } else {
                break;
            }
        }
        if (st.sent.len() as u64) < u64::from(st.max_per_second) {
            st.sent.push_back(now);
            return Ok(());
        }
        let oldest = st.sent.front().copied().unwrap_or(now);
        let age = (now - oldest).to_std().unwrap_or(Duration::ZERO);
        Err(window.saturating_sub(age).max(Duration::from_millis(1)))
    }

    /// Wait (on `clock`) until a slot is free, then take it.
    pub async fn acquire<C: Clock>(&self, clock: &C) {
        loop {
            match self.try_acquire(clock.now()) {
                Ok(()) => return,
                Err(wait) => clock.sleep(wait).await,
            }
        }
    }
}

impl Default for Pacer {
    fn default() -> Self {
        Pacer::new(crate::types::Limits::default().max_request_per_second)
    }
}

/// How hard to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts, the first included (at least 1).
    pub max_attempts: u32,
    /// Cap on a `Retry-After` wait and on one backoff step.
    pub max_retry_after: Duration,
    /// First backoff step when Apple gives no `Retry-After`; doubles each attempt.
    pub base_backoff: Duration,
    /// Give up rather than wait longer than this in total.
    pub max_total_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            max_retry_after: Duration::from_secs(60),
            base_backoff: Duration::from_secs(1),
            max_total_wait: Duration::from_secs(180),
        }
    }
}

impl RetryPolicy {
    /// One attempt: for callers behind the Apple component, which retries for them.
    pub fn none() -> Self {
        RetryPolicy {
            max_attempts: 1,
            max_retry_after: Duration::ZERO,
            base_backoff: Duration::ZERO,
            max_total_wait: Duration::ZERO,
        }
    }

    /// The wait before attempt `failed_attempts + 1`, `jitter` in `0..1`.
    pub fn delay(&self, failed_attempts: u32, err: &AppleError, jitter: f64) -> Duration {
        if let Some(ra) = err.retry_after() {
            return ra.min(self.max_retry_after);
        }
        let exp = failed_attempts.saturating_sub(1).min(20);
        let step = self.base_backoff.saturating_mul(1u32 << exp);
        // Equal jitter: half fixed, half random, so clients that collided spread out.
        let jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.5
        };
        let jittered = step.mul_f64(0.5 + 0.5 * jitter);
        jittered.min(self.max_retry_after)
    }
}

/// What a retry loop ended with.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempted {
    /// The last answer (or transport failure), exactly as it came.
    pub last: Result<AppleResponse, String>,
    /// Its classification: `None` means success.
    pub error: Option<AppleError>,
    pub attempts: u32,
    pub waited: Duration,
}

/// Send `req` with pacing and bounded retries, and keep the last raw answer. The Apple
/// component uses this to forward Apple's own status, body and `Retry-After`.
///
/// A write (POST) resent after an attempt whose outcome was unclear (no answer, or an error
/// without an `errorNumber`: Apple may have applied it) and refused on a later attempt with an
/// `errorNumber` ends with that unclear attempt: the refusal proves only that the resend did
/// nothing, not the first attempt, and callers take an `errorNumber` as "nothing happened".
pub async fn send_with_retry_raw<T: Transport, C: Clock>(
    transport: &T,
    clock: &C,
    pacer: &Pacer,
    policy: &RetryPolicy,
    req: &AppleRequest,
) -> Attempted {
    let max_attempts = policy.max_attempts.max(1);
    let write = req.method == Method::Post;
    let mut attempts = 0u32;
    let mut waited = Duration::ZERO;
    // A write's first attempt whose outcome was unclear: (its answer, its classification).
    let mut unclear: Option<(Result<AppleResponse, String>, AppleError)> = None;
    loop {
        attempts += 1;
        pacer.acquire(clock).await;
        let last = transport.send(req).await;
        let error = match &last {
            Ok(resp) => AppleError::from_response(resp, clock.now()),
            Err(e) => Some(AppleError::Transport(e.clone())),
        };
        let Some(err) = &error else {
            return Attempted {
                last,
                error,
                attempts,
                waited,
            };
        };
        // What the loop ends with: this attempt, or a write's earlier unclear one.
        let end = |last, error: Option<AppleError>, unclear, waited| {
            let refused = error.as_ref().is_some_and(|e| e.number().is_some());
            match unclear {
                Some((first, first_err)) if refused => Attempted {
                    last: first,
                    error: Some(first_err),
                    attempts,
                    waited,
                },
                _ => Attempted {
                    last,
                    error,
                    attempts,
                    waited,
                },
            }
        };
        if !err.is_retryable() || attempts >= max_attempts {
            return end(last, error, unclear, waited);
        }
        let delay = policy.delay(attempts, err, clock.jitter());
        if waited + delay > policy.max_total_wait {
            return end(last, error, unclear, waited);
        }
        if write && unclear.is_none() && err.number().is_none() {
            unclear = Some((last.clone(), err.clone()));
        }
        clock.sleep(delay).await;
        waited += delay;
    }
}

/// Send `req` with pacing and bounded retries; a classified error after the last attempt.
pub async fn send_with_retry<T: Transport, C: Clock>(
    transport: &T,
    clock: &C,
    pacer: &Pacer,
    policy: &RetryPolicy,
    req: &AppleRequest,
) -> Result<AppleResponse, AppleError> {
    let done = send_with_retry_raw(transport, clock, pacer, policy, req).await;
    match (done.error, done.last) {
        (Some(err), _) => Err(err),
        (None, Ok(resp)) => Ok(resp),
        (None, Err(e)) => Err(AppleError::Transport(e)),
    }
}
