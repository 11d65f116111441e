//! Generates the gRPC code from `proto/` with protox (pure Rust): no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/datamover/v1/datamover.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_build::configure()
        .bytes(["."])
        .codec_path("crate::codec::SizedCodec")
        .compile_fds(fds)?;
    Ok(())
}
