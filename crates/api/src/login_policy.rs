//! The login policy: which realm a name without `@realm` belongs to, and who must log in
//! with a second factor.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::Role;

/// How logins are checked (`GET`/`PUT /api/v1/login-policy`, administrators).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct LoginPolicy {
    /// The realm of a login name without `@realm`: `local` (the default) or an existing
    /// LDAP realm.
    #[serde(default = "local")]
    #[schema(pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub default_realm: String,
    /// Realms (`local` included) whose users must log in with a second factor (TOTP). A
    /// user so required who has not enrolled one is refused (403), as Proxmox VE refuses
    /// users without a second factor in a realm that enforces one.
    #[serde(default)]
    #[schema(max_items = 64)]
    pub two_factor_realms: Vec<String>,
    /// Roles whose holders must log in with a second factor (the role the login would
    /// give decides).
    #[serde(default)]
    pub two_factor_roles: Vec<Role>,
}

fn local() -> String {
    "local".into()
}

impl Default for LoginPolicy {
    fn default() -> Self {
        LoginPolicy {
            default_realm: local(),
            two_factor_realms: Vec::new(),
            two_factor_roles: Vec::new(),
        }
    }
}

impl LoginPolicy {
    /// Whether a login of a user of `realm` that would get `role` needs a second factor.
    pub fn requires_two_factor(&self, realm: &str, role: Role) -> bool {
        self.two_factor_realms.iter().any(|r| r == realm) || self.two_factor_roles.contains(&role)
    }
}

crate::object_only!(LoginPolicy);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_realm_or_a_role_requires_the_second_factor() {
        let mut p: LoginPolicy = serde_json::from_str("{}").unwrap();
        assert_eq!(p, LoginPolicy::default());
        assert!(!p.requires_two_factor("local", Role::Administrator));
        p.two_factor_roles = vec![Role::Administrator];
        assert!(p.requires_two_factor("corp", Role::Administrator));
        assert!(!p.requires_two_factor("corp", Role::Operator));
        p.two_factor_realms = vec!["corp".into()];
        assert!(p.requires_two_factor("corp", Role::Auditor));
        assert!(!p.requires_two_factor("local", Role::Auditor));
        assert!(serde_json::from_str::<LoginPolicy>("[\"local\"]").is_err());
        assert!(serde_json::from_str::<LoginPolicy>("{\"x\":1}").is_err());
    }
}
