//! The mesh tunnel end to end: real sidecars (in-process and as processes),
//! real mTLS and HTTP/2, real sockets. See docs/DESIGN.md, "Mesh tunnel".

mod common;
#[path = "tunnel/data.rs"]
mod data;
#[path = "tunnel/drain.rs"]
mod drain;
#[path = "tunnel/edge.rs"]
mod edge;
#[path = "tunnel/mixed.rs"]
mod mixed;
#[path = "tunnel/reuse.rs"]
mod reuse;
#[path = "tunnel/rotation.rs"]
mod rotation;
#[path = "tunnel/support.rs"]
mod support;
