//! Compiles Trellis's own Istio-compatible protos with `protox`, a pure-Rust protobuf compiler,
//! so the build never needs a system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/istio/workload/workload.proto",
        "proto/istio/security/authorization.proto",
        "proto/istio/security/citadel.proto",
        "proto/trellis/node/v1/node.proto",
        "proto/trellis/pod/v1/pod.proto",
        "proto/trellis/echo/v1/echo.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    Ok(())
}
