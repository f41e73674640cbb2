//! Generates the message types from the repository's proto/ at build time
//! (prost-build runs `protoc`: $PROTOC, else `protoc` on PATH).
use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let proto_root = manifest.join("../../proto");
    let proto = proto_root.join("akidb/embedding/v1/embedding_service.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    prost_build::Config::new()
        .compile_protos(&[proto], &[proto_root])
        .expect("compiling proto/akidb/embedding/v1/embedding_service.proto (is protoc installed?)");
}
