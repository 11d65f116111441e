#![no_main]
//! Raw gRPC request bodies sent to a real server in this process: the stable harness's
//! body (one server for the whole run, started at the first input).
use std::sync::{Mutex, OnceLock};

use datamover_server::fuzz_targets::GrpcTarget;

static TARGET: OnceLock<Mutex<GrpcTarget>> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    let target = TARGET.get_or_init(|| {
        Mutex::new(GrpcTarget::start().unwrap_or_else(|e| panic!("the server did not start: {e}")))
    });
    let mut t = target.lock().unwrap_or_else(|p| p.into_inner());
    t.run(input);
});
