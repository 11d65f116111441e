//! Fuzz harnesses (see `datamover_core::fuzz`) for what the server reads that others
//! write: credential files (tokens and PHC strings) and the edge-sync state objects
//! (manifests and upload records) in the bucket.

use datamover_core::fuzz::{self, LargestAlloc};
use datamover_server::credentials::{Credential, trim, valid_client_id};
use datamover_server::sync::state::{Manifest, UploadRecord};

#[global_allocator]
static ALLOC: LargestAlloc = LargestAlloc;

#[test]
fn fuzz_credential_files() {
    let seeds = vec![
        b"token-1234\n".to_vec(),
        b"  $argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQxMjM0$M1R6TXpDb3JyZWN0SG9yc2VCYXR0ZXJ5U3RhcGxl\n".to_vec(),
        b"\xff\xfe".to_vec(),
    ];
    fuzz::run("credential_files", &seeds, |input| {
        let t = trim(input);
        assert!(t.len() <= input.len());
        match Credential::parse(input) {
            Some(Credential::Phc(s)) => {
                // What verification parses first.
                let _ = argon2::password_hash::PasswordHash::new(&s);
            }
            Some(Credential::Token(t)) => assert!(!t.is_empty()),
            None => assert!(trim(input).is_empty() || trim(input).starts_with(b"$argon2")),
        }
        let _ = valid_client_id(&String::from_utf8_lossy(input));
    });
}

#[test]
fn fuzz_sync_state() {
    let seeds = vec![
        br#"{"entries":{"a/b.txt":{"e":"\"etag\"","s":5,"h":"0000000000000000000000000000000000000000000000000000000000000000","m":1,"o":420}}}"#.to_vec(),
        br#"{"upload_id":"u","size":10485760,"hash":"1111111111111111111111111111111111111111111111111111111111111111","part_size":5242880,"parts":[[1,"x"]]}"#.to_vec(),
    ];
    fuzz::run("sync_state", &seeds, |input| {
        let _ = serde_json::from_slice::<Manifest>(input);
        if let Ok(r) = serde_json::from_slice::<UploadRecord>(input) {
            // Where an upload resumes: never past the object's end.
            assert!(r.offset() <= r.size, "{r:?}");
        }
    });
}
