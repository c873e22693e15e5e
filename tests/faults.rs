//! Fault tests: rules rewritten in a storm under traffic, a server sidecar
//! killed with SIGKILL and restarted, and an identity service down for
//! longer than a leaf lives. (The long load runs are in `tests/soak.rs`.)

#[path = "ca_serve/apiserver.rs"]
#[allow(dead_code)]
mod apiserver;
#[path = "faults/app.rs"]
mod app;
mod common;
#[path = "ca_serve/harness.rs"]
#[allow(dead_code)]
mod harness;
#[path = "faults/identity.rs"]
mod identity;
#[path = "faults/load.rs"]
mod load;
#[path = "faults/proc.rs"]
#[allow(dead_code)]
mod proc;
#[path = "faults/reload.rs"]
mod reload;
#[path = "faults/restart.rs"]
mod restart;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_storm_with_renamed_file_never_mixes_sets() {
    reload::storm(reload::Layout::RenameOneFile).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_storm_with_configmap_swaps_never_mixes_sets() {
    reload::storm(reload::Layout::ConfigMap).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_server_fails_closed_and_traffic_resumes_after_restart() {
    restart::sigkill_and_restart().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_service_down_longer_than_a_leaf_lives() {
    identity::identity_service_outage_longer_than_a_leaf().await;
}

/// The short version; `make soak` holds 10,000 (tests/soak.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_held_connections_through_a_pair() {
    let n = load::connections_allowed(500);
    assert_eq!(n, 500);
    let held = load::hold(n, common::echo_server().await).await;
    load::assert_bounded(&held, 64);
}
