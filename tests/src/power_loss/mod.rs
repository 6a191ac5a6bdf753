//! The power-loss harness of issue #9: the store on powerfs, a verifying NBD workload,
//! power cuts at random points, and a block-by-block check after each restart. See
//! `docs/power-loss.md`.

pub mod admin_ops;
pub mod cycle;
pub mod history;
pub mod store;
pub mod workload;

pub use cycle::{CycleFailure, CycleStats, Finding, Harness, Options};
pub use workload::Mix;
