//! One module per resource of the API: each runs its subcommands and shows the answers.

pub mod certificate;
pub mod cluster;
pub mod events;
pub mod image;
pub mod networks;
pub mod node_upgrade;
pub mod nodes;
pub mod realms;
pub mod session;
pub mod settings;
pub mod tasks;
pub mod tokens;
pub mod users;
pub mod vm_console;
pub mod vms;
pub mod volume_cp;
pub mod volumes;
