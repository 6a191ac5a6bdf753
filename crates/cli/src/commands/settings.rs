//! The cluster's settings: show them, change them (administrators).

use tessera_api::{ClusterSettings, SettingsUpdate};

use crate::client::Client;
use crate::endpoints::{SETTINGS, SETTINGS_SET};
use crate::output::Output;

fn human(s: ClusterSettings) {
    println!("vcpu_overcommit: {}", s.vcpu_overcommit);
    println!("replica_replace_after_s: {}", s.replica_replace_after_s);
}

pub fn show(client: &Client, out: Output) -> anyhow::Result<()> {
    let v = client.call(SETTINGS, &[], None)?;
    out.show(SETTINGS, &v, human)
}

pub fn set(
    client: &Client,
    vcpu_overcommit: Option<f64>,
    replica_replace_after_s: Option<u64>,
    out: Output,
) -> anyhow::Result<()> {
    let update = SettingsUpdate {
        vcpu_overcommit,
        replica_replace_after_s,
    };
    let v = client.send(SETTINGS_SET, &[], &update)?;
    out.show(SETTINGS_SET, &v, human)
}
