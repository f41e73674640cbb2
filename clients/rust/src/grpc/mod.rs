//! gRPC over HTTP/2, on the `h2` crate: the small, well-specified layer that
//! tonic would provide (https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md).
//!
//! - requests: `POST /package.Service/Method`, `content-type: application/grpc`,
//!   `te: trailers`, `grpc-timeout` for deadlines;
//! - messages: 5-byte length prefix + protobuf bytes (`codec`), flow-controlled
//!   in both directions so messages larger than the HTTP/2 window go through;
//! - outcome: `grpc-status` / `grpc-message` (percent-encoded) in trailers or in a
//!   trailers-only response, HTTP status and stream resets mapped to codes (`status`).
//!
//! Everything above this module speaks only `Channel::unary`,
//! `Channel::streaming`, `RequestSink`, `Streaming` and `Status`, so a build
//! with crates.io can swap this module for tonic without touching the client.

mod channel;
mod codec;
mod status;
mod timeout;

#[cfg(test)]
mod tests;

pub use channel::{default_socket_path, Channel, ChannelOptions, RequestSink, Streaming, Target};
pub use status::{Code, Status};
