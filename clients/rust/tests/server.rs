//! The Rust client against the real Python server (see common/mod.rs).

mod common;

use std::time::{Duration, Instant};

use akidb_embed_client::{ChannelOptions, Code, ServingStatus, StreamItem};
use futures_util::StreamExt;

use common::*;

const TEXTS: [&str; 5] = [
    "The quick brown fox jumps over the lazy dog.",
    "AkiDB stores vectors and searches them by cosine similarity.",
    "Ünïcödé text — with accents, dashes and emoji 🚀.",
    "a",
    "Embedding models map sentences of similar meaning to nearby points in a vector space, \
     which is what lets a database find documents by meaning rather than by exact words.",
];

#[tokio::test]
async fn unary_embed_equals_the_python_clients_vectors() {
    let client = shared_client().await;
    let rust = client.embed("", TEXTS, None).await.unwrap();
    let python = python_embed(&shared_target(), &TEXTS);

    assert_eq!(rust.embeddings.len(), TEXTS.len());
    assert_eq!(rust.model, python.model);
    assert!(!rust.space.fingerprint.is_empty());
    assert_eq!(rust.space.fingerprint, python.fingerprint);
    assert_eq!(
        rust.space.dimensions as usize,
        rust.embeddings[0].vector.len()
    );
    let mut worst_abs = 0.0f64;
    let mut worst_cos = 1.0f64;
    for (i, (r, p)) in rust.embeddings.iter().zip(&python.vectors).enumerate() {
        assert_eq!(r.vector.len(), p.len(), "text {}", i);
        assert_eq!(r.token_count, python.token_counts[i], "text {}", i);
        assert!(
            (norm(&r.vector) - 1.0).abs() < 1e-5,
            "text {} norm {}",
            i,
            norm(&r.vector)
        );
        worst_abs = worst_abs.max(max_abs_diff(&r.vector, p));
        worst_cos = worst_cos.min(cosine(&r.vector, p));
    }
    let total: u64 = rust.embeddings.iter().map(|e| e.token_count as u64).sum();
    assert_eq!(rust.total_tokens, total);
    eprintln!(
        "rust vs python client: max abs diff {:e}, min cosine {}",
        worst_abs, worst_cos
    );
    // Same server, same batch: the vectors must be the same numbers.
    assert!(worst_abs <= 1e-6, "max abs diff {}", worst_abs);
    // And different texts are different vectors (the comparison can fail).
    assert!(cosine(&rust.embeddings[0].vector, &rust.embeddings[1].vector) < 0.9);
}

#[tokio::test]
async fn stream_of_10000_items_is_answered_once_each_in_order() {
    let client = shared_client().await;
    const N: usize = 10_000;
    // Short texts: this checks the stream's bookkeeping, not the model's speed.
    let items = futures_util::stream::iter(
        (0..N).map(|i| StreamItem::new(format!("doc-{}", i), format!("document {}", i))),
    );
    let started = Instant::now();
    let mut results = client.embed_stream(items).await.unwrap();
    let mut seen = 0usize;
    let mut fingerprint = None;
    let mut sample = Vec::new();
    while let Some(result) = results.next().await {
        let result = result.unwrap();
        assert_eq!(
            result.id,
            format!("doc-{}", seen),
            "answers out of order or duplicated"
        );
        let embedding = result.embedding.unwrap();
        assert!((norm(&embedding.vector) - 1.0).abs() < 1e-5);
        let space = result.space.expect("space with every embedding");
        assert_eq!(space.dimensions as usize, embedding.vector.len());
        match &fingerprint {
            None => fingerprint = Some(space.fingerprint.clone()),
            Some(f) => assert_eq!(f, &space.fingerprint),
        }
        if seen % 2500 == 0 {
            sample.push((seen, embedding.vector));
        }
        seen += 1;
    }
    let elapsed = started.elapsed();
    assert_eq!(seen, N, "every item answered exactly once");
    eprintln!(
        "stream: {} items in {:.1} s ({:.0} items/s)",
        N,
        elapsed.as_secs_f64(),
        N as f64 / elapsed.as_secs_f64()
    );
    // Streamed vectors are the unary vectors of the same texts (batches differ: allow float noise).
    for (i, v) in sample {
        let text = format!("document {}", i);
        let unary = client.embed("", [text], None).await.unwrap();
        assert!(cosine(&v, &unary.embeddings[0].vector) > 0.99999);
        assert!(max_abs_diff(&v, &unary.embeddings[0].vector) < 1e-4);
    }
}

#[tokio::test]
async fn a_bad_item_gets_its_own_error_and_the_stream_goes_on() {
    let client = shared_client().await;
    const TEXTS5: [&str; 5] = ["first", "second", "", "fourth", "fifth"];
    let items = futures_util::stream::iter(
        TEXTS5
            .iter()
            .enumerate()
            .map(|(i, t)| StreamItem::new(format!("id{}", i), *t)),
    );
    let results: Vec<_> = client.embed_stream(items).await.unwrap().collect().await;
    assert_eq!(results.len(), 5);
    for (i, result) in results.into_iter().enumerate() {
        let result = result.unwrap();
        assert_eq!(result.id, format!("id{}", i));
        if i == 2 {
            let err = result.embedding.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{}", err);
            assert!(!err.message().is_empty());
        } else {
            assert!(!result.embedding.unwrap().vector.is_empty(), "item {}", i);
        }
    }
}

#[tokio::test]
async fn an_unknown_model_is_not_found() {
    let client = shared_client().await;
    let err = client
        .embed("no-such-model-xyz", ["hello"], None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{}", err);
    assert!(
        err.message().contains("no-such-model-xyz"),
        "{}",
        err.message()
    );

    // In a stream it is the item's error; the next item switches back and succeeds.
    let mut bad = StreamItem::new("bad", "hello");
    bad.model = Some("no-such-model-xyz".into());
    let default_model = client.health().await.unwrap();
    let models = client.list_models().await.unwrap();
    let default = models
        .iter()
        .find(|m| m.is_default)
        .expect("a default model");
    let mut good = StreamItem::new("good", "hello");
    good.model = Some(default.name.clone());
    let results: Vec<_> = client
        .embed_stream(futures_util::stream::iter(vec![bad, good]))
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(
        results[0]
            .as_ref()
            .unwrap()
            .embedding
            .as_ref()
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert!(results[1].as_ref().unwrap().embedding.is_ok());
    assert_eq!(default_model.status, ServingStatus::Serving as i32);
}

#[tokio::test]
async fn messages_larger_than_the_http2_window_go_both_ways() {
    // The smallest windows HTTP/2 allows by default, on our side too.
    let small = ChannelOptions {
        stream_window: 65_535,
        connection_window: 65_535,
        ..ChannelOptions::default()
    };
    for options in [small, ChannelOptions::default()] {
        let client = shared_client_with(options).await;
        // 64 texts of ~4.2 KB: a request over 256 KiB; the response is 64 vectors of
        // 384+ floats, over 96 KiB. One long word is one [UNK] token for WordPiece
        // models, so the server's compute stays small on a busy CI machine.
        let texts: Vec<String> = (0..64)
            .map(|i| format!("text {} {}", i, "x".repeat(4200)))
            .collect();
        let request_bytes: usize = texts.iter().map(|t| t.len()).sum();
        assert!(request_bytes > 4 * 65_535);
        let out = client.embed("", texts, None).await.unwrap();
        assert_eq!(out.embeddings.len(), 64);
        let response_bytes: usize = out.embeddings.iter().map(|e| e.vector.len() * 4).sum();
        assert!(
            response_bytes > 65_535,
            "response only {} bytes",
            response_bytes
        );
        for e in &out.embeddings {
            assert!(e.token_count >= 3);
            assert!((norm(&e.vector) - 1.0).abs() < 1e-5);
        }
    }
}

#[tokio::test]
async fn an_expired_deadline_is_deadline_exceeded_and_the_client_recovers() {
    let client = shared_client().await;
    let texts: Vec<String> = (0..64)
        .map(|i| format!("{} {}", i, "deadline".repeat(500)))
        .collect();
    let started = Instant::now();
    let err = client
        .with_timeout(Duration::from_millis(1))
        .embed("", texts, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // A roomy deadline on the same connection still works.
    let ok = client
        .with_timeout(Duration::from_secs(60))
        .embed("", ["after"], None)
        .await
        .unwrap();
    assert_eq!(ok.embeddings.len(), 1);
}

#[tokio::test]
async fn list_models_and_health_describe_the_server() {
    let client = shared_client().await;
    let models = client.list_models().await.unwrap();
    let default = models
        .iter()
        .find(|m| m.is_default)
        .expect("a default model");
    assert_eq!(
        default.state,
        akidb_embed_client::pb::ModelState::Loaded as i32
    );
    assert!(default.dimensions > 0);
    let out = client.embed(&default.name, ["x"], None).await.unwrap();
    assert_eq!(out.embeddings[0].vector.len(), default.dimensions as usize);
    assert_eq!(out.model, default.name);

    let health = client.health().await.unwrap();
    assert_eq!(health.status, ServingStatus::Serving as i32);
    assert!(!health.version.is_empty());
    assert!(health.uptime_seconds > 0.0);
    assert!(health.models.iter().any(|m| m.name == default.name));
    let limits = health.limits.expect("the server's limits");
    assert!(limits.max_texts_per_request > 0);
    assert!(limits.stream_window > 0);
    assert!(limits.max_message_bytes > 0);
    assert!(health.workers_ready <= health.workers_configured);
}

#[tokio::test]
async fn the_client_reconnects_after_the_server_restarts() {
    let mut server = Server::start();
    let client = server.client().await;
    let before = client.embed("", ["restart me"], None).await.unwrap();

    server.stop();
    let down = client.embed("", ["restart me"], None).await.unwrap_err();
    assert_eq!(down.code(), Code::Unavailable, "{}", down);

    server.restart();
    client
        .wait_until_serving(Duration::from_secs(180))
        .await
        .unwrap();
    let after = client.embed("", ["restart me"], None).await.unwrap();
    assert_eq!(after.space.fingerprint, before.space.fingerprint);
    assert!(max_abs_diff(&after.embeddings[0].vector, &before.embeddings[0].vector) < 1e-6);
}

#[tokio::test]
async fn chunked_int8_rows_come_back_typed_with_byte_ranges() {
    use akidb_embed_client::encoding::Vectors;
    use akidb_embed_client::pb;

    let client = shared_client().await;
    // Long enough for several windows of 32 tokens; multi-byte characters included.
    let text = "Ünïcödé vectors — 🚀 are stored and searched by meaning. ".repeat(20);
    let options = pb::EmbedOptions {
        truncation: pb::TruncationPolicy::Chunk as i32,
        chunk_tokens: 32,
        encoding: pb::Encoding::Int8 as i32,
        ..Default::default()
    };
    let out = client
        .embed("", [text.as_str()], Some(options))
        .await
        .unwrap();
    assert_eq!(out.embeddings.len(), 1);
    let chunks = &out.embeddings[0].chunks;
    assert!(chunks.len() > 2, "{} windows", chunks.len());
    let mut covered = 0usize;
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c.chunk.index as usize, i);
        // The database slices UTF-8 bytes: every range is a valid str slice of the text.
        let slice = &text[c.chunk.byte_start as usize..c.chunk.byte_end as usize];
        assert_eq!(
            slice.chars().count() as u32,
            c.chunk.char_end - c.chunk.char_start
        );
        // No gaps: each window starts where the last ended, or before (overlap).
        assert!(
            c.chunk.byte_start as usize <= covered,
            "gap before window {}",
            i
        );
        covered = c.chunk.byte_end as usize;
        match &c.encoded {
            Some(Vectors::Int8(values)) => assert_eq!(values.len(), 384),
            other => panic!("window {} came back as {:?}", i, other),
        }
    }
    assert!(covered >= text.trim_end().len());
}
