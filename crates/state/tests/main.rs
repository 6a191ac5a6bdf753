//! tessera-state's integration tests, in one test binary: every test binary compiles and
//! links the Raft stack it uses (openraft, redb, rustls, tokio) again. In the suite's ci
//! profile the four binaries these were took 261 s of CPU to build, this one takes 87 s
//! (rustc's user+sys time, 2026-12-02). Each module is one story; `common` has their
//! shared helpers.

// Helpers of these tests unwrap too: a failure there is the test failing.
#![allow(clippy::unwrap_used)]

mod accept_errors;
mod common;
mod leader_removal;
mod no_leader;
mod port_edges;
mod raft;
mod writes_once;
