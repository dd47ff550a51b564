//! Compiles graywatch.v1 with protox (a pure-Rust protobuf compiler): no system `protoc` needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/graywatch/v1/graywatch.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    // Our codec: prost with smaller per-stream buffers (see `Codec` in lib.rs).
    tonic_prost_build::configure()
        .codec_path("crate::Codec")
        .compile_fds(fds)?;
    Ok(())
}
