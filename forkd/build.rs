//! Compiles `proto/forkd.proto` with protox (pure Rust: no protoc needed),
//! and writes its file descriptor set for gRPC server reflection.

use protox::prost::Message;

fn main() {
    println!("cargo:rerun-if-changed=proto/forkd.proto");
    let fds = protox::compile(["proto/forkd.proto"], ["proto"])
        .expect("proto/forkd.proto does not compile");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    std::fs::write(out.join("forkd_descriptor.bin"), fds.encode_to_vec())
        .expect("writing the file descriptor set");
    tonic_prost_build::configure()
        .compile_fds(fds)
        .expect("generating gRPC code");
}
