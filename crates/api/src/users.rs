//! User management.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::Role;

/// A user, without secrets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UserInfo {
    /// User name.
    pub username: String,
    /// Role.
    pub role: Role,
    /// Whether the password must be changed at next login.
    pub must_change_password: bool,
}

/// A new user.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct NewUser {
    /// 1-63 of a-z, 0-9, '-', '.', '_', starting with a letter or digit.
    #[schema(
        min_length = 1,
        max_length = 63,
        pattern = "^[a-z0-9][a-z0-9._-]{0,62}$"
    )]
    pub username: String,
    /// Initial password (12 to 1024 characters, no control characters); the user must
    /// change it at first login.
    #[schema(
        min_length = 12,
        max_length = 1024,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"
    )]
    pub password: String,
    /// Role.
    pub role: Role,
}

/// Changes to a user.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct UserUpdate {
    /// A new role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// A new password (12 to 1024 characters, no control characters), which the user must
    /// change at next login.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        min_length = 12,
        max_length = 1024,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"
    )]
    pub password: Option<String>,
}

crate::object_only!(NewUser, UserUpdate);
