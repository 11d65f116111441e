#![no_main]
//! Edge-sync manifests and upload records: the stable harness's body.
libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    datamover_server::fuzz_targets::sync_state(input);
});
