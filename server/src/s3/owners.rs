//! Bucket names are one namespace across tenants: a bucket belongs to the tenant that
//! created it, and every other tenant is refused (AccessDenied; BucketAlreadyExists on
//! CreateBucket), as between AWS accounts.
//!
//! The owner is kept in the store, so every replica and every restart agrees:
//! `.datamover/s3/buckets/<bucket>.json` (`{"tenant": …, "created_unix": …}`) beside an
//! entry `.datamover/s3/tenants/<tenant>/<bucket>` that lets ListBuckets find a tenant's
//! empty buckets. The objects stay where edge sync keeps them, `<tenant>/<bucket>/<key>`.
//!
//! A bucket without an owner record (a sync target written before buckets had owners)
//! belongs to the tenant whose namespace holds objects under that name: its first S3
//! request records it, and so does a write of another tenant, which looks in the
//! namespaces of the tenants the server knows (from the credential files) before it takes
//! a free name. A name nobody holds is claimed by the first tenant that writes to it
//! (CreateBucket, PutObject, a multipart upload or a copy); reading one just finds it
//! empty. With the gateway on, edge sync records the targets it writes.
//!
//! Records are written and read back: two tenants claiming one new name at the same
//! instant on two replicas both read the last writer's record, so one of them is refused.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use datamover_repo::objects::ObjectStore;
use datamover_repo::store::StoreError;
use futures::{StreamExt as _, TryStreamExt as _};
use serde::{Deserialize, Serialize};

use super::error::{GatewayError, GatewayResult};
use super::names::{bucket_prefix, tenant_prefix};

/// How long a replica trusts an owner it read (a bucket deleted and taken by another
/// tenant elsewhere is seen after this at most; objects stay per tenant meanwhile).
const OWNER_TTL: Duration = Duration::from_secs(5);
/// Owners cached at most (the cache is emptied when full).
const MAX_CACHED: usize = 10_000;
/// Other tenants' namespaces looked at, at most, before a free name is claimed.
const MAX_TENANTS_LOOKED_AT: usize = 10_000;
/// Namespaces looked at at once.
const LOOKUPS_AT_ONCE: usize = 16;
/// The largest record the gateway reads (they are a few dozen bytes).
pub const MAX_RECORD: usize = 64 * 1024;

#[derive(Debug, Serialize, Deserialize)]
struct OwnerRecord {
    tenant: String,
    created_unix: u64,
}

/// What a request does with a bucket that may have no owner yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// Reads, lists, deletes: an unowned name stays unowned.
    Read,
    /// Writes: an unowned name becomes the caller's.
    Write,
}

/// The owner of a bucket as the caller sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owned {
    Mine,
    Nobody,
    Other,
}

fn owner_key(bucket: &str) -> String {
    format!(".datamover/s3/buckets/{bucket}.json")
}

fn tenant_entry(tenant: &str, bucket: &str) -> String {
    format!(".datamover/s3/tenants/{tenant}/{bucket}")
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A small object's bytes, `None` when it does not exist; refused when over `max` bytes.
pub async fn read_small(
    objects: &dyn ObjectStore,
    key: &str,
    max: usize,
) -> GatewayResult<Option<Vec<u8>>> {
    let (head, mut body) = match objects.get(key, 0).await {
        Ok(got) => got,
        Err(StoreError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if head.size > max as u64 {
        return Err(GatewayError::Store(StoreError::Other {
            what: format!("reading gateway record {key}"),
            detail: format!(
                "{} bytes, more than the {max} a record may have: remove the object",
                head.size
            ),
        }));
    }
    let mut out = Vec::with_capacity(head.size as usize);
    // Bounded: stops at `max` bytes whatever the store sends.
    while let Some(piece) = body.next().await {
        let piece = piece?;
        if out.len() + piece.len() > max {
            break;
        }
        out.extend_from_slice(&piece);
    }
    Ok(Some(out))
}

/// Owners of buckets, read from the store and cached briefly.
#[derive(Default)]
pub struct Owners {
    cache: Mutex<HashMap<String, (String, Instant)>>,
}

impl Owners {
    fn cached(&self, bucket: &str) -> Option<String> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(bucket)
            .filter(|(_, at)| at.elapsed() < OWNER_TTL)
            .map(|(t, _)| t.clone())
    }

    fn remember(&self, bucket: &str, tenant: &str) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(bucket.to_string(), (tenant.to_string(), Instant::now()));
    }

    fn forget(&self, bucket: &str) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.remove(bucket);
    }

    /// The recorded owner of `bucket`, if any.
    pub async fn recorded(
        &self,
        objects: &dyn ObjectStore,
        bucket: &str,
    ) -> GatewayResult<Option<String>> {
        if let Some(t) = self.cached(bucket) {
            return Ok(Some(t));
        }
        let Some(bytes) = read_small(objects, &owner_key(bucket), MAX_RECORD).await? else {
            return Ok(None);
        };
        match serde_json::from_slice::<OwnerRecord>(&bytes) {
            Ok(r) => {
                self.remember(bucket, &r.tenant);
                Ok(Some(r.tenant))
            }
            Err(e) => {
                tracing::warn!(bucket, error = %e, "unreadable bucket owner record: the bucket is refused to every tenant until an operator removes .datamover/s3/buckets/<bucket>.json");
                Ok(Some(String::new()))
            }
        }
    }

    /// Records `tenant` as the owner of `bucket` unless someone is; returns the owner.
    pub async fn claim(
        &self,
        objects: &dyn ObjectStore,
        tenant: &str,
        bucket: &str,
    ) -> GatewayResult<String> {
        if let Some(owner) = self.recorded(objects, bucket).await? {
            return Ok(owner);
        }
        let record = serde_json::to_vec(&OwnerRecord {
            tenant: tenant.to_string(),
            created_unix: now_unix(),
        })
        .map_err(|e| GatewayError::Body(e.to_string()))?;
        objects
            .put(&owner_key(bucket), Bytes::from(record), None)
            .await?;
        // Read back: of two claims at once, the last write holds.
        self.forget(bucket);
        let owner = self
            .recorded(objects, bucket)
            .await?
            .unwrap_or_else(|| tenant.to_string());
        if owner == tenant {
            objects
                .put(&tenant_entry(tenant, bucket), Bytes::new(), None)
                .await?;
            tracing::info!(tenant, bucket, "S3 bucket recorded as the tenant's");
        }
        Ok(owner)
    }

    /// Who owns `bucket` for `tenant`; records the owner of a sync target found in the
    /// caller's namespace, and of a free name the caller writes to.
    ///
    /// `others` names the other tenants the server knows; before a free name is given to
    /// the caller, their namespaces are looked at for objects under it (a sync target
    /// written before buckets had owners).
    pub async fn resolve(
        &self,
        objects: &dyn ObjectStore,
        tenant: &str,
        bucket: &str,
        intent: Intent,
        others: impl FnOnce() -> Vec<String>,
    ) -> GatewayResult<Owned> {
        let prefix = bucket_prefix(tenant, bucket)?;
        let owner = match self.recorded(objects, bucket).await? {
            Some(owner) => owner,
            None => {
                let holds = !objects.list(&prefix).await?.is_empty();
                if holds {
                    self.claim(objects, tenant, bucket).await?
                } else if intent == Intent::Read {
                    return Ok(Owned::Nobody);
                } else {
                    // A free name, unless another tenant's namespace holds it already.
                    let holder = holder(objects, others(), bucket).await?;
                    let first = holder.as_deref().unwrap_or(tenant);
                    self.claim(objects, first, bucket).await?
                }
            }
        };
        Ok(if owner == tenant {
            Owned::Mine
        } else {
            Owned::Other
        })
    }

    /// The buckets whose owner is `tenant` per an entry (its empty ones included).
    pub async fn entries(
        &self,
        objects: &dyn ObjectStore,
        tenant: &str,
    ) -> GatewayResult<Vec<String>> {
        let base = format!(".datamover/s3/tenants/{}", tenant_prefix(tenant)?);
        Ok(objects
            .list(&base)
            .await?
            .into_iter()
            .filter_map(|o| o.key.strip_prefix(&base).map(str::to_string))
            .filter(|b| !b.contains('/'))
            .collect())
    }

    /// Forgets the owner of a bucket that its owner deleted: the name is free again.
    pub async fn release(
        &self,
        objects: &dyn ObjectStore,
        tenant: &str,
        bucket: &str,
    ) -> GatewayResult<()> {
        objects.delete(&tenant_entry(tenant, bucket)).await?;
        objects.delete(&owner_key(bucket)).await?;
        self.forget(bucket);
        Ok(())
    }
}

/// The first of `tenants` whose namespace holds objects under `bucket` (at most
/// [`MAX_TENANTS_LOOKED_AT`] are looked at).
async fn holder(
    objects: &dyn ObjectStore,
    tenants: Vec<String>,
    bucket: &str,
) -> GatewayResult<Option<String>> {
    if tenants.len() > MAX_TENANTS_LOOKED_AT {
        tracing::warn!(
            tenants = tenants.len(),
            bucket,
            "too many tenants to look for an unrecorded sync target of this name in each: only the first are"
        );
    }
    let found: Vec<Option<String>> =
        futures::stream::iter(tenants.into_iter().take(MAX_TENANTS_LOOKED_AT))
            .map(|t| async move {
                let Ok(prefix) = bucket_prefix(&t, bucket) else {
                    return Ok(None);
                };
                let holds = !objects.list(&prefix).await?.is_empty();
                Ok::<_, GatewayError>(holds.then_some(t))
            })
            .buffered(LOOKUPS_AT_ONCE)
            .try_collect()
            .await?;
    Ok(found.into_iter().flatten().next())
}

/// For edge sync: records `tenant` as the owner of the bucket named like its sync target's
/// first segment when no tenant owns that name yet, so the target stays the tenant's over
/// S3. Best effort: a failure is logged and sync goes on.
pub async fn note_sync_target(objects: &dyn ObjectStore, tenant: &str, target: &str) {
    let bucket = target.split('/').next().unwrap_or_default();
    if !valid_bucket_name(bucket) || bucket_prefix(tenant, bucket).is_err() {
        return;
    }
    let owners = Owners::default();
    if let Err(e) = owners.claim(objects, tenant, bucket).await {
        tracing::warn!(tenant, bucket, error = %e, "could not record the owner of a sync target's bucket name; its tenant's first S3 request does");
    }
}

/// The S3 bucket naming rules (3 to 63 lower-case letters, digits, '.' and '-', starting
/// and ending with a letter or digit).
pub fn valid_bucket_name(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
        && b.bytes().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && b.bytes().last().is_some_and(|c| c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names() {
        assert!(valid_bucket_name("site-a"));
        assert!(valid_bucket_name("a.b.c"));
        assert!(!valid_bucket_name("ab"));
        assert!(!valid_bucket_name("Site"));
        assert!(!valid_bucket_name("-a-"));
        assert!(!valid_bucket_name("a_b"));
    }
}
