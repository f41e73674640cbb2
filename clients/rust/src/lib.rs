pub mod grpc;

/// Message types generated from `proto/akidb/embedding/v1/embedding_service.proto`.
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/akidb.embedding.v1.rs"));
}
