//! Split listings of plain objects on a real S3 store (Garage on loopback): whatever the
//! hints (exact, stale, outside the prefix, unsorted), `list_split` returns exactly what
//! one plain listing returns, in key order, each key once.

use std::sync::Arc;

use bytes::Bytes;
use datamover_repo::objects::{ObjectInfo, ObjectStore, S3Objects};
use datamover_repo::store::S3Store;
use datamover_tests::Garage;
use futures::StreamExt;

fn keys(v: &[ObjectInfo]) -> Vec<String> {
    v.iter().map(|o| o.key.clone()).collect()
}

#[test]
fn split_listing_equals_plain_listing_whatever_the_hints() {
    let Some(g) = Garage::start_or_skip() else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let store = S3Store::new(g.s3_options("")).expect("store");
        let objects: Arc<dyn ObjectStore> = Arc::new(S3Objects::new(&store, "root"));
        // 2,600 objects under the prefix (more than two pages), names of varied length so
        // byte order differs from numeric order, and neighbours just outside the prefix.
        let mut names: Vec<String> = (0..2600)
            .map(|i| format!("t/target/d{}/f{i}", i % 7))
            .collect();
        names.push("t/target-other/x".into());
        names.push("t/targes".into());
        let puts = names.iter().map(|k| {
            let objects = Arc::clone(&objects);
            async move {
                objects
                    .put(k, Bytes::from(k.clone().into_bytes()), None)
                    .await
            }
        });
        let results: Vec<_> = futures::stream::iter(puts)
            .buffer_unordered(32)
            .collect()
            .await;
        for r in results {
            r.expect("put");
        }
        let prefix = "t/target/";
        let mut plain = objects.list(prefix).await.expect("list");
        plain.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(plain.len(), 2600);
        let sorted = keys(&plain);

        let exact: Vec<String> = sorted.iter().skip(999).step_by(1000).cloned().collect();
        let stale: Vec<String> = vec![
            "t/target/d3/f9999".into(), // never written
            "t/target/d0/f0".into(),    // the very first key
            "t/target/d6/zzz".into(),   // after the last key
            "t/target/d1/f1".into(),
            "t/target/d1/f1".into(), // twice
            "t/other/x".into(),      // outside the prefix
            "t/target".into(),       // the prefix without its slash
        ];
        let single = vec![sorted[sorted.len() - 1].clone()];
        for (what, bounds) in [
            ("none", Vec::new()),
            ("exact", exact),
            ("stale", stale),
            ("last key", single),
            ("every key", sorted.clone()),
        ] {
            let split = objects.list_split(prefix, &bounds).await.expect("split");
            assert_eq!(keys(&split), sorted, "hints: {what}");
            assert_eq!(split, plain, "hints: {what}: sizes and etags too");
        }
    });
}
