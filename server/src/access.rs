//! Who may do what: tenants and roles, from `/etc/config`.
//!
//! - `tenants`: lines `client_id=tenant` (or `client_id: tenant`); clients not listed are
//!   their own tenant.
//! - `roles`: lines `client_id=role`, role one of `append` (back up only), `read` (restore
//!   only), `full` (back up, restore, delete within its tenant), `admin` (full, plus
//!   maintenance); clients not listed get `defaultRole` (default `full`).
//!
//! Both keys are re-read with the credentials, so a change takes effect without a restart.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// What a client may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Append,
    Read,
    Full,
    Admin,
}

/// Operations, for permission checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Backup,
    Restore,
    List,
    Delete,
    /// Verify the caller's tenant (any role that may restore or delete).
    Verify,
    /// Maintenance, and verify across tenants.
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s.trim().to_ascii_lowercase().as_str() {
            "append" | "backup" | "write" => Some(Role::Append),
            "read" | "restore" => Some(Role::Read),
            "full" => Some(Role::Full),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Append => "append",
            Role::Read => "read",
            Role::Full => "full",
            Role::Admin => "admin",
        }
    }

    pub fn allows(self, op: Op) -> bool {
        match op {
            Op::List => true,
            Op::Backup => matches!(self, Role::Append | Role::Full | Role::Admin),
            Op::Restore => matches!(self, Role::Read | Role::Full | Role::Admin),
            Op::Delete => matches!(self, Role::Full | Role::Admin),
            Op::Verify => matches!(self, Role::Read | Role::Full | Role::Admin),
            Op::Admin => matches!(self, Role::Admin),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Tenants and roles of clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    tenants: HashMap<String, String>,
    roles: HashMap<String, Role>,
    default_role: Role,
}

impl Default for Access {
    fn default() -> Self {
        Access {
            tenants: HashMap::new(),
            roles: HashMap::new(),
            default_role: Role::Full,
        }
    }
}

fn pairs(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.split(['\n', ','])
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(['=', ':']))
        .map(|(k, v)| (k.trim(), v.trim()))
        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
}

impl Access {
    /// Reads the `tenants`, `roles` and `defaultRole` keys of a config mount.
    pub fn from_config(config: &BTreeMap<String, String>) -> Access {
        let mut a = Access::default();
        if let Some(t) = config.get("tenants") {
            for (client, tenant) in pairs(t) {
                a.tenants.insert(client.to_string(), tenant.to_string());
            }
        }
        if let Some(r) = config.get("roles") {
            for (client, role) in pairs(r) {
                let parsed = Role::parse(role).unwrap_or_else(|| {
                    tracing::warn!(client, role, "unknown role in config key 'roles' (use append, read, full or admin); the client gets role read");
                    Role::Read
                });
                a.roles.insert(client.to_string(), parsed);
            }
        }
        if let Some(d) = config.get("defaultRole") {
            match Role::parse(d) {
                Some(r) => a.default_role = r,
                None => tracing::warn!(value = %d, "unknown defaultRole; using full"),
            }
        }
        a
    }

    pub fn tenant(&self, client_id: &str) -> String {
        self.tenants
            .get(client_id)
            .cloned()
            .unwrap_or_else(|| client_id.to_string())
    }

    pub fn role(&self, client_id: &str) -> Role {
        self.roles
            .get(client_id)
            .copied()
            .unwrap_or(self.default_role)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_config() {
        let mut c = BTreeMap::new();
        c.insert("tenants".into(), "a=team\n# comment\nb: team\n".into());
        c.insert("roles".into(), "a=append, b=read\nc=bogus".into());
        let a = Access::from_config(&c);
        assert_eq!(a.tenant("a"), "team");
        assert_eq!(a.tenant("b"), "team");
        assert_eq!(a.tenant("z"), "z");
        assert_eq!(a.role("a"), Role::Append);
        assert_eq!(a.role("b"), Role::Read);
        assert_eq!(a.role("c"), Role::Read, "an unknown role is the least one");
        assert_eq!(a.role("z"), Role::Full);
    }

    #[test]
    fn permissions() {
        assert!(Role::Append.allows(Op::Backup));
        assert!(!Role::Append.allows(Op::Restore));
        assert!(!Role::Append.allows(Op::Delete));
        assert!(!Role::Read.allows(Op::Backup));
        assert!(Role::Read.allows(Op::Restore));
        assert!(!Role::Read.allows(Op::Delete));
        assert!(Role::Full.allows(Op::Delete));
        assert!(Role::Admin.allows(Op::Delete));
        assert!(!Role::Full.allows(Op::Admin));
        assert!(Role::Admin.allows(Op::Admin));
        assert!(!Role::Append.allows(Op::Verify));
    }
}
