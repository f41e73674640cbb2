//! The client the database uses: typed calls over the gRPC layer, vectors
//! decoded to `Vec<f32>`, and a bulk stream with bounded in-flight items.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_core::Stream;
use futures_util::StreamExt;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::grpc::{Channel, ChannelOptions, Code, Status, Target};
use crate::pb::{self, embedding_service as paths};

pub use crate::pb::embed_options::PromptChoice;
pub use crate::pb::{EmbedOptions, EmbeddingSpace, HealthResponse, ModelInfo, ServingStatus};

/// One text's vector.
#[derive(Clone, Debug, PartialEq)]
pub struct Embedding {
    pub vector: Vec<f32>,
    /// Tokens the model saw (after truncation, special tokens included).
    pub token_count: u32,
    /// The text was cut to the model's maximum token count.
    pub truncated: bool,
}

/// The answer to `embed`: one embedding per text, in input order.
#[derive(Clone, Debug, PartialEq)]
pub struct Embeddings {
    pub embeddings: Vec<Embedding>,
    /// The vector space: store `space.fingerprint` with the index and never mix
    /// vectors with different fingerprints.
    pub space: EmbeddingSpace,
    /// The model that served the call (the server's default if none was named).
    pub model: String,
    pub total_tokens: u64,
}

/// One item of a bulk stream.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StreamItem {
    /// Echoed on this item's result.
    pub id: String,
    pub text: String,
    /// Sticky: applies to this item and later ones until another item sets it.
    /// `None` keeps the current one (the server's default at the start).
    pub model: Option<String>,
    /// Sticky, like `model`.
    pub options: Option<EmbedOptions>,
}

impl StreamItem {
    pub fn new(id: impl Into<String>, text: impl Into<String>) -> StreamItem {
        StreamItem {
            id: id.into(),
            text: text.into(),
            model: None,
            options: None,
        }
    }
}

/// One item's outcome. A bad item gets its own error and the stream goes on.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamResult {
    pub id: String,
    pub embedding: Result<Embedding, Status>,
    /// Set with every embedding.
    pub space: Option<EmbeddingSpace>,
}

/// The results of `embed_stream`, as they come. An `Err` ends the stream: the
/// call itself failed (server gone, deadline, invalid stream).
pub type ResultStream = Pin<Box<dyn Stream<Item = Result<StreamResult, Status>> + Send + 'static>>;

/// Items of one stream sent but not yet answered, by default. The server reads
/// ahead a bounded window too; past both, HTTP/2 flow control pushes back.
pub const DEFAULT_STREAM_IN_FLIGHT: usize = 512;

/// An async client for akidb-embed. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Client {
    channel: Channel,
    timeout: Option<Duration>,
    stream_in_flight: usize,
}

impl Client {
    /// Connects to `target`: a socket path (`/run/akidb-embed/embed.sock`,
    /// `unix:/run/akidb-embed/embed.sock`), `host:port`, or `""` for the server's
    /// default socket (`$AKIDB_EMBED_SOCKET`, else the per-user path the server uses).
    pub async fn connect(target: &str) -> Result<Client, Status> {
        Client::connect_with(target, ChannelOptions::default()).await
    }

    /// Connects to the server's default socket: `$AKIDB_EMBED_SOCKET`, else
    /// `$XDG_RUNTIME_DIR/akidb-embed/embed.sock`, else `/tmp/akidb-embed-$UID/embed.sock`
    /// (`akidb_embed_client::grpc::default_socket_path`).
    pub async fn connect_default() -> Result<Client, Status> {
        Client::connect("").await
    }

    pub async fn connect_with(target: &str, options: ChannelOptions) -> Result<Client, Status> {
        let channel = Channel::connect(Target::parse(target)?, options).await?;
        Ok(Client::over(channel))
    }

    /// A client that dials on first use (e.g. before the sidecar has started;
    /// pair with `wait_until_serving`).
    pub fn lazy(target: &str, options: ChannelOptions) -> Result<Client, Status> {
        Ok(Client::over(Channel::lazy(Target::parse(target)?, options)))
    }

    fn over(channel: Channel) -> Client {
        Client {
            channel,
            timeout: None,
            stream_in_flight: DEFAULT_STREAM_IN_FLIGHT,
        }
    }

    /// A client whose calls have this deadline (sent as `grpc-timeout` and
    /// enforced locally: `DEADLINE_EXCEEDED`). For a stream it bounds the whole stream.
    pub fn with_timeout(&self, timeout: Duration) -> Client {
        Client {
            timeout: Some(timeout),
            ..self.clone()
        }
    }

    /// A client whose streams keep at most `n` (at least 1) items unanswered.
    pub fn with_stream_in_flight(&self, n: usize) -> Client {
        Client {
            stream_in_flight: n.max(1),
            ..self.clone()
        }
    }

    /// Embeds `texts` with `model` ("" = the server's default).
    pub async fn embed<I>(
        &self,
        model: &str,
        texts: I,
        options: Option<EmbedOptions>,
    ) -> Result<Embeddings, Status>
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        let request = pb::EmbedRequest {
            model: model.to_string(),
            texts: texts.into_iter().map(Into::into).collect(),
            options,
        };
        let sent = request.texts.len();
        let response: pb::EmbedResponse = self
            .channel
            .unary(paths::EMBED, &request, self.timeout)
            .await?;
        if response.embeddings.len() != sent {
            return Err(Status::new(
                Code::Internal,
                format!(
                    "server returned {} embeddings for {} texts",
                    response.embeddings.len(),
                    sent
                ),
            ));
        }
        Ok(Embeddings {
            embeddings: response
                .embeddings
                .into_iter()
                .map(decode_embedding)
                .collect::<Result<_, _>>()?,
            space: response.space.unwrap_or_default(),
            model: response.model,
            total_tokens: response.total_tokens,
        })
    }

    /// Bulk embedding: sends `items` while results come back, each with its
    /// item's id, in the order the server answers (the akidb-embed server keeps
    /// input order). At most `with_stream_in_flight` items are unanswered.
    /// Dropping the returned stream cancels the call.
    pub async fn embed_stream<S>(&self, items: S) -> Result<ResultStream, Status>
    where
        S: Stream<Item = StreamItem> + Send + 'static,
    {
        let (mut sink, responses) = self
            .channel
            .streaming::<pb::EmbedStreamRequest, pb::EmbedStreamResponse>(
                paths::EMBED_STREAM,
                self.timeout,
            )
            .await?;
        let in_flight = Arc::new(Semaphore::new(self.stream_in_flight));
        let permits = in_flight.clone();
        let sender = tokio::spawn(async move {
            futures_util::pin_mut!(items);
            while let Some(item) = items.next().await {
                match permits.acquire().await {
                    Ok(permit) => permit.forget(), // given back when the answer arrives
                    Err(_) => return,
                }
                let request = pb::EmbedStreamRequest {
                    id: item.id,
                    text: item.text,
                    model: item.model.unwrap_or_default(),
                    options: item.options,
                };
                // A failed send ends the call; the receiving side reports its status.
                if sink.send(&request).await.is_err() {
                    return;
                }
            }
            let _ = sink.finish();
        });
        let state = Receiving {
            responses,
            in_flight,
            _sender: AbortOnDrop(sender),
        };
        let results = futures_util::stream::unfold(Some(state), |state| async move {
            let mut state = state?;
            match state.responses.message().await {
                Ok(Some(response)) => {
                    state.in_flight.add_permits(1);
                    Some((Ok(decode_stream_response(response)), Some(state)))
                }
                Ok(None) => None,
                Err(status) => Some((Err(status), None)),
            }
        });
        Ok(Box::pin(results))
    }

    /// Every model the server knows, with its state.
    pub async fn list_models(&self) -> Result<Vec<ModelInfo>, Status> {
        let response: pb::ListModelsResponse = self
            .channel
            .unary(paths::LIST_MODELS, &pb::ListModelsRequest {}, self.timeout)
            .await?;
        Ok(response.models)
    }

    /// Overall and per-model status, version, uptime.
    pub async fn health(&self) -> Result<HealthResponse, Status> {
        self.channel
            .unary(paths::HEALTH, &pb::HealthRequest {}, self.timeout)
            .await
    }

    /// Polls `health` until the server says SERVING (it loads and warms its
    /// models first), retrying while the socket is not there yet.
    pub async fn wait_until_serving(&self, within: Duration) -> Result<HealthResponse, Status> {
        let deadline = tokio::time::Instant::now() + within;
        let probe = self.with_timeout(Duration::from_secs(2));
        loop {
            let last = match probe.health().await {
                Ok(h) if h.status == ServingStatus::Serving as i32 => return Ok(h),
                Ok(h) => format!("server reports {:?}", ServingStatus::from_i32(h.status)),
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::new(
                    Code::Unavailable,
                    format!(
                        "server at {} not SERVING after {:?}: {}",
                        self.channel.target(),
                        within,
                        last
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

struct Receiving {
    responses: crate::grpc::Streaming<pb::EmbedStreamResponse>,
    in_flight: Arc<Semaphore>,
    _sender: AbortOnDrop,
}

/// Stops the sending task when the results are dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Packed little-endian f32 bytes to a vector, checked against `dimensions`.
fn decode_embedding(e: pb::Embedding) -> Result<Embedding, Status> {
    if e.vector.len() != e.dimensions as usize * 4 {
        return Err(Status::new(
            Code::Internal,
            format!(
                "embedding has {} bytes for {} dimensions (expected 4 bytes each)",
                e.vector.len(),
                e.dimensions
            ),
        ));
    }
    let vector = e
        .vector
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok(Embedding {
        vector,
        token_count: e.token_count,
        truncated: e.truncated,
    })
}

fn decode_stream_response(response: pb::EmbedStreamResponse) -> StreamResult {
    use pb::embed_stream_response::Result as Outcome;
    let embedding = match response.result {
        Some(Outcome::Embedding(e)) => decode_embedding(e),
        Some(Outcome::Error(e)) => Err(Status::new(Code::from_u32(e.code), e.message)),
        None => Err(Status::new(
            Code::Internal,
            "stream response without an embedding or an error",
        )),
    };
    StreamResult {
        id: response.id,
        embedding,
        space: response.space,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn decodes_packed_little_endian_f32() {
        let values = [1.0f32, -0.5, 3.25e-7, f32::MAX];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let e = decode_embedding(pb::Embedding {
            vector: Bytes::from(bytes),
            dimensions: 4,
            token_count: 7,
            truncated: true,
        })
        .unwrap();
        assert_eq!(e.vector, values.to_vec());
        assert_eq!((e.token_count, e.truncated), (7, true));
    }

    #[test]
    fn rejects_a_vector_whose_length_disagrees_with_dimensions() {
        let err = decode_embedding(pb::Embedding {
            vector: Bytes::from_static(&[0; 12]),
            dimensions: 4,
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(err.code(), Code::Internal);
    }

    #[test]
    fn item_error_becomes_a_status() {
        let r = decode_stream_response(pb::EmbedStreamResponse {
            id: "x".into(),
            result: Some(pb::embed_stream_response::Result::Error(pb::ItemError {
                code: 3,
                message: "text is empty".into(),
            })),
            space: None,
        });
        assert_eq!(r.id, "x");
        let err = r.embedding.unwrap_err();
        assert_eq!(
            (err.code(), err.message()),
            (Code::InvalidArgument, "text is empty")
        );
    }
}
