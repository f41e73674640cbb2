//! A pool of 3 replicas of the real Python server on loopback TCP ports: unary
//! calls spread by round robin, a 20,000-item stream survives one replica killed
//! (-9) and one draining (SIGTERM) mid-stream, and with no replica left the client
//! reports UNAVAILABLE at once. Slow (minutes on 2 cores): `make test-rust` runs
//! them (`cargo test -- --include-ignored`).

mod common;

use std::time::{Duration, Instant};

use akidb_embed_client::{ChannelOptions, Client, Code, StreamItem};
use futures_util::StreamExt;

use common::*;

const N_ITEMS: usize = 20_000;
/// Texts repeat, ids do not: the reference is one batch per distinct text.
const DISTINCT: usize = 1_000;

/// One pool at a time: three replicas already fill two cores.
static ONE_POOL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn text_of(i: usize) -> String {
    format!("passage {} on vectors", i % DISTINCT)
}

async fn pool_client(replicas: &[Replica]) -> Client {
    let addresses: Vec<&str> = replicas.iter().map(|r| r.address.as_str()).collect();
    Client::connect_endpoints(&addresses, ChannelOptions::default())
        .await
        .unwrap()
        .with_timeout(Duration::from_secs(600))
}

#[tokio::test]
#[ignore = "slow: 3 replicas and 20,000 items; make test-rust runs it"]
async fn a_20000_item_stream_survives_a_killed_and_a_draining_replica() {
    let _one = ONE_POOL.lock().unwrap_or_else(|e| e.into_inner());
    let mut replicas = start_replicas(3).await;
    // Every distinct text's vector from one replica alone.
    let single = Client::connect(&replicas[2].address).await.unwrap();
    let texts: Vec<String> = (0..DISTINCT).map(text_of).collect();
    let mut expected = Vec::new();
    for chunk in texts.chunks(250) {
        let out = single.embed("", chunk.to_vec(), None).await.unwrap();
        expected.extend(out.embeddings.into_iter().map(|e| e.vector));
    }

    let client = pool_client(&replicas).await;
    let items = futures_util::stream::iter(
        (0..N_ITEMS).map(|i| StreamItem::new(format!("doc-{}", i), text_of(i))),
    );
    let started = Instant::now();
    let mut results = client.embed_stream(items).await.unwrap();
    let mut seen = 0usize;
    let mut worst = 0.0f64;
    while let Some(result) = results.next().await {
        let result = result.unwrap();
        assert_eq!(
            result.id,
            format!("doc-{}", seen),
            "answers out of order or duplicated"
        );
        let embedding = result.embedding.unwrap();
        assert!(result.space.is_some());
        worst = worst.max(max_abs_diff(&embedding.vector, &expected[seen % DISTINCT]));
        seen += 1;
        if seen == N_ITEMS / 4 {
            replicas[0].kill(); // kill -9 mid-stream
        } else if seen == N_ITEMS / 2 {
            replicas[1].terminate(); // SIGTERM: drains
        }
    }
    let elapsed = started.elapsed();
    let counters = client.counters();
    eprintln!(
        "rust pool stream: {} items in {:.1} s, {:?}, per endpoint {:?}, max abs diff {:e}",
        N_ITEMS,
        elapsed.as_secs_f64(),
        counters,
        client.endpoint_calls(),
        worst
    );
    assert_eq!(seen, N_ITEMS, "every item answered exactly once");
    assert!(worst <= 1e-6, "max abs diff {}", worst);
    assert!(counters.streams_broken >= 1, "{:?}", counters);
    assert!(counters.resent_items >= 1, "{:?}", counters);
    let drained = replicas[1].wait_exit(Duration::from_secs(30));
    assert!(
        drained.map_or(false, |s| s.success()),
        "the draining replica did not exit cleanly: {:?}\n{}",
        drained,
        replicas[1].log_tail()
    );
}

#[tokio::test]
#[ignore = "slow: 3 replicas; make test-rust runs it"]
async fn unary_calls_spread_evenly_and_with_no_replica_left_it_is_unavailable_at_once() {
    let _one = ONE_POOL.lock().unwrap_or_else(|e| e.into_inner());
    let mut replicas = start_replicas(3).await;
    let client = pool_client(&replicas)
        .await
        .with_timeout(Duration::from_secs(30));
    let before: Vec<u64> = client.endpoint_calls().iter().map(|(_, n)| *n).collect();
    let calls = 300;
    for i in 0..calls {
        client
            .embed("", [format!("query {}", i)], None)
            .await
            .unwrap();
    }
    let counts: Vec<u64> = client
        .endpoint_calls()
        .iter()
        .zip(&before)
        .map(|((_, n), b)| n - b)
        .collect();
    eprintln!("unary calls per replica: {:?}", counts);
    assert_eq!(counts.iter().sum::<u64>(), calls);
    let mean = calls as f64 / 3.0;
    assert!(
        counts
            .iter()
            .all(|&c| (c as f64 - mean).abs() <= 0.2 * mean),
        "{:?}",
        counts
    );

    // One replica gone: unary calls keep working (retried on the next one).
    replicas[0].kill();
    for i in 0..30 {
        client
            .embed("", [format!("after kill {}", i)], None)
            .await
            .unwrap();
    }

    for replica in &mut replicas {
        replica.kill();
    }
    let started = Instant::now();
    let err = client.embed("", ["nobody home"], None).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err);
    assert!(err.message().contains("no replica"), "{}", err);
    let items = futures_util::stream::iter(vec![StreamItem::new("a", "nobody home")]);
    let results: Vec<_> = client.embed_stream(items).await.unwrap().collect().await;
    let err = results
        .into_iter()
        .find_map(|r| r.err())
        .expect("the stream fails");
    assert_eq!(err.code(), Code::Unavailable, "{}", err);
    assert!(err.message().contains("no replica"), "{}", err);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_slow_replica_does_not_set_the_pace() {
    // Two scripted replicas, one answering at 200 ms a message. The client sends
    // up to 256 items a message: an even split would give the slow one 16 of the
    // 32 messages, 3.2 s.
    let slow = ScriptedReplica::start(200);
    let fast = ScriptedReplica::start(0);
    let client = Client::connect_endpoints(
        &[slow.address.as_str(), fast.address.as_str()],
        ChannelOptions::default(),
    )
    .await
    .unwrap()
    .with_substreams(2)
    .with_timeout(Duration::from_secs(60));
    let n = 8000usize;
    let items = futures_util::stream::iter(
        (0..n).map(|i| StreamItem::new(format!("i{}", i), format!("text {}", i))),
    );
    let started = Instant::now();
    let mut results = client.embed_stream(items).await.unwrap();
    let mut seen = 0usize;
    while let Some(result) = results.next().await {
        let result = result.unwrap();
        assert_eq!(
            result.id,
            format!("i{}", seen),
            "out of order or duplicated"
        );
        let vector = result.embedding.unwrap().vector;
        assert_eq!(vector, vec![seen as f32]);
        seen += 1;
    }
    let elapsed = started.elapsed();
    let counters = client.counters();
    let calls = client.endpoint_calls();
    eprintln!(
        "slow replica: {} items in {:.2} s, {:?}, streams per endpoint {:?}",
        n,
        elapsed.as_secs_f64(),
        counters,
        calls
    );
    assert_eq!(seen, n, "every item answered exactly once");
    // The slow replica holds at most one message at a time once it is known to be
    // slow, and the late ones are hedged on the fast replica.
    assert!(counters.hedged_items > 0, "{:?}", counters);
    assert!(elapsed < Duration::from_millis(1600), "{:?}", elapsed);
}
