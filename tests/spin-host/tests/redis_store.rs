//! The Redis-backed store against a real `redis-server` (`bash scripts/setup-redis` installs
//! it; each test starts its own on a free port): Spin's Redis semantics, as the guest sees them
//! through the host's store, selected by a runtime config.

use std::sync::Arc;

use spin_host::key_value::{KvManager, Store, StoreConfig, SwapError};
use spin_host::redis_store::RedisServer;

fn redis_store(server: &RedisServer) -> Arc<Store> {
    let configs = vec![(
        "default".to_string(),
        StoreConfig::Redis { url: server.url() },
    )];
    KvManager::with_configs(&configs, None, None)
        .unwrap()
        .store("default")
        .unwrap()
}

#[test]
fn basic_operations_listing_and_increment() {
    let server = RedisServer::start().unwrap();
    let s = redis_store(&server);
    assert_eq!(s.get("a").unwrap(), None);
    s.set("a", b"1").unwrap();
    s.set("b", &[0xff, 0x00]).unwrap();
    assert!(s.exists("a").unwrap());
    assert_eq!(s.get("b").unwrap().unwrap(), [0xff, 0x00]);
    let mut keys = s.keys().unwrap();
    keys.sort();
    assert_eq!(keys, ["a", "b"]);
    assert_eq!(s.scan_keys().unwrap(), ["a", "b"]);
    s.delete("a").unwrap();
    s.delete("missing").unwrap();
    assert_eq!(s.scan_keys().unwrap(), ["b"]);

    // INCRBY: ASCII decimal, readable with get; a non-number is an error, not a trap.
    assert_eq!(s.increment("n", 5).unwrap(), 5);
    assert_eq!(s.increment("n", -2).unwrap(), 3);
    assert_eq!(s.get("n").unwrap().unwrap(), b"3");
    assert!(matches!(
        s.increment("b", 1),
        Err(spin_host::key_value::IncrementError::Store(_))
    ));

    // Spin's Redis get-many sends KEYS with the keys as patterns: it fails.
    assert!(s.get_many(&["b".into(), "n".into()]).is_err());
    s.set_many(&[("x".into(), b"1".to_vec()), ("y".into(), b"2".to_vec())])
        .unwrap();
    s.delete_many(&["x".into(), "y".into()]).unwrap();
    assert!(!s.exists("x").unwrap());
}

/// Spin 4.0.2's Redis swap: the write is applied when the watched key did not change, and the
/// swap is reported as failed either way (`UNWATCH key` is refused by Redis).
#[test]
fn compare_and_swap_reports_failure_even_when_applied() {
    let server = RedisServer::start().unwrap();
    let s = redis_store(&server);
    s.set("k", b"v1").unwrap();

    let mut cas = s.new_cas("k").unwrap();
    assert_eq!(cas.current().unwrap().as_deref(), Some(&b"v1"[..]));
    assert!(matches!(cas.swap(b"v2"), Err(SwapError::CasFailed(_))));
    assert_eq!(s.get("k").unwrap().unwrap(), b"v2", "applied");

    // Another writer between current() and swap: EXEC aborts, nothing written.
    let mut cas = s.new_cas("k").unwrap();
    assert_eq!(cas.current().unwrap().as_deref(), Some(&b"v2"[..]));
    s.set("k", b"other").unwrap();
    assert!(matches!(cas.swap(b"v3"), Err(SwapError::CasFailed(_))));
    assert_eq!(s.get("k").unwrap().unwrap(), b"other", "not applied");

    // Even writing the same bytes counts as a change for WATCH.
    let mut cas = s.new_cas("k").unwrap();
    cas.current().unwrap();
    s.set("k", b"other").unwrap();
    assert!(matches!(cas.swap(b"v4"), Err(SwapError::CasFailed(_))));
    assert_eq!(s.get("k").unwrap().unwrap(), b"other");

    // A key absent at current() and created before the swap: not applied either.
    let mut cas = s.new_cas("fresh").unwrap();
    assert_eq!(cas.current().unwrap(), None);
    s.set("fresh", b"first").unwrap();
    assert!(matches!(cas.swap(b"second"), Err(SwapError::CasFailed(_))));
    assert_eq!(s.get("fresh").unwrap().unwrap(), b"first");

    // Without current() there is no WATCH: the write is unconditional.
    let mut cas = s.new_cas("k").unwrap();
    assert!(matches!(cas.swap(b"blind"), Err(SwapError::CasFailed(_))));
    assert_eq!(s.get("k").unwrap().unwrap(), b"blind");
}

/// Two apps configured with the same Redis URL see one store; the label does not separate.
#[test]
fn instances_and_labels_share_one_redis() {
    let server = RedisServer::start().unwrap();
    let configs = vec![
        (
            "default".to_string(),
            StoreConfig::Redis { url: server.url() },
        ),
        (
            "other".to_string(),
            StoreConfig::Redis { url: server.url() },
        ),
    ];
    let one = KvManager::with_configs(&configs, None, None).unwrap();
    let two = KvManager::with_configs(&configs, None, None).unwrap();
    one.store("default").unwrap().set("shared", b"x").unwrap();
    assert_eq!(
        two.store("default")
            .unwrap()
            .get("shared")
            .unwrap()
            .unwrap(),
        b"x"
    );
    assert_eq!(
        two.store("other").unwrap().get("shared").unwrap().unwrap(),
        b"x"
    );
}

#[test]
fn an_unreachable_redis_fails_the_load() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let configs = vec![(
        "default".to_string(),
        StoreConfig::Redis {
            url: format!("redis://127.0.0.1:{port}"),
        },
    )];
    let err = KvManager::with_configs(&configs, None, None).unwrap_err();
    assert!(format!("{err:#}").contains("Redis"), "{err:#}");
}
