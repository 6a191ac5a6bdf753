//! tessera-nbd's integration tests, in one test binary rather than one per file: each
//! binary compiles and links what it uses of tokio and rustls again. In the suite's ci
//! profile the five binaries these were took 59 s of CPU to build, this one takes 35 s
//! (rustc's user+sys time, 2026-12-02). Each module is one story.

mod client_pipelined;
mod client_server;
mod fuzz_state_machine;
mod limits;
mod remote_reads;
mod tls;
