//! `embed_stream` over one or many endpoints: the caller's items, cut into
//! messages, spread over concurrent sub-streams (one per endpoint by default),
//! results merged back in the caller's order.
//!
//! Every sub-stream keeps the messages it has sent and not yet had answered (the
//! server answers a stream's messages in order). When a sub-stream breaks with
//! UNAVAILABLE or CANCELLED (its replica died or went away), or its replica
//! answers items with UNAVAILABLE (it is draining), those items go out again on
//! another sub-stream, and the endpoint is skipped for a while. Each id is
//! answered exactly once; nothing is kept on the servers. A sub-stream takes new
//! messages only while it has less than its share of the in-flight items, so a
//! slow replica gets fewer of them.
//!
//! One slow replica does not set the pace (as in the Python client): a
//! sub-stream whose answers take `SLOW_FACTOR` times the quickest one's gets one
//! message at a time, and a message unanswered for `HEDGE_FACTOR` times the
//! quickest answer time (at least `HEDGE_MIN`) is sent again on an idle
//! sub-stream. The first answer wins; the later one is dropped.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_core::Stream;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

use crate::client::{
    decode_stream_response, AbortOnDrop, Batch, Batcher, Sticky, StreamItem, StreamResult,
};
use crate::grpc::{Code, Status};
use crate::pb::{self, embedding_service as paths, EmbeddingSpace};
use crate::pool::{Endpoint, Pool};

/// Times an item may be sent again (and consecutive failed opens of a sub-stream)
/// before the stream gives up with UNAVAILABLE.
pub const DEFAULT_MAX_RESENDS: u32 = 6;
/// Sub-streams of one stream at most, by default one per endpoint.
pub const MAX_SUBSTREAMS: usize = 8;
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_CAP: Duration = Duration::from_secs(1);
/// A message late by this many times the quickest sub-stream's answer time is
/// sent again on an idle sub-stream.
const HEDGE_FACTOR: f64 = 4.0;
/// ... but never one younger than this.
const HEDGE_MIN: Duration = Duration::from_millis(20);
/// A sub-stream this many times slower than the quickest gets one message at once.
const SLOW_FACTOR: f64 = 4.0;

/// What the client did to keep its streams whole (cumulative, shared by clones).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamCounters {
    /// Sub-streams started, re-opens included.
    pub streams_opened: u64,
    /// Sub-streams that broke with UNAVAILABLE or CANCELLED.
    pub streams_broken: u64,
    /// Items sent again on another sub-stream.
    pub resent_items: u64,
    pub resent_messages: u64,
    /// Items a draining replica answered with UNAVAILABLE.
    pub drained_items: u64,
    /// Items of a late message sent again on an idle sub-stream.
    pub hedged_items: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    streams_opened: AtomicU64,
    streams_broken: AtomicU64,
    resent_items: AtomicU64,
    resent_messages: AtomicU64,
    drained_items: AtomicU64,
    hedged_items: AtomicU64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> StreamCounters {
        StreamCounters {
            streams_opened: self.streams_opened.load(Ordering::Relaxed),
            streams_broken: self.streams_broken.load(Ordering::Relaxed),
            resent_items: self.resent_items.load(Ordering::Relaxed),
            resent_messages: self.resent_messages.load(Ordering::Relaxed),
            drained_items: self.drained_items.load(Ordering::Relaxed),
            hedged_items: self.hedged_items.load(Ordering::Relaxed),
        }
    }

    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

pub(crate) struct Settings {
    pub(crate) pool: Pool,
    pub(crate) deadline: Option<Instant>,
    pub(crate) in_flight: usize,
    pub(crate) substreams: usize,
    pub(crate) max_resends: u32,
    pub(crate) counters: Arc<Counters>,
}

/// Items of one message and where they stand in the caller's stream.
#[derive(Clone)]
struct Chunk {
    indices: Vec<u64>,
    batch: Batch,
    attempt: u32,
    sent_at: Instant,
    /// A copy went to another sub-stream (or this is the copy): not hedged again.
    hedged: bool,
}

impl Chunk {
    fn new(indices: Vec<u64>, batch: Batch, attempt: u32) -> Chunk {
        Chunk {
            indices,
            batch,
            attempt,
            sent_at: Instant::now(),
            hedged: false,
        }
    }
}

enum Event {
    Response(usize, u64, pb::EmbedStreamResponse),
    Ended(usize, u64, Result<(), Status>),
}

/// One sub-stream slot: the live stream in it, if any, and what it has unanswered.
struct Slot {
    /// Bumped on every (re)open, so late events of an old stream are ignored.
    generation: u64,
    requests: Option<mpsc::UnboundedSender<pb::EmbedStreamRequest>>,
    endpoint: Option<Arc<Endpoint>>,
    unanswered: VecDeque<Chunk>,
    items: usize,
    sticky: Sticky,
    space: Option<EmbeddingSpace>,
    failures: u32,
    reopen_at: Option<Instant>,
    answered: bool,
    task: Option<AbortOnDrop>,
    /// Seconds from sending a message to its answer (a moving average).
    latency: Option<f64>,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            generation: 0,
            requests: None,
            endpoint: None,
            unanswered: VecDeque::new(),
            items: 0,
            sticky: Sticky::default(),
            space: None,
            failures: 0,
            reopen_at: Some(Instant::now()),
            answered: false,
            task: None,
            latency: None,
        }
    }

    /// Takes new messages: its stream is open and not half-closed.
    fn open(&self) -> bool {
        self.requests.is_some()
    }

    /// Has a stream, perhaps half-closed and still answering what it holds.
    fn live(&self) -> bool {
        self.task.is_some()
    }
}

type Output = mpsc::UnboundedSender<Result<StreamResult, Status>>;

/// Starts the stream; results come through the returned stream, in order.
pub(crate) fn start<S>(
    settings: Settings,
    items: S,
) -> impl Stream<Item = Result<StreamResult, Status>> + Send + 'static
where
    S: Stream<Item = StreamItem> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(settings.in_flight.max(1)));
    let (out, results) = mpsc::unbounded_channel();
    let coordinator = Coordinator::new(settings, permits.clone(), out);
    let task = AbortOnDrop::new(tokio::spawn(coordinator.run(items)));
    futures_util::stream::unfold(
        (results, permits, task),
        |(mut results, permits, task)| async move {
            let result = results.recv().await?;
            if result.is_ok() {
                permits.add_permits(1);
            }
            Some((result, (results, permits, task)))
        },
    )
}

struct Coordinator {
    settings: Settings,
    permits: Arc<Semaphore>,
    out: Output,
    slots: Vec<Slot>,
    retry: VecDeque<Chunk>,
    /// Results waiting for earlier ones; slot i is item `next_out + i`.
    done: VecDeque<Option<StreamResult>>,
    next_out: u64,
    taken: u64,
    input_ended: bool,
    window: usize,
    events: mpsc::UnboundedSender<Event>,
    inbox: Option<mpsc::UnboundedReceiver<Event>>,
}

impl Coordinator {
    fn new(settings: Settings, permits: Arc<Semaphore>, out: Output) -> Coordinator {
        let n = settings.substreams.clamp(1, MAX_SUBSTREAMS);
        let window = (settings.in_flight / n).max(crate::client::MAX_ITEMS_PER_MESSAGE);
        let (events, inbox) = mpsc::unbounded_channel();
        Coordinator {
            settings,
            permits,
            out,
            slots: (0..n).map(|_| Slot::new()).collect(),
            retry: VecDeque::new(),
            done: VecDeque::new(),
            next_out: 0,
            taken: 0,
            input_ended: false,
            window,
            events,
            inbox: Some(inbox),
        }
    }

    async fn run<S>(mut self, items: S)
    where
        S: Stream<Item = StreamItem> + Send + 'static,
    {
        let mut batcher = Batcher::new(items);
        let mut inbox = self.inbox.take().expect("run once");
        let permits = self.permits.clone();
        loop {
            if let Err(status) = self.step().await {
                let _ = self.out.send(Err(status));
                return;
            }
            if self.input_ended && self.taken == self.next_out {
                // Everything answered: half-close the streams and let them end by themselves.
                for slot in &mut self.slots {
                    slot.requests = None;
                    if let Some(task) = slot.task.take() {
                        task.detach();
                    }
                }
                return;
            }
            let can_take = !self.input_ended && self.retry.is_empty() && self.room().is_some();
            let wake = self
                .slots
                .iter()
                .filter(|s| !s.live())
                .filter_map(|s| s.reopen_at)
                .min();
            let deadline = self.settings.deadline;
            let hedge_at = self.next_hedge_at();
            tokio::select! {
                event = inbox.recv() => match event {
                    Some(event) => {
                        if let Err(status) = self.on_event(event) {
                            let _ = self.out.send(Err(status));
                            return;
                        }
                    }
                    None => return,
                },
                batch = batcher.next(&permits), if can_take => match batch {
                    Some(batch) => {
                        let first = self.taken;
                        self.taken += batch.ids.len() as u64;
                        for _ in 0..batch.ids.len() {
                            self.done.push_back(None);
                        }
                        let chunk = Chunk::new((first..self.taken).collect(), batch, 0);
                        let slot = self.room().expect("checked before");
                        self.assign(slot, chunk);
                    }
                    None => self.input_ended = true,
                },
                _ = sleep_until(wake), if wake.is_some() => {}
                _ = sleep_until(hedge_at), if hedge_at.is_some() => {}
                _ = sleep_until(deadline), if deadline.is_some() => {
                    let _ = self.out.send(Err(Status::new(
                        Code::DeadlineExceeded,
                        "deadline exceeded before the stream completed",
                    )));
                    return;
                }
                _ = self.out.closed() => return, // the caller dropped the results
            }
        }
    }

    /// Opens the slots that are due, hands retries out, emits what is ready.
    async fn step(&mut self) -> Result<(), Status> {
        let work_left = !self.input_ended || self.taken != self.next_out;
        let now = Instant::now();
        for i in 0..self.slots.len() {
            let due = self.slots[i].reopen_at.map_or(false, |t| t <= now);
            if !self.slots[i].live() && due && work_left {
                self.open(i).await?;
            }
        }
        while !self.retry.is_empty() {
            match self.room_for_retry() {
                Some(slot) => {
                    let chunk = self.retry.pop_front().expect("not empty");
                    self.assign(slot, chunk);
                }
                None => break,
            }
        }
        self.hedge();
        while let Some(Some(_)) = self.done.front() {
            let result = self.done.pop_front().flatten().expect("checked");
            self.next_out += 1;
            if self.out.send(Ok(result)).is_err() {
                return Ok(()); // the caller is gone; run() notices
            }
        }
        Ok(())
    }

    /// The open slot with the fewest items unanswered, if it has room.
    fn room(&self) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            // A full message more stays within the slot's share of the window; a slow
            // slot gets one message at a time.
            .filter(|(i, s)| {
                s.open()
                    && (s.items == 0
                        || (!self.slow(*i)
                            && s.items + crate::client::MAX_ITEMS_PER_MESSAGE <= self.window))
            })
            .min_by_key(|(_, s)| s.items)
            .map(|(i, _)| i)
    }

    /// The answer time of the quickest live slot other than `but`.
    fn fastest(&self, but: Option<usize>) -> Option<f64> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(i, s)| Some(*i) != but && s.live())
            .filter_map(|(_, s)| s.latency)
            .fold(None, |best: Option<f64>, l| {
                Some(best.map_or(l, |b| b.min(l)))
            })
    }

    fn slow(&self, i: usize) -> bool {
        match (self.slots[i].latency, self.fastest(Some(i))) {
            (Some(mine), Some(fastest)) => mine > SLOW_FACTOR * fastest,
            _ => false,
        }
    }

    /// How long a message may go unanswered before it is hedged.
    fn hedge_after(&self) -> Option<Duration> {
        let fastest = self.fastest(None)?;
        Some(HEDGE_MIN.max(Duration::from_secs_f64(HEDGE_FACTOR * fastest)))
    }

    fn idle_slot(&self) -> Option<usize> {
        self.slots.iter().position(|s| s.open() && s.items == 0)
    }

    /// The oldest unanswered message (the front of another slot) not hedged yet.
    fn oldest_unhedged(&self, but: usize) -> Option<(usize, Instant)> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(i, s)| *i != but && s.live())
            .filter_map(|(i, s)| s.unanswered.front().map(|c| (i, c)))
            .filter(|(_, c)| !c.hedged)
            .map(|(i, c)| (i, c.sent_at))
            .min_by_key(|(_, at)| *at)
    }

    /// When the oldest message becomes late, if there is an idle slot to hedge it on.
    fn next_hedge_at(&self) -> Option<Instant> {
        let idle = self.idle_slot()?;
        let after = self.hedge_after()?;
        self.oldest_unhedged(idle).map(|(_, at)| at + after)
    }

    /// Sends copies of late messages to idle slots; the first answer wins.
    fn hedge(&mut self) {
        while let (Some(idle), Some(after)) = (self.idle_slot(), self.hedge_after()) {
            let (owner, sent_at) = match self.oldest_unhedged(idle) {
                Some(found) => found,
                None => return,
            };
            if sent_at + after > Instant::now() {
                return;
            }
            let original = self.slots[owner].unanswered.front_mut().expect("found");
            original.hedged = true;
            let mut copy = original.clone();
            copy.attempt = 0;
            let counters = self.settings.counters.clone();
            Counters::add(&counters.hedged_items, copy.indices.len());
            self.assign(idle, copy);
        }
    }

    /// Whether item `index` has its result already (a hedged copy or a re-send answered).
    fn answered(&self, index: u64) -> bool {
        index < self.next_out || self.done[(index - self.next_out) as usize].is_some()
    }

    /// Re-sends go out at once to the least loaded open slot.
    fn room_for_retry(&self) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.open())
            .min_by_key(|(_, s)| s.items)
            .map(|(i, _)| i)
    }

    fn assign(&mut self, slot: usize, mut chunk: Chunk) {
        chunk.sent_at = Instant::now();
        let s = &mut self.slots[slot];
        let request = s.sticky.request(&chunk.batch);
        s.items += chunk.batch.ids.len();
        s.unanswered.push_back(chunk);
        if let Some(requests) = &s.requests {
            // A closed channel means the stream ended: its Ended event re-sends this.
            let _ = requests.send(request);
        }
    }

    async fn open(&mut self, i: usize) -> Result<(), Status> {
        let endpoint = self.settings.pool.pick().await?;
        let slot = &mut self.slots[i];
        slot.generation += 1;
        slot.reopen_at = None;
        slot.sticky = Sticky::default();
        slot.space = None;
        slot.answered = false;
        let (requests, outgoing) = mpsc::unbounded_channel();
        slot.requests = Some(requests);
        slot.endpoint = Some(endpoint.clone());
        let timeout = self
            .settings
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()));
        let events = self.events.clone();
        let generation = slot.generation;
        slot.task = Some(AbortOnDrop::new(tokio::spawn(substream(
            endpoint, timeout, outgoing, events, i, generation,
        ))));
        Counters::add(&self.settings.counters.streams_opened, 1);
        Ok(())
    }

    fn on_event(&mut self, event: Event) -> Result<(), Status> {
        match event {
            Event::Response(i, generation, response) => {
                if self.slots[i].generation == generation {
                    self.on_response(i, response)?;
                }
            }
            Event::Ended(i, generation, result) => {
                if self.slots[i].generation == generation {
                    self.on_end(i, result)?;
                }
            }
        }
        Ok(())
    }

    fn on_response(&mut self, i: usize, response: pb::EmbedStreamResponse) -> Result<(), Status> {
        let max_resends = self.settings.max_resends;
        let slot = &mut self.slots[i];
        let chunk = slot.unanswered.pop_front().ok_or_else(|| {
            Status::internal("a replica answered a stream message that was not sent")
        })?;
        slot.items -= chunk.batch.ids.len();
        let took = chunk.sent_at.elapsed().as_secs_f64();
        slot.latency = Some(slot.latency.map_or(took, |l| 0.7 * l + 0.3 * took));
        if response.ids != chunk.batch.ids {
            return Err(Status::internal(format!(
                "a replica answered {} ids starting {:?} for a message of {} starting {:?}",
                response.ids.len(),
                response.ids.first(),
                chunk.batch.ids.len(),
                chunk.batch.ids.first()
            )));
        }
        if !slot.answered {
            slot.answered = true;
            slot.failures = 0;
            if let Some(endpoint) = &slot.endpoint {
                self.settings.pool.succeeded(endpoint);
            }
        }
        let results = decode_stream_response(response, &mut slot.space)?;
        let mut again = Chunk::new(
            Vec::new(),
            Batch {
                model: chunk.batch.model.clone(),
                options: chunk.batch.options.clone(),
                ..Batch::default()
            },
            chunk.attempt + 1,
        );
        for (position, result) in results.into_iter().enumerate() {
            let index = chunk.indices[position];
            if self.answered(index) {
                continue; // a hedged copy or a re-send answered first: it wins
            }
            let unavailable = matches!(&result.embedding, Err(e) if e.code() == Code::Unavailable);
            if unavailable && chunk.attempt < max_resends {
                again.indices.push(index);
                again.batch.ids.push(result.id);
                again.batch.texts.push(chunk.batch.texts[position].clone());
                continue;
            }
            self.done[(index - self.next_out) as usize] = Some(result);
        }
        let slot = &mut self.slots[i];
        if !again.indices.is_empty() {
            // The replica is draining: it gets nothing more, and the slot reopens
            // elsewhere once this stream has answered what it holds and ended.
            let counters = &self.settings.counters;
            Counters::add(&counters.drained_items, again.indices.len());
            Counters::add(&counters.resent_items, again.indices.len());
            Counters::add(&counters.resent_messages, 1);
            if let Some(endpoint) = &slot.endpoint {
                self.settings.pool.failed(endpoint);
            }
            slot.requests = None; // half-close
            self.retry.push_back(again);
        }
        Ok(())
    }

    fn on_end(&mut self, i: usize, result: Result<(), Status>) -> Result<(), Status> {
        let max_resends = self.settings.max_resends;
        let work_left = !self.input_ended || self.taken != self.next_out;
        let counters = self.settings.counters.clone();
        let slot = &mut self.slots[i];
        slot.requests = None;
        slot.task = None;
        let broken = match result {
            Ok(()) if slot.unanswered.is_empty() => None,
            Ok(()) => Some(Status::unavailable(
                "a replica ended the stream with items unanswered",
            )),
            Err(status) => match status.code() {
                Code::Unavailable | Code::Cancelled => Some(status),
                _ => return Err(status),
            },
        };
        if let Some(status) = broken {
            if max_resends == 0 {
                return Err(status); // one sidecar: its status is the caller's
            }
            if let Some(endpoint) = &slot.endpoint {
                self.settings.pool.failed(endpoint);
            }
            Counters::add(&counters.streams_broken, 1);
            slot.failures += 1;
            let drained: Vec<Chunk> = slot.unanswered.drain(..).collect();
            slot.items = 0;
            // Messages answered meanwhile on another sub-stream (hedged copies) are not resent.
            let chunks: Vec<Chunk> = drained
                .into_iter()
                .filter(|c| c.indices.iter().any(|&k| !self.answered(k)))
                .collect();
            let slot = &mut self.slots[i];
            let unanswered: usize = chunks.iter().map(|c| c.batch.ids.len()).sum();
            let exhausted =
                slot.failures >= max_resends || chunks.iter().any(|c| c.attempt >= max_resends);
            if exhausted {
                return Err(Status::unavailable(format!(
                    "no replica of {} answered the stream after {} attempts (last: {}); {} items \
                     unanswered: check that the replicas are up and SERVING",
                    self.settings.pool,
                    slot.failures,
                    status,
                    self.taken - self.next_out
                )));
            }
            if unanswered > 0 {
                Counters::add(&counters.resent_items, unanswered);
                Counters::add(&counters.resent_messages, chunks.len());
            }
            for mut chunk in chunks.into_iter().rev() {
                chunk.attempt += 1;
                self.retry.push_front(chunk);
            }
            let backoff = BACKOFF_FIRST
                .checked_mul(1 << (slot.failures - 1).min(8))
                .unwrap_or(BACKOFF_CAP)
                .min(BACKOFF_CAP);
            slot.reopen_at = Some(Instant::now() + backoff);
        } else if work_left {
            slot.reopen_at = Some(Instant::now());
        }
        Ok(())
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => futures_util::future::pending().await,
    }
}

/// One sub-stream: sends what the coordinator hands it, reports every response
/// and the end. Dropping `outgoing`'s sender half-closes the call.
async fn substream(
    endpoint: Arc<Endpoint>,
    timeout: Option<Duration>,
    mut outgoing: mpsc::UnboundedReceiver<pb::EmbedStreamRequest>,
    events: mpsc::UnboundedSender<Event>,
    slot: usize,
    generation: u64,
) {
    let opened = endpoint
        .channel
        .streaming::<pb::EmbedStreamRequest, pb::EmbedStreamResponse>(paths::EMBED_STREAM, timeout)
        .await;
    let (mut sink, mut responses) = match opened {
        Ok(pair) => pair,
        Err(status) => {
            let _ = events.send(Event::Ended(slot, generation, Err(status)));
            return;
        }
    };
    let sender = AbortOnDrop::new(tokio::spawn(async move {
        while let Some(request) = outgoing.recv().await {
            // A failed send ends the call; the receiving side reports its status.
            if sink.send(&request).await.is_err() {
                return;
            }
        }
        let _ = sink.finish();
    }));
    let end = loop {
        match responses.message().await {
            Ok(Some(response)) => {
                if events
                    .send(Event::Response(slot, generation, response))
                    .is_err()
                {
                    return;
                }
            }
            Ok(None) => break Ok(()),
            Err(status) => break Err(status),
        }
    };
    drop(sender);
    let _ = events.send(Event::Ended(slot, generation, end));
}
