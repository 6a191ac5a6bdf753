//! The node image's first boot: the seed a user edits on the image's seed partition
//! (`seed.toml`), what it becomes on the node (host name, a systemd-networkd file for the
//! management interface, `tesserad`'s own seed), the console's status screen
//! (`/etc/issue`), the A/B root slots with their boot entries (`slots`) and the data
//! partition's format record that both slots' releases check (`data_format`). Pure:
//! reading the machine and writing files is `main.rs`'s job.

#![forbid(unsafe_code)]

pub mod data_format;
pub mod issue;
pub mod node_seed;
pub mod render;
pub mod slots;
