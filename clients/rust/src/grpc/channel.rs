//! Connections and calls: one HTTP/2 connection per channel over a Unix socket or
//! TCP, redialled when the server has gone away, and the unary and bidirectional
//! streaming call shapes on top of it.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::poll_fn;
use h2::client::{ResponseFuture, SendRequest};
use h2::{RecvStream, SendStream};
use http::header::{CONTENT_TYPE, TE, USER_AGENT};
use http::{Method, Request, Version};
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::codec::{self, Decoder};
use super::status::{Code, Status};
use super::timeout;

const USER_AGENT_VALUE: &str = concat!("akidb-embed-client-rust/", env!("CARGO_PKG_VERSION"));

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Unix(PathBuf),
    /// `host:port`
    Tcp(String),
}

extern "C" {
    fn getuid() -> u32;
}

/// The socket the server listens on by default, as the server computes it:
/// `$AKIDB_EMBED_SOCKET`, else `$XDG_RUNTIME_DIR/akidb-embed/embed.sock`, else
/// `/tmp/akidb-embed-$UID/embed.sock`.
pub fn default_socket_path() -> PathBuf {
    if let Some(path) = std::env::var_os("AKIDB_EMBED_SOCKET").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let base = match std::env::var_os("XDG_RUNTIME_DIR").filter(|p| !p.is_empty()) {
        Some(runtime) => PathBuf::from(runtime).join("akidb-embed"),
        // SAFETY: getuid has no preconditions and cannot fail.
        None => PathBuf::from(format!("/tmp/akidb-embed-{}", unsafe { getuid() })),
    };
    base.join("embed.sock")
}

impl Target {
    /// `unix:PATH`, `unix://PATH`, a path starting with `/` or `.`, or
    /// `host:port` (optionally `http://host:port`). An empty target is the
    /// server's default socket (`default_socket_path`).
    pub fn parse(target: &str) -> Result<Target, Status> {
        if target.trim().is_empty() {
            return Ok(Target::Unix(default_socket_path()));
        }
        let invalid = |why: &str| {
            Status::new(
                Code::InvalidArgument,
                format!(
                    "invalid target {:?}: {}; use a socket path (unix:/run/akidb-embed/embed.sock), host:port, or \"\" for the default socket",
                    target, why
                ),
            )
        };
        let unix = target
            .strip_prefix("unix://")
            .or_else(|| target.strip_prefix("unix:"))
            .or_else(|| {
                if target.starts_with('/') || target.starts_with('.') {
                    Some(target)
                } else {
                    None
                }
            });
        if let Some(path) = unix {
            if path.is_empty() {
                return Err(invalid("empty socket path"));
            }
            return Ok(Target::Unix(PathBuf::from(path)));
        }
        let host_port = target
            .strip_prefix("http://")
            .unwrap_or(target)
            .trim_end_matches('/');
        match host_port.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Target::Tcp(host_port.to_string()))
            }
            _ => Err(invalid("expected host:port")),
        }
    }

    /// The `:authority` of requests: the TCP address, or `localhost` for a socket.
    fn authority(&self) -> &str {
        match self {
            Target::Unix(_) => "localhost",
            Target::Tcp(host_port) => host_port,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Unix(path) => write!(f, "unix:{}", path.display()),
            Target::Tcp(host_port) => f.write_str(host_port),
        }
    }
}

/// Connection settings. The defaults suit a local sidecar.
#[derive(Clone, Debug)]
pub struct ChannelOptions {
    /// How long dialling and the HTTP/2 handshake may take.
    pub connect_timeout: Duration,
    /// Our HTTP/2 receive window per stream; larger means fewer WINDOW_UPDATE
    /// round trips for big responses (h2's default is 65,535 bytes).
    pub stream_window: u32,
    /// Our HTTP/2 receive window for the whole connection.
    pub connection_window: u32,
    /// Largest message this client sends or accepts.
    pub max_message_size: usize,
}

impl Default for ChannelOptions {
    fn default() -> ChannelOptions {
        ChannelOptions {
            connect_timeout: Duration::from_secs(5),
            stream_window: 2 * 1024 * 1024,
            connection_window: 8 * 1024 * 1024,
            max_message_size: 64 * 1024 * 1024,
        }
    }
}

/// One live HTTP/2 connection and the flag its driver task sets when it ends.
#[derive(Clone)]
struct Connection {
    sender: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
    generation: u64,
}

struct Inner {
    target: Target,
    options: ChannelOptions,
    connection: Mutex<Option<Connection>>,
    generations: AtomicU64,
}

/// A cheap-to-clone handle that multiplexes calls over one connection and
/// redials it after the server went away (e.g. restarted).
#[derive(Clone)]
pub struct Channel {
    inner: Arc<Inner>,
}

impl Channel {
    /// Connects now, so that a wrong path or a server that is down shows up here.
    pub async fn connect(target: Target, options: ChannelOptions) -> Result<Channel, Status> {
        let channel = Channel::lazy(target, options);
        channel.connection().await?;
        Ok(channel)
    }

    /// A channel that dials on its first call.
    pub fn lazy(target: Target, options: ChannelOptions) -> Channel {
        Channel {
            inner: Arc::new(Inner {
                target,
                options,
                connection: Mutex::new(None),
                generations: AtomicU64::new(0),
            }),
        }
    }

    pub fn target(&self) -> &Target {
        &self.inner.target
    }

    /// Dials now if there is no live connection.
    pub async fn ready(&self) -> Result<(), Status> {
        self.connection().await.map(|_| ())
    }

    /// The live connection, dialling a new one if there is none or it has closed.
    /// Dialling holds the lock so that concurrent calls share one new connection.
    async fn connection(&self) -> Result<Connection, Status> {
        let mut slot = self.inner.connection.lock().await;
        if let Some(conn) = slot.as_ref() {
            if !conn.closed.load(Ordering::Acquire) {
                return Ok(conn.clone());
            }
        }
        let generation = self.inner.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let dial = self.dial(generation);
        let conn = match tokio::time::timeout(self.inner.options.connect_timeout, dial).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(Status::unavailable(format!(
                    "connecting to {} timed out after {:?}",
                    self.inner.target, self.inner.options.connect_timeout
                )))
            }
        };
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Forgets a connection that failed, unless it was already replaced.
    async fn discard(&self, generation: u64) {
        let mut slot = self.inner.connection.lock().await;
        if slot.as_ref().map(|c| c.generation) == Some(generation) {
            *slot = None;
        }
    }

    async fn dial(&self, generation: u64) -> Result<Connection, Status> {
        let unreachable = |e: std::io::Error| {
            Status::unavailable(format!("cannot connect to {}: {}", self.inner.target, e))
        };
        match &self.inner.target {
            Target::Unix(path) => {
                let io = UnixStream::connect(path).await.map_err(unreachable)?;
                self.handshake(io, generation).await
            }
            Target::Tcp(host_port) => {
                let io = TcpStream::connect(host_port.as_str())
                    .await
                    .map_err(unreachable)?;
                // Small request messages must not wait for Nagle's algorithm.
                io.set_nodelay(true).map_err(unreachable)?;
                self.handshake(io, generation).await
            }
        }
    }

    async fn handshake<T>(&self, io: T, generation: u64) -> Result<Connection, Status>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let options = &self.inner.options;
        let (sender, driver) = h2::client::Builder::new()
            .initial_window_size(options.stream_window)
            .initial_connection_window_size(options.connection_window)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| Status::from_h2(&e))?;
        let closed = Arc::new(AtomicBool::new(false));
        let flag = closed.clone();
        // The driver does all socket I/O; it ends when the server closes the
        // connection or every handle to it is dropped.
        tokio::spawn(async move {
            let _ = driver.await;
            flag.store(true, Ordering::Release);
        });
        Ok(Connection {
            sender,
            closed,
            generation,
        })
    }

    fn request(&self, path: &str, timeout: Option<Duration>) -> Result<Request<()>, Status> {
        let uri = format!("http://{}{}", self.inner.target.authority(), path);
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .version(Version::HTTP_2)
            .header(CONTENT_TYPE, "application/grpc")
            .header(TE, "trailers")
            .header(USER_AGENT, USER_AGENT_VALUE);
        if let Some(t) = timeout {
            builder = builder.header("grpc-timeout", timeout::encode(t));
        }
        builder
            .body(())
            .map_err(|e| Status::internal(format!("building the request for {}: {}", path, e)))
    }

    /// Opens a stream for `path`. A request that could not be started on the
    /// current connection (closed, or refused before anything was sent) is
    /// retried once on a fresh one: the server has seen nothing of it.
    async fn start(
        &self,
        path: &str,
        timeout: Option<Duration>,
    ) -> Result<(ResponseFuture, SendStream<Bytes>), Status> {
        let mut last_error = None;
        for _ in 0..2 {
            let conn = self.connection().await?;
            let mut sender = match conn.sender.clone().ready().await {
                Ok(sender) => sender,
                Err(e) => {
                    self.discard(conn.generation).await;
                    last_error = Some(Status::from_h2(&e));
                    continue;
                }
            };
            match sender.send_request(self.request(path, timeout)?, false) {
                Ok(pair) => return Ok(pair),
                Err(e) => {
                    self.discard(conn.generation).await;
                    last_error = Some(Status::from_h2(&e));
                }
            }
        }
        Err(last_error.unwrap_or_else(|| Status::unavailable("could not start the call")))
    }

    /// A unary call: one request message, one response message.
    pub async fn unary<Q, R>(
        &self,
        path: &str,
        request: &Q,
        timeout: Option<Duration>,
    ) -> Result<R, Status>
    where
        Q: Message,
        R: Message + Default,
    {
        let max = self.inner.options.max_message_size;
        let body = codec::encode(request, max)?;
        let deadline = timeout.map(|t| Instant::now() + t);
        let call = async {
            let (response, mut send) = self.start(path, timeout).await?;
            let mut responses = Streaming::<R>::new(response, max, None);
            let sending = send_all(&mut send, body, true);
            let receiving = async {
                let message = match responses.message().await? {
                    Some(m) => m,
                    None => {
                        return Err(Status::internal(
                            "server ended a unary call with OK but no response message",
                        ))
                    }
                };
                match responses.message().await? {
                    None => Ok(message),
                    Some(_) => Err(Status::internal(
                        "server sent more than one message for a unary call",
                    )),
                }
            };
            tokio::pin!(sending, receiving);
            // Send and receive together: a server may answer (e.g. with an error
            // status) before it has read a request larger than its window, and
            // then the answer, not the failed send, is what matters.
            let mut sent = false;
            loop {
                tokio::select! {
                    result = &mut receiving => return result,
                    _ = &mut sending, if !sent => sent = true,
                }
            }
        };
        with_deadline(deadline, call).await
    }

    /// A bidirectional streaming call. Messages go out through the returned sink
    /// and come back through the returned stream, independently.
    pub async fn streaming<Q, R>(
        &self,
        path: &str,
        timeout: Option<Duration>,
    ) -> Result<(RequestSink<Q>, Streaming<R>), Status>
    where
        Q: Message,
        R: Message + Default,
    {
        let deadline = timeout.map(|t| Instant::now() + t);
        let (response, send) = with_deadline(deadline, self.start(path, timeout)).await?;
        let max = self.inner.options.max_message_size;
        let sink = RequestSink {
            send,
            max_message_size: max,
            deadline,
            finished: false,
            _message: PhantomData,
        };
        Ok((sink, Streaming::new(response, max, deadline)))
    }
}

async fn with_deadline<T, F>(deadline: Option<Instant>, fut: F) -> Result<T, Status>
where
    F: Future<Output = Result<T, Status>>,
{
    match deadline {
        Some(deadline) => match tokio::time::timeout_at(deadline, fut).await {
            Ok(result) => result,
            Err(_) => Err(Status::deadline_exceeded()),
        },
        None => fut.await,
    }
}

/// Writes `data` no faster than the peer's flow-control window allows, so
/// nothing piles up in h2's (unbounded) send buffer and a slow server pushes
/// back on the sender.
pub(crate) async fn send_all(
    send: &mut SendStream<Bytes>,
    mut data: Bytes,
    end_of_stream: bool,
) -> Result<(), Status> {
    if data.is_empty() {
        return send
            .send_data(data, end_of_stream)
            .map_err(|e| Status::from_h2(&e));
    }
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        while send.capacity() == 0 {
            match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(Status::from_h2(&e)),
                None => {
                    return Err(Status::unavailable(
                        "the server closed the stream while the request was being sent",
                    ))
                }
            }
        }
        let chunk = data.split_to(send.capacity().min(data.len()));
        send.send_data(chunk, end_of_stream && data.is_empty())
            .map_err(|e| Status::from_h2(&e))?;
    }
    Ok(())
}

/// The sending half of a streaming call.
pub struct RequestSink<Q> {
    send: SendStream<Bytes>,
    max_message_size: usize,
    deadline: Option<Instant>,
    finished: bool,
    _message: PhantomData<fn(Q)>,
}

impl<Q: Message> RequestSink<Q> {
    /// Sends one message; waits while the server's window is full.
    pub async fn send(&mut self, message: &Q) -> Result<(), Status> {
        let framed = codec::encode(message, self.max_message_size)?;
        with_deadline(self.deadline, send_all(&mut self.send, framed, false)).await
    }

    /// Half-closes the call: no more messages; responses keep coming.
    pub fn finish(mut self) -> Result<(), Status> {
        self.finished = true;
        self.send
            .send_data(Bytes::new(), true)
            .map_err(|e| Status::from_h2(&e))
    }
}

impl<Q> Drop for RequestSink<Q> {
    /// Dropped without `finish`: the caller gave up, so cancel the call rather
    /// than leave the server waiting for more messages.
    fn drop(&mut self) {
        if !self.finished {
            self.send.send_reset(h2::Reason::CANCEL);
        }
    }
}

enum State {
    AwaitingHeaders(ResponseFuture),
    Body(RecvStream),
    Done,
}

/// The receiving half of a call: messages, then the final status.
pub struct Streaming<R> {
    state: State,
    decoder: Decoder,
    deadline: Option<Instant>,
    _message: PhantomData<fn() -> R>,
}

impl<R: Message + Default> Streaming<R> {
    fn new(
        response: ResponseFuture,
        max_message_size: usize,
        deadline: Option<Instant>,
    ) -> Streaming<R> {
        Streaming {
            state: State::AwaitingHeaders(response),
            decoder: Decoder::new(max_message_size),
            deadline,
            _message: PhantomData,
        }
    }

    /// The next message; `Ok(None)` once the server ended the call with OK, or
    /// the server's (or the transport's) status as the error. After the end,
    /// always `Ok(None)`.
    pub async fn message(&mut self) -> Result<Option<R>, Status> {
        let deadline = self.deadline;
        let result = with_deadline(deadline, self.next()).await;
        if result.is_err() {
            self.state = State::Done;
        }
        result
    }

    async fn next(&mut self) -> Result<Option<R>, Status> {
        loop {
            match &mut self.state {
                State::Done => return Ok(None),
                State::AwaitingHeaders(response) => {
                    let response = response.await.map_err(|e| Status::from_h2(&e))?;
                    self.state = Self::on_headers(response)?;
                }
                State::Body(body) => {
                    if let Some(payload) = self.decoder.next_message()? {
                        return codec::decode(payload).map(Some);
                    }
                    match body.data().await {
                        Some(Ok(chunk)) => {
                            // Hand the window back at once: the decoder holds at
                            // most one message, so memory stays bounded.
                            let _ = body.flow_control().release_capacity(chunk.len());
                            self.decoder.push(&chunk);
                        }
                        Some(Err(e)) => return Err(Status::from_h2(&e)),
                        None => {
                            if self.decoder.has_partial() {
                                return Err(Status::internal(
                                    "the response ended in the middle of a message",
                                ));
                            }
                            let trailers =
                                body.trailers().await.map_err(|e| Status::from_h2(&e))?;
                            self.state = State::Done;
                            let status = trailers
                                .as_ref()
                                .and_then(Status::from_headers)
                                .unwrap_or_else(|| {
                                    Status::internal(
                                        "the response ended without a grpc-status trailer",
                                    )
                                });
                            return if status.is_ok() {
                                Ok(None)
                            } else {
                                Err(status)
                            };
                        }
                    }
                }
            }
        }
    }

    /// Checks the response headers; a trailers-only response (grpc-status in the
    /// headers, no body) ends the call here.
    fn on_headers(response: http::Response<RecvStream>) -> Result<State, Status> {
        let (head, body) = response.into_parts();
        if let Some(status) = Status::from_headers(&head.headers) {
            return if status.is_ok() {
                Ok(State::Done)
            } else {
                Err(status)
            };
        }
        if head.status != http::StatusCode::OK {
            return Err(Status::from_http_status(head.status));
        }
        let content_type = head
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !content_type.starts_with("application/grpc") {
            return Err(Status::new(
                Code::Unknown,
                format!("unexpected content-type {:?} in the response", content_type),
            ));
        }
        Ok(State::Body(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_target_is_the_default_socket() {
        // The only test that touches the variable: tests run in parallel threads.
        std::env::set_var("AKIDB_EMBED_SOCKET", "/run/akidb-embed/embed.sock");
        assert_eq!(
            Target::parse("").unwrap(),
            Target::Unix(PathBuf::from("/run/akidb-embed/embed.sock"))
        );
        std::env::remove_var("AKIDB_EMBED_SOCKET");
        let fallback = default_socket_path();
        let shown = fallback.to_string_lossy().into_owned();
        assert!(
            shown.ends_with("/akidb-embed/embed.sock") || shown.starts_with("/tmp/akidb-embed-")
        );
        assert_eq!(Target::parse(" ").unwrap(), Target::Unix(fallback));
        assert_eq!(
            Target::parse("localhost:50051").unwrap(),
            Target::Tcp("localhost:50051".into())
        );
    }
}
