//! Gatehouse: an API gateway on Pingora. The binary (`main.rs`) is a thin CLI over this crate.
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod access_log;
pub mod admin;
pub mod aggregate;
pub mod cache;
pub mod compress;
pub mod config;
pub mod demo;
pub mod explain;
pub mod front;
pub mod metrics;
pub mod path;
pub mod proxy;
pub mod router;
pub mod runtime;
pub mod server;
pub mod stores;
pub mod systemd;
pub mod tls;
pub mod trace;
pub mod upgrade;
pub mod upstream;
