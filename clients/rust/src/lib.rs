//! Async Rust client for akidb-embed, AkiDB's embedding sidecar.
//!
//! ```no_run
//! # async fn demo() -> Result<(), akidb_embed_client::Status> {
//! use akidb_embed_client::Client;
//! let client = Client::connect("unix:/run/akidb-embed.sock").await?;
//! let out = client.embed("", ["what is a vector database?"], None).await?;
//! println!("{} dims, space {}", out.embeddings[0].vector.len(), out.space.fingerprint);
//! # Ok(()) }
//! ```

mod client;
/// Typed vectors per encoding, and the windows of chunked texts.
pub mod encoding;
pub mod grpc;

/// Message types generated from `proto/akidb/embedding/v1/embedding_service.proto`
/// at build time, and the HTTP/2 paths of its methods.
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/akidb.embedding.v1.rs"));
}

pub use client::{
    Client, EmbedOptions, Embedding, EmbeddingSpace, Embeddings, HealthResponse, ModelInfo,
    PromptChoice, ResultStream, ServingStatus, StreamItem, StreamResult, DEFAULT_STREAM_IN_FLIGHT,
};
pub use futures_core::Stream;
pub use grpc::{ChannelOptions, Code, Status};
