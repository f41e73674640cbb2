//! How the database calls the sidecar: connect, embed a query, stream a corpus.
//!
//!     cargo run --example embed -- unix:/run/akidb-embed/embed.sock 1000
//!
//! With no target (or ""), the server's default socket: $AKIDB_EMBED_SOCKET, else the
//! per-user path `akidb-embed serve` uses.

use std::time::{Duration, Instant};

use akidb_embed_client::{Client, Code, StreamItem};
use futures_util::StreamExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let target = args.next().unwrap_or_default();
    let n: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1000);

    let client = Client::connect(&target)
        .await?
        .with_timeout(Duration::from_secs(30));

    // Query path: one text, the server's default model.
    let query = client
        .embed("", ["what is a vector database?"], None)
        .await?;
    let space = &query.space;
    println!(
        "query: {} dims, {} tokens, space {} ({} @ {})",
        query.embeddings[0].vector.len(),
        query.embeddings[0].token_count,
        space.fingerprint,
        space.model_id,
        space.revision
    );

    // Errors carry the server's status code.
    match client.embed("no-such-model", ["x"], None).await {
        Err(e) if e.code() == Code::NotFound => println!("unknown model: {}", e.message()),
        other => println!("unexpected: {:?}", other.map(|r| r.model)),
    }

    // Bulk path: ids in, results out as they come; no deadline for the whole stream.
    let bulk = Client::connect(&target).await?;
    let docs = futures_util::stream::iter(
        (0..n).map(|i| StreamItem::new(i.to_string(), format!("document {}", i))),
    );
    let started = Instant::now();
    let mut results = bulk.embed_stream(docs).await?;
    let (mut ok, mut failed) = (0usize, 0usize);
    while let Some(result) = results.next().await {
        match result?.embedding {
            Ok(_vector) => ok += 1,
            Err(_item_error) => failed += 1,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "stream: {} ok, {} failed in {:.2} s ({:.0}/s)",
        ok,
        failed,
        secs,
        n as f64 / secs
    );
    Ok(())
}
