//! Prometheus metrics at `GET /metrics`, named after vLLM's (`vllm:` -> `oxtune:`).
//!
//! Built on `prometheus-client` with one explicit [`Registry`] per server (no process-global
//! recorder), so several servers in one test process keep separate counts. Latencies are
//! measured on the server with the monotonic clock (`Instant`), from the moment the request
//! reached its handler — the view a client such as `vllm bench serve` has, minus the network:
//!
//! | name | kind | what |
//! |---|---|---|
//! | `oxtune:time_to_first_token_seconds` | histogram | handler entry -> first token, per choice |
//! | `oxtune:inter_token_latency_seconds` | histogram | between consecutive tokens of a choice |
//! | `oxtune:e2e_request_latency_seconds` | histogram | handler entry -> last token, per choice |
//! | `oxtune:request_queue_time_seconds` | histogram | engine arrival -> first scheduled |
//! | `oxtune:num_requests_running` | gauge | sequences in the engine's running set |
//! | `oxtune:num_requests_waiting` | gauge | sequences queued in the engine |
//! | `oxtune:kv_cache_usage_perc` | gauge | fraction of KV-cache blocks in use, 0..=1 |
//! | `oxtune:prompt_tokens_total` | counter | prompt tokens of finished choices |
//! | `oxtune:generation_tokens_total` | counter | generated tokens of finished choices |
//! | `oxtune:request_success_total{finished_reason}` | counter | choices finished: stop, length, abort |
//! | `oxtune:request_failure_total{reason}` | counter | failed requests, by reason |
//! | `oxtune:prefix_cache_queries_total`, `oxtune:prefix_cache_hits_total` | gauge | prompt tokens looked up / found in the prefix cache |
//! | `oxtune:num_preemptions_total` | gauge | sequences preempted |
//!
//! Failure reasons: `invalid_request`, `not_found`, `unauthorized`, `overloaded`,
//! `shutting_down`, `not_ready`, `engine_dead`, `engine_error`, `internal`,
//! `client_disconnected`.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use oxtune_engine::EngineStats;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

/// Every failure reason, registered at zero so dashboards see the series from the start.
pub const FAILURE_REASONS: &[&str] = &[
    "invalid_request",
    "not_found",
    "unauthorized",
    "overloaded",
    "shutting_down",
    "not_ready",
    "engine_dead",
    "engine_error",
    "internal",
    "client_disconnected",
];

const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
    7.5, 10.0, 20.0, 40.0, 80.0,
];
const REQUEST_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
];

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    time_to_first_token: Histogram,
    inter_token_latency: Histogram,
    e2e_request_latency: Histogram,
    request_queue_time: Histogram,
    running: Gauge,
    waiting: Gauge,
    kv_cache_usage: Gauge<f64, AtomicU64>,
    prefix_cache_queries: Gauge,
    prefix_cache_hits: Gauge,
    preemptions: Gauge,
    prompt_tokens: Counter,
    generation_tokens: Counter,
    success: Family<Labels, Counter>,
    failure: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let histogram = |buckets: &[f64]| Histogram::new(buckets.iter().copied());
        let metrics = Self {
            time_to_first_token: histogram(TTFT_BUCKETS),
            inter_token_latency: histogram(ITL_BUCKETS),
            e2e_request_latency: histogram(REQUEST_BUCKETS),
            request_queue_time: histogram(REQUEST_BUCKETS),
            running: Gauge::default(),
            waiting: Gauge::default(),
            kv_cache_usage: Gauge::default(),
            prefix_cache_queries: Gauge::default(),
            prefix_cache_hits: Gauge::default(),
            preemptions: Gauge::default(),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            success: Family::default(),
            failure: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "oxtune:time_to_first_token_seconds",
            "Time to first token, per choice",
            metrics.time_to_first_token.clone(),
        );
        registry.register(
            "oxtune:inter_token_latency_seconds",
            "Time between consecutive tokens of a choice",
            metrics.inter_token_latency.clone(),
        );
        registry.register(
            "oxtune:e2e_request_latency_seconds",
            "Handler entry to the last token, per choice",
            metrics.e2e_request_latency.clone(),
        );
        registry.register(
            "oxtune:request_queue_time_seconds",
            "Time a request waited in the engine before it first ran",
            metrics.request_queue_time.clone(),
        );
        registry.register(
            "oxtune:num_requests_running",
            "Sequences the engine is running",
            metrics.running.clone(),
        );
        registry.register(
            "oxtune:num_requests_waiting",
            "Sequences queued in the engine",
            metrics.waiting.clone(),
        );
        registry.register(
            "oxtune:kv_cache_usage_perc",
            "Fraction of KV-cache blocks in use (0..=1)",
            metrics.kv_cache_usage.clone(),
        );
        registry.register(
            "oxtune:prefix_cache_queries_total",
            "Prompt tokens looked up in the prefix cache",
            metrics.prefix_cache_queries.clone(),
        );
        registry.register(
            "oxtune:prefix_cache_hits_total",
            "Prompt tokens found in the prefix cache",
            metrics.prefix_cache_hits.clone(),
        );
        registry.register(
            "oxtune:num_preemptions_total",
            "Sequences preempted for KV-cache space",
            metrics.preemptions.clone(),
        );
        // Counters get their `_total` suffix from the encoder.
        registry.register(
            "oxtune:prompt_tokens",
            "Prompt tokens of finished choices",
            metrics.prompt_tokens.clone(),
        );
        registry.register(
            "oxtune:generation_tokens",
            "Generated tokens of finished choices",
            metrics.generation_tokens.clone(),
        );
        registry.register(
            "oxtune:request_success",
            "Choices finished, by finish reason",
            metrics.success.clone(),
        );
        registry.register(
            "oxtune:request_failure",
            "Requests failed, by reason",
            metrics.failure.clone(),
        );
        for reason in ["stop", "length", "abort"] {
            let _ = metrics
                .success
                .get_or_create(&vec![("finished_reason", reason)]);
        }
        for reason in FAILURE_REASONS {
            let _ = metrics.failure.get_or_create(&vec![("reason", *reason)]);
        }
        Self {
            registry,
            ..metrics
        }
    }

    pub fn observe_time_to_first_token(&self, elapsed: Duration) {
        self.time_to_first_token.observe(elapsed.as_secs_f64());
    }

    pub fn observe_inter_token_latency(&self, elapsed: Duration) {
        self.inter_token_latency.observe(elapsed.as_secs_f64());
    }

    /// A choice finished: latency, queue time, token counts and its finish reason.
    pub fn record_finished(
        &self,
        reason: &'static str,
        e2e: Duration,
        queue: Duration,
        usage: &oxtune_engine::Usage,
    ) {
        self.e2e_request_latency.observe(e2e.as_secs_f64());
        self.request_queue_time.observe(queue.as_secs_f64());
        self.prompt_tokens.inc_by(usage.prompt_tokens as u64);
        self.generation_tokens
            .inc_by(usage.completion_tokens as u64);
        self.success
            .get_or_create(&vec![("finished_reason", reason)])
            .inc();
    }

    pub fn record_failure(&self, reason: &'static str) {
        self.failure.get_or_create(&vec![("reason", reason)]).inc();
    }

    /// The text exposition, with the gauges read from `stats` (the engine's, if it runs).
    pub fn render(&self, stats: Option<&EngineStats>) -> String {
        if let Some(stats) = stats {
            let as_i64 = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
            self.running.set(as_i64(stats.running as u64));
            self.waiting.set(as_i64(stats.waiting as u64));
            self.kv_cache_usage.set(stats.kv_cache_usage);
            self.prefix_cache_queries
                .set(as_i64(stats.prefix_cache_queries));
            self.prefix_cache_hits.set(as_i64(stats.prefix_cache_hits));
            self.preemptions.set(as_i64(stats.preemptions));
        }
        let mut text = String::new();
        if encode(&mut text, &self.registry).is_err() {
            tracing::error!("encoding the metrics failed");
        }
        text
    }
}

/// The value of an unlabelled sample `name` in a text exposition (tests and probes).
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            (key == name).then(|| value.parse().ok()).flatten()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        let metrics = Metrics::new();
        metrics.record_failure("overloaded");
        metrics.observe_time_to_first_token(Duration::from_millis(5));
        let text = metrics.render(Some(&EngineStats {
            running: 2,
            kv_cache_usage: 0.5,
            ..EngineStats::default()
        }));
        for name in [
            "oxtune:time_to_first_token_seconds_bucket",
            "oxtune:inter_token_latency_seconds_count",
            "oxtune:e2e_request_latency_seconds_sum",
            "oxtune:request_queue_time_seconds_count",
            "oxtune:prompt_tokens_total",
            "oxtune:generation_tokens_total",
            "oxtune:request_success_total{finished_reason=\"stop\"}",
            "oxtune:request_failure_total{reason=\"overloaded\"} 1",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
        assert_eq!(sample(&text, "oxtune:num_requests_running"), Some(2.0));
        assert_eq!(sample(&text, "oxtune:num_requests_waiting"), Some(0.0));
        assert_eq!(sample(&text, "oxtune:kv_cache_usage_perc"), Some(0.5));
        assert_eq!(
            sample(&text, "oxtune:time_to_first_token_seconds_count"),
            Some(1.0)
        );
    }
}
