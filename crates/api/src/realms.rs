//! Realms: where users come from. `local` is the cluster's own users; an LDAP realm
//! checks passwords by binding to a directory (OpenLDAP, Active Directory) and takes
//! roles from group memberships.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::Role;

/// `uris`: 1 to 8 `ldap://` or `ldaps://` URIs of printable ASCII.
fn ldap_uris() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
    ArrayBuilder::new()
        .items(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^ldaps?://[!-~]{1,500}$"))
                .max_length(Some(512)),
        )
        .min_items(Some(1))
        .max_items(Some(8))
        .description(Some(
            "Server URIs tried in order until one answers: `ldaps://host:636`, or \
             `ldap://` (upgraded with StartTLS unless `insecure`)",
        ))
        .build()
}

/// An LDAP realm: what an administrator gives to create or replace one, and what
/// `GET` shows (the bind password is write-only: never shown).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct Realm {
    /// 1-63 of `a-z0-9-`, starting with a letter or digit; not `local`.
    #[schema(pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub name: String,
    /// Server URIs tried in order until one answers: `ldaps://host:636`, or `ldap://`
    /// (upgraded with StartTLS; plain only with `insecure` and without `starttls`).
    #[schema(schema_with = ldap_uris)]
    pub uris: Vec<String>,
    /// Upgrade `ldap://` connections with StartTLS.
    #[serde(default)]
    pub starttls: bool,
    /// Allow plain `ldap://` without TLS (passwords cross the network in the clear).
    #[serde(default)]
    pub insecure: bool,
    /// PEM CA certificate(s) the servers' certificates must chain to (default: the
    /// system's roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// The DN the cluster searches with; none: anonymous search.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind_dn: Option<String>,
    /// The bind DN's password; stored sealed, never shown. Absent in an update: kept.
    /// Ignored without `bind_dn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 1024)]
    pub bind_password: Option<String>,
    /// Where users are searched (subtree).
    #[schema(min_length = 1, max_length = 1024, pattern = "\\S")]
    pub user_base: String,
    /// Which entries are users (default `(objectClass=person)`, Active Directory
    /// `(objectClass=user)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 1024, pattern = "^\\([^\\x00]*\\)$")]
    pub user_filter: Option<String>,
    /// The attribute a login name is matched against (default `uid`, Active Directory
    /// `sAMAccountName`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[A-Za-z0-9.;-]{1,64}$")]
    pub user_attr: Option<String>,
    /// Where groups are searched (default: `user_base`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_base: Option<String>,
    /// Which entries are groups (default `(|(objectClass=groupOfNames)(objectClass=group))`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 1024, pattern = "^\\([^\\x00]*\\)$")]
    pub group_filter: Option<String>,
    /// The group attribute naming members by DN (default `member`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[A-Za-z0-9.;-]{1,64}$")]
    pub group_member_attr: Option<String>,
    /// Active Directory: groups from the user's `memberOf` and nested groups through
    /// `LDAP_MATCHING_RULE_IN_CHAIN`; also the defaults above become AD's.
    #[serde(default)]
    pub active_directory: bool,
    /// Group DN → role; a user gets the greatest role of its groups (nested groups
    /// count), and cannot log in without one.
    #[serde(default)]
    pub group_roles: BTreeMap<String, Role>,
    /// Login name → role, for users given a role of their own (compared without regard
    /// to case); a user gets the greatest of this and its groups' roles. The user must
    /// still be found in the directory.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub user_roles: BTreeMap<String, Role>,
    /// How often (seconds) the cluster checks its directory users again and ends the
    /// sessions of those who lost their role (default 300, 30 to 86400).
    #[serde(
        default,
        deserialize_with = "crate::strict::opt_int",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(minimum = 30, maximum = 86400)]
    pub sync_interval_s: Option<u64>,
    /// Shown: whether a bind password is stored (ignored in requests).
    #[serde(default)]
    pub has_bind_password: bool,
}

/// A sample login to try against a realm without saving anything.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct RealmTest {
    /// The login name within the realm (without `@realm`).
    #[schema(min_length = 1, max_length = 256)]
    pub username: String,
    /// If given, the user's password is checked too (by binding as the user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

/// What a user would get.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RealmTestReply {
    /// The server that answered.
    pub server: String,
    /// The user's DN, if found.
    pub dn: Option<String>,
    /// Its groups (nested ones too).
    pub groups: Vec<String>,
    /// The role the mappings give (none: the user could not log in).
    pub role: Option<Role>,
    /// Whether the password was checked and right (absent when none was given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_ok: Option<bool>,
}

/// The outcome of checking a realm's users again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RealmSynced {
    /// Directory users checked.
    pub checked: usize,
    /// Users whose role changed or who lost access: their sessions ended.
    pub changed: Vec<String>,
}

crate::object_only!(Realm, RealmTest);
