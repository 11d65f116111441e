//! Buckets and keys onto the plain-object layout of edge sync.
//!
//! A tenant's bucket is a sync target: object `key` of bucket `b` is the plain object
//! `<tenant>/<b>/<key>` of the sync root, so what a device syncs is readable over S3 and
//! the reverse. Bucket names are checked by the S3 library (the S3 naming rules); keys
//! must be relative paths that edge sync can restore as files.

use super::error::{GatewayError, GatewayResult};

/// The longest key, as in S3.
const MAX_KEY: usize = 1024;

/// The store prefix of a tenant's bucket, with a trailing '/'.
pub fn bucket_prefix(tenant: &str, bucket: &str) -> GatewayResult<String> {
    check_tenant(tenant)?;
    if bucket.is_empty() || bucket.contains('/') || bucket.starts_with('.') {
        return Err(GatewayError::BadKey(bucket.to_string()));
    }
    Ok(format!("{tenant}/{bucket}/"))
}

/// The store key of object `key` in a tenant's bucket.
pub fn object_key(tenant: &str, bucket: &str, key: &str) -> GatewayResult<String> {
    check_key(key)?;
    Ok(format!("{}{key}", bucket_prefix(tenant, bucket)?))
}

/// The store prefix of a tenant's buckets.
pub fn tenant_prefix(tenant: &str) -> GatewayResult<String> {
    check_tenant(tenant)?;
    Ok(format!("{tenant}/"))
}

fn check_tenant(tenant: &str) -> GatewayResult<()> {
    if tenant.is_empty() || tenant.starts_with('.') || tenant.contains('/') {
        return Err(GatewayError::BadTenant(tenant.to_string()));
    }
    Ok(())
}

/// A key must be a relative path of plain names: what a directory can hold as a file.
pub fn check_key(key: &str) -> GatewayResult<()> {
    let bad = || GatewayError::BadKey(key.chars().take(200).collect());
    if key.len() > MAX_KEY || key.chars().any(char::is_control) || key.contains('\\') {
        return Err(bad());
    }
    if key.ends_with('/') {
        return Err(bad());
    }
    datamover_core::paths::safe_relative(key.as_bytes()).map_err(|_| bad())?;
    Ok(())
}

/// The part of a listing prefix up to and including its last '/': the directory that
/// holds every key with that prefix (the store lists directories, not arbitrary prefixes).
pub fn dir_of(prefix: &str) -> &str {
    match prefix.rfind('/') {
        Some(i) => &prefix[..=i],
        None => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_under_the_tenant() {
        assert_eq!(object_key("t", "b", "a/c.txt").unwrap(), "t/b/a/c.txt");
        for bad in [
            "", "/a", "a/../b", "..", "a//b", "./a", "a\\b", "a\nb", "dir/",
        ] {
            assert!(
                object_key("t", "b", bad).is_err(),
                "{bad:?} must be refused"
            );
        }
        assert!(object_key(".t", "b", "k").is_err());
        assert!(object_key("t/x", "b", "k").is_err());
        assert!(object_key("t", ".datamover", "k").is_err());
    }

    #[test]
    fn directory_of_a_prefix() {
        assert_eq!(dir_of("a/b/c"), "a/b/");
        assert_eq!(dir_of("a/"), "a/");
        assert_eq!(dir_of("abc"), "");
    }
}
