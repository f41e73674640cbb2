//! Generates the message types (and the method paths) from the repository's
//! proto/ at build time. prost-build runs `protoc`: $PROTOC, else `protoc` on PATH.
use std::fmt::Write as _;
use std::path::PathBuf;

/// Emits one `&str` constant per RPC with its HTTP/2 path, e.g.
/// `embedding_service::EMBED = "/akidb.embedding.v1.EmbeddingService/Embed"`,
/// so the client never spells a method name by hand.
struct MethodPaths;

impl prost_build::ServiceGenerator for MethodPaths {
    fn generate(&mut self, service: prost_build::Service, buf: &mut String) {
        let module = heck_snake(&service.name);
        let _ = writeln!(
            buf,
            "/// HTTP/2 paths of `{}.{}`'s methods.",
            service.package, service.proto_name
        );
        let _ = writeln!(buf, "pub mod {} {{", module);
        for method in &service.methods {
            let _ = writeln!(
                buf,
                "    pub const {}: &str = \"/{}.{}/{}\";",
                method.name.to_uppercase(),
                service.package,
                service.proto_name,
                method.proto_name
            );
        }
        let _ = writeln!(buf, "}}");
    }
}

/// `EmbeddingService` -> `embedding_service`.
fn heck_snake(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.extend(c.to_lowercase());
    }
    out
}

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let proto_root = manifest.join("../../proto");
    let proto = proto_root.join("akidb/embedding/v1/embedding_service.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    println!("cargo:rerun-if-env-changed=PROTOC");
    prost_build::Config::new()
        // `bytes` fields as `Bytes`: vectors are sliced out of the received buffer, not copied.
        .bytes(["."])
        .service_generator(Box::new(MethodPaths))
        .compile_protos(&[proto], &[proto_root])
        .expect("compiling proto/akidb/embedding/v1/embedding_service.proto (is protoc installed? scripts/install-rust-deps.sh)");
}
