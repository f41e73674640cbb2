//! The client the database uses: typed calls over the gRPC layer, vectors
//! decoded to `Vec<f32>`, and a bulk stream with bounded in-flight items.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_core::Stream;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::grpc::{ChannelOptions, Code, Status};
use crate::pb::{self, embedding_service as paths};
use crate::pool::Pool;
use crate::stream::{Counters, Settings, StreamCounters, DEFAULT_MAX_RESENDS, MAX_SUBSTREAMS};

pub use crate::pb::embed_options::PromptChoice;
pub use crate::pb::{
    EmbedOptions, EmbeddingSpace, HealthResponse, ModelInfo, ServerLimits, ServingStatus,
};

/// One text's vector.
#[derive(Clone, Debug, PartialEq)]
pub struct Embedding {
    /// The values as f32: float32 rows as sent, float16 rows widened. Empty for the
    /// integer and bit encodings: read `encoded` (and dequantise with the model's
    /// `quantization_ranges` from ListModels).
    pub vector: Vec<f32>,
    /// The row as sent when the request asked for another encoding than float32
    /// (`Vectors::Int8`, `Uint8`, `Binary`, `Ubinary`, `Float16`); None for float32.
    pub encoded: Option<crate::encoding::Vectors>,
    /// Tokens the model saw (after truncation, special tokens included; with chunking,
    /// of all the text's windows).
    pub token_count: u32,
    /// The text was cut to the model's maximum token count.
    pub truncated: bool,
    /// With truncation CHUNK: the text's windows in order, each with its vector and its
    /// character and UTF-8 byte range in the text (`vector` above is then empty).
    pub chunks: Vec<ChunkEmbedding>,
}

/// One window of a chunked text.
#[derive(Clone, Debug, PartialEq)]
pub struct ChunkEmbedding {
    /// Index, code point range and UTF-8 byte range of the window in the original text.
    pub chunk: crate::encoding::Chunk,
    pub vector: Vec<f32>,
    pub encoded: Option<crate::encoding::Vectors>,
    pub token_count: u32,
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
pub const DEFAULT_STREAM_IN_FLIGHT: usize = 2048;

/// Items one stream message carries at most.
pub const MAX_ITEMS_PER_MESSAGE: usize = 256;
/// Bytes of text one stream message carries at most (a single larger text goes alone).
pub const MAX_TEXT_BYTES_PER_MESSAGE: usize = 1 << 20;

/// An async client for akidb-embed. Cheap to clone; clones share the connections.
///
/// One target is one sidecar. Several (a comma-separated list, `connect_endpoints`)
/// or a `dns:///name:port` target (a headless Kubernetes Service, looked up again
/// every 30 s) make a pool: calls spread by round robin, an endpoint that fails is
/// skipped with a growing backoff, unary calls are retried on UNAVAILABLE on the
/// next endpoint, and `embed_stream` runs over one sub-stream per endpoint and
/// re-sends what a failed or draining replica left unanswered.
#[derive(Clone)]
pub struct Client {
    pool: Pool,
    timeout: Option<Duration>,
    stream_in_flight: usize,
    substreams: Option<usize>,
    counters: Arc<Counters>,
}

impl Client {
    /// Connects to `target`: a socket path (`/run/akidb-embed/embed.sock`,
    /// `unix:/run/akidb-embed/embed.sock`), `host:port`, a comma-separated list of
    /// those, `dns:///host:port`, or `""` for the server's default socket
    /// (`$AKIDB_EMBED_SOCKET`, else the per-user path the server uses). With several
    /// endpoints it is enough that one of them answers.
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
        let client = Client::lazy(target, options)?;
        client.check_reachable().await?;
        Ok(client)
    }

    /// A pool of the given endpoints (each a socket path or `host:port`).
    pub async fn connect_endpoints(
        targets: &[&str],
        options: ChannelOptions,
    ) -> Result<Client, Status> {
        let client = Client::over(Pool::fixed(targets, options)?);
        client.check_reachable().await?;
        Ok(client)
    }

    /// A client that dials on first use (e.g. before the sidecar has started;
    /// pair with `wait_until_serving`).
    pub fn lazy(target: &str, options: ChannelOptions) -> Result<Client, Status> {
        Ok(Client::over(Pool::parse(target, options)?))
    }

    fn over(pool: Pool) -> Client {
        Client {
            pool,
            timeout: None,
            stream_in_flight: DEFAULT_STREAM_IN_FLIGHT,
            substreams: None,
            counters: Arc::new(Counters::default()),
        }
    }

    async fn check_reachable(&self) -> Result<(), Status> {
        let mut last = None;
        for _ in 0..self.pool.endpoints().len().max(1) {
            let endpoint = self.pool.pick().await?;
            match endpoint.channel.ready().await {
                Ok(()) => return Ok(()),
                Err(status) => {
                    self.pool.failed(&endpoint);
                    last = Some(status);
                }
            }
        }
        Err(last.unwrap_or_else(|| Status::unavailable(format!("no endpoints for {}", self.pool))))
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

    /// A client whose streams run over `n` concurrent sub-streams (default: one
    /// per endpoint, at most 8).
    pub fn with_substreams(&self, n: usize) -> Client {
        Client {
            substreams: Some(n.max(1)),
            ..self.clone()
        }
    }

    /// What this client (and its clones) did to keep streams whole: re-sent items,
    /// broken sub-streams, items a draining replica refused.
    pub fn counters(&self) -> StreamCounters {
        self.counters.snapshot()
    }

    /// Calls and sub-streams started per endpoint, as round robin spread them.
    pub fn endpoint_calls(&self) -> Vec<(String, u64)> {
        self.pool.calls()
    }

    /// A unary call; on a pool, UNAVAILABLE is retried on the next endpoint (the
    /// calls are idempotent) within the deadline.
    async fn unary<Q, R>(&self, path: &str, request: &Q) -> Result<R, Status>
    where
        Q: prost::Message,
        R: prost::Message + Default,
    {
        let deadline = self.timeout.map(|t| tokio::time::Instant::now() + t);
        let attempts = if self.pool.is_single() {
            1
        } else {
            self.pool.endpoints().len().clamp(1, 4) + 1
        };
        let mut last: Option<Status> = None;
        for _ in 0..attempts {
            let timeout = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(tokio::time::Instant::now());
                    if left.is_zero() {
                        return Err(last.unwrap_or_else(Status::deadline_exceeded));
                    }
                    Some(left)
                }
                None => None,
            };
            let endpoint = self.pool.pick().await?;
            match endpoint.channel.unary(path, request, timeout).await {
                Ok(response) => {
                    self.pool.succeeded(&endpoint);
                    return Ok(response);
                }
                Err(status) if status.code() == Code::Unavailable => {
                    self.pool.failed(&endpoint);
                    last = Some(status);
                }
                Err(status) => return Err(status),
            }
        }
        let last = last.expect("at least one attempt");
        if attempts == 1 {
            return Err(last);
        }
        Err(Status::unavailable(format!(
            "no replica of {} answered after {} attempts (last: {}): check that the replicas are up and SERVING",
            self.pool, attempts, last
        )))
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
        let response: pb::EmbedResponse = self.unary(paths::EMBED, &request).await?;
        Ok(Embeddings {
            embeddings: decode_batch(response.embeddings.unwrap_or_default(), sent)?,
            space: response.space.unwrap_or_default(),
            model: response.model,
            total_tokens: response.total_tokens,
        })
    }

    /// Bulk embedding: sends `items` while results come back, each with its
    /// item's id, in input order. Items go out coalesced into messages: whatever
    /// the input stream has ready is sent together (up to
    /// `MAX_ITEMS_PER_MESSAGE` items or `MAX_TEXT_BYTES_PER_MESSAGE` bytes of
    /// text), and a message leaves as soon as the input pauses. At most
    /// `with_stream_in_flight` items are unanswered. Dropping the returned stream
    /// cancels the call.
    ///
    /// On a pool the messages spread over concurrent sub-streams on different
    /// endpoints, and what a replica that dies or drains leaves unanswered is
    /// sent again on another: each id is still answered exactly once, in order.
    pub async fn embed_stream<S>(&self, items: S) -> Result<ResultStream, Status>
    where
        S: Stream<Item = StreamItem> + Send + 'static,
    {
        let single = self.pool.is_single();
        let substreams = self
            .substreams
            .unwrap_or_else(|| self.pool.endpoints().len().clamp(1, MAX_SUBSTREAMS));
        let settings = Settings {
            pool: self.pool.clone(),
            deadline: self.timeout.map(|t| tokio::time::Instant::now() + t),
            in_flight: self.stream_in_flight,
            substreams,
            max_resends: if single { 0 } else { DEFAULT_MAX_RESENDS },
            counters: self.counters.clone(),
        };
        Ok(Box::pin(crate::stream::start(settings, items)))
    }

    /// Every model the server knows, with its state.
    pub async fn list_models(&self) -> Result<Vec<ModelInfo>, Status> {
        let response: pb::ListModelsResponse = self
            .unary(paths::LIST_MODELS, &pb::ListModelsRequest {})
            .await?;
        Ok(response.models)
    }

    /// Overall and per-model status, version, uptime.
    pub async fn health(&self) -> Result<HealthResponse, Status> {
        self.unary(paths::HEALTH, &pb::HealthRequest {}).await
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
                        self.pool, within, last
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Stops a task when dropped (the results of a stream, a sub-stream).
pub(crate) struct AbortOnDrop(Option<JoinHandle<()>>);

impl AbortOnDrop {
    pub(crate) fn new(task: JoinHandle<()>) -> AbortOnDrop {
        AbortOnDrop(Some(task))
    }

    /// Lets the task run to its end.
    pub(crate) fn detach(mut self) {
        self.0 = None;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// The items of one stream message, with the model and options in effect for them.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Batch {
    pub(crate) ids: Vec<String>,
    pub(crate) texts: Vec<String>,
    pub(crate) model: String,
    pub(crate) options: Option<EmbedOptions>,
}

/// Cuts the caller's items into messages: whatever the input has ready now, up
/// to a count or a byte budget; an item that changes the model or the options
/// starts a new message.
pub(crate) struct Batcher<S> {
    items: Pin<Box<S>>,
    /// Taken from the input but not yet in a message.
    carry: Option<StreamItem>,
    ended: bool,
    model: String,
    options: Option<EmbedOptions>,
}

impl<S: Stream<Item = StreamItem>> Batcher<S> {
    pub(crate) fn new(items: S) -> Batcher<S> {
        Batcher {
            items: Box::pin(items),
            carry: None,
            ended: false,
            model: String::new(),
            options: None,
        }
    }

    /// The next message, or `None` once the input has ended. Waits for the
    /// first item and a permit for it; takes further items only while they are
    /// ready and permits are free, so the message leaves as soon as the input
    /// pauses. Each item taken holds one permit (forgotten: the caller gives
    /// them back when the answers arrive).
    pub(crate) async fn next(&mut self, permits: &Semaphore) -> Option<Batch> {
        // Cancel-safe: an item taken while waiting for a permit stays in `carry`.
        if self.carry.is_none() {
            if self.ended {
                return None;
            }
            match self.items.next().await {
                Some(item) => self.carry = Some(item),
                None => {
                    self.ended = true;
                    return None;
                }
            }
        }
        match permits.acquire().await {
            Ok(permit) => permit.forget(),
            Err(_) => return None,
        }
        let first = self.carry.take().expect("set above");
        self.adopt(&first);
        let mut batch = Batch {
            ids: vec![first.id],
            texts: vec![first.text],
            model: self.model.clone(),
            options: self.options.clone(),
        };
        let mut bytes = batch.texts[0].len();
        while batch.ids.len() < MAX_ITEMS_PER_MESSAGE && !self.ended {
            // Unconstrained: tokio's cooperative budget would make a ready
            // channel look empty after ~128 items and cut messages short.
            let item = match tokio::task::unconstrained(self.items.next()).now_or_never() {
                Some(Some(item)) => item,
                Some(None) => {
                    self.ended = true;
                    break;
                }
                None => break, // the input paused: send what there is
            };
            let fits = bytes + item.text.len() <= MAX_TEXT_BYTES_PER_MESSAGE;
            if !fits || item.model.is_some() || item.options.is_some() {
                self.carry = Some(item);
                break;
            }
            match permits.try_acquire() {
                Ok(permit) => permit.forget(),
                Err(_) => {
                    self.carry = Some(item);
                    break;
                }
            }
            bytes += item.text.len();
            batch.ids.push(item.id);
            batch.texts.push(item.text);
        }
        Some(batch)
    }

    fn adopt(&mut self, item: &StreamItem) {
        if let Some(model) = &item.model {
            self.model = model.clone();
        }
        if let Some(options) = &item.options {
            self.options = Some(options.clone());
        }
    }
}

/// What one stream has told the server so far: model and options are sticky,
/// so a message sets them only when they change.
#[derive(Default)]
pub(crate) struct Sticky {
    sent: bool,
    model: String,
    options: Option<EmbedOptions>,
}

impl Sticky {
    pub(crate) fn request(&mut self, batch: &Batch) -> pb::EmbedStreamRequest {
        let mut request = pb::EmbedStreamRequest {
            ids: batch.ids.clone(),
            texts: batch.texts.clone(),
            ..Default::default()
        };
        if !self.sent || batch.model != self.model {
            request.model = batch.model.clone();
            self.model = batch.model.clone();
        }
        if !self.sent || batch.options != self.options {
            request.options = batch.options.clone();
            self.options = batch.options.clone();
        }
        self.sent = true;
        request
    }
}

/// The rows of a packed batch (little-endian f32, row-major), checked against
/// the number of rows expected.
pub(crate) fn decode_batch(
    batch: pb::EmbeddingBatch,
    rows: usize,
) -> Result<Vec<Embedding>, Status> {
    let dims = batch.dimensions as usize;
    let malformed = |what: String| {
        Status::new(
            Code::Internal,
            format!("malformed embedding batch: {}", what),
        )
    };
    let decoded = crate::encoding::decode_rows(&batch).map_err(|e| malformed(e.to_string()))?;
    let chunked = !batch.chunk_counts.is_empty();
    if chunked && batch.chunk_counts.len() != rows {
        return Err(malformed(format!(
            "chunk counts for {} texts where {} were expected",
            batch.chunk_counts.len(),
            rows
        )));
    }
    let row_count = if chunked {
        batch.chunk_counts.iter().map(|&c| c as usize).sum()
    } else {
        rows
    };
    if decoded.len() != row_count {
        return Err(malformed(format!(
            "{} rows of {} dimensions where {} were expected",
            decoded.len(),
            dims,
            row_count
        )));
    }
    if batch.token_counts.len() != row_count || batch.truncated.len() != row_count {
        return Err(malformed(format!(
            "{} token counts and {} truncated flags for {} rows",
            batch.token_counts.len(),
            batch.truncated.len(),
            row_count
        )));
    }
    let split = |row: crate::encoding::Vectors| match row {
        crate::encoding::Vectors::Float32(values) => (values, None),
        other @ crate::encoding::Vectors::Float16(_) => {
            (other.to_f32(None).unwrap_or_default(), Some(other))
        }
        other => (Vec::new(), Some(other)),
    };
    let mut out = Vec::with_capacity(rows);
    if chunked {
        let windows = crate::encoding::chunks(&batch);
        if windows.len() != row_count {
            return Err(malformed(format!(
                "{} chunk ranges for {} rows",
                windows.len(),
                row_count
            )));
        }
        let mut decoded = decoded.into_iter().zip(windows).enumerate();
        for &count in &batch.chunk_counts {
            let mut chunks = Vec::with_capacity(count as usize);
            for (i, (row, chunk)) in decoded.by_ref().take(count as usize) {
                let (vector, encoded) = split(row);
                chunks.push(ChunkEmbedding {
                    chunk,
                    vector,
                    encoded,
                    token_count: batch.token_counts[i],
                });
            }
            out.push(Embedding {
                vector: Vec::new(),
                encoded: None,
                token_count: chunks.iter().map(|c| c.token_count).sum(),
                truncated: false,
                chunks,
            });
        }
        return Ok(out);
    }
    for (i, row) in decoded.into_iter().enumerate() {
        let (vector, encoded) = split(row);
        out.push(Embedding {
            vector,
            encoded,
            token_count: batch.token_counts[i],
            truncated: batch.truncated[i],
            chunks: Vec::new(),
        });
    }
    Ok(out)
}

/// One response message to its items' results, in order; `space` is the last
/// space received on the stream and is updated when the response carries one.
pub(crate) fn decode_stream_response(
    response: pb::EmbedStreamResponse,
    space: &mut Option<EmbeddingSpace>,
) -> Result<Vec<StreamResult>, Status> {
    if response.space.is_some() {
        *space = response.space;
    }
    let n = response.ids.len();
    let mut errors: Vec<Option<Status>> = vec![None; n];
    for e in response.errors {
        let index = e.index as usize;
        if index >= n || errors[index].is_some() {
            return Err(Status::new(
                Code::Internal,
                format!(
                    "stream response names item {} in error, but has {} ids",
                    e.index, n
                ),
            ));
        }
        errors[index] = Some(Status::new(Code::from_u32(e.code), e.message));
    }
    let failed = errors.iter().filter(|e| e.is_some()).count();
    let mut rows = decode_batch(response.embeddings.unwrap_or_default(), n - failed)?.into_iter();
    let mut out = Vec::with_capacity(n);
    for (id, error) in response.ids.into_iter().zip(errors) {
        let (embedding, item_space) = match error {
            Some(status) => (Err(status), None),
            None => match rows.next() {
                Some(e) => (Ok(e), space.clone()),
                None => unreachable!("decode_batch checked the row count"),
            },
        };
        out.push(StreamResult {
            id,
            embedding,
            space: item_space,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn packed(rows: &[&[f32]]) -> pb::EmbeddingBatch {
        let dims = rows.first().map_or(0, |r| r.len());
        pb::EmbeddingBatch {
            vectors: Bytes::from(
                rows.iter()
                    .flat_map(|r| r.iter().flat_map(|v| v.to_le_bytes()))
                    .collect::<Vec<u8>>(),
            ),
            dimensions: dims as u32,
            token_counts: (0..rows.len() as u32).map(|i| i + 3).collect(),
            truncated: (0..rows.len()).map(|i| i == 1).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn decodes_a_packed_little_endian_f32_batch_row_by_row() {
        let rows: [&[f32]; 2] = [&[1.0, -0.5, 3.25e-7], &[f32::MAX, 0.0, -1.0]];
        let out = decode_batch(packed(&rows), 2).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].vector, rows[0].to_vec());
        assert_eq!(out[1].vector, rows[1].to_vec());
        assert_eq!((out[0].token_count, out[0].truncated), (3, false));
        assert_eq!((out[1].token_count, out[1].truncated), (4, true));
    }

    #[test]
    fn rows_in_another_encoding_come_back_typed() {
        let batch = pb::EmbeddingBatch {
            vectors: Bytes::from(vec![1u8, 2, 3, 250, 5, 6]),
            dimensions: 3,
            token_counts: vec![4, 5],
            truncated: vec![false, false],
            encoding: pb::Encoding::Int8 as i32,
            ..Default::default()
        };
        let out = decode_batch(batch, 2).unwrap();
        assert!(out[0].vector.is_empty());
        assert_eq!(
            out[1].encoded,
            Some(crate::encoding::Vectors::Int8(vec![-6, 5, 6]))
        );
        let half = pb::EmbeddingBatch {
            vectors: Bytes::from(vec![0x00, 0x3c, 0x00, 0xc0]), // 1.0, -2.0
            dimensions: 2,
            token_counts: vec![3],
            truncated: vec![false],
            encoding: pb::Encoding::Float16 as i32,
            ..Default::default()
        };
        assert_eq!(decode_batch(half, 1).unwrap()[0].vector, vec![1.0, -2.0]);
    }

    #[test]
    fn chunked_rows_come_back_under_their_text() {
        let rows: [&[f32]; 3] = [&[1.0, 0.0], &[0.0, 1.0], &[0.5, 0.5]];
        let mut batch = packed(&rows);
        batch.chunk_counts = vec![2, 1];
        batch.chunk_index = vec![0, 1, 0];
        batch.char_start = vec![0, 10, 0];
        batch.char_end = vec![12, 20, 5];
        batch.byte_start = vec![0, 11, 0];
        batch.byte_end = vec![13, 23, 5];
        let out = decode_batch(batch.clone(), 2).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].chunks.len(), 2);
        assert_eq!(out[0].chunks[1].vector, vec![0.0, 1.0]);
        assert_eq!(
            (
                out[0].chunks[1].chunk.byte_start,
                out[0].chunks[1].chunk.byte_end
            ),
            (11, 23)
        );
        assert_eq!(out[0].token_count, 3 + 4);
        assert_eq!(out[1].chunks[0].chunk.char_end, 5);
        assert!(out[0].vector.is_empty());
        assert_eq!(decode_batch(batch, 3).unwrap_err().code(), Code::Internal);
    }

    #[test]
    fn rejects_a_batch_whose_size_disagrees_with_its_rows() {
        let rows: [&[f32]; 2] = [&[1.0, 2.0], &[3.0, 4.0]];
        // One row expected, two sent.
        let err = decode_batch(packed(&rows), 1).unwrap_err();
        assert_eq!(err.code(), Code::Internal);
        let mut short = packed(&rows);
        short.vectors = short.vectors.slice(..12);
        assert_eq!(decode_batch(short, 2).unwrap_err().code(), Code::Internal);
        let mut counts = packed(&rows);
        counts.token_counts.pop();
        assert_eq!(decode_batch(counts, 2).unwrap_err().code(), Code::Internal);
    }

    #[test]
    fn a_stream_response_interleaves_rows_and_item_errors_and_keeps_the_space() {
        let rows: [&[f32]; 2] = [&[1.0, 0.0], &[0.0, 1.0]];
        let space = EmbeddingSpace {
            fingerprint: "fp".into(),
            ..Default::default()
        };
        let mut last = None;
        let out = decode_stream_response(
            pb::EmbedStreamResponse {
                ids: vec!["a".into(), "b".into(), "c".into()],
                space: Some(space.clone()),
                embeddings: Some(packed(&rows)),
                errors: vec![pb::ItemError {
                    index: 1,
                    code: 3,
                    message: "text is empty".into(),
                }],
            },
            &mut last,
        )
        .unwrap();
        let ids: Vec<&str> = out.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(out[0].embedding.as_ref().unwrap().vector, vec![1.0, 0.0]);
        let err = out[1].embedding.as_ref().unwrap_err();
        assert_eq!(
            (err.code(), err.message()),
            (Code::InvalidArgument, "text is empty")
        );
        assert_eq!(out[2].embedding.as_ref().unwrap().vector, vec![0.0, 1.0]);
        assert_eq!(out[2].space.as_ref(), Some(&space));
        assert!(out[1].space.is_none());

        // A later response without a space keeps the last one.
        let rows: [&[f32]; 1] = [&[0.5, 0.5]];
        let out = decode_stream_response(
            pb::EmbedStreamResponse {
                ids: vec!["d".into()],
                embeddings: Some(packed(&rows)),
                ..Default::default()
            },
            &mut last,
        )
        .unwrap();
        assert_eq!(out[0].space.as_ref(), Some(&space));
    }

    #[test]
    fn an_error_index_out_of_range_is_internal() {
        let err = decode_stream_response(
            pb::EmbedStreamResponse {
                ids: vec!["a".into()],
                errors: vec![pb::ItemError {
                    index: 1,
                    code: 3,
                    message: String::new(),
                }],
                ..Default::default()
            },
            &mut None,
        )
        .unwrap_err();
        assert_eq!(err.code(), Code::Internal);
    }

    fn item(i: usize) -> StreamItem {
        StreamItem::new(format!("{}", i), format!("text {}", i))
    }

    #[tokio::test]
    async fn the_batcher_takes_what_is_ready_and_sends_when_the_input_pauses() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let items = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let permits = Semaphore::new(10_000);
        let mut batcher = Batcher::new(items);
        for i in 0..3 {
            tx.send(item(i)).unwrap();
        }
        let batch = batcher.next(&permits).await.unwrap();
        assert_eq!(batch.ids, ["0", "1", "2"]); // everything ready, nothing more awaited
        for i in 3..600 {
            tx.send(item(i)).unwrap();
        }
        let sizes: Vec<usize> = vec![
            batcher.next(&permits).await.unwrap().ids.len(),
            batcher.next(&permits).await.unwrap().ids.len(),
            batcher.next(&permits).await.unwrap().ids.len(),
        ];
        assert_eq!(
            sizes,
            [MAX_ITEMS_PER_MESSAGE, MAX_ITEMS_PER_MESSAGE, 597 - 512]
        );
        drop(tx);
        assert!(batcher.next(&permits).await.is_none());
        assert_eq!(permits.available_permits(), 10_000 - 600);
    }

    #[tokio::test]
    async fn the_batcher_keeps_to_the_byte_budget_and_the_permits() {
        let big = "x".repeat(MAX_TEXT_BYTES_PER_MESSAGE / 2 + 1);
        let items = futures_util::stream::iter(
            (0..3).map(move |i| StreamItem::new(i.to_string(), big.clone())),
        );
        let permits = Semaphore::new(100);
        let mut batcher = Batcher::new(items);
        for _ in 0..3 {
            assert_eq!(batcher.next(&permits).await.unwrap().ids.len(), 1);
        }
        assert!(batcher.next(&permits).await.is_none());

        let permits = Semaphore::new(5);
        let mut batcher = Batcher::new(futures_util::stream::iter((0..8).map(item)));
        assert_eq!(batcher.next(&permits).await.unwrap().ids.len(), 5);
        permits.add_permits(3);
        assert_eq!(batcher.next(&permits).await.unwrap().ids, ["5", "6", "7"]);
    }

    #[tokio::test]
    async fn a_model_or_options_change_starts_a_message_and_is_sent_once() {
        let mut other = item(2);
        other.model = Some("other".into());
        let items = futures_util::stream::iter(vec![item(0), item(1), other, item(3)]);
        let permits = Semaphore::new(100);
        let mut batcher = Batcher::new(items);
        let mut sticky = Sticky::default();
        let first = sticky.request(&batcher.next(&permits).await.unwrap());
        assert_eq!(first.ids, ["0", "1"]);
        let second_batch = batcher.next(&permits).await.unwrap();
        assert_eq!(second_batch.model, "other");
        let second = sticky.request(&second_batch);
        assert_eq!((second.ids.len(), second.model.as_str()), (2, "other"));
        assert!(batcher.next(&permits).await.is_none());
        // The same model again is not repeated.
        let again = sticky.request(&second_batch);
        assert_eq!(again.model, "");
    }
}
