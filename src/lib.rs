//! portcullis: a per-pod service-mesh sidecar. See DESIGN.md for the map.
// No unsafe code, except one reviewed call into the C allocator (`heap.rs`).
#![deny(unsafe_code)]

pub mod admin;
pub mod app;
pub mod authz;
pub mod await_ready;
pub mod ca_cli;
pub mod check;
pub mod config;
pub mod demo;
pub mod drain;
pub mod file_limits;
pub mod filewatch;
pub mod heap;
pub mod identity;
pub mod inject;
pub mod install;
pub mod intercept;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod rules_cli;
pub mod runtime;
pub mod tls;
