//! The netlink side of [`super`]: reads the management interface, every address and the
//! main table's routes, and carries out the [`super::plan`]'s steps through rtnetlink.
//! Decides nothing itself.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressMessage, AddressProtocol, AddressScope,
};
use rtnetlink::packet_route::link::LinkFlags;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::{AddressMessageBuilder, Handle, LinkUnspec, RouteMessageBuilder};

use super::{
    plan, route_metric, Cidr, ManagementDef, ManagementError, ManagementReport, Present,
    PresentAddress, PresentRoute, RouteDef, Step, MARK_PROTO,
};
use crate::Error;

/// Brings the current network namespace's management addresses and routes to `def`:
/// adds what is missing, corrects Tessera's own where they differ, removes Tessera's own
/// that are no longer wanted, never touches anything else. Idempotent: a second call with
/// the same `def` changes nothing. Needs a tokio runtime and CAP_NET_ADMIN.
pub async fn apply(def: &ManagementDef) -> Result<ManagementReport, Error> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(Error::Connect)?;
    let conn = tokio::spawn(conn);
    let out = apply_with(&handle, def).await;
    conn.abort();
    out
}

/// Rounds of read, plan, carry out: the kernel takes routes away with the address whose
/// subnet held their gateway (a prefix changed is an address deleted and added), so a
/// round that changed addresses is followed by another, which puts such routes back. The
/// second round of a settled node has no steps.
const ROUNDS: usize = 3;

async fn apply_with(handle: &Handle, def: &ManagementDef) -> Result<ManagementReport, Error> {
    let mut report = ManagementReport::default();
    for round in 0..ROUNDS {
        let present = read(handle, &def.interface).await?;
        let plan = match plan(def, &present) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(interface = %def.interface, "management network not applied: {e}");
                report.problems.push(e);
                return Ok(report);
            }
        };
        let mut failed = Vec::new();
        for step in &plan.steps {
            match run(handle, step).await {
                Ok(()) => {
                    tracing::info!(interface = %def.interface, "{step}");
                    report.changes.push(step.to_string());
                }
                Err(e) => {
                    // The other steps still run: an address refused does not stop a route
                    // elsewhere from being corrected.
                    tracing::warn!(interface = %def.interface, "{e}");
                    failed.push(e);
                }
            }
        }
        let addresses_changed = plan
            .steps
            .iter()
            .any(|s| matches!(s, Step::DeleteAddress { .. } | Step::AddAddress { .. }));
        // Settled, the last round, or the kernel refused something (another round would
        // only repeat it): what stands in the way is this round's.
        if !addresses_changed || !failed.is_empty() || round + 1 == ROUNDS {
            report.problems.extend(failed);
            report.problems.extend(plan.conflicts);
            break;
        }
    }
    for p in &report.problems {
        tracing::warn!(interface = %def.interface, "{p}");
    }
    Ok(report)
}

/// The interface named `name`, every address, the main table's unicast routes.
pub async fn read(handle: &Handle, name: &str) -> Result<Present, Error> {
    let list = |e: rtnetlink::Error| Error::List(e.to_string());
    let mut present = Present::default();
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(m)) => {
            present.interface = Some((m.header.index, m.header.flags.contains(LinkFlags::Up)))
        }
        Ok(None) => {}
        Err(e) if errno(&e) == Some(libc::ENODEV) => {}
        Err(e) => return Err(list(e)),
    }
    let mut addrs = handle.address().get().execute();
    while let Some(m) = addrs.try_next().await.map_err(list)? {
        if let Some(a) = address_of(&m) {
            present.addresses.push(a);
        }
    }
    for query in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let mut routes = handle.route().get(query).execute();
        while let Some(m) = routes.try_next().await.map_err(list)? {
            if let Some(r) = route_of(&m) {
                present.routes.push(r);
            }
        }
    }
    Ok(present)
}

fn address_of(m: &AddressMessage) -> Option<PresentAddress> {
    let mut local = None;
    let mut address = None;
    let mut ours = false;
    for a in &m.attributes {
        match a {
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            AddressAttribute::Protocol(p) => ours = u8::from(*p) == MARK_PROTO,
            _ => {}
        }
    }
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on a
    // point-to-point link and the same as IFA_LOCAL otherwise (IPv6 has only IFA_ADDRESS).
    let ip = local.or(address)?;
    Some(PresentAddress {
        interface: m.header.index,
        cidr: Cidr {
            ip,
            prefix: m.header.prefix_len,
        },
        ours,
    })
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
        RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        _ => None,
    }
}

fn route_of(m: &RouteMessage) -> Option<PresentRoute> {
    if m.header.kind != RouteType::Unicast {
        return None;
    }
    let mut table = u32::from(m.header.table);
    let mut destination = None;
    let mut gateway = None;
    let mut interface = None;
    let mut metric = 0;
    for a in &m.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(d) => destination = ip_of(d),
            RouteAttribute::Gateway(g) => gateway = ip_of(g),
            RouteAttribute::Oif(i) => interface = Some(*i),
            RouteAttribute::Priority(p) => metric = *p,
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    let unspecified = match m.header.address_family {
        rtnetlink::packet_route::AddressFamily::Inet => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        rtnetlink::packet_route::AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => return None,
    };
    Some(PresentRoute {
        destination: Cidr {
            ip: destination.unwrap_or(unspecified),
            prefix: m.header.destination_prefix_length,
        },
        gateway,
        interface,
        metric,
        ours: u8::from(m.header.protocol) == MARK_PROTO,
    })
}

/// A route message for `route` out of `interface` (if given), marked as Tessera's.
fn route_message(route: &RouteDef, interface: Option<u32>) -> Result<RouteMessage, String> {
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(route.destination.ip, route.destination.prefix)
        .map_err(|e| e.to_string())?
        .protocol(RouteProtocol::Other(MARK_PROTO))
        .priority(route_metric(&route.destination));
    match route.gateway {
        Some(g) => b = b.gateway(g).map_err(|e| e.to_string())?,
        // Straight out of the interface: on the link, as `ip route add ... dev` makes it
        // (a delete must name the same scope).
        None => b = b.scope(RouteScope::Link),
    }
    if let Some(i) = interface {
        b = b.output_interface(i);
    }
    Ok(b.build())
}

fn address_message(interface: u32, a: &Cidr) -> AddressMessage {
    let mut m = match a.ip {
        IpAddr::V4(v) => AddressMessageBuilder::<Ipv4Addr>::new()
            .index(interface)
            .address(v, a.prefix)
            .build(),
        IpAddr::V6(v) => AddressMessageBuilder::<Ipv6Addr>::new()
            .index(interface)
            .address(v, a.prefix)
            .build(),
    };
    m.attributes
        .push(AddressAttribute::Protocol(AddressProtocol::Other(
            MARK_PROTO,
        )));
    m
}

async fn run(handle: &Handle, step: &Step) -> Result<(), ManagementError> {
    let failed = |message: String| ManagementError::Netlink {
        step: step.to_string(),
        message,
    };
    let nl = |e: rtnetlink::Error| failed(e.to_string());
    match step {
        Step::SetUp { interface } => {
            let msg = LinkUnspec::new_with_index(*interface).up().build();
            handle.link().set(msg).execute().await.map_err(nl)
        }
        Step::DeleteRoute { route, interface } => {
            let msg = route_message(route, *interface).map_err(failed)?;
            match handle.route().del(msg).execute().await {
                // Gone already (its address went first and took it along).
                Err(e) if errno(&e) == Some(libc::ESRCH) => Ok(()),
                r => r.map_err(nl),
            }
        }
        Step::DeleteAddress { interface, address } => {
            let msg = address_message(*interface, address);
            match handle.address().del(msg).execute().await {
                Err(e) if errno(&e) == Some(libc::EADDRNOTAVAIL) => Ok(()),
                r => r.map_err(nl),
            }
        }
        Step::AddAddress { interface, address } => {
            let mut req = handle.address().add(*interface, address.ip, address.prefix);
            req.message_mut().header.scope = scope_of(address.ip);
            req.message_mut()
                .attributes
                .push(AddressAttribute::Protocol(AddressProtocol::Other(
                    MARK_PROTO,
                )));
            req.execute().await.map_err(nl)
        }
        Step::SetRoute {
            interface,
            route,
            replace,
        } => {
            let msg = route_message(route, Some(*interface)).map_err(failed)?;
            let req = handle.route().add(msg);
            let req = if *replace { req.replace() } else { req };
            req.execute().await.map_err(nl)
        }
    }
}

/// The scope an address gets by default, as `ip addr add` gives it: host for loopback
/// addresses (the kernel refuses 127.0.0.0/8 in the universe scope), link for link-local
/// ones, universe for the rest.
fn scope_of(ip: IpAddr) -> AddressScope {
    match ip {
        IpAddr::V4(v) if v.is_loopback() => AddressScope::Host,
        IpAddr::V4(v) if v.is_link_local() => AddressScope::Link,
        IpAddr::V6(v) if v.is_loopback() => AddressScope::Host,
        IpAddr::V6(v) if (v.segments()[0] & 0xffc0) == 0xfe80 => AddressScope::Link,
        _ => AddressScope::Universe,
    }
}

/// The errno of a failed netlink request, if the kernel gave one.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}
