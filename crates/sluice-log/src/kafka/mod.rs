//! The log on Kafka (SPEC §2, §5).
//!
//! - `KafkaLog::connect` creates sluice's topics if they are missing (the ingest topic, plus the
//!   dead-letter and actions topics, with the configured partition count) and reads the ingest
//!   topic's actual partition count: Kafka's partitions are fixed once created, and the
//!   partitioner must use the real number.
//! - `append` sends every record with an explicit partition, computed with the same murmur2
//!   partitioner as the embedded log (`sluice_model::partition_for_key`), through an idempotent
//!   producer with `acks=all`, and returns only when every delivery report came back: that is
//!   the durability promise of the API's 200.
//! - Records never time out in the producer (`message.timeout.ms` 0): librdkafka keeps each
//!   partition's queue and retries it in order until the brokers take it, so the queue has no
//!   gaps. With a timeout, a record that expired in an outage could be followed by a later one
//!   that got through; the caller's retry of the first would then land behind the second, out
//!   of the user's order. A caller that stops waiting leaves its records to be delivered; its
//!   bound on waiting is its own (`log_ack_timeout`, the pipeline's stop, shutdown).
//!
//! - `subscribe` joins a consumer group: see `consumer` for how partitions are handed out,
//!   revoked and committed.

mod consumer;
#[cfg(feature = "testing")]
pub mod testing;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::{Ack, Log, LogError, LogRecord, Record, Subscription};

/// Settings of the Kafka log.
#[derive(Debug, Clone)]
pub struct KafkaLogConfig {
    /// `host:port[,host:port...]`.
    pub brokers: String,
    pub topic: String,
    /// Partitions to create the topic with, if it does not exist.
    pub partitions: u32,
    /// Replication factor of the topics sluice creates; `None`: 3, or the broker count when
    /// the cluster has fewer (SPEC §2).
    pub replication_factor: Option<i32>,
    /// `min.insync.replicas` of the topics sluice creates; `None`: 2 when the replication
    /// factor is 3 or more, else the broker's default. With `acks=all`, an append is
    /// acknowledged only once this many replicas have it.
    pub min_insync_replicas: Option<i32>,
    /// Topics created with unlimited retention (`retention.ms` and `retention.bytes` -1): dead
    /// letters must not expire before someone has looked at them.
    pub unlimited_retention: Vec<String>,
    /// librdkafka properties set on every client sluice makes (producer, consumers, admin),
    /// after its own: TLS, SASL, tuning (SPEC §2 `[kafka_options]`).
    pub options: Vec<(String, String)>,
    /// How long metadata and admin requests may take.
    pub request_timeout: Duration,
    /// Producer `linger.ms`: how long the producer waits to fill a batch.
    pub linger: Duration,
    /// Other topics to create if missing (dead letters, actions), same partitions.
    pub other_topics: Vec<String>,
    /// Consumer `session.timeout.ms`: how long a member that stopped heartbeating (killed)
    /// keeps its partitions before the group hands them to another.
    pub session_timeout: Duration,
    /// How long a revoke waits for a partition's stream to finish its batch and commit.
    pub revoke_timeout: Duration,
    /// How long the group membership may stay unsettled before the consumer is replaced by a
    /// new one (`kafka::consumer` module docs); `None`: derived from the session and revoke
    /// timeouts.
    pub stall_timeout: Option<Duration>,
    /// Static group membership (`group.instance.id`), stable across restarts of one node and
    /// unique among running nodes; `None` for dynamic membership. A node restarted within
    /// `session_timeout` gets its partitions back without a rebalance. Further subscriptions
    /// of the same `KafkaLog` append `-2`, `-3`, ...
    pub instance_id: Option<String>,
}

impl KafkaLogConfig {
    pub fn new(brokers: impl Into<String>, topic: impl Into<String>) -> Self {
        KafkaLogConfig {
            brokers: brokers.into(),
            topic: topic.into(),
            partitions: 8,
            replication_factor: None,
            min_insync_replicas: None,
            unlimited_retention: vec!["sluice.dlq".into()],
            options: Vec::new(),
            request_timeout: Duration::from_secs(10),
            linger: Duration::from_millis(2),
            other_topics: vec!["sluice.dlq".into(), "sluice.actions".into()],
            session_timeout: Duration::from_secs(10),
            revoke_timeout: Duration::from_secs(30),
            stall_timeout: None,
            instance_id: None,
        }
    }

    /// Parses `kafka://host:port[,host:port]` into the broker list.
    pub fn brokers_from_url(url: &str) -> Result<String, LogError> {
        let brokers = url.strip_prefix("kafka://").ok_or_else(|| {
            LogError::Config(format!(
                "{url:?} is not a Kafka URL: expected kafka://host:port[,host:port...]"
            ))
        })?;
        let brokers = brokers.trim_end_matches('/');
        if brokers.is_empty() || brokers.split(',').any(|b| !b.contains(':')) {
            return Err(LogError::Config(format!(
                "{url:?}: every broker needs host:port, e.g. kafka://127.0.0.1:9092"
            )));
        }
        Ok(brokers.to_string())
    }
}

/// The producer's callbacks: notes when librdkafka reports every broker down, for
/// `is_healthy`; the next delivered record clears it.
///
/// While a broker is unreachable librdkafka reports the same error about twice a second;
/// each is logged once (a warning), and again only after `REPEAT_WARNING` or another error
/// in between. "All brokers down" is a warning when the producer goes down, not on each report.
struct ProducerHealth {
    all_brokers_down: Arc<AtomicBool>,
    /// The error last logged as a warning, and when.
    last_warning: Mutex<Option<(Option<RDKafkaErrorCode>, std::time::Instant)>>,
}

/// How long an error that repeats is logged at debug level only.
const REPEAT_WARNING: Duration = Duration::from_secs(60);

impl ProducerHealth {
    fn new(all_brokers_down: &Arc<AtomicBool>) -> ProducerHealth {
        ProducerHealth {
            all_brokers_down: Arc::clone(all_brokers_down),
            last_warning: Mutex::new(None),
        }
    }

    /// Whether `code` is news: not the error warned of last, within `REPEAT_WARNING`.
    fn is_news(&self, code: Option<RDKafkaErrorCode>) -> bool {
        let mut last = self
            .last_warning
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = std::time::Instant::now();
        let repeated = matches!(*last, Some((c, at)) if c == code && now - at < REPEAT_WARNING);
        if !repeated {
            *last = Some((code, now));
        }
        !repeated
    }
}

impl ClientContext for ProducerHealth {
    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        let news = if code == Some(RDKafkaErrorCode::AllBrokersDown) {
            !self.all_brokers_down.swap(true, Ordering::Relaxed)
        } else {
            self.is_news(code)
        };
        if news {
            tracing::warn!(%error, reason, "kafka producer");
        } else {
            tracing::debug!(%error, reason, "kafka producer (repeated)");
        }
    }
}

/// The log on a Kafka cluster.
pub struct KafkaLog {
    config: KafkaLogConfig,
    /// The producer, with a generation that counts replacements (`renew_if_fatal`).
    producer: RwLock<(u64, FutureProducer<ProducerHealth>)>,
    all_brokers_down: Arc<AtomicBool>,
    /// The ingest topic's partition count, once the cluster was reached.
    partitions: tokio::sync::OnceCell<u32>,
    /// Threads of the subscriptions; each ends once its subscription is dropped.
    consumers: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Which instance-id suffixes live subscriptions hold.
    slots: consumer::Slots,
}

impl KafkaLog {
    /// Connects, creates the topics if missing, and learns the ingest topic's partition count;
    /// fails if the cluster cannot be reached.
    pub async fn connect(config: KafkaLogConfig) -> Result<KafkaLog, LogError> {
        let log = KafkaLog::connect_lazily(config)?;
        log.prepared().await?;
        Ok(log)
    }

    /// Like `connect`, but without talking to the cluster yet: for a producer that must start
    /// while Kafka is down (an API node spills until it is back). The topics are created and
    /// the partition count learned before the first append; until then appends fail with a
    /// retriable error.
    pub fn connect_lazily(config: KafkaLogConfig) -> Result<KafkaLog, LogError> {
        let all_brokers_down = Arc::new(AtomicBool::new(false));
        let producer = new_producer(&config, &all_brokers_down)?;
        Ok(KafkaLog {
            config,
            producer: RwLock::new((0, producer)),
            all_brokers_down,
            partitions: tokio::sync::OnceCell::new(),
            consumers: Mutex::new(Vec::new()),
            slots: consumer::Slots::default(),
        })
    }

    /// The ingest topic's partition count, after creating the topics if this is the first
    /// call that reached the cluster.
    pub async fn prepared(&self) -> Result<u32, LogError> {
        let (_, producer) = self.producer();
        self.partitions
            .get_or_try_init(|| prepare(&producer, &self.config))
            .await
            .copied()
    }

    /// The current producer and its generation.
    fn producer(&self) -> (u64, FutureProducer<ProducerHealth>) {
        self.producer
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// After a failed delivery: if the producer is in a fatal state (an idempotent producer
    /// fenced or out of sequence after its messages timed out, e.g. while the broker was
    /// frozen), it will never deliver again; replace it. Its unacknowledged records were
    /// reported failed, so their callers retry them through the new one.
    fn renew_if_fatal(
        &self,
        generation: u64,
        used: &FutureProducer<ProducerHealth>,
        error: &KafkaError,
    ) {
        let fenced = matches!(
            error.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
                    | RDKafkaErrorCode::InvalidProducerIdMapping
                    | RDKafkaErrorCode::UnknownProducerId
                    | RDKafkaErrorCode::OutOfOrderSequenceNumber
            )
        );
        let Some((code, reason)) = used.client().fatal_error().or_else(|| {
            fenced.then(|| {
                (
                    error
                        .rdkafka_error_code()
                        .unwrap_or(RDKafkaErrorCode::Fatal),
                    error.to_string(),
                )
            })
        }) else {
            return;
        };
        let mut current = self
            .producer
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.0 != generation {
            return; // another append already replaced it
        }
        match new_producer(&self.config, &self.all_brokers_down) {
            Ok(producer) => {
                *current = (generation + 1, producer);
                tracing::warn!(%code, reason, "kafka: the producer hit a fatal error; replaced it with a new one");
            }
            Err(e) => tracing::error!(error = %e, "kafka: cannot replace the failed producer"),
        }
    }

    fn error(&self, message: String) -> LogError {
        LogError::Broker {
            brokers: self.config.brokers.clone(),
            message,
        }
    }

    /// The high watermarks (end offsets) of `partitions` of the topic, fetched on the blocking
    /// pool; `what` names them in the error.
    async fn high_watermarks(
        &self,
        partitions: std::ops::Range<u32>,
        what: &str,
    ) -> Result<Vec<u64>, LogError> {
        let (_, producer) = self.producer();
        let topic = self.config.topic.clone();
        let timeout = self.config.request_timeout;
        let ends = tokio::task::spawn_blocking(move || {
            partitions
                .map(|p| {
                    producer
                        .client()
                        .fetch_watermarks(&topic, p as i32, timeout)
                        .map(|(_, high)| high.max(0) as u64)
                })
                .collect::<Result<Vec<u64>, KafkaError>>()
        })
        .await
        .map_err(|e| LogError::Unexpected(format!("watermark task failed: {e}")))?;
        ends.map_err(|e| self.error(format!("cannot read {what}: {e}")))
    }
}

/// An idempotent `acks=all` producer.
fn new_producer(
    config: &KafkaLogConfig,
    all_brokers_down: &Arc<AtomicBool>,
) -> Result<FutureProducer<ProducerHealth>, LogError> {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", config.linger.as_millis().to_string())
        // No compression by default, as Kafka's own clients: single events make batches of a
        // few records, where lz4 cost the broker 64 µs of CPU per request instead of 38 and
        // took 30% off the single-event rate (BENCHMARKS.md). `[kafka_options]`
        // `"compression.type" = "lz4"` (or zstd) trades CPU for bytes on a metered network.
        .set("compression.type", "none")
        // Never: see the module docs (no gaps in a partition's queue).
        .set("message.timeout.ms", "0");
    with_options(&mut client, config)
        .create_with_context(ProducerHealth::new(all_brokers_down))
        .map_err(|e| LogError::Broker {
            brokers: config.brokers.clone(),
            message: format!("cannot create the producer: {e}"),
        })
}

/// Up to `max` records of the topic's `partition` from `from` on, read by a plain consumer
/// (assigned, no group membership, nothing committed), up to the high watermark.
fn read_partition(
    config: &KafkaLogConfig,
    partition: u32,
    from: u64,
    max: usize,
) -> Result<Vec<LogRecord>, LogError> {
    use rdkafka::Message;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    let error = |what: &str, e: KafkaError| LogError::Broker {
        brokers: config.brokers.clone(),
        message: format!("{what} ({} partition {partition}): {e}", config.topic),
    };
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", "sluice-reader")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    let consumer: BaseConsumer = with_options(&mut client, config)
        .create()
        .map_err(|e| error("cannot create a reader", e))?;
    let timeout = config.request_timeout.max(Duration::from_secs(1));
    let (low, high) = consumer
        .fetch_watermarks(&config.topic, partition as i32, timeout)
        .map_err(|e| error("cannot read the offsets", e))?;
    let start = (from as i64).max(low);
    if start >= high || max == 0 {
        return Ok(Vec::new());
    }
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(&config.topic, partition as i32, Offset::Offset(start))
        .map_err(|e| error("cannot assign", e))?;
    consumer
        .assign(&assignment)
        .map_err(|e| error("cannot assign", e))?;
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + timeout * 2;
    while out.len() < max && std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let offset = m.offset();
                out.push(LogRecord {
                    partition,
                    offset: offset as u64,
                    timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
                    key: bytes::Bytes::copy_from_slice(m.key().unwrap_or_default()),
                    value: bytes::Bytes::copy_from_slice(m.payload().unwrap_or_default()),
                });
                if offset + 1 >= high {
                    break;
                }
            }
            Some(Err(e)) => return Err(error("cannot read", e)),
            None => {}
        }
    }
    if out.is_empty() {
        return Err(LogError::Timeout(timeout * 2));
    }
    Ok(out)
}

/// The `[kafka_options]` passthrough, laid over a client's own settings just before it is
/// created.
pub(crate) fn with_options<'a>(
    client: &'a mut ClientConfig,
    config: &KafkaLogConfig,
) -> &'a mut ClientConfig {
    for (key, value) in &config.options {
        client.set(key, value);
    }
    client
}

/// The replication factor and `min.insync.replicas` to create topics with, from the config
/// and the number of brokers in the cluster.
fn replication(config: &KafkaLogConfig, brokers: usize) -> (i32, Option<i32>) {
    let factor = config
        .replication_factor
        .unwrap_or_else(|| 3.min(brokers.max(1) as i32));
    let min_insync = config.min_insync_replicas.or((factor >= 3).then_some(2));
    (factor, min_insync)
}

/// An admin client of the cluster, with the config's `[kafka_options]`.
fn admin_client(config: &KafkaLogConfig) -> Result<AdminClient<DefaultClientContext>, KafkaError> {
    with_options(
        ClientConfig::new().set("bootstrap.servers", &config.brokers),
        config,
    )
    .create()
}

/// Creates sluice's topics if they are missing and reads the ingest topic's partition count.
async fn prepare(
    producer: &FutureProducer<ProducerHealth>,
    config: &KafkaLogConfig,
) -> Result<u32, LogError> {
    let broker_error = |what: &str, e: KafkaError| LogError::Broker {
        brokers: config.brokers.clone(),
        message: format!("{what}: {e}"),
    };
    let admin =
        admin_client(config).map_err(|e| broker_error("cannot create the admin client", e))?;
    let brokers = reachable_brokers(config).await?;
    let (factor, min_insync) = replication(config, brokers);
    if factor as usize > brokers {
        return Err(LogError::Broker {
            brokers: config.brokers.clone(),
            message: format!(
                "kafka_replication_factor = {factor}, but the cluster has {brokers} broker(s): \
                 topics cannot be created with more replicas than brokers"
            ),
        });
    }
    let min_insync_text = min_insync.map(|n| n.to_string());
    let topics: Vec<NewTopic<'_>> = std::iter::once(&config.topic)
        .chain(&config.other_topics)
        .map(|name| {
            let mut topic = NewTopic::new(
                name,
                config.partitions as i32,
                TopicReplication::Fixed(factor),
            );
            if let Some(n) = &min_insync_text {
                topic = topic.set("min.insync.replicas", n);
            }
            if config.unlimited_retention.contains(name) {
                topic = topic.set("retention.ms", "-1").set("retention.bytes", "-1");
            }
            topic
        })
        .collect();
    let options = AdminOptions::new()
        .request_timeout(Some(config.request_timeout))
        .operation_timeout(Some(config.request_timeout));
    let results = tokio::time::timeout(
        config.request_timeout + Duration::from_secs(1),
        admin.create_topics(&topics, &options),
    )
    .await
    .map_err(|_| LogError::Broker {
        brokers: config.brokers.clone(),
        message: format!(
            "no answer within {:?} while creating topics: is the broker reachable?",
            config.request_timeout
        ),
    })?
    .map_err(|e| broker_error("cannot create topics", e))?;
    for result in results {
        match result {
            Ok(name) => tracing::info!(
                topic = %name,
                partitions = config.partitions,
                replication_factor = factor,
                min_insync_replicas = ?min_insync,
                "kafka: created topic"
            ),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(LogError::Broker {
                    brokers: config.brokers.clone(),
                    message: format!("cannot create topic {name:?}: {code}"),
                });
            }
        }
    }
    let partitions = topic_partitions(producer, config).await?;
    if partitions != config.partitions {
        tracing::warn!(
            topic = %config.topic,
            partitions,
            configured = config.partitions,
            "kafka: the topic exists with another partition count; using the topic's"
        );
    }
    Ok(partitions)
}

/// The cluster's metadata (of `topic` only, when given), read off the async runtime.
async fn metadata(
    producer: &FutureProducer<ProducerHealth>,
    config: &KafkaLogConfig,
    topic: Option<&str>,
) -> Result<rdkafka::metadata::Metadata, LogError> {
    let producer = producer.clone();
    let owned = topic.map(str::to_owned);
    let timeout = config.request_timeout;
    tokio::task::spawn_blocking(move || producer.client().fetch_metadata(owned.as_deref(), timeout))
        .await
        .map_err(|e| LogError::Broker {
            brokers: config.brokers.clone(),
            message: format!("metadata task failed: {e}"),
        })?
        .map_err(|e| LogError::Broker {
            brokers: config.brokers.clone(),
            message: match topic {
                Some(topic) => format!("cannot read the metadata of topic {topic:?}: {e}"),
                None => format!("cannot read the cluster's metadata: {e}"),
            },
        })
}

/// Whether a TCP connection to `address` (`host:port`) opens within `timeout`.
async fn probe(address: String, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&address)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// The cluster's metadata, asked by a new client through the bootstrap addresses.
async fn bootstrap_metadata(
    config: &KafkaLogConfig,
) -> Result<rdkafka::metadata::Metadata, LogError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let error = |message: String| LogError::Broker {
        brokers: config.brokers.clone(),
        message,
    };
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.brokers);
    let client: BaseConsumer = with_options(&mut client, config)
        .create()
        .map_err(|e| error(format!("cannot create a metadata client: {e}")))?;
    let timeout = config.request_timeout;
    tokio::task::spawn_blocking(move || client.fetch_metadata(None, timeout))
        .await
        .map_err(|e| error(format!("metadata task failed: {e}")))?
        .map_err(|e| error(format!("cannot read the cluster's metadata: {e}")))
}

/// How many brokers the cluster's metadata lists, once the addresses they advertise were
/// checked: the bootstrap address answering says nothing about them, and a broker whose
/// `advertised.listeners` names a host or port this node cannot reach (a container's
/// hostname, an internal listener) makes every later request wait out its timeout with no
/// word of why. None of them reachable is an error that names them; some of them, a warning.
async fn reachable_brokers(config: &KafkaLogConfig) -> Result<usize, LogError> {
    let timeout = config.request_timeout.min(Duration::from_secs(3));
    // A client of its own: its first request goes to the bootstrap address, where the
    // long-lived producer may already have dropped that connection for the advertised ones.
    // librdkafka drops it too once it learned them, so even this can miss the answer.
    let metadata = match bootstrap_metadata(config).await {
        Ok(metadata) => metadata,
        Err(LogError::Broker { brokers, message }) => {
            let mut answering = false;
            let mut refusing = Vec::new();
            for address in config.brokers.split(',').map(str::trim) {
                match probe(address.to_string(), timeout).await {
                    Ok(()) => answering = true,
                    Err(why) => refusing.push(format!("{address} ({why})")),
                }
            }
            return Err(LogError::Broker {
                brokers,
                message: if answering {
                    format!(
                        "{message}; the bootstrap address accepts connections, so the brokers \
                         may advertise listeners this node cannot reach (check their \
                         advertised.listeners) or expect TLS/SASL (see [kafka_options])"
                    )
                } else {
                    format!(
                        "{message}; no bootstrap address accepts connections: {}",
                        refusing.join(", ")
                    )
                },
            });
        }
        Err(e) => return Err(e),
    };
    let advertised: Vec<(i32, String)> = metadata
        .brokers()
        .iter()
        .map(|b| (b.id(), format!("{}:{}", b.host(), b.port())))
        .collect();
    let mut probes = tokio::task::JoinSet::new();
    for (id, address) in advertised.clone() {
        probes.spawn(async move { (id, address.clone(), probe(address, timeout).await) });
    }
    let mut unreachable = Vec::new();
    while let Some(done) = probes.join_next().await {
        if let Ok((id, address, Err(why))) = done {
            unreachable.push((id, address, why));
        }
    }
    unreachable.sort();
    let listed = |list: &[(i32, String, String)]| {
        list.iter()
            .map(|(id, address, why)| format!("broker {id} at {address} ({why})"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !advertised.is_empty() && unreachable.len() == advertised.len() {
        return Err(LogError::Broker {
            brokers: config.brokers.clone(),
            message: format!(
                "the cluster answered, but no broker it advertises can be reached from here: {}; \
                 check the brokers' advertised.listeners",
                listed(&unreachable)
            ),
        });
    }
    if !unreachable.is_empty() {
        tracing::warn!(
            brokers = %config.brokers,
            unreachable = %listed(&unreachable),
            "kafka: some advertised brokers cannot be reached from here (check their advertised.listeners)"
        );
    }
    Ok(advertised.len())
}

/// The partition count of the topic, from the cluster's metadata. A topic created a moment
/// ago may not be in every broker's metadata yet (Kafka answers CreateTopics before its brokers
/// have all learned of it): asked again until `request_timeout`.
async fn topic_partitions(
    producer: &FutureProducer<ProducerHealth>,
    config: &KafkaLogConfig,
) -> Result<u32, LogError> {
    let deadline = tokio::time::Instant::now() + config.request_timeout;
    loop {
        let count = metadata(producer, config, Some(&config.topic))
            .await?
            .topics()
            .iter()
            .find(|t| t.name() == config.topic)
            .map_or(0, |t| t.partitions().len());
        if count > 0 {
            return Ok(count as u32);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(LogError::Broker {
                brokers: config.brokers.clone(),
                message: format!(
                    "topic {:?} has no partitions after {:?}",
                    config.topic, config.request_timeout
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[async_trait]
impl Log for KafkaLog {
    fn partitions(&self) -> u32 {
        // Known after `connect`; a lazily connected log that has not reached the cluster yet
        // has no partitions to offer (it only produces).
        self.partitions
            .get()
            .copied()
            .unwrap_or(self.config.partitions)
    }

    async fn append(&self, records: Vec<Record>) -> Result<Vec<Ack>, LogError> {
        let partitions = self.prepared().await?;
        let (generation, producer) = self.producer();
        let mut deliveries = Vec::with_capacity(records.len());
        for record in &records {
            let partition = sluice_model::partition_for_key(&record.key, partitions) as i32;
            let mut next = FutureRecord::to(&self.config.topic)
                .key(&record.key[..])
                .payload(&record.value[..])
                .partition(partition)
                .timestamp(record.timestamp_ms);
            loop {
                match producer.send_result(next) {
                    Ok(delivery) => {
                        deliveries.push(delivery);
                        break;
                    }
                    // The local queue is full: wait for deliveries to free room (backpressure).
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        next = back;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err((e, _)) => {
                        self.renew_if_fatal(generation, &producer, &e);
                        return Err(self.error(format!("cannot send: {e}")));
                    }
                }
            }
        }
        let mut acks = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            match delivery.await {
                Ok(Ok(delivered)) => {
                    acks.push(Ack {
                        partition: delivered.partition as u32,
                        offset: delivered.offset as u64,
                    });
                }
                Ok(Err((e, _))) => {
                    self.renew_if_fatal(generation, &producer, &e);
                    return Err(self.error(format!("the broker did not acknowledge: {e}")));
                }
                Err(_) => return Err(LogError::Closed),
            }
        }
        if !acks.is_empty() {
            // A broker acknowledged: they are not all down (any more).
            self.all_brokers_down.store(false, Ordering::Relaxed);
        }
        Ok(acks)
    }

    async fn read(
        &self,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<LogRecord>, LogError> {
        let config = self.config.clone();
        tokio::task::spawn_blocking(move || read_partition(&config, partition, from, max))
            .await
            .map_err(|e| LogError::Unexpected(format!("read task failed: {e}")))?
    }

    async fn end_offsets(&self) -> Result<Vec<u64>, LogError> {
        let partitions = self.prepared().await?;
        self.high_watermarks(0..partitions, "the end offsets").await
    }

    async fn end_offset(&self, partition: u32) -> Result<u64, LogError> {
        let partitions = self.prepared().await?;
        if partition >= partitions {
            return Err(LogError::NoSuchPartition {
                partition,
                partitions,
            });
        }
        let what = format!("the end offset of partition {partition}");
        let ends = self
            .high_watermarks(partition..partition + 1, &what)
            .await?;
        ends.first().copied().ok_or_else(|| {
            LogError::Unexpected(format!("no watermark came back for partition {partition}"))
        })
    }

    async fn delete_before(&self, partition: u32, offset: u64) -> Result<(), LogError> {
        let config = &self.config;
        let admin = admin_client(config)
            .map_err(|e| self.error(format!("cannot create the admin client: {e}")))?;
        let mut offsets = rdkafka::TopicPartitionList::new();
        offsets
            .add_partition_offset(
                &config.topic,
                partition as i32,
                rdkafka::Offset::Offset(offset as i64),
            )
            .map_err(|e| self.error(format!("offset {offset}: {e}")))?;
        let options = AdminOptions::new()
            .request_timeout(Some(config.request_timeout))
            .operation_timeout(Some(config.request_timeout));
        let answer = tokio::time::timeout(
            config.request_timeout + Duration::from_secs(1),
            admin.delete_records(&offsets, &options),
        )
        .await
        .map_err(|_| {
            self.error(format!(
                "no answer within {:?} while deleting records of {} partition {partition}",
                config.request_timeout, config.topic
            ))
        })?
        .map_err(|e| {
            self.error(format!(
                "cannot delete the records of {} partition {partition} before {offset}: {e}",
                config.topic
            ))
        })?;
        for element in answer.elements() {
            if let Err(e) = element.error() {
                return Err(self.error(format!(
                    "cannot delete the records of {} partition {partition} before {offset}: {e}",
                    config.topic
                )));
            }
        }
        Ok(())
    }

    async fn subscribe(&self, group: &str) -> Result<Box<dyn Subscription>, LogError> {
        let (subscription, thread) = consumer::subscribe(&self.config, group, &self.slots)?;
        self.consumers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(thread);
        Ok(subscription)
    }

    fn is_healthy(&self) -> bool {
        // librdkafka reconnects by itself; this turns false while it reports every broker
        // down, until a record is delivered again.
        !self.all_brokers_down.load(Ordering::Relaxed)
    }

    async fn close(&self) -> Result<(), LogError> {
        let (_, producer) = self.producer();
        let timeout = self.config.request_timeout;
        let consumers = std::mem::take(
            &mut *self
                .consumers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        // Consumer threads end once their subscriptions are dropped; they leave their group.
        let joined = tokio::task::spawn_blocking(move || {
            for thread in consumers {
                let _ = thread.join();
            }
        });
        if tokio::time::timeout(timeout, joined).await.is_err() {
            tracing::warn!(
                "kafka: a consumer did not leave its group within {timeout:?}; closing anyway"
            );
        }
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|e| self.error(format!("flush task failed: {e}")))?
            .map_err(|e| self.error(format!("cannot flush the producer: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_producer_error_is_a_warning_once() {
        let down = Arc::new(AtomicBool::new(false));
        let health = ProducerHealth::new(&down);
        let transport = Some(RDKafkaErrorCode::BrokerTransportFailure);
        assert!(health.is_news(transport));
        assert!(!health.is_news(transport), "the same error again");
        assert!(health.is_news(Some(RDKafkaErrorCode::Authentication)));
        assert!(health.is_news(transport), "news again after another error");
        let all_down = KafkaError::Global(RDKafkaErrorCode::AllBrokersDown);
        health.error(all_down.clone(), "1/1 brokers are down");
        assert!(down.load(Ordering::Relaxed));
        health.error(all_down, "1/1 brokers are down");
        assert!(down.load(Ordering::Relaxed), "still down");
    }

    #[test]
    fn kafka_urls_are_parsed_and_bad_ones_explained() {
        assert_eq!(
            KafkaLogConfig::brokers_from_url("kafka://a:9092,b:9093").expect("valid"),
            "a:9092,b:9093"
        );
        for bad in ["a:9092", "kafka://", "kafka://host"] {
            let e = KafkaLogConfig::brokers_from_url(bad).expect_err("invalid");
            assert!(e.to_string().contains("kafka://"), "{e}");
        }
    }
}
