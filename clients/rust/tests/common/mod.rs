//! Starts the real Python server (`python -m akidb_embed serve --socket PATH`)
//! for the integration tests.
//!
//! - `AKIDB_EMBED_PYTHON`: the interpreter (default `python3`); it must have the
//!   server's dependencies (e.g. `/work/main/.venv/bin/python`, or `.venv/bin/python`).
//! - The server and Python client code come from this repository
//!   (`CARGO_MANIFEST_DIR/../..`, or `AKIDB_EMBED_REPO`).
#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use akidb_embed_client::{ChannelOptions, Client};

/// Runs the server's CLI, and SIGTERMs it when stdin closes: when the test
/// drops the server, or when the test process exits without dropping it.
const BOOTSTRAP: &str = r#"
import os, runpy, signal, sys, threading
def _watch_parent():
    while os.read(0, 4096):  # raw fd: a buffered stdin would block interpreter exit
        pass
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=_watch_parent, daemon=True).start()
sys.argv = ["akidb_embed"] + sys.argv[1:]
runpy.run_module("akidb_embed", run_name="__main__", alter_sys=True)
"#;

const OPENBLAS: &str = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3";

pub fn repo_root() -> PathBuf {
    match std::env::var_os("AKIDB_EMBED_REPO") {
        Some(root) => PathBuf::from(root),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
    }
}

pub fn python() -> String {
    std::env::var("AKIDB_EMBED_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// A command for `python()` with the repository's server and client importable.
pub fn python_command() -> Command {
    let root = repo_root();
    let mut cmd = Command::new(python());
    cmd.env(
        "PYTHONPATH",
        format!(
            "{}:{}",
            root.join("server").display(),
            root.join("clients/python").display()
        ),
    );
    // MLX's CPU matmuls are ~50x faster with OpenBLAS; it must be loaded at start.
    if std::env::var_os("LD_PRELOAD").is_none() && Path::new(OPENBLAS).exists() {
        cmd.env("LD_PRELOAD", OPENBLAS);
    }
    cmd
}

pub struct Server {
    child: Option<(Child, ChildStdin)>,
    pub socket: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    pub fn start() -> Server {
        let dir = tempfile::Builder::new()
            .prefix("akidb-embed-rs")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("embed.sock");
        let log = dir.path().join("server.log");
        let mut server = Server {
            child: None,
            socket,
            log,
            _dir: dir,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut child = python_command()
            .args(["-c", BOOTSTRAP, "serve", "--socket"])
            .arg(&self.socket)
            .stdin(Stdio::piped())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {} (set AKIDB_EMBED_PYTHON): {}", python(), e));
        let stdin = child.stdin.take().unwrap();
        self.child = Some((child, stdin));
    }

    pub fn target(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Graceful stop (SIGTERM through the closed stdin), SIGKILL after 20 s.
    pub fn stop(&mut self) {
        if let Some((mut child, stdin)) = self.child.take() {
            drop(stdin);
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(20) {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// A client that has seen the server report SERVING.
    pub async fn client(&self) -> Client {
        self.client_with(ChannelOptions::default()).await
    }

    pub async fn client_with(&self, options: ChannelOptions) -> Client {
        let client = Client::lazy(&self.target(), options).unwrap();
        if let Err(e) = client.wait_until_serving(Duration::from_secs(180)).await {
            panic!("{}\nserver log:\n{}", e, self.log_tail());
        }
        client
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

static SHARED: Mutex<Option<Server>> = Mutex::new(None);

/// One server shared by the tests of a test binary. It is never dropped: when
/// the test process exits its stdin closes and it shuts itself down.
pub async fn shared_client() -> Client {
    shared_client_with(ChannelOptions::default()).await
}

pub async fn shared_client_with(options: ChannelOptions) -> Client {
    let target = {
        let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert_with(Server::start).target()
    };
    let client = Client::lazy(&target, options).unwrap();
    if let Err(e) = client.wait_until_serving(Duration::from_secs(180)).await {
        let log = SHARED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|s| s.log_tail());
        panic!("{}\nserver log:\n{}", e, log.unwrap_or_default());
    }
    client
}

pub fn shared_target() -> String {
    let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    slot.get_or_insert_with(Server::start).target()
}

/// What the Python client (`akidb_embed_client.EmbedClient`) gets for `texts`.
pub struct PythonEmbeddings {
    pub model: String,
    pub fingerprint: String,
    pub vectors: Vec<Vec<f32>>,
    pub token_counts: Vec<u32>,
}

const PYTHON_EMBED: &str = r#"
import sys
from akidb_embed_client import EmbedClient
texts = sys.stdin.read().split("\n")
with EmbedClient(sys.argv[1], timeout=120) as client:
    result = client.embed(texts)
print(result.model)
print(result.space.fingerprint)
for count, vector in zip(result.token_counts, result.vectors):
    print(count, " ".join(repr(float(v)) for v in vector))
"#;

/// Embeds `texts` (no newlines in them) through the Python client.
pub fn python_embed(target: &str, texts: &[&str]) -> PythonEmbeddings {
    let mut child = python_command()
        .args(["-c", PYTHON_EMBED, target])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(texts.join("\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let model = lines.next().unwrap().to_string();
    let fingerprint = lines.next().unwrap().to_string();
    let mut vectors = Vec::new();
    let mut token_counts = Vec::new();
    for line in lines {
        let mut fields = line.split(' ');
        token_counts.push(fields.next().unwrap().parse().unwrap());
        // Python prints each float32 widened to a double, exactly; narrowing back is exact.
        vectors.push(fields.map(|v| v.parse::<f64>().unwrap() as f32).collect());
    }
    PythonEmbeddings {
        model,
        fingerprint,
        vectors,
        token_counts,
    }
}

pub fn norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|x| (*x as f64) * (*x as f64))
        .sum::<f64>()
        .sqrt()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max)
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    dot / (norm(a) * norm(b))
}

/// One server process on a loopback TCP port (`serve --no-socket --port 0`, one
/// engine in the process), its address read from its log.
pub struct Replica {
    child: Option<(Child, ChildStdin)>,
    pub address: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Replica {
    pub fn start() -> Replica {
        let dir = tempfile::Builder::new()
            .prefix("akidb-embed-replica")
            .tempdir()
            .unwrap();
        let log = dir.path().join("server.log");
        let file = File::create(&log).unwrap();
        let mut child = python_command()
            .args(["-c", BOOTSTRAP, "serve", "--no-socket", "--port", "0"])
            .args(["--workers", "0", "--grace", "20"])
            .stdin(Stdio::piped())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {} (set AKIDB_EMBED_PYTHON): {}", python(), e));
        let stdin = child.stdin.take().unwrap();
        Replica {
            child: Some((child, stdin)),
            address: String::new(),
            log,
            _dir: dir,
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Waits for the address in the log, then for SERVING.
    pub async fn wait_serving(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        while self.address.is_empty() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(rest) = text.split("listening on ").nth(1) {
                let line = rest.lines().next().unwrap_or("");
                if let Some(a) = line.split(", ").find(|a| a.starts_with("127.0.0.1:")) {
                    self.address = a.trim().to_string();
                }
            }
            if let Some((child, _)) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("replica exited {}:\n{}", status, self.log_tail());
                }
            }
            assert!(
                Instant::now() < deadline,
                "no address:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let client = Client::lazy(&self.address, ChannelOptions::default()).unwrap();
        let left = deadline.saturating_duration_since(Instant::now());
        if let Err(e) = client.wait_until_serving(left).await {
            panic!("{}\nreplica log:\n{}", e, self.log_tail());
        }
    }

    /// kill -9: no drain, connections reset.
    pub fn kill(&mut self) {
        if let Some((mut child, _stdin)) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM: NOT_SERVING, new items UNAVAILABLE, in-flight ones answered, exit.
    pub fn terminate(&mut self) {
        if let Some((child, _)) = self.child.as_ref() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
    }

    /// Waits for the process to exit; its exit status.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let started = Instant::now();
        let (child, _) = self.child.as_mut()?;
        while started.elapsed() < within {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some((mut child, stdin)) = self.child.take() {
            drop(stdin); // SIGTERM through the closed stdin
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(20) {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `n` replicas, started together, each SERVING.
pub async fn start_replicas(n: usize) -> Vec<Replica> {
    let mut replicas: Vec<Replica> = (0..n).map(|_| Replica::start()).collect();
    for replica in &mut replicas {
        replica.wait_serving(Duration::from_secs(180)).await;
    }
    replicas
}

/// A scripted replica: a few lines of grpc.aio that answer `EmbedStream` with
/// each item's number (ids are "i<number>") as its one-dimensional vector, after
/// `delay_ms` per message. It takes every message at once, as a transport does,
/// and answers them in order. No model: the tests of the client's spreading.
const SCRIPTED: &str = r#"
import asyncio, os, sys, threading
import numpy as np, grpc
from akidb.embedding.v1 import embedding_service_pb2 as pb, embedding_service_pb2_grpc as pbg
delay = int(sys.argv[1]) / 1000
def _watch_parent():
    while os.read(0, 4096):
        pass
    os._exit(0)
threading.Thread(target=_watch_parent, daemon=True).start()
class Scripted(pbg.EmbeddingServiceServicer):
    async def EmbedStream(self, requests, context):
        inbox = asyncio.Queue()
        async def read():
            async for request in requests:
                await inbox.put(request)
            await inbox.put(None)
        reader = asyncio.ensure_future(read())
        while (request := await inbox.get()) is not None:
            await asyncio.sleep(delay)
            ids = list(request.ids)
            values = np.array([float(i[1:]) for i in ids], "<f4")
            yield pb.EmbedStreamResponse(
                ids=ids,
                embeddings=pb.EmbeddingBatch(vectors=values.tobytes(), dimensions=1,
                    token_counts=[1] * len(ids), truncated=[False] * len(ids)),
                space=pb.EmbeddingSpace(fingerprint="scripted", dimensions=1),
            )
        await reader
async def main():
    server = grpc.aio.server()
    pbg.add_EmbeddingServiceServicer_to_server(Scripted(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()
asyncio.run(main())
"#;

pub struct ScriptedReplica {
    child: Child,
    _stdin: ChildStdin,
    pub address: String,
}

impl ScriptedReplica {
    pub fn start(delay_ms: u64) -> ScriptedReplica {
        let mut child = python_command()
            .args(["-c", SCRIPTED, &delay_ms.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {} (set AKIDB_EMBED_PYTHON): {}", python(), e));
        let stdin = child.stdin.take().unwrap();
        let mut line = String::new();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
        assert!(
            line.starts_with("127.0.0.1:"),
            "scripted replica said {:?}",
            line
        );
        ScriptedReplica {
            child,
            _stdin: stdin,
            address: line.trim().to_string(),
        }
    }
}

impl Drop for ScriptedReplica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
