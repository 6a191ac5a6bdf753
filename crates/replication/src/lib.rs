//! tessera-replication: the volume replication protocol between `tessera-store`s, free of I/O.
//!
//! What this crate owns: the one versioned wire format every replication message uses
//! ([`wire`]), and the pure state machines that decide what a replica and a primary do with
//! those messages. What it must not do: open sockets, touch files, spawn threads or read
//! the clock. The shell (the store's QUIC service) feeds bytes, messages and the time in,
//! and performs the actions that come out, in order. That keeps every decision here
//! testable deterministically, with a seeded simulated network (see `tests/`).
//!
//! See `docs/replication.md` for the protocol, the fencing rule and why an acknowledged,
//! flushed write cannot be lost.

#![forbid(unsafe_code)]

pub mod catchup;
pub mod primary;
pub mod regions;
pub mod replica;
pub mod wire;
