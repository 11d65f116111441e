//! The S3 store against a real S3 server (Garage on loopback): objects written with and
//! without a signed payload read back the same.

use bytes::Bytes;
use datamover_repo::store::{FileType, S3Options, S3Store, Store};
use datamover_tests::{Garage, random_bytes};

#[test]
fn signed_and_unsigned_payloads_round_trip() {
    let Some(g) = Garage::start_or_skip() else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (prefix, unsigned) in [("signed", false), ("unsigned", true)] {
        let store = S3Store::new(S3Options {
            unsigned_payload: Some(unsigned),
            ..g.s3_options(prefix)
        })
        .unwrap();
        let data = Bytes::from(random_bytes(7, 9 * 1024 * 1024 + 3));
        rt.block_on(async {
            store
                .write(FileType::Pack, "p1", data.clone())
                .await
                .unwrap();
            assert_eq!(
                store.read(FileType::Pack, "p1").await.unwrap(),
                data,
                "{prefix}"
            );
            assert_eq!(
                store.list(FileType::Pack).await.unwrap(),
                vec!["p1".to_string()]
            );
        });
    }
}
