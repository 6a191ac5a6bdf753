//! Directory (LDAP) realms: finding a user, its groups (nested ones too) and the role they
//! map to, and checking its password by binding as it. Speaks LDAP through `ldap3`;
//! login names reach a filter only through `ldap3::ldap_escape`, never raw.
//!
//! - `realms/<name>`: [`RealmRecord`], the realm with its bind password sealed;
//! - `directory_users/<user>@<realm>`: [`DirectoryUser`], written at each login and kept
//!   current by the sync (`realms.rs`); sessions of directory users name `user@realm`.

use std::sync::Arc;
use std::time::Duration;

use ldap3::{ldap_escape, Ldap, LdapConnAsync, LdapConnSettings, Scope, SearchEntry};
use serde::{Deserialize, Serialize};
use tessera_api::{Realm, Role};

pub use super::sealed::{bind_password, open_bytes, seal, seal_bytes, SealedHex};
use super::{read, ApiError, ApiState};

/// `realms/<name>`: [`RealmRecord`].
pub const REALMS: &str = "realms";
/// `directory_users/<user>@<realm>`: [`DirectoryUser`].
pub const DIRECTORY_USERS: &str = "directory_users";

/// How long a server gets to accept a connection, and to answer one operation.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Nested groups are followed this deep (a cycle ends at groups already seen).
const MAX_NESTING: usize = 8;

/// A realm as stored: the settings without the bind password, which is sealed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RealmRecord {
    /// The settings (`bind_password` always `None`).
    pub realm: Realm,
    /// The bind password, sealed (see [`seal`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_bind_password: Option<SealedHex>,
}

/// A directory user the cluster has seen log in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DirectoryUser {
    /// Its realm.
    pub realm: String,
    /// Its DN when last checked.
    pub dn: String,
    /// The role its groups gave when last checked.
    pub role: Role,
    /// Its groups when last checked.
    pub groups: Vec<String>,
    /// Sessions carry this id; it changes when the role does, ending them.
    pub credentials: String,
}

/// Why a directory could not answer.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// No server of the realm accepted a connection (TLS included).
    #[error("no server of the realm answered: {0}")]
    Unreachable(String),
    /// The service bind was refused.
    #[error("the realm's bind DN could not bind at {server}: {reason}")]
    ServiceBind { server: String, reason: String },
    /// A search failed.
    #[error("search at {server} failed: {reason}")]
    Search { server: String, reason: String },
    /// The realm's settings cannot be used.
    #[error("{0}")]
    Settings(String),
}

impl From<DirectoryError> for ApiError {
    fn from(e: DirectoryError) -> ApiError {
        match e {
            DirectoryError::Settings(m) => ApiError::bad(m),
            e => ApiError::unavailable(e.to_string()),
        }
    }
}

/// The realm `name`, if it exists (after catching up with the leader when absent here).
pub async fn realm(st: &ApiState, name: &str) -> Result<Option<RealmRecord>, ApiError> {
    let n = super::node(st)?;
    let mut rec: Option<RealmRecord> = read(&n, REALMS, name)?;
    if rec.is_none() {
        n.sync().await.map_err(|e| super::sync_error(&e))?;
        rec = read(&n, REALMS, name)?;
    }
    Ok(rec)
}

// ---- settings ----

/// The settings with their defaults filled in (Active Directory's when it is one).
pub struct Settings<'a> {
    pub realm: &'a Realm,
    pub user_filter: &'a str,
    pub user_attr: &'a str,
    pub group_base: &'a str,
    pub group_filter: &'a str,
    pub member_attr: &'a str,
}

impl<'a> Settings<'a> {
    pub fn of(r: &'a Realm) -> Settings<'a> {
        let ad = r.active_directory;
        Settings {
            realm: r,
            user_filter: r.user_filter.as_deref().unwrap_or(if ad {
                "(objectClass=user)"
            } else {
                "(objectClass=person)"
            }),
            user_attr: r
                .user_attr
                .as_deref()
                .unwrap_or(if ad { "sAMAccountName" } else { "uid" }),
            group_base: r.group_base.as_deref().unwrap_or(&r.user_base),
            group_filter: r.group_filter.as_deref().unwrap_or(if ad {
                "(objectClass=group)"
            } else {
                "(|(objectClass=groupOfNames)(objectClass=group))"
            }),
            member_attr: r.group_member_attr.as_deref().unwrap_or("member"),
        }
    }
}

fn is_attr(a: &str) -> bool {
    !a.is_empty()
        && a.len() <= 64
        && a.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.' || c == b';')
}

fn is_filter(f: &str) -> bool {
    f.chars().count() <= 1024 && f.starts_with('(') && f.ends_with(')') && !f.contains('\0')
}

/// Whether a connection to `uri` upgrades with StartTLS: an `ldap://` server always
/// does unless the realm says `insecure` (then only with `starttls`), so a password
/// never crosses the network in the clear by default.
fn starttls(r: &Realm, uri: &str) -> bool {
    uri.starts_with("ldap://") && (r.starttls || !r.insecure)
}

/// Checks a realm's settings (400 naming the field).
pub fn check(r: &Realm) -> Result<(), ApiError> {
    if r.uris.is_empty() || r.uris.len() > 8 {
        return Err(ApiError::bad("uris: 1 to 8 server URIs"));
    }
    for u in &r.uris {
        if !u.starts_with("ldap://") && !u.starts_with("ldaps://") {
            return Err(ApiError::bad(format!(
                "uris: {u}: must start with ldaps:// or ldap://"
            )));
        }
        if u.len() > 512 || u.chars().any(char::is_control) {
            return Err(ApiError::bad(
                "uris: at most 512 characters, no control characters",
            ));
        }
    }
    let s = Settings::of(r);
    for (field, v) in [
        ("user_attr", s.user_attr),
        ("group_member_attr", s.member_attr),
    ] {
        if !is_attr(v) {
            return Err(ApiError::bad(format!("{field}: an attribute name")));
        }
    }
    for (field, v) in [
        ("user_filter", s.user_filter),
        ("group_filter", s.group_filter),
    ] {
        if !is_filter(v) {
            return Err(ApiError::bad(format!(
                "{field}: an LDAP filter in parentheses, at most 1024 characters"
            )));
        }
    }
    if r.user_base.trim().is_empty() || r.user_base.chars().count() > 1024 {
        return Err(ApiError::bad(
            "user_base: required, at most 1024 characters",
        ));
    }
    if let Some(pem) = &r.ca_pem {
        tls_config(pem).map_err(|e| ApiError::bad(format!("ca_pem: {e}")))?;
    }
    if r.user_roles.len() > 1000
        || r.user_roles
            .keys()
            .any(|u| u.is_empty() || u.chars().count() > 256 || u.chars().any(char::is_control))
    {
        return Err(ApiError::bad(
            "user_roles: at most 1000 login names of 1 to 256 characters, no control characters",
        ));
    }
    if let Some(i) = r.sync_interval_s {
        if !(30..=86400).contains(&i) {
            return Err(ApiError::bad("sync_interval_s: 30 to 86400"));
        }
    }
    Ok(())
}

fn tls_config(pem: &str) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let c = c.map_err(|e| format!("not PEM certificates: {e}"))?;
        roots
            .add(c)
            .map_err(|e| format!("not a usable CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no certificate in it".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

// ---- talking to the directory ----

/// A connection to one of the realm's servers, bound as the realm's bind DN (or
/// anonymous).
pub struct Connection {
    ldap: Ldap,
    /// The URI that answered.
    pub server: String,
}

/// Connects to the first server that answers, in the realm's order, and binds with the
/// service account.
pub async fn connect(r: &Realm, bind_password: Option<&str>) -> Result<Connection, DirectoryError> {
    let tls = match &r.ca_pem {
        Some(pem) => Some(tls_config(pem).map_err(DirectoryError::Settings)?),
        None => None,
    };
    let mut failures = Vec::new();
    for uri in &r.uris {
        let mut settings = LdapConnSettings::new().set_conn_timeout(CONNECT_TIMEOUT);
        if let Some(c) = &tls {
            settings = settings.set_config(c.clone());
        }
        if starttls(r, uri) {
            settings = settings.set_starttls(true);
        }
        let attempt = tokio::time::timeout(
            CONNECT_TIMEOUT * 2,
            LdapConnAsync::with_settings(settings, uri),
        )
        .await;
        let (conn, mut ldap) = match attempt {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::warn!(realm = %r.name, server = %uri, error = %e, "LDAP server did not answer; trying the next");
                failures.push(format!("{uri}: {e}"));
                continue;
            }
            Err(_) => {
                tracing::warn!(realm = %r.name, server = %uri, "LDAP server timed out; trying the next");
                failures.push(format!("{uri}: timed out"));
                continue;
            }
        };
        ldap3::drive!(conn);
        if let Some(dn) = &r.bind_dn {
            let res = ldap
                .with_timeout(OP_TIMEOUT)
                .simple_bind(dn, bind_password.unwrap_or(""))
                .await
                .and_then(|r| r.success());
            if let Err(e) = res {
                return Err(DirectoryError::ServiceBind {
                    server: uri.clone(),
                    reason: e.to_string(),
                });
            }
        }
        return Ok(Connection {
            ldap,
            server: uri.clone(),
        });
    }
    Err(DirectoryError::Unreachable(failures.join("; ")))
}

/// Whether a login name holds characters that mean something in an LDAP filter (they
/// are escaped; such a name is logged as a possible injection attempt).
pub fn looks_like_injection(name: &str) -> bool {
    name.contains(['*', '(', ')', '\\', '\0'])
}

impl Connection {
    async fn search(
        &mut self,
        base: &str,
        filter: &str,
        attrs: Vec<&str>,
    ) -> Result<Vec<SearchEntry>, DirectoryError> {
        let err = |e: ldap3::LdapError| DirectoryError::Search {
            server: self.server.clone(),
            reason: e.to_string(),
        };
        let res = self
            .ldap
            .with_timeout(OP_TIMEOUT)
            .search(base, Scope::Subtree, filter, attrs)
            .await;
        let (entries, _) = match res.and_then(|r| r.success()) {
            Ok(r) => r,
            // No such base object: nobody there, not a failure of the server.
            Err(ldap3::LdapError::LdapResult { result }) if result.rc == 32 => {
                return Ok(Vec::new())
            }
            Err(e) => return Err(err(e)),
        };
        Ok(entries.into_iter().map(SearchEntry::construct).collect())
    }

    /// The DN of login name `name` (escaped into the filter), and its `memberOf` values;
    /// `None` unless exactly one entry matches.
    pub async fn find_user(
        &mut self,
        s: &Settings<'_>,
        name: &str,
    ) -> Result<Option<(String, Vec<String>)>, DirectoryError> {
        let filter = format!(
            "(&{}({}={}))",
            s.user_filter,
            s.user_attr,
            ldap_escape(name)
        );
        let mut found = self
            .search(&s.realm.user_base, &filter, vec!["memberOf"])
            .await?;
        if found.len() != 1 {
            return Ok(None);
        }
        let mut e = found.remove(0);
        let member_of = e.attrs.remove("memberOf").unwrap_or_default();
        Ok(Some((e.dn, member_of)))
    }

    /// The groups of the user `dn`, nested ones included: Active Directory by its
    /// in-chain matching rule (plus `memberOf`), others by following `member` links up.
    pub async fn groups(
        &mut self,
        s: &Settings<'_>,
        dn: &str,
        member_of: Vec<String>,
    ) -> Result<Vec<String>, DirectoryError> {
        let mut seen: Vec<String> = Vec::new();
        let add = |seen: &mut Vec<String>, g: String| {
            if !seen.iter().any(|x| same_dn(x, &g)) {
                seen.push(g);
                true
            } else {
                false
            }
        };
        if s.realm.active_directory {
            for g in member_of {
                add(&mut seen, g);
            }
            let filter = format!(
                "(&{}({}:1.2.840.113556.1.4.1941:={}))",
                s.group_filter,
                s.member_attr,
                ldap_escape(dn)
            );
            for e in self.search(s.group_base, &filter, vec!["1.1"]).await? {
                add(&mut seen, e.dn);
            }
            return Ok(seen);
        }
        let mut frontier = vec![dn.to_string()];
        for _ in 0..MAX_NESTING {
            let mut next = Vec::new();
            for member in &frontier {
                let filter = format!(
                    "(&{}({}={}))",
                    s.group_filter,
                    s.member_attr,
                    ldap_escape(member.as_str())
                );
                for e in self.search(s.group_base, &filter, vec!["1.1"]).await? {
                    if add(&mut seen, e.dn.clone()) {
                        next.push(e.dn);
                    }
                }
            }
            if next.is_empty() {
                break;
            }
            frontier = next;
        }
        Ok(seen)
    }

    /// Whether `password` binds as `dn`. Never called with an empty password: an LDAP
    /// bind with a DN and no password is an "unauthenticated bind" that succeeds.
    pub async fn check_password(
        &mut self,
        dn: &str,
        password: &str,
    ) -> Result<bool, DirectoryError> {
        if password.is_empty() {
            return Ok(false);
        }
        match self
            .ldap
            .with_timeout(OP_TIMEOUT)
            .simple_bind(dn, password)
            .await
        {
            Ok(r) if r.rc == 0 => Ok(true),
            // invalidCredentials, inappropriateAuthentication, unwillingToPerform.
            Ok(r) if [49, 48, 53].contains(&r.rc) => Ok(false),
            Ok(r) => Err(DirectoryError::Search {
                server: self.server.clone(),
                reason: format!("bind answered {}: {}", r.rc, r.text),
            }),
            Err(e) => Err(DirectoryError::Search {
                server: self.server.clone(),
                reason: e.to_string(),
            }),
        }
    }

    /// Ends the connection politely.
    pub async fn close(mut self) {
        let _ = self.ldap.unbind().await;
    }
}

/// DNs compared as directories mostly do: case-insensitively, ignoring spaces around
/// the separators.
pub fn same_dn(a: &str, b: &str) -> bool {
    normal_dn(a) == normal_dn(b)
}

fn normal_dn(d: &str) -> String {
    d.split(',')
        .map(|rdn| {
            rdn.split('=')
                .map(|p| p.trim().to_lowercase())
                .collect::<Vec<_>>()
                .join("=")
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The greatest role the realm gives login name `name`: its own assignment, or the
/// mapping of any of its `groups`.
pub fn role_of(r: &Realm, name: &str, groups: &[String]) -> Option<Role> {
    let own = r
        .user_roles
        .iter()
        .filter(|(u, _)| u.to_lowercase() == name.to_lowercase())
        .map(|(_, role)| *role);
    r.group_roles
        .iter()
        .filter(|(g, _)| groups.iter().any(|x| same_dn(x, g)))
        .map(|(_, role)| *role)
        .chain(own)
        .max()
}

/// What the directory says about login name `name`: its DN, groups and role (no
/// password checked).
pub struct Lookup {
    pub dn: Option<String>,
    pub groups: Vec<String>,
    pub role: Option<Role>,
}

/// Looks `name` up on an open connection.
pub async fn lookup(c: &mut Connection, r: &Realm, name: &str) -> Result<Lookup, DirectoryError> {
    let s = Settings::of(r);
    let Some((dn, member_of)) = c.find_user(&s, name).await? else {
        return Ok(Lookup {
            dn: None,
            groups: Vec::new(),
            role: None,
        });
    };
    let groups = c.groups(&s, &dn, member_of).await?;
    let role = role_of(r, name, &groups);
    Ok(Lookup {
        dn: Some(dn),
        groups,
        role,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn realm() -> Realm {
        Realm {
            name: "corp".into(),
            uris: vec!["ldaps://dc1".into()],
            user_base: "dc=corp".into(),
            ..Default::default()
        }
    }

    #[test]
    fn roles_come_from_the_greatest_mapped_group() {
        let mut r = realm();
        r.group_roles
            .insert("cn=Ops,ou=g,dc=corp".into(), Role::Operator);
        r.group_roles
            .insert("cn=admins,ou=g,dc=corp".into(), Role::Administrator);
        assert_eq!(role_of(&r, "al", &[]), None);
        assert_eq!(
            role_of(&r, "al", &["CN=ops, OU=g, DC=corp".into()]),
            Some(Role::Operator)
        );
        assert_eq!(
            role_of(
                &r,
                "al",
                &[
                    "cn=ops,ou=g,dc=corp".into(),
                    "cn=admins,ou=g,dc=corp".into()
                ]
            ),
            Some(Role::Administrator)
        );
        // A user's own role counts with its groups' (the greater wins), by name
        // without regard to case.
        r.user_roles.insert("Eve".into(), Role::Auditor);
        assert_eq!(role_of(&r, "eve", &[]), Some(Role::Auditor));
        assert_eq!(
            role_of(&r, "EVE", &["cn=ops,ou=g,dc=corp".into()]),
            Some(Role::Operator)
        );
        r.user_roles.insert("al".into(), Role::Administrator);
        assert_eq!(
            role_of(&r, "al", &["cn=ops,ou=g,dc=corp".into()]),
            Some(Role::Administrator)
        );
        assert_eq!(role_of(&r, "mallory", &[]), None);
    }

    #[test]
    fn plain_ldap_needs_insecure_and_defaults_follow_active_directory() {
        let mut r = realm();
        assert!(check(&r).is_ok());
        assert!(!starttls(&r, "ldaps://dc1"));
        r.uris = vec!["ldap://dc1".into()];
        assert!(check(&r).is_ok());
        assert!(starttls(&r, "ldap://dc1"), "ldap:// is upgraded by default");
        r.starttls = true;
        assert!(starttls(&r, "ldap://dc1"));
        r.starttls = false;
        r.insecure = true;
        assert!(check(&r).is_ok());
        assert!(!starttls(&r, "ldap://dc1"), "plain only when insecure");
        r.starttls = true;
        assert!(starttls(&r, "ldap://dc1"));
        r.starttls = false;
        r.uris = vec!["http://dc1".into()];
        assert!(check(&r).is_err());
        r.uris = vec!["ldaps://dc1".into()];
        r.user_attr = Some("uid)(x".into());
        assert!(check(&r).is_err());
        let mut ad = realm();
        ad.active_directory = true;
        let s = Settings::of(&ad);
        assert_eq!(s.user_attr, "sAMAccountName");
        assert_eq!(s.user_filter, "(objectClass=user)");
        assert_eq!(Settings::of(&realm()).user_attr, "uid");
    }

    #[test]
    fn filter_characters_are_escaped_and_flagged() {
        for bad in ["*", "a)(uid=*", "x\0", "a\\2a"] {
            assert!(looks_like_injection(bad), "{bad:?}");
            let e = ldap_escape(bad);
            assert!(!e.contains(['*', '(', ')', '\0']), "{bad:?} -> {e}");
        }
        assert!(!looks_like_injection("alice.smith"));
    }
}
