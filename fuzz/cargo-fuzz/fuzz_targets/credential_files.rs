#![no_main]
//! `/etc/client_credentials/` files: the stable harness's body.
libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    datamover_server::fuzz_targets::credential_files(input);
});
