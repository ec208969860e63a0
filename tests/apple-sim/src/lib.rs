//! apple-sim: a simulator of Apple's Apps and Books (VPP) v2 API for tests and offline demos.
//!
//! [`Simulator`] runs an HTTP server on its own thread and tokio runtime, so it can be used from
//! plain `#[test]`s and from inside a tokio runtime alike: every method is synchronous and only
//! takes a mutex (none blocks on a future). The protocol logic lives in [`model`] as plain
//! functions over [`model::Model`]; the control API and this Rust API call the same functions.
//!
//! ```no_run
//! use apple_sim::{Simulator, LocationSpec, AssetSpec};
//! let sim = Simulator::start().unwrap();
//! let token = sim.add_location(LocationSpec::named("School"));
//! sim.add_assets(&token, vec![AssetSpec::app("408709785", 10)]).unwrap();
//! // point the client at format!("{}/mdm/v2", sim.origin()) with `Authorization: Bearer {token}`
//! ```

pub mod client;
pub mod model;
#[cfg(test)]
mod model_tests;
pub mod rng;
mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use hyper_util::rt::TokioIo;

pub use model::{
    apple_time, AssetSpec, AssetView, Assignment, AssignmentSpec, CallRecord, Event, EventStatus,
    EventType, FaultKind, FaultSpec, Limits, LocationSpec, LocationState, MdmInfo,
    NotificationRecord, SimConfig, TakeOver, User, UserSpec,
};

use server::Shared;

/// A running simulator. Dropping it stops the server.
pub struct Simulator {
    shared: Arc<Shared>,
    origin: String,
    addr: SocketAddr,
    handle: tokio::runtime::Handle,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Simulator {
    /// Starts on `127.0.0.1:0` (a free port).
    pub fn start() -> anyhow::Result<Simulator> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Starts on the given address.
    pub fn start_on(addr: SocketAddr) -> anyhow::Result<Simulator> {
        Self::start_with(addr, SimConfig::default())
    }

    /// Starts with a configuration.
    pub fn start_with(addr: SocketAddr, config: SimConfig) -> anyhow::Result<Simulator> {
        let listener = std::net::TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let origin = format!("http://{addr}");
        let shared = Arc::new(Shared::new(&origin));
        shared.lock().config = config;
        let (tx_handle, rx_handle) = std::sync::mpsc::channel();
        let (tx_stop, rx_stop) = tokio::sync::oneshot::channel::<()>();
        let shared2 = shared.clone();
        let thread = std::thread::Builder::new()
            .name("apple-sim".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("apple-sim-rt")
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx_handle.send(Err(anyhow::anyhow!("runtime: {e}")));
                        return;
                    }
                };
                let listener = {
                    let _g = rt.enter();
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = tx_handle.send(Err(anyhow::anyhow!("listener: {e}")));
                            return;
                        }
                    }
                };
                let _ = tx_handle.send(Ok(rt.handle().clone()));
                rt.block_on(serve(shared2, listener, rx_stop));
                rt.shutdown_timeout(Duration::from_millis(500));
            })?;
        let handle = rx_handle.recv().context("simulator thread died")??;
        Ok(Simulator {
            shared,
            origin,
            addr,
            handle,
            shutdown: Some(tx_stop),
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:PORT` (no path). The API is at `{origin}/mdm/v2`.
    pub fn origin(&self) -> String {
        self.origin.clone()
    }

    /// `{origin}/mdm/v2`.
    pub fn base_url(&self) -> String {
        format!("{}/mdm/v2", self.origin)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn model(&self) -> std::sync::MutexGuard<'_, model::Model> {
        self.shared.lock()
    }

    fn notify(&self, notes: Vec<model::Outgoing>) {
        if !notes.is_empty() {
            let shared = self.shared.clone();
            shared
                .in_flight
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.handle.spawn(async move {
                server::deliver_all(shared.clone(), notes).await;
                shared
                    .in_flight
                    .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
    }

    // ----- configuration ----------------------------------------------------------------------

    pub fn config(&self) -> SimConfig {
        self.model().config.clone()
    }

    /// Changes the configuration in place: `sim.configure(|c| c.page_size = 2)`.
    pub fn configure(&self, f: impl FnOnce(&mut SimConfig)) {
        f(&mut self.model().config)
    }

    pub fn set_page_size(&self, n: usize) {
        self.configure(|c| c.page_size = n.max(1))
    }

    /// Delay before asynchronous writes are applied (0: before the write's response).
    pub fn set_event_delay(&self, d: Duration) {
        self.configure(|c| c.event_delay_ms = d.as_millis() as u64)
    }

    /// Events wait on the simulator's own clock ([`Simulator::advance_clock`]), not on timers:
    /// with a seeded [`Simulator::seed`], a test replays exactly.
    pub fn set_manual_clock(&self, on: bool) {
        self.configure(|c| c.manual_clock = on)
    }

    /// Move the simulator's clock on (see [`Simulator::set_manual_clock`]): the events now due
    /// are applied in the order they were accepted, their notifications delivered in order in
    /// the background ([`Simulator::is_idle`] tells when they are done).
    pub fn advance_clock(&self, d: Duration) {
        let notes = self.model().advance_clock(d);
        self.notify(notes);
    }

    /// Seed the simulator's random source (identifiers, duplicate notifications), so a test
    /// that seeds it gets the same ones each run.
    pub fn seed(&self, seed: u64) {
        self.model().rng = model::Rng::from_seed(seed);
    }

    /// Deliver every notification twice (same notificationId), or never.
    pub fn set_duplicate_notifications(&self, on: bool) {
        self.configure(|c| c.duplicate_notification_chance = if on { 1.0 } else { 0.0 })
    }

    pub fn set_duplicate_notification_chance(&self, p: f64) {
        self.configure(|c| c.duplicate_notification_chance = p.clamp(0.0, 1.0))
    }

    pub fn set_rate_limit_enabled(&self, on: bool) {
        self.configure(|c| c.rate_limit_enabled = on)
    }

    pub fn set_limits(&self, limits: Limits) {
        self.configure(|c| c.limits = limits)
    }

    /// Drops all locations, events, faults and logs.
    pub fn reset(&self) {
        self.model().reset()
    }

    // ----- seeding ------------------------------------------------------------------------------

    /// Creates a location; returns its token file content (base64), the bearer to use.
    pub fn add_location(&self, spec: LocationSpec) -> String {
        self.model().add_location(spec)
    }

    /// The location's `uId` (key: token, uId or inner token).
    pub fn location_uid(&self, key: &str) -> Option<String> {
        self.model().location(key).map(|l| l.uid.clone())
    }

    pub fn add_assets(&self, key: &str, assets: Vec<AssetSpec>) -> anyhow::Result<()> {
        self.model().add_assets(key, assets)
    }

    /// Seeds assignments directly (no event, no notification).
    pub fn add_assignments(
        &self,
        key: &str,
        assignments: Vec<AssignmentSpec>,
    ) -> anyhow::Result<()> {
        self.model().add_assignments(key, assignments)
    }

    /// Removes assignments directly (no event, no notification).
    pub fn remove_assignments(
        &self,
        key: &str,
        assignments: Vec<AssignmentSpec>,
    ) -> anyhow::Result<()> {
        self.model().remove_assignments(key, assignments)
    }

    pub fn add_users(&self, key: &str, users: Vec<UserSpec>) -> anyhow::Result<()> {
        self.model().add_users(key, users)
    }

    /// A user accepts the invitation (USER_ASSOCIATED notification).
    pub fn associate_user(&self, key: &str, client_user_id: &str) -> anyhow::Result<()> {
        let notes = self.model().associate_user(key, client_user_id)?;
        self.notify(notes);
        Ok(())
    }

    /// A purchase / transfer / refund: total count += delta, ASSET_COUNT notification.
    pub fn change_asset_count(
        &self,
        key: &str,
        adam_id: &str,
        pricing_param: &str,
        delta: i64,
    ) -> anyhow::Result<()> {
        let notes = self
            .model()
            .change_asset_count(key, adam_id, pricing_param, delta)?;
        self.notify(notes);
        Ok(())
    }

    /// Another MDM overwrites mdmInfo (and optionally assigns licenses).
    pub fn take_over(&self, key: &str, t: TakeOver) -> anyhow::Result<()> {
        self.model().take_over(key, t)
    }

    /// Changes the token's expiry.
    pub fn set_token_expiry(&self, key: &str, exp: DateTime<Utc>) -> anyhow::Result<()> {
        self.model().set_token_state(key, Some(exp), None)
    }

    /// Marks the token revoked (every call answers 401 9625) or not.
    pub fn set_token_revoked(&self, key: &str, revoked: bool) -> anyhow::Result<()> {
        self.model().set_token_state(key, None, Some(revoked))
    }

    // ----- faults -------------------------------------------------------------------------------

    /// Injects a fault on one location.
    pub fn inject_fault(&self, key: &str, fault: FaultSpec) -> anyhow::Result<()> {
        self.model().add_fault(Some(key), fault)
    }

    /// Injects a fault on every request (service config and unknown tokens included).
    pub fn inject_global_fault(&self, fault: FaultSpec) {
        let _ = self.model().add_fault(None, fault);
    }

    pub fn clear_faults(&self, key: &str) -> anyhow::Result<()> {
        self.model().clear_faults(Some(key))
    }

    pub fn clear_all_faults(&self) {
        let _ = self.model().clear_faults(None);
    }

    // ----- inspection ---------------------------------------------------------------------------

    /// Every call received on `/mdm/v2` and the lookup, oldest first.
    pub fn calls(&self) -> Vec<CallRecord> {
        self.model().calls.clone()
    }

    /// Calls made with one location's token.
    pub fn calls_for(&self, key: &str) -> Vec<CallRecord> {
        let m = self.model();
        let uid = m.location(key).map(|l| l.uid.clone());
        m.calls
            .iter()
            .filter(|c| uid.is_some() && c.location_uid == uid)
            .cloned()
            .collect()
    }

    /// Every license an applied event took from one location, oldest first:
    /// (adamId, serial number, client user id).
    pub fn removals_for(&self, key: &str) -> Vec<(String, Option<String>, Option<String>)> {
        let m = self.model();
        let Some(uid) = m.location(key).map(|l| l.uid.clone()) else {
            return Vec::new();
        };
        m.removed
            .iter()
            .filter(|r| r.0 == uid)
            .map(|r| (r.1.clone(), r.2.clone(), r.3.clone()))
            .collect()
    }

    pub fn clear_calls(&self) {
        self.model().calls.clear()
    }

    /// Every notification delivery (a duplicate shows twice with the same notificationId).
    pub fn notifications(&self) -> Vec<NotificationRecord> {
        self.model().notifications.clone()
    }

    pub fn clear_notifications(&self) {
        self.model().notifications.clear()
    }

    pub fn location_state(&self, key: &str) -> anyhow::Result<LocationState> {
        self.model().location_state(key)
    }

    pub fn event(&self, event_id: &str) -> Option<Event> {
        self.model().events.get(event_id).cloned()
    }

    pub fn pending_events(&self) -> usize {
        self.model().pending_events().len()
    }

    /// True when no event is pending and no notification delivery is under way (with the
    /// manual clock: no delivery under way; pending events wait for the clock). Cheap and
    /// non-blocking: poll it with `tokio::time::sleep` inside a runtime.
    pub fn is_idle(&self) -> bool {
        let waiting = {
            let m = self.model();
            !m.config.manual_clock && !m.pending_events().is_empty()
        };
        !waiting
            && self
                .shared
                .in_flight
                .load(std::sync::atomic::Ordering::SeqCst)
                == 0
    }

    /// Blocks (std sleep) until [`Simulator::is_idle`]. Synchronous tests only.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while !self.is_idle() {
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Applies every pending event now (their notifications go out in the background).
    pub fn flush_events(&self) {
        let notes = self.model().flush_events();
        self.notify(notes);
    }

    /// Blocks (std sleep) until `pred` holds on the notification log or the timeout passes.
    /// For synchronous tests only: inside a tokio runtime poll [`Simulator::notifications`]
    /// with `tokio::time::sleep` instead.
    pub fn wait_for_notifications(
        &self,
        timeout: Duration,
        pred: impl Fn(&[NotificationRecord]) -> bool,
    ) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if pred(&self.model().notifications) {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Blocks (std sleep) until no event is pending. Synchronous tests only (see above).
    pub fn wait_for_events(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while self.pending_events() > 0 {
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Seeds the demo data; returns `(location name, token)` pairs.
    pub fn seed_demo(&self) -> Vec<(String, String)> {
        seed_demo(&mut self.model())
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| server::handle(shared.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }
    }
}

/// Two locations with a few apps and books, users and assignments.
pub fn seed_demo(m: &mut model::Model) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let school = m.add_location(LocationSpec {
        org_name: "Demo School District".into(),
        location_name: "Demo High School".into(),
        default_platform: "volumestore".into(),
        website_url: "https://school.apple.com".into(),
        ..Default::default()
    });
    let named = |mut a: AssetSpec, name: &str, bundle: Option<&str>| {
        a.name = Some(name.into());
        a.bundle_id = bundle.map(str::to_string);
        a
    };
    let _ = m.add_assets(
        &school,
        vec![
            named(
                AssetSpec::app("361309726", 30),
                "Pages",
                Some("com.apple.iWork.Pages"),
            ),
            named(
                AssetSpec::app("361285480", 30),
                "Keynote",
                Some("com.apple.iWork.Keynote"),
            ),
            named(
                AssetSpec::app("361304891", 5),
                "Numbers",
                Some("com.apple.iWork.Numbers"),
            ),
            named(
                AssetSpec {
                    unlimited: true,
                    ..AssetSpec::app("1208226939", 0)
                },
                "Swift Playgrounds",
                Some("com.apple.Playgrounds"),
            ),
            named(AssetSpec::book("1459997404", 25), "Everyone Can Code", None),
        ],
    );
    let _ = m.add_users(
        &school,
        vec![
            UserSpec {
                client_user_id: "student-001".into(),
                email: Some("student-001@school.example".into()),
                status: Some("Associated".into()),
                ..Default::default()
            },
            UserSpec {
                client_user_id: "student-002".into(),
                email: Some("student-002@school.example".into()),
                ..Default::default()
            },
        ],
    );
    let _ = m.add_assignments(
        &school,
        vec![
            AssignmentSpec::device("361309726", "DMQXDEMO0001"),
            AssignmentSpec::device("361309726", "DMQXDEMO0002"),
            AssignmentSpec::device("361285480", "DMQXDEMO0001"),
            AssignmentSpec::device("361304891", "DMQXDEMO0003"),
            AssignmentSpec::user("1459997404", "student-001"),
        ],
    );
    out.push(("Demo High School".to_string(), school));

    let business = m.add_location(LocationSpec {
        org_name: "Demo Corp".into(),
        location_name: "Demo Corp HQ".into(),
        ..Default::default()
    });
    let _ = m.add_assets(
        &business,
        vec![
            named(
                AssetSpec::app("409201541", 50),
                "Pages for Business",
                Some("com.example.pages"),
            ),
            named(
                AssetSpec::app("1274495053", 2),
                "Microsoft Teams",
                Some("com.microsoft.skype.teams"),
            ),
            named(
                AssetSpec {
                    pricing_param: "PLUS".into(),
                    ..AssetSpec::app("409203825", 10)
                },
                "Numbers PLUS",
                Some("com.example.numbers"),
            ),
            named(AssetSpec::book("1538406536", 10), "Security Handbook", None),
        ],
    );
    let _ = m.add_assignments(
        &business,
        vec![
            AssignmentSpec::device("409201541", "C02DEMO00001"),
            AssignmentSpec::device("1274495053", "C02DEMO00001"),
            AssignmentSpec::device("1274495053", "C02DEMO00002"),
        ],
    );
    out.push(("Demo Corp HQ".to_string(), business));
    out
}
