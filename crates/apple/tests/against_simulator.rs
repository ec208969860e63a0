//! The client against the Apple simulator (tests/apple-sim) over real HTTP/1.1.

use std::future::Future;
use std::pin::pin;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use apple_sim::{AssetSpec, AssignmentSpec, FaultKind, FaultSpec, LocationSpec, Simulator};
use chrono::{DateTime, Utc};
use vpp_apple::*;

fn block_on<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}

/// Blocking HTTP/1.1 over std's TcpStream (the simulator's helper); adds the bearer.
struct SimTransport {
    base: String,
    bearer: String,
    sent_at: Mutex<Vec<DateTime<Utc>>>,
}

impl SimTransport {
    fn new(sim: &Simulator, bearer: &str) -> Self {
        SimTransport {
            base: sim.base_url(),
            bearer: bearer.to_string(),
            sent_at: Mutex::new(Vec::new()),
        }
    }
}

impl Transport for SimTransport {
    fn send(&self, req: &AppleRequest) -> impl Future<Output = Result<AppleResponse, String>> {
        self.sent_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Utc::now());
        let url = req.url(&self.base);
        let auth = format!("Bearer {}", self.bearer);
        let mut headers = vec![("Authorization", auth.as_str())];
        if req.body.is_some() {
            headers.push(("Content-Type", "application/json"));
        }
        let out =
            apple_sim::client::request(req.method.as_str(), &url, &headers, req.body.as_deref())
                .map(|r| AppleResponse {
                    status: r.status,
                    retry_after: r.header("Retry-After").map(str::to_string),
                    body: r.body,
                })
                .map_err(|e| e.to_string());
        std::future::ready(out)
    }
}

/// Real time; sleeps are recorded so tests can check the waits.
#[derive(Default)]
struct RealClock {
    sleeps: Mutex<Vec<Duration>>,
}

impl Clock for RealClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
    fn sleep(&self, d: Duration) -> impl Future<Output = ()> {
        self.sleeps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(d);
        std::thread::sleep(d);
        std::future::ready(())
    }
    fn jitter(&self) -> f64 {
        f64::from(Utc::now().timestamp_subsec_nanos() % 1000) / 1000.0
    }
}

type SimClient = Client<SimTransport, RealClock>;

fn client(sim: &Simulator, token: &str) -> SimClient {
    Client::new(SimTransport::new(sim, token), RealClock::default()).with_policy(RetryPolicy {
        max_attempts: 3,
        max_retry_after: Duration::from_secs(2),
        base_backoff: Duration::from_millis(100),
        max_total_wait: Duration::from_secs(10),
    })
}

fn calls_to(sim: &Simulator, token: &str, method: &str, path: &str) -> usize {
    let full = format!("/mdm/v2/{path}");
    sim.calls_for(token)
        .iter()
        .filter(|c| c.method == method && c.path == full)
        .count()
}

fn serials(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("SERIAL{i:05}")).collect()
}

#[test]
fn token_from_simulator_parses() {
    let sim = Simulator::start().unwrap();
    let token = sim.add_location(LocationSpec::named("School"));
    let t = ServerToken::parse(&token).unwrap();
    assert_eq!(t.bearer(), token.trim());
    assert!(!t.is_expired(Utc::now()));
    let c = client(&sim, t.bearer());
    let cfg = block_on(c.client_config()).unwrap();
    assert_eq!(cfg.location_name.as_deref(), Some("School"));
    assert_eq!(cfg.u_id, sim.location_uid(&token));
}

#[test]
fn all_pages_read_and_no_more() {
    let sim = Simulator::start().unwrap();
    sim.set_page_size(3);
    let token = sim.add_location(LocationSpec::named("L"));
    let assets: Vec<AssetSpec> = (0..10)
        .map(|i| AssetSpec::app(&format!("{}", 1000 + i), 5))
        .collect();
    sim.add_assets(&token, assets).unwrap();
    let c = client(&sim, &token);
    let all = block_on(c.all_assets(&AssetFilter::default())).unwrap();
    assert_eq!(all.assets.len(), 10);
    assert!(all.version_id.is_some());
    assert_eq!(calls_to(&sim, &token, "GET", "assets"), 4);

    // Up to five pages in flight: still every page once.
    let c = client(&sim, &token).with_page_concurrency(5);
    let all = block_on(c.all_assets(&AssetFilter::default())).unwrap();
    assert_eq!(all.assets.len(), 10);
    assert_eq!(calls_to(&sim, &token, "GET", "assets"), 8);
}

#[test]
fn incremental_sync_returns_only_changes() {
    let sim = Simulator::start().unwrap();
    sim.set_page_size(2);
    let token = sim.add_location(LocationSpec::named("L"));
    sim.add_assets(&token, vec![AssetSpec::app("1", 100)])
        .unwrap();
    sim.add_assignments(
        &token,
        serials(5)
            .iter()
            .map(|s| AssignmentSpec::device("1", s))
            .collect(),
    )
    .unwrap();
    let c = client(&sim, &token);
    let first = block_on(c.all_assignments(&AssignmentFilter::default(), None)).unwrap();
    assert_eq!(first.assignments.len(), 5);
    let version = first.version_id.clone().unwrap();

    // Nothing changed: zero records is normal.
    let none = block_on(c.all_assignments(&AssignmentFilter::default(), Some(&version))).unwrap();
    assert!(none.assignments.is_empty(), "{:?}", none.assignments);

    sim.set_event_delay(Duration::ZERO);
    let events = block_on(c.associate(&ManageAssetsRequest {
        assets: vec![AssetRef::new("1", PricingParam::Stdq)],
        serial_numbers: vec!["NEW1".into(), "NEW2".into()],
        ..Default::default()
    }))
    .unwrap();
    assert_eq!(events.len(), 1);
    assert!(sim.wait_for_events(Duration::from_secs(5)));
    let changes =
        block_on(c.all_assignments(&AssignmentFilter::default(), Some(&version))).unwrap();
    let mut got: Vec<String> = changes
        .assignments
        .iter()
        .filter_map(|a| a.serial_number.clone())
        .collect();
    got.sort();
    assert_eq!(got, vec!["NEW1", "NEW2"]);
    assert_ne!(changes.version_id.as_deref(), Some(version.as_str()));
}

#[test]
fn requests_split_to_the_limits() {
    let sim = Simulator::start().unwrap();
    sim.set_limits(apple_sim::Limits {
        max_serial_numbers: 10,
        max_revoke_serial_numbers: 4,
        ..Default::default()
    });
    let token = sim.add_location(LocationSpec::named("L"));
    sim.add_assets(&token, vec![AssetSpec::app("1", 100)])
        .unwrap();
    let c = client(&sim, &token);
    let events = block_on(c.associate(&ManageAssetsRequest {
        assets: vec![AssetRef::new("1", PricingParam::Stdq)],
        serial_numbers: serials(25),
        ..Default::default()
    }))
    .unwrap();
    assert_eq!(events.len(), 3);
    assert_eq!(calls_to(&sim, &token, "POST", "assets/associate"), 3);
    // Every request was accepted (none rejected for exceeding a limit).
    assert!(sim.calls_for(&token).iter().all(|c| c.status == 200));

    let events = block_on(c.revoke(&RevokeAssetsRequest {
        serial_numbers: serials(10),
        ..Default::default()
    }))
    .unwrap();
    assert_eq!(events.len(), 3);
    assert_eq!(calls_to(&sim, &token, "POST", "assets/revoke"), 3);
    let config_reads = sim
        .calls()
        .iter()
        .filter(|c| c.path == "/mdm/v2/service/config")
        .count();
    assert_eq!(config_reads, 1);
}

#[test]
fn rate_limit_and_outage_retried_after_retry_after() {
    let sim = Simulator::start().unwrap();
    let token = sim.add_location(LocationSpec::named("L"));
    let c = client(&sim, &token);

    sim.inject_fault(
        &token,
        FaultSpec::new(FaultKind::RateLimited)
            .on("client/config")
            .times(1)
            .retry_after(1),
    )
    .unwrap();
    assert!(block_on(c.client_config()).is_ok());
    assert_eq!(calls_to(&sim, &token, "GET", "client/config"), 2);

    sim.inject_fault(
        &token,
        FaultSpec::new(FaultKind::Unavailable)
            .on("client/config")
            .times(1)
            .retry_after(1),
    )
    .unwrap();
    assert!(block_on(c.client_config()).is_ok());
    assert_eq!(calls_to(&sim, &token, "GET", "client/config"), 4);
    let sleeps = c.clock().sleeps.lock().unwrap().clone();
    assert_eq!(sleeps, vec![Duration::from_secs(1), Duration::from_secs(1)]);

    // A long Retry-After is capped (policy cap 2 s).
    sim.inject_fault(
        &token,
        FaultSpec::new(FaultKind::Unavailable)
            .on("client/config")
            .times(1)
            .retry_after(600),
    )
    .unwrap();
    assert!(block_on(c.client_config()).is_ok());
    assert_eq!(
        c.clock().sleeps.lock().unwrap().last(),
        Some(&Duration::from_secs(2))
    );
}

#[test]
fn bounded_attempts_then_clear_error() {
    let sim = Simulator::start().unwrap();
    let token = sim.add_location(LocationSpec::named("L"));
    sim.inject_fault(
        &token,
        FaultSpec::new(FaultKind::Unavailable)
            .on("assets")
            .retry_after(1),
    )
    .unwrap();
    let c = client(&sim, &token);
    let err = block_on(c.assets_page(&AssetFilter::default(), 0)).unwrap_err();
    assert!(
        matches!(err, AppleError::Unavailable { status: 503, .. }),
        "{err:?}"
    );
    assert_eq!(calls_to(&sim, &token, "GET", "assets"), 3);
}

#[test]
fn token_errors_told_apart_and_not_retried() {
    let sim = Simulator::start().unwrap();
    let expired = sim.add_location(LocationSpec {
        exp_date: Some(Utc::now() - chrono::Duration::days(1)),
        ..LocationSpec::named("Expired")
    });
    let revoked = sim.add_location(LocationSpec::named("Revoked"));
    sim.set_token_revoked(&revoked, true).unwrap();
    let invalid200 = sim.add_location(LocationSpec::named("Invalid200"));
    sim.inject_fault(&invalid200, FaultSpec::new(FaultKind::Invalid200))
        .unwrap();

    let err = |token: &str| block_on(client(&sim, token).client_config()).unwrap_err();
    assert_eq!(err(&expired), AppleError::TokenExpired);
    assert_eq!(err(&revoked), AppleError::TokenRevoked);
    assert_eq!(
        err(&invalid200),
        AppleError::TokenInvalid { number: Some(9622) }
    );
    assert!(matches!(
        err("bm90IGEgdG9rZW4="),
        AppleError::TokenInvalid { .. }
    ));
    for t in [&expired, &revoked, &invalid200] {
        assert_eq!(calls_to(&sim, t, "GET", "client/config"), 1);
    }
}

#[test]
fn rate_never_above_15_per_second() {
    let sim = Simulator::start().unwrap();
    sim.set_rate_limit_enabled(true);
    let token = sim.add_location(LocationSpec::named("L"));
    let c = client(&sim, &token).with_policy(RetryPolicy::none());
    for i in 0..40 {
        if let Err(e) = block_on(c.client_config()) {
            let sent = c.transport().sent_at.lock().unwrap().clone();
            for (t, call) in sent.iter().zip(sim.calls_for(&token)) {
                eprintln!(
                    "{} {} {}",
                    t.format("%S%.6f"),
                    call.time.format("%S%.6f"),
                    call.status
                );
            }
            panic!("request {i}: {e:?}");
        }
    }
    let sent = c.transport().sent_at.lock().unwrap().clone();
    for (i, start) in sent.iter().enumerate() {
        let n = sent[i..]
            .iter()
            .take_while(|t| (**t - *start) < chrono::Duration::seconds(1))
            .count();
        assert!(n <= 15, "{n} requests within a second of request {i}");
    }
    assert!(sim.calls_for(&token).iter().all(|c| c.status != 429));
}

#[test]
fn ownership_and_metadata() {
    let sim = Simulator::start().unwrap();
    let token = sim.add_location(LocationSpec::named("L"));
    sim.add_assets(
        &token,
        vec![AssetSpec {
            name: Some("Pages".into()),
            ..AssetSpec::app("361309726", 5)
        }],
    )
    .unwrap();
    let c = client(&sim, &token);
    assert_eq!(
        block_on(c.verify_owner("ours")).unwrap(),
        Ownership::Unclaimed
    );
    let mine = MdmInfo {
        id: "ours".into(),
        name: "vpp-spin".into(),
        metadata: "test".into(),
    };
    block_on(c.set_client_config(&ClientConfigRequest {
        mdm_info: Some(mine),
        ..Default::default()
    }))
    .unwrap();
    assert_eq!(block_on(c.verify_owner("ours")).unwrap(), Ownership::Ours);
    sim.take_over(&token, apple_sim::TakeOver::default())
        .unwrap();
    block_on(c.all_assets(&AssetFilter::default())).unwrap();
    assert!(matches!(
        check_owner("ours", c.last_mdm_info().as_ref()),
        Ownership::Foreign { .. }
    ));

    let meta = block_on(c.metadata(&["361309726".to_string()])).unwrap();
    assert_eq!(meta.len(), 1);
    assert_eq!(meta[0].name.as_deref(), Some("Pages"));
}
