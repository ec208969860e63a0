//! The domain of vpp-spin: accounts, assets, assignments, policies, reconcile, notices, jobs,
//! audit. Plain Rust: the key-value store is a [`vpp_store::Kv`], Apple is a
//! [`vpp_apple::Client`] over some transport, and time is passed in.

pub mod account;
pub mod apple_state;
pub mod assignment;
pub mod audit;
pub mod auth;
pub mod cleanup;
pub mod copy;
pub mod daily;
pub mod error;
pub mod event;
pub mod instance;
pub mod job;
pub mod ledger;
pub mod licenses;
pub mod licenses_openapi;
pub mod metrics;
pub mod model;
pub mod notice;
pub mod notification;
pub mod openapi;
pub mod policy;
pub mod reconcile;
pub mod refresh;
pub mod runner;
pub mod settings;
pub mod status;
pub mod users;

pub use error::{ApiError, ErrorCode};

/// Largest request body the API accepts (413 above it).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// The version reported by `/api/health`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
