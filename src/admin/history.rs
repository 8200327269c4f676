//! The status page's charts: per route and per upstream, request rate, error rate and p50/p99
//! latency over the last 15 minutes, sampled from the process's own metric families every
//! 5 s and kept here (180 points a series, a few KiB each): no time-series service to run.
//!
//! A point is the difference between two samples: requests and errors over the interval, and
//! the latency quantiles of the requests of the interval (from the histogram buckets'
//! differences, interpolated within the bucket as Prometheus' `histogram_quantile` does).
use std::collections::{BTreeMap, VecDeque};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use prometheus::proto::MetricFamily;
use serde_json::{json, Value};

pub const INTERVAL: Duration = Duration::from_secs(5);
const POINTS: usize = 180;

/// Cumulative counts of one series at one sample.
#[derive(Clone, Default)]
struct Sample {
    requests: u64,
    errors: u64,
    /// (upper bound in seconds, cumulative count), the histogram's buckets.
    buckets: Vec<(f64, u64)>,
}

#[derive(Clone, Copy)]
struct Point {
    at: u64,
    rate: f64,
    error_pct: Option<f64>,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
}

#[derive(Default)]
struct Series {
    last: Sample,
    points: VecDeque<Point>,
}

#[derive(Default)]
pub struct History {
    series: Mutex<BTreeMap<(&'static str, String), Series>>,
}

pub static HISTORY: LazyLock<History> = LazyLock::new(History::default);

fn label<'a>(m: &'a prometheus::proto::Metric, name: &str) -> &'a str {
    m.get_label()
        .iter()
        .find(|l| l.name() == name)
        .map_or("", |l| l.value())
}

/// The `q` quantile, in ms, of the observations between two cumulative bucket lists.
fn quantile(q: f64, now: &[(f64, u64)], before: &[(f64, u64)]) -> Option<f64> {
    let diff: Vec<(f64, u64)> = now
        .iter()
        .enumerate()
        .map(|(i, (b, c))| (*b, c.saturating_sub(before.get(i).map_or(0, |x| x.1))))
        .collect();
    let total = diff.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut prev = (0.0, 0u64);
    for &(bound, cum) in &diff {
        if cum as f64 >= rank {
            if bound.is_infinite() {
                return Some(prev.0 * 1000.0);
            }
            let within = (cum - prev.1) as f64;
            let f = if within > 0.0 {
                (rank - prev.1 as f64) / within
            } else {
                1.0
            };
            return Some((prev.0 + (bound - prev.0) * f) * 1000.0);
        }
        prev = (bound, cum);
    }
    Some(prev.0 * 1000.0)
}

fn buckets(m: &prometheus::proto::Metric) -> Vec<(f64, u64)> {
    let h = m.get_histogram();
    let mut b: Vec<(f64, u64)> = h
        .get_bucket()
        .iter()
        .map(|b| (b.upper_bound(), b.cumulative_count()))
        .collect();
    b.push((f64::INFINITY, h.get_sample_count()));
    b
}

impl History {
    /// Takes one sample of every route and upstream series (`at`: unix seconds).
    pub fn sample(&self, families: &[MetricFamily], at: u64) {
        let mut now: BTreeMap<(&'static str, String), Sample> = BTreeMap::new();
        for f in families {
            match f.name() {
                "gatehouse_requests_total" => {
                    for m in f.get_metric() {
                        let key = format!("{}/{}", label(m, "gateway"), label(m, "route"));
                        let v = m.get_counter().value() as u64;
                        let s = now.entry(("route", key)).or_default();
                        s.requests += v;
                        if label(m, "status") == "5xx" {
                            s.errors += v;
                        }
                    }
                }
                "gatehouse_request_duration_seconds" => {
                    for m in f.get_metric() {
                        let key = format!("{}/{}", label(m, "gateway"), label(m, "route"));
                        now.entry(("route", key)).or_default().buckets = buckets(m);
                    }
                }
                "gatehouse_upstream_duration_seconds" => {
                    for m in f.get_metric() {
                        let s = now
                            .entry(("upstream", label(m, "upstream").to_string()))
                            .or_default();
                        s.buckets = buckets(m);
                        s.requests += m.get_histogram().get_sample_count();
                    }
                }
                "gatehouse_upstream_errors_total" => {
                    for m in f.get_metric() {
                        let v = m.get_counter().value() as u64;
                        let s = now
                            .entry(("upstream", label(m, "upstream").to_string()))
                            .or_default();
                        s.errors += v;
                        // An attempt with no answer is an attempt the histogram did not see.
                        if label(m, "kind") == "failed" {
                            s.requests += v;
                        }
                    }
                }
                _ => {}
            }
        }
        let secs = INTERVAL.as_secs_f64();
        let Ok(mut series) = self.series.lock() else {
            return;
        };
        // Series the config no longer has go (their metric series went on reload).
        series.retain(|k, _| now.contains_key(k));
        for (key, s) in now {
            let e = series.entry(key).or_default();
            let first = e.last.buckets.is_empty() && e.last.requests == 0 && e.points.is_empty();
            if !first {
                let n = s.requests.saturating_sub(e.last.requests);
                let errors = s.errors.saturating_sub(e.last.errors);
                e.points.push_back(Point {
                    at,
                    rate: n as f64 / secs,
                    error_pct: (n > 0).then(|| 100.0 * errors as f64 / n as f64),
                    p50_ms: quantile(0.5, &s.buckets, &e.last.buckets),
                    p99_ms: quantile(0.99, &s.buckets, &e.last.buckets),
                });
                if e.points.len() > POINTS {
                    e.points.pop_front();
                }
            }
            e.last = s;
        }
    }

    /// `GET /history`: every series' points, oldest first.
    pub fn json(&self) -> Value {
        let series = self.series.lock();
        let Ok(series) = series else {
            return json!({});
        };
        let list: Vec<Value> = series
            .iter()
            .map(|((kind, name), s)| {
                let col = |f: &dyn Fn(&Point) -> Option<f64>| -> Vec<Value> {
                    s.points
                        .iter()
                        .map(|p| f(p).map_or(Value::Null, |v| json!((v * 1000.0).round() / 1000.0)))
                        .collect()
                };
                json!({
                    "kind": kind,
                    "name": name,
                    "at": s.points.iter().map(|p| p.at).collect::<Vec<_>>(),
                    "rate": col(&|p| Some(p.rate)),
                    "error_pct": col(&|p| p.error_pct),
                    "p50_ms": col(&|p| p.p50_ms),
                    "p99_ms": col(&|p| p.p99_ms),
                })
            })
            .collect();
        json!({ "interval_seconds": INTERVAL.as_secs(), "window_seconds": INTERVAL.as_secs() * POINTS as u64, "series": list })
    }
}

/// Samples every [`INTERVAL`] for as long as the server runs (the background service).
pub async fn run() {
    loop {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let families = crate::metrics::METRICS.registry.gather();
        HISTORY.sample(&families, at);
        tokio::time::sleep(INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let before = [(0.01, 0), (0.1, 0), (f64::INFINITY, 0)];
        let now = [(0.01, 50), (0.1, 100), (f64::INFINITY, 100)];
        // Half the requests under 10 ms: the median is the first bucket's top.
        assert_eq!(quantile(0.5, &now, &before), Some(10.0));
        // p99 falls in the second bucket, 98% of the way through it.
        let p99 = quantile(0.99, &now, &before).unwrap();
        assert!((p99 - 98.2).abs() < 0.01, "{p99}");
        assert_eq!(quantile(0.5, &before, &before), None);
    }
}
