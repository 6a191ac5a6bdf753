//! The netlink side: reads this network namespace's interfaces and carries out a
//! [`policy::Plan`] through rtnetlink. Decides nothing itself.

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressScope};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::{Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVlan};

use crate::policy::{self, Link, LinkKind, Step};
use crate::{Error, NetworkDef, NetworkError, NetworkReport, Report};

/// Brings the current network namespace to `defs`: creates, corrects and removes
/// Tessera's bridges and VLAN interfaces. Idempotent; a network that cannot be set up
/// is reported and the others proceed. Needs a tokio runtime and CAP_NET_ADMIN.
pub async fn reconcile(defs: &[NetworkDef]) -> Result<Report, Error> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(Error::Connect)?;
    let conn = tokio::spawn(conn);
    let out = reconcile_with(&handle, defs).await;
    conn.abort();
    out
}

async fn reconcile_with(handle: &Handle, defs: &[NetworkDef]) -> Result<Report, Error> {
    let links = list(handle).await?;
    let plan = policy::plan(defs, &links);
    let mut report = Report {
        foreign: plan.foreign,
        ..Report::default()
    };
    for name in &report.foreign {
        tracing::warn!(interface = %name, "named like Tessera's but not marked; left alone");
    }

    for (network, step) in &plan.removals {
        let r = run(handle, step).await;
        match &r {
            Ok(()) => tracing::info!(%network, "{step}"),
            Err(e) => tracing::warn!(%network, "{e}"),
        }
        report.removed.push((step_target(step).to_string(), r));
    }

    let mut networks: Vec<NetworkReport> = plan
        .failed
        .into_iter()
        .map(|(network, e)| {
            tracing::warn!(%network, "network not set up: {e}");
            NetworkReport {
                network,
                bridge: None,
                vlan_interface: None,
                changes: Vec::new(),
                result: Err(e),
            }
        })
        .collect();
    for p in plan.networks {
        let mut changes = Vec::new();
        let mut result = Ok(());
        for step in &p.steps {
            if let Err(e) = run(handle, step).await {
                tracing::warn!(network = %p.network, "{e}");
                result = Err(e);
                break;
            }
            tracing::info!(network = %p.network, "{step}");
            changes.push(step.to_string());
        }
        networks.push(NetworkReport {
            network: p.network,
            bridge: Some(p.bridge),
            vlan_interface: p.vlan_interface,
            changes,
            result,
        });
    }
    networks.sort_by(|a, b| a.network.cmp(&b.network));
    report.networks = networks;
    Ok(report)
}

fn step_target(step: &Step) -> &str {
    match step {
        Step::Delete { name }
        | Step::CreateBridge { name, .. }
        | Step::CreateVlan { name, .. }
        | Step::SetMaster { name, .. }
        | Step::SetUp { name } => name,
    }
}

/// Every interface of the current network namespace, with its global addresses.
pub async fn list(handle: &Handle) -> Result<Vec<Link>, Error> {
    let mut out = Vec::new();
    let mut s = handle.link().get().execute();
    while let Some(m) = s.try_next().await.map_err(|e| Error::List(e.to_string()))? {
        out.push(parse(&m));
    }
    let mut a = handle.address().get().execute();
    while let Some(m) = a.try_next().await.map_err(|e| Error::List(e.to_string()))? {
        // Link-local and host addresses do not count: every interface has an fe80::, and
        // losing it on a bridge port loses nothing anyone configured.
        if !matches!(m.header.scope, AddressScope::Universe | AddressScope::Site) {
            continue;
        }
        let ip = m.attributes.iter().fold(None, |found, a| match a {
            AddressAttribute::Local(ip) => Some(*ip),
            AddressAttribute::Address(ip) => found.or(Some(*ip)),
            _ => found,
        });
        if let (Some(ip), Some(l)) = (ip, out.iter_mut().find(|l| l.index == m.header.index)) {
            l.addresses.push(format!("{ip}/{}", m.header.prefix_len));
        }
    }
    Ok(out)
}

fn parse(m: &LinkMessage) -> Link {
    let mut link = Link {
        index: m.header.index,
        name: String::new(),
        kind: LinkKind::Other,
        up: m.header.flags.contains(LinkFlags::Up),
        master: None,
        alias: None,
        addresses: Vec::new(),
    };
    let mut parent = None;
    let mut kind = None;
    let mut vlan_id = None;
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::IfAlias(s) => link.alias = Some(s.clone()),
            LinkAttribute::Controller(i) => link.master = Some(*i),
            LinkAttribute::Link(i) => parent = Some(*i),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(k) => kind = Some(k.clone()),
                        LinkInfo::Data(InfoData::Vlan(v)) => {
                            vlan_id = v.iter().find_map(|x| match x {
                                InfoVlan::Id(id) => Some(*id),
                                _ => None,
                            })
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    link.kind = match kind {
        Some(InfoKind::Bridge) => LinkKind::Bridge,
        Some(InfoKind::Vlan) => LinkKind::Vlan {
            id: vlan_id.unwrap_or(0),
            parent: parent.unwrap_or(0),
        },
        _ => LinkKind::Other,
    };
    link
}

/// The interface called `name` now (indexes change when interfaces are recreated).
async fn by_name(handle: &Handle, name: &str) -> Result<Link, rtnetlink::Error> {
    let mut s = handle.link().get().match_name(name.to_string()).execute();
    match s.try_next().await? {
        Some(m) => Ok(parse(&m)),
        None => Err(rtnetlink::Error::RequestFailed),
    }
}

async fn run(handle: &Handle, step: &Step) -> Result<(), NetworkError> {
    let failed = |e: rtnetlink::Error| NetworkError::Netlink {
        step: step.to_string(),
        message: e.to_string(),
    };
    let links = handle.link();
    match step {
        Step::Delete { name } => {
            let l = match by_name(handle, name).await {
                Ok(l) => l,
                // Gone already: another tesserad sharing this network namespace (the dev
                // cluster's nodes) deleted it first.
                Err(e)
                    if errno(&e) == Some(libc::ENODEV)
                        || matches!(e, rtnetlink::Error::RequestFailed) =>
                {
                    return Ok(())
                }
                Err(e) => return Err(failed(e)),
            };
            // Checked again here, not only in the plan: nothing unmarked is ever deleted.
            if l.owner().is_none() {
                return Err(NetworkError::Conflict {
                    interface: name.clone(),
                    owner: None,
                });
            }
            links.del(l.index).execute().await.map_err(failed)
        }
        Step::CreateBridge { name, mark } => {
            let msg = LinkMessageBuilder::<LinkBridge>::new(name).build();
            match links.add(msg).execute().await {
                Err(e) if errno(&e) == Some(libc::EEXIST) => made_by_a_peer(handle, name, mark)
                    .await
                    .map_err(|owner| NetworkError::Conflict {
                        interface: name.clone(),
                        owner,
                    }),
                r => {
                    r.map_err(failed)?;
                    set_mark(handle, name, mark).await.map_err(failed)
                }
            }
        }
        Step::CreateVlan {
            name,
            uplink,
            id,
            mark,
        } => {
            let parent = by_name(handle, uplink).await.map_err(failed)?;
            let msg = LinkVlan::new(name, parent.index, *id).build();
            match links.add(msg).execute().await {
                Err(rtnetlink::Error::NetlinkError(m))
                    if m.code.map(|c| c.get()) == Some(-libc::EOPNOTSUPP) =>
                {
                    return Err(NetworkError::VlanUnsupported)
                }
                r => r.map_err(failed)?,
            }
            set_mark(handle, name, mark).await.map_err(failed)
        }
        Step::SetMaster { name, master } => {
            let l = by_name(handle, name).await.map_err(failed)?;
            let m = by_name(handle, master).await.map_err(failed)?;
            let msg = LinkUnspec::new_with_index(l.index)
                .controller(m.index)
                .build();
            links.set(msg).execute().await.map_err(failed)
        }
        Step::SetUp { name } => {
            let l = by_name(handle, name).await.map_err(failed)?;
            let msg = LinkUnspec::new_with_index(l.index).up().build();
            links.set(msg).execute().await.map_err(failed)
        }
    }
}

/// Marks a new interface as Tessera's. The kernel takes no alias when it creates a link,
/// so this is a second request right after the creation.
async fn set_mark(handle: &Handle, name: &str, mark: &str) -> Result<(), rtnetlink::Error> {
    let l = by_name(handle, name).await?;
    let msg = LinkUnspec::new_with_index(l.index).alias(mark).build();
    handle.link().set(msg).execute().await
}

/// The errno of a failed netlink request, if the kernel gave one.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// A bridge we were about to create exists: made by another `tesserad` of this network
/// namespace a moment ago (it marks it right after creating it), or by someone else. Ok
/// once it carries `mark` (within a second); else the mark it has, if any.
async fn made_by_a_peer(handle: &Handle, name: &str, mark: &str) -> Result<(), Option<String>> {
    let mut seen = None;
    for _ in 0..10 {
        seen = by_name(handle, name).await.ok().and_then(|l| l.alias);
        if seen.as_deref() == Some(mark) {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Err(seen)
}
