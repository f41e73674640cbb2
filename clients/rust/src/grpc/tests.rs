//! The gRPC layer against an in-process HTTP/2 server (h2's server half) whose
//! windows are h2's defaults (65,535 bytes), so large messages must be
//! flow-controlled in both directions.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use super::channel::send_all;
use super::codec::{self, Decoder};
use super::*;
use crate::pb::EmbedRequest;

const ECHO: &str = "/t.S/Echo";

struct TestServer {
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    fn start(path: &Path) -> TestServer {
        let _ = std::fs::remove_file(path);
        TestServer::serve(Listener::Unix(UnixListener::bind(path).unwrap()))
    }

    /// On 127.0.0.1, a free port; returns `host:port` too.
    async fn start_tcp() -> (TestServer, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        (TestServer::serve(Listener::Tcp(listener)), address)
    }

    fn serve(listener: Listener) -> TestServer {
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, rx));
        TestServer { shutdown, task }
    }

    /// Closes the listener and every connection, as a server exit does.
    async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<Box<dyn Io>> {
        Ok(match self {
            Listener::Unix(l) => Box::new(l.accept().await?.0),
            Listener::Tcp(l) => Box::new(l.accept().await?.0),
        })
    }
}

async fn accept_loop(listener: Listener, mut shutdown: watch::Receiver<bool>) {
    let mut connections = Vec::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let io = accepted.unwrap();
                let mut rx = shutdown.clone();
                connections.push(tokio::spawn(async move {
                    let mut conn = h2::server::handshake(io).await.unwrap();
                    loop {
                        tokio::select! {
                            next = conn.accept() => match next {
                                Some(Ok((req, respond))) => { tokio::spawn(handle(req, respond)); }
                                _ => break,
                            },
                            _ = rx.changed() => break,
                        }
                    }
                }));
            }
            _ = shutdown.changed() => break,
        }
    }
    for c in connections {
        let _ = c.await;
    }
}

fn grpc_headers() -> Response<()> {
    Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(())
        .unwrap()
}

fn status_trailers(code: u32, message: &str) -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert(
        "grpc-status",
        HeaderValue::from_str(&code.to_string()).unwrap(),
    );
    if !message.is_empty() {
        t.insert("grpc-message", HeaderValue::from_str(message).unwrap());
    }
    t
}

/// Reads the next request message, releasing flow-control capacity as it goes.
async fn read_message(body: &mut RecvStream, decoder: &mut Decoder) -> Option<EmbedRequest> {
    loop {
        if let Some(p) = decoder.next_message().unwrap() {
            return Some(codec::decode(p).unwrap());
        }
        let chunk = body.data().await?.ok()?;
        let _ = body.flow_control().release_capacity(chunk.len());
        decoder.push(&chunk);
    }
}

async fn handle(req: Request<RecvStream>, mut respond: SendResponse<Bytes>) {
    let (head, mut body) = req.into_parts();
    let mut decoder = Decoder::new(usize::MAX);
    let header = |name: &str| {
        head.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    match head.uri.path() {
        // Echoes every request message as it arrives (unary and bidi).
        ECHO => {
            let mut send = respond.send_response(grpc_headers(), false).unwrap();
            while let Some(m) = read_message(&mut body, &mut decoder).await {
                if send_all(&mut send, codec::encode(&m, usize::MAX).unwrap(), false)
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let _ = send.send_trailers(status_trailers(0, ""));
        }
        // Answers with what the client sent in its headers.
        "/t.S/Headers" => {
            read_message(&mut body, &mut decoder).await;
            let seen = EmbedRequest {
                model: head.method.to_string(),
                texts: vec![
                    header("content-type"),
                    header("te"),
                    header("grpc-timeout"),
                    header("user-agent"),
                    head.uri
                        .authority()
                        .map(|a| a.to_string())
                        .unwrap_or_default(),
                ],
                options: None,
            };
            let mut send = respond.send_response(grpc_headers(), false).unwrap();
            send_all(&mut send, codec::encode(&seen, usize::MAX).unwrap(), false)
                .await
                .unwrap();
            send.send_trailers(status_trailers(0, "")).unwrap();
        }
        // Trailers-only error, before reading any of the request.
        "/t.S/TrailersOnly" => {
            let mut response = grpc_headers();
            response
                .headers_mut()
                .extend(status_trailers(5, "model %22nope%22 not found"));
            respond.send_response(response, true).unwrap();
        }
        // One echoed message, then an error status in the trailers.
        "/t.S/FailAfterOne" => {
            let m = read_message(&mut body, &mut decoder).await.unwrap();
            let mut send = respond.send_response(grpc_headers(), false).unwrap();
            send_all(&mut send, codec::encode(&m, usize::MAX).unwrap(), false)
                .await
                .unwrap();
            send.send_trailers(status_trailers(3, "text 2 is empty: send non-empty texts"))
                .unwrap();
        }
        "/t.S/Sleep" => {
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        "/t.S/Http503" => {
            let response = Response::builder()
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .body(())
                .unwrap();
            respond.send_response(response, true).unwrap();
        }
        "/t.S/NoTrailers" => {
            read_message(&mut body, &mut decoder).await;
            let mut send = respond.send_response(grpc_headers(), false).unwrap();
            send_all(
                &mut send,
                codec::encode(&EmbedRequest::default(), usize::MAX).unwrap(),
                true,
            )
            .await
            .unwrap();
        }
        "/t.S/TwoMessages" => {
            read_message(&mut body, &mut decoder).await;
            let mut send = respond.send_response(grpc_headers(), false).unwrap();
            for _ in 0..2 {
                send_all(
                    &mut send,
                    codec::encode(&EmbedRequest::default(), usize::MAX).unwrap(),
                    false,
                )
                .await
                .unwrap();
            }
            send.send_trailers(status_trailers(0, "")).unwrap();
        }
        _ => {
            let mut response = grpc_headers();
            response
                .headers_mut()
                .extend(status_trailers(12, "unknown method"));
            respond.send_response(response, true).unwrap();
        }
    }
}

fn socket() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.sock");
    (dir, path)
}

fn small_window() -> ChannelOptions {
    ChannelOptions {
        stream_window: 65_535,
        connection_window: 65_535,
        ..ChannelOptions::default()
    }
}

fn texts(n: usize, len: usize) -> EmbedRequest {
    EmbedRequest {
        model: "m".into(),
        texts: (0..n)
            .map(|i| format!("{:0width$}", i, width = len))
            .collect(),
        options: None,
    }
}

#[tokio::test]
async fn unary_round_trip_sends_grpc_headers() {
    let (_dir, path) = socket();
    let server = TestServer::start(&path);
    let ch = Channel::connect(Target::Unix(path.clone()), ChannelOptions::default())
        .await
        .unwrap();

    let echoed: EmbedRequest = ch.unary(ECHO, &texts(3, 10), None).await.unwrap();
    assert_eq!(echoed, texts(3, 10));

    let seen: EmbedRequest = ch
        .unary("/t.S/Headers", &texts(1, 1), Some(Duration::from_secs(7)))
        .await
        .unwrap();
    assert_eq!(seen.model, "POST");
    assert_eq!(seen.texts[0], "application/grpc");
    assert_eq!(seen.texts[1], "trailers");
    assert_eq!(seen.texts[2], "7000000u");
    assert!(seen.texts[3].starts_with("akidb-embed-client-rust/"));
    assert_eq!(seen.texts[4], "localhost");
    server.stop().await;
}

#[tokio::test]
async fn messages_larger_than_both_windows_pass_both_ways() {
    let (_dir, path) = socket();
    let server = TestServer::start(&path);
    for options in [small_window(), ChannelOptions::default()] {
        let ch = Channel::connect(Target::Unix(path.clone()), options)
            .await
            .unwrap();
        // ~1 MiB: 16 times the server's receive window and the client's.
        let big = texts(256, 4096);
        let echoed: EmbedRequest = ch
            .unary(ECHO, &big, Some(Duration::from_secs(20)))
            .await
            .unwrap();
        assert_eq!(echoed, big);
        // Several big calls at once share the connection window.
        let calls = (0..4).map(|_| ch.unary::<_, EmbedRequest>(ECHO, &big, None));
        for r in futures_util::future::join_all(calls).await {
            assert_eq!(r.unwrap(), big);
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn trailers_only_error_surfaces_code_and_decoded_message() {
    let (_dir, path) = socket();
    let server = TestServer::start(&path);
    let ch = Channel::connect(Target::Unix(path.clone()), small_window())
        .await
        .unwrap();
    // Small request, and one far over the window the server never reads.
    for req in [texts(1, 1), texts(64, 4096)] {
        let err = ch
            .unary::<_, EmbedRequest>("/t.S/TrailersOnly", &req, None)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        assert_eq!(err.message(), "model \"nope\" not found");
    }
    let err = ch
        .unary::<_, EmbedRequest>("/t.S/Missing", &texts(1, 1), None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    server.stop().await;
}

#[tokio::test]
async fn malformed_responses_are_errors() {
    let (_dir, path) = socket();
    let server = TestServer::start(&path);
    let ch = Channel::connect(Target::Unix(path.clone()), ChannelOptions::default())
        .await
        .unwrap();
    let code = |path: &'static str| {
        let ch = ch.clone();
        async move {
            ch.unary::<_, EmbedRequest>(path, &texts(1, 1), None)
                .await
                .unwrap_err()
                .code()
        }
    };
    assert_eq!(code("/t.S/Http503").await, Code::Unavailable);
    assert_eq!(code("/t.S/NoTrailers").await, Code::Internal);
    assert_eq!(code("/t.S/TwoMessages").await, Code::Internal);
    server.stop().await;
}

#[tokio::test]
async fn deadline_expires_locally_and_the_channel_stays_usable() {
    let (_dir, path) = socket();
    let server = TestServer::start(&path);
    let ch = Channel::connect(Target::Unix(path.clone()), ChannelOptions::default())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let err = ch
        .unary::<_, EmbedRequest>("/t.S/Sleep", &texts(1, 1), Some(Duration::from_millis(50)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let ok: EmbedRequest = ch.unary(ECHO, &texts(1, 1), None).await.unwrap();
    assert_eq!(ok, texts(1, 1));
    server.stop().await;
}

#[tokio::test]
async fn bidi_stream_receives_while_sending() {
    let (_dir, path) = socket();
    let server = TestServer::start(&path);
    let ch = Channel::connect(Target::Unix(path.clone()), small_window())
        .await
        .unwrap();
    let (mut sink, mut responses) = ch
        .streaming::<EmbedRequest, EmbedRequest>(ECHO, None)
        .await
        .unwrap();
    // Lock-step: each reply arrives before the next request is sent, which
    // only works if the response is readable while the request is open.
    for i in 0..100 {
        let m = texts(1, i);
        sink.send(&m).await.unwrap();
        assert_eq!(responses.message().await.unwrap(), Some(m));
    }
    // And bulk: 2,000 x 1 KiB sent by one task while another receives.
    let sender = tokio::spawn(async move {
        for i in 0..2000 {
            sink.send(&texts(1, 1024 + i % 7)).await.unwrap();
        }
        sink.finish().unwrap();
    });
    for i in 0..2000 {
        assert_eq!(
            responses.message().await.unwrap(),
            Some(texts(1, 1024 + i % 7))
        );
    }
    assert_eq!(responses.message().await.unwrap(), None);
    assert_eq!(responses.message().await.unwrap(), None);
    sender.await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn stream_error_status_after_messages() {
    let (_dir, path) = socket();
    let server = TestServer::start(&path);
    let ch = Channel::connect(Target::Unix(path.clone()), ChannelOptions::default())
        .await
        .unwrap();
    let (mut sink, mut responses) = ch
        .streaming::<EmbedRequest, EmbedRequest>("/t.S/FailAfterOne", None)
        .await
        .unwrap();
    sink.send(&texts(1, 3)).await.unwrap();
    assert_eq!(responses.message().await.unwrap(), Some(texts(1, 3)));
    let err = responses.message().await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "text 2 is empty: send non-empty texts");
    assert_eq!(responses.message().await.unwrap(), None);
    drop(sink);
    server.stop().await;
}

#[tokio::test]
async fn redials_after_the_server_restarts() {
    let (_dir, path) = socket();
    let server = TestServer::start(&path);
    let ch = Channel::connect(Target::Unix(path.clone()), ChannelOptions::default())
        .await
        .unwrap();
    let _: EmbedRequest = ch.unary(ECHO, &texts(1, 1), None).await.unwrap();
    server.stop().await;

    let down = ch
        .unary::<_, EmbedRequest>(ECHO, &texts(1, 1), None)
        .await
        .unwrap_err();
    assert_eq!(down.code(), Code::Unavailable, "{}", down);

    let server = TestServer::start(&path);
    let back: EmbedRequest = ch.unary(ECHO, &texts(2, 2), None).await.unwrap();
    assert_eq!(back, texts(2, 2));
    server.stop().await;
}

#[tokio::test]
async fn works_over_tcp_with_the_address_as_authority() {
    let (server, address) = TestServer::start_tcp().await;
    let ch = Channel::connect(Target::parse(&address).unwrap(), small_window())
        .await
        .unwrap();
    let seen: EmbedRequest = ch.unary("/t.S/Headers", &texts(1, 1), None).await.unwrap();
    assert_eq!(seen.texts[4], address);
    let big = texts(64, 4096);
    let echoed: EmbedRequest = ch.unary(ECHO, &big, None).await.unwrap();
    assert_eq!(echoed, big);
    server.stop().await;
}

#[tokio::test]
async fn connect_to_nothing_is_unavailable() {
    let (_dir, path) = socket();
    let err = Channel::connect(Target::Unix(path), ChannelOptions::default())
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("t.sock"), "{}", err);
}

#[test]
fn parses_targets() {
    assert_eq!(
        Target::parse("unix:/run/a.sock").unwrap(),
        Target::Unix("/run/a.sock".into())
    );
    assert_eq!(
        Target::parse("unix:///run/a.sock").unwrap(),
        Target::Unix("/run/a.sock".into())
    );
    assert_eq!(
        Target::parse("/tmp/x.sock").unwrap(),
        Target::Unix("/tmp/x.sock".into())
    );
    assert_eq!(
        Target::parse("./x.sock").unwrap(),
        Target::Unix("./x.sock".into())
    );
    assert_eq!(
        Target::parse("127.0.0.1:50051").unwrap(),
        Target::Tcp("127.0.0.1:50051".into())
    );
    assert_eq!(
        Target::parse("http://localhost:8080/").unwrap(),
        Target::Tcp("localhost:8080".into())
    );
    assert_eq!(
        Target::parse("[::1]:50051").unwrap(),
        Target::Tcp("[::1]:50051".into())
    );
    // "" is the default socket (channel::tests), not an error.
    for bad in ["unix:", "localhost", "host:notaport", ":50051"] {
        assert_eq!(
            Target::parse(bad).unwrap_err().code(),
            Code::InvalidArgument,
            "{:?}",
            bad
        );
    }
}
