//! Which Kubernetes ServiceAccounts may connect, as which tenant and role:
//! `/etc/serviceaccount_clients/` (under `DATAMOVER_ROOT` when set), a ConfigMap the
//! DatamoverServer controller writes from `spec.serviceAccountClients`. Watched live, like
//! `/etc/client_credentials`; kubelet's `..data` symlink swaps are read through.
//!
//! Two keys (files):
//!
//! - `audience`: the one audience a client's token must be issued for (the
//!   controller publishes it in `status.serverInfo.tokenAudience`; a pod projects its
//!   token with `serviceAccountToken.audience` set to it). Surrounding whitespace is
//!   ignored. Without it no ServiceAccount token is accepted.
//! - `clients.json`: a JSON array of entries:
//!
//! ```json
//! [
//!   {"namespace": "shop", "name": "db-backup", "tenant": "shop", "role": "append"},
//!   {"namespace": "shop", "tenant": "shop", "role": "read"},
//!   {"namespace": "shop", "selector": {"matchLabels": {"datamover/restore": "true"}},
//!    "tenant": "shop", "role": "full"},
//!   {"selector": {"matchExpressions": [{"key": "team", "operator": "In", "values": ["a"]}]},
//!    "tenant": "team-a", "role": "append"}
//! ]
//! ```
//!
//! - `namespace`: the ServiceAccount's namespace. Required unless `selector` is given
//!   (then absent = any namespace).
//! - `name`: the ServiceAccount's name; absent = any ServiceAccount that the other fields
//!   match.
//! - `selector`: a Kubernetes label selector (`matchLabels`, `matchExpressions` with
//!   `In`, `NotIn`, `Exists`, `DoesNotExist`) on the ServiceAccount's labels; the server
//!   then also needs `get` on `serviceaccounts`. An empty selector without a namespace
//!   would admit every ServiceAccount of the cluster and is refused.
//! - `tenant` (required): whose snapshots the client sees; a name like a client id
//!   (letters, digits, `.`, `_`, `-`, not starting with `.`). Tenants are isolated exactly
//!   as for credential clients, which may share a tenant with ServiceAccounts.
//! - `role` (required): `append`, `read`, `full` or `admin`.
//!
//! Unknown fields are errors (a misspelt `name` must not widen an entry to a whole
//! namespace). An entry with an error is skipped with a warning and admits nobody; a file
//! that is not a JSON array admits nobody. When several entries match, the most specific
//! wins (one with `name`, then one with `selector`, then a whole namespace); among equals
//! the first in the file.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::access::Role;
use crate::credentials::valid_client_id;

/// The file of entries in the directory.
pub const CLIENTS_FILE: &str = "clients.json";
/// The file of the audience in the directory.
pub const AUDIENCE_FILE: &str = "audience";

pub type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: Labels,
    #[serde(default)]
    pub match_expressions: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirement {
    pub key: String,
    pub operator: String,
    #[serde(default)]
    pub values: Vec<String>,
}

impl LabelSelector {
    fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    fn check(&self) -> Result<(), String> {
        for r in &self.match_expressions {
            match r.operator.as_str() {
                "In" | "NotIn" if r.values.is_empty() => {
                    return Err(format!(
                        "selector: operator {} on '{}' needs values",
                        r.operator, r.key
                    ));
                }
                "Exists" | "DoesNotExist" if !r.values.is_empty() => {
                    return Err(format!(
                        "selector: operator {} on '{}' takes no values",
                        r.operator, r.key
                    ));
                }
                "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
                other => {
                    return Err(format!(
                        "selector: unknown operator '{other}' (use In, NotIn, Exists or DoesNotExist)"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Kubernetes semantics: every label and every requirement must hold.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let v = labels.get(&r.key);
                match r.operator.as_str() {
                    "In" => v.is_some_and(|v| r.values.contains(v)),
                    "NotIn" => v.is_none_or(|v| !r.values.contains(v)),
                    "Exists" => v.is_some(),
                    "DoesNotExist" => v.is_none(),
                    _ => false,
                }
            })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    namespace: Option<String>,
    name: Option<String>,
    selector: Option<LabelSelector>,
    tenant: String,
    role: String,
}

/// One allowed set of ServiceAccounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub selector: Option<LabelSelector>,
    pub tenant: String,
    pub role: Role,
}

impl Entry {
    fn from_raw(raw: RawEntry) -> Result<Entry, String> {
        let nonempty =
            |v: Option<String>| v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        let namespace = nonempty(raw.namespace);
        let name = nonempty(raw.name);
        match (&namespace, &raw.selector) {
            (None, None) => {
                return Err("give a namespace (or a selector)".into());
            }
            (None, Some(s)) if s.is_empty() => {
                return Err(
                    "an empty selector without a namespace would admit every ServiceAccount of the cluster".into(),
                );
            }
            _ => {}
        }
        if let Some(s) = &raw.selector {
            s.check()?;
        }
        let tenant = raw.tenant.trim().to_string();
        if !valid_client_id(&tenant) {
            return Err(format!(
                "tenant '{tenant}' is not a valid name (letters, digits, '.', '_', '-', not starting with '.')"
            ));
        }
        let role = Role::parse(&raw.role).ok_or_else(|| {
            format!(
                "unknown role '{}' (use append, read, full or admin)",
                raw.role
            )
        })?;
        Ok(Entry {
            namespace,
            name,
            selector: raw.selector,
            tenant,
            role,
        })
    }

    /// Higher wins: a named ServiceAccount, then a selector, then a namespace.
    fn specificity(&self) -> u8 {
        if self.name.is_some() {
            3
        } else if self.selector.is_some() {
            2
        } else {
            1
        }
    }

    /// Does it match? `None` when that depends on labels not given.
    fn matches(&self, namespace: &str, name: &str, labels: Option<&Labels>) -> Option<bool> {
        if self.namespace.as_deref().is_some_and(|n| n != namespace)
            || self.name.as_deref().is_some_and(|n| n != name)
        {
            return Some(false);
        }
        match (&self.selector, labels) {
            (None, _) => Some(true),
            (Some(s), Some(l)) => Some(s.matches(l)),
            (Some(_), None) => None,
        }
    }
}

/// The outcome of looking a ServiceAccount up.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<'a> {
    Allowed(&'a Entry),
    /// A selector entry may decide: look the labels up and ask again.
    NeedLabels,
    NotListed,
}

/// The allowed ServiceAccounts and the audience, as last read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceAccountClients {
    pub entries: Vec<Entry>,
    pub audience: Option<String>,
}

impl ServiceAccountClients {
    /// Parses `clients.json`; bad entries are skipped with a warning.
    pub fn parse(json: &[u8], audience: Option<String>) -> ServiceAccountClients {
        let audience = audience
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty());
        let items: Vec<serde_json::Value> = match serde_json::from_slice(json) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(file = CLIENTS_FILE, error = %e, "ServiceAccount clients: not a JSON array of entries; no ServiceAccount may connect");
                Vec::new()
            }
        };
        let mut entries = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            match serde_json::from_value::<RawEntry>(item)
                .map_err(|e| e.to_string())
                .and_then(Entry::from_raw)
            {
                Ok(e) => entries.push(e),
                Err(e) => tracing::warn!(
                    file = CLIENTS_FILE,
                    entry = i,
                    error = %e,
                    "ServiceAccount clients: entry skipped"
                ),
            }
        }
        ServiceAccountClients { entries, audience }
    }

    /// Reads the directory; missing files mean no entries or no audience.
    pub fn load(dir: &Path) -> ServiceAccountClients {
        let files = crate::settings::read_mount(dir);
        let audience = files
            .get(AUDIENCE_FILE)
            .map(|a| String::from_utf8_lossy(a).into_owned());
        match files.get(CLIENTS_FILE) {
            Some(json) if !crate::credentials::trim(json).is_empty() => Self::parse(json, audience),
            _ => ServiceAccountClients {
                entries: Vec::new(),
                audience: audience
                    .map(|a| a.trim().to_string())
                    .filter(|a| !a.is_empty()),
            },
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Does any entry use a selector that may concern `namespace`?
    pub fn uses_selectors(&self) -> bool {
        self.entries.iter().any(|e| e.selector.is_some())
    }

    /// The entry that admits ServiceAccount `namespace`/`name` (with `labels` if known).
    pub fn lookup(&self, namespace: &str, name: &str, labels: Option<&Labels>) -> Lookup<'_> {
        // The first entry of the highest specificity wins; an entry that needs the labels
        // to decide matters only if it would win.
        let rank = |e: &Entry, i: usize| (e.specificity(), std::cmp::Reverse(i));
        let mut best: Option<(&Entry, usize)> = None;
        let mut undecided = None;
        for (i, e) in self.entries.iter().enumerate() {
            match e.matches(namespace, name, labels) {
                Some(true) if best.is_none_or(|(b, j)| rank(e, i) > rank(b, j)) => {
                    best = Some((e, i));
                }
                Some(_) => {}
                None if undecided.is_none_or(|u| rank(e, i) > u) => {
                    undecided = Some(rank(e, i));
                }
                None => {}
            }
        }
        match (best, undecided) {
            (Some((b, i)), u) if u.is_none_or(|u| rank(b, i) > u) => Lookup::Allowed(b),
            (_, Some(_)) => Lookup::NeedLabels,
            _ => Lookup::NotListed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn allowed(l: Lookup<'_>) -> (String, Role) {
        match l {
            Lookup::Allowed(e) => (e.tenant.clone(), e.role),
            other => panic!("not allowed: {other:?}"),
        }
    }

    #[test]
    fn parse_entries_and_skip_bad_ones() {
        let c = ServiceAccountClients::parse(
            br#"[
              {"namespace": "shop", "name": "db-backup", "tenant": "shop", "role": "append"},
              {"namespace": "shop", "nmae": "typo", "tenant": "shop", "role": "full"},
              {"name": "no-namespace", "tenant": "x", "role": "full"},
              {"selector": {}, "tenant": "x", "role": "full"},
              {"namespace": "a", "tenant": "../etc", "role": "full"},
              {"namespace": "a", "tenant": "a", "role": "superuser"},
              {"namespace": "a", "tenant": "a"},
              {"namespace": "a", "selector": {"matchExpressions": [{"key": "k", "operator": "In"}]}, "tenant": "a", "role": "read"},
              {"namespace": "a", "selector": {"matchExpressions": [{"key": "k", "operator": "Near", "values": ["v"]}]}, "tenant": "a", "role": "read"},
              {"namespace": " ops ", "tenant": "ops", "role": "Admin"}
            ]"#,
            Some(" dm-audience\n".into()),
        );
        assert_eq!(c.audience.as_deref(), Some("dm-audience"));
        assert_eq!(c.entries.len(), 2, "{:?}", c.entries);
        assert_eq!(c.entries[0].name.as_deref(), Some("db-backup"));
        assert_eq!(c.entries[0].role, Role::Append);
        assert_eq!(c.entries[1].namespace.as_deref(), Some("ops"));
        assert_eq!(c.entries[1].role, Role::Admin);
        assert!(ServiceAccountClients::parse(b"{}", None).is_empty());
        assert!(ServiceAccountClients::parse(b"not json", None).is_empty());
        assert_eq!(
            ServiceAccountClients::parse(b"[]", Some(" ".into())).audience,
            None
        );
    }

    #[test]
    fn the_most_specific_entry_wins() {
        let c = ServiceAccountClients::parse(
            br#"[
              {"namespace": "shop", "tenant": "shop", "role": "read"},
              {"namespace": "shop", "name": "db-backup", "tenant": "shop", "role": "append"},
              {"namespace": "shop", "name": "db-backup", "tenant": "other", "role": "full"},
              {"namespace": "lab", "name": "x", "tenant": "lab", "role": "full"}
            ]"#,
            None,
        );
        assert!(!c.uses_selectors());
        assert_eq!(
            allowed(c.lookup("shop", "db-backup", None)),
            ("shop".into(), Role::Append)
        );
        assert_eq!(
            allowed(c.lookup("shop", "web", None)),
            ("shop".into(), Role::Read)
        );
        assert_eq!(c.lookup("lab", "y", None), Lookup::NotListed);
        assert_eq!(c.lookup("shopping", "db-backup", None), Lookup::NotListed);
    }

    #[test]
    fn selectors_need_labels_only_when_they_could_decide() {
        let c = ServiceAccountClients::parse(
            br#"[
              {"namespace": "shop", "tenant": "shop", "role": "read"},
              {"namespace": "shop", "selector": {"matchLabels": {"backup": "yes"}}, "tenant": "shop", "role": "full"},
              {"namespace": "shop", "name": "fixed", "tenant": "fixed", "role": "append"},
              {"selector": {"matchExpressions": [
                  {"key": "team", "operator": "In", "values": ["a", "b"]},
                  {"key": "frozen", "operator": "DoesNotExist"}]}, "tenant": "teams", "role": "append"}
            ]"#,
            None,
        );
        assert!(c.uses_selectors());
        // A named entry outranks any selector: no labels needed.
        assert_eq!(
            allowed(c.lookup("shop", "fixed", None)),
            ("fixed".into(), Role::Append)
        );
        assert_eq!(c.lookup("shop", "web", None), Lookup::NeedLabels);
        assert_eq!(
            allowed(c.lookup("shop", "web", Some(&labels(&[("backup", "yes")])))),
            ("shop".into(), Role::Full)
        );
        assert_eq!(
            allowed(c.lookup("shop", "web", Some(&labels(&[("backup", "no")])))),
            ("shop".into(), Role::Read)
        );
        assert_eq!(c.lookup("lab", "x", None), Lookup::NeedLabels);
        assert_eq!(
            allowed(c.lookup("lab", "x", Some(&labels(&[("team", "b")])))),
            ("teams".into(), Role::Append)
        );
        assert_eq!(
            c.lookup("lab", "x", Some(&labels(&[("team", "b"), ("frozen", "")]))),
            Lookup::NotListed
        );
        assert_eq!(
            c.lookup("lab", "x", Some(&labels(&[("team", "c")]))),
            Lookup::NotListed
        );
    }

    #[test]
    fn selector_operators() {
        let s: LabelSelector = serde_json::from_str(
            r#"{"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["x"]},
                                    {"key": "b", "operator": "Exists"}]}"#,
        )
        .unwrap();
        assert!(s.matches(&labels(&[("b", "")])));
        assert!(s.matches(&labels(&[("a", "y"), ("b", "1")])));
        assert!(!s.matches(&labels(&[("a", "x"), ("b", "1")])));
        assert!(!s.matches(&labels(&[("a", "y")])));
    }

    #[test]
    fn load_a_mounted_config_map() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(
            ServiceAccountClients::load(d.path()),
            ServiceAccountClients::default()
        );
        std::fs::write(d.path().join(AUDIENCE_FILE), "aud\n").unwrap();
        std::fs::write(
            d.path().join(CLIENTS_FILE),
            r#"[{"namespace": "n", "tenant": "t", "role": "read"}]"#,
        )
        .unwrap();
        let c = ServiceAccountClients::load(d.path());
        assert_eq!(c.audience.as_deref(), Some("aud"));
        assert_eq!(c.entries.len(), 1);
    }
}
