//! Test doubles: a scripted transport, a fake clock and a minimal executor.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

use crate::transport::{AppleRequest, AppleResponse, Clock, Transport};

/// Run a future whose awaits complete without a reactor (fakes, blocking transports).
pub fn block_on<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}

#[derive(Debug)]
struct ClockState {
    now: DateTime<Utc>,
    sleeps: Vec<Duration>,
    jitter: f64,
}

/// A clock that only moves when something sleeps on it. Clones share the same time.
#[derive(Debug, Clone)]
pub struct FakeClock {
    state: Arc<Mutex<ClockState>>,
}

impl Default for FakeClock {
    fn default() -> Self {
        let start = Utc
            .with_ymd_and_hms(2025, 1, 1, 0, 0, 0)
            .single()
            .unwrap_or_else(Utc::now);
        FakeClock::at(start)
    }
}

impl FakeClock {
    pub fn at(now: DateTime<Utc>) -> Self {
        FakeClock {
            state: Arc::new(Mutex::new(ClockState {
                now,
                sleeps: Vec::new(),
                jitter: 0.5,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ClockState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn advance(&self, d: Duration) {
        let mut st = self.lock();
        st.now += chrono::Duration::from_std(d).unwrap_or(chrono::Duration::zero());
    }

    pub fn set_jitter(&self, j: f64) {
        self.lock().jitter = j;
    }

    /// Every sleep so far, in order.
    pub fn sleeps(&self) -> Vec<Duration> {
        self.lock().sleeps.clone()
    }

    pub fn total_slept(&self) -> Duration {
        self.lock().sleeps.iter().sum()
    }
}

impl Clock for FakeClock {
    fn now(&self) -> DateTime<Utc> {
        self.lock().now
    }

    fn sleep(&self, d: Duration) -> impl Future<Output = ()> {
        {
            let mut st = self.lock();
            st.sleeps.push(d);
            st.now += chrono::Duration::from_std(d).unwrap_or(chrono::Duration::zero());
        }
        std::future::ready(())
    }

    fn jitter(&self) -> f64 {
        self.lock().jitter
    }
}

type Responder = dyn Fn(&AppleRequest, usize) -> Result<AppleResponse, String> + Send + Sync;

/// A transport that answers from a script and logs every request with the (fake) time.
pub struct ScriptedTransport {
    responder: Box<Responder>,
    queue: Mutex<VecDeque<Result<AppleResponse, String>>>,
    log: Mutex<Vec<(DateTime<Utc>, AppleRequest)>>,
    clock: Option<FakeClock>,
}

impl ScriptedTransport {
    /// Answer with `f(request, call_number)` (call numbers start at 0).
    pub fn new(
        f: impl Fn(&AppleRequest, usize) -> Result<AppleResponse, String> + Send + Sync + 'static,
    ) -> Self {
        ScriptedTransport {
            responder: Box::new(f),
            queue: Mutex::new(VecDeque::new()),
            log: Mutex::new(Vec::new()),
            clock: None,
        }
    }

    /// Answer with these responses in order, then fail with "script exhausted".
    pub fn sequence(responses: Vec<Result<AppleResponse, String>>) -> Self {
        let t = ScriptedTransport::new(|_, _| Err("script exhausted".to_string()));
        *t.queue.lock().unwrap_or_else(|p| p.into_inner()) = responses.into();
        t
    }

    /// Stamp logged requests with this clock's time.
    pub fn with_clock(mut self, clock: FakeClock) -> Self {
        self.clock = Some(clock);
        self
    }

    pub fn requests(&self) -> Vec<AppleRequest> {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(_, r)| r.clone())
            .collect()
    }

    pub fn times(&self) -> Vec<DateTime<Utc>> {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(t, _)| *t)
            .collect()
    }

    pub fn calls(&self) -> usize {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Transport for ScriptedTransport {
    fn send(&self, req: &AppleRequest) -> impl Future<Output = Result<AppleResponse, String>> {
        let now = self
            .clock
            .as_ref()
            .map(|c| c.now())
            .unwrap_or_else(Utc::now);
        let n = {
            let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
            log.push((now, req.clone()));
            log.len() - 1
        };
        let queued = self
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front();
        let out = match queued {
            Some(r) => r,
            None => (self.responder)(req, n),
        };
        std::future::ready(out)
    }
}

/// A JSON response.
pub fn json(status: u16, value: serde_json::Value) -> AppleResponse {
    AppleResponse::new(status, value.to_string())
}
