//! The seam between Spin and the domain. Components call into here to open the key-value
//! store, read variables, turn requests into calls and errors into responses. Nothing here
//! knows about licenses.

pub mod apple_http;
pub mod gateway;
pub mod http_api;
pub mod kv;
pub mod vars;

pub use http_api::{ApiRequest, ApiResponse};
pub use kv::SpinKv;
