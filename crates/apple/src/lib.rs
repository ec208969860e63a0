//! Apple's Apps and Books (VPP) v2 protocol: the content token, typed requests and responses,
//! error classification, paging, splitting to Apple's limits, pacing and bounded retries.
//!
//! No Spin dependency: requests go through a [`Transport`], time through a [`Clock`].

pub mod client;
pub mod error;
pub mod retry;
pub mod token;
pub mod transport;
pub mod types;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

#[cfg(test)]
mod tests;

pub use client::{
    check_owner, split_manage, split_revoke, split_users, AssetFilter, AssignmentFilter,
    BatchError, Client, Ownership, Paged, ResponseEcho, UserFilter,
};
pub use error::{parse_retry_after, AppleError};
pub use retry::{
    send_with_retry, send_with_retry_raw, Attempted, Pacer, RetryPolicy, DEFAULT_PACER_WINDOW,
};
pub use token::{parse_apple_date, ServerToken, TokenError};
pub use transport::{
    AppleRequest, AppleResponse, Clock, Method, Target, Transport, APPLE_BASE_URL,
};
pub use types::*;
