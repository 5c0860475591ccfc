//! Compiles `proto/forkd.proto` with protox (pure Rust: no protoc needed).

fn main() {
    println!("cargo:rerun-if-changed=proto/forkd.proto");
    let fds = protox::compile(["proto/forkd.proto"], ["proto"])
        .expect("proto/forkd.proto does not compile");
    tonic_prost_build::configure()
        .compile_fds(fds)
        .expect("generating gRPC code");
}
