//! Async Rust client for akidb-embed, AkiDB's embedding sidecar.
//!
//! ```no_run
//! # async fn demo() -> Result<(), akidb_embed_client::Status> {
//! use akidb_embed_client::Client;
//! // "" or `Client::connect_default()`: $AKIDB_EMBED_SOCKET, else the server's default.
//! let client = Client::connect("unix:/run/akidb-embed/embed.sock").await?;
//! let out = client.embed("", ["what is a vector database?"], None).await?;
//! println!("{} dims, space {}", out.embeddings[0].vector.len(), out.space.fingerprint);
//! # Ok(()) }
//! ```

mod client;
/// Typed vectors per encoding, and the windows of chunked texts.
pub mod encoding;
pub mod grpc;
mod pool;
mod stream;

/// Message types generated from `proto/akidb/embedding/v1/embedding_service.proto`
/// at build time, and the HTTP/2 paths of its methods.
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/akidb.embedding.v1.rs"));
}

pub use client::{
    ChunkEmbedding, Client, EmbedOptions, Embedding, EmbeddingSpace, Embeddings, HealthResponse,
    ModelInfo, PromptChoice, ResultStream, ServerLimits, ServingStatus, StreamItem, StreamResult,
    DEFAULT_STREAM_IN_FLIGHT, MAX_ITEMS_PER_MESSAGE, MAX_TEXT_BYTES_PER_MESSAGE,
};
pub use futures_core::Stream;
pub use grpc::{ChannelOptions, Code, Status};
pub use pool::DEFAULT_RESOLVE_EVERY;
pub use stream::{StreamCounters, DEFAULT_MAX_RESENDS, MAX_SUBSTREAMS};
