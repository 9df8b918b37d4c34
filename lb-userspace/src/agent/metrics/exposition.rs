//! The exposition of one scrape, built with `prometheus-client`: families
//! are declared with a name, a kind and a help text, then filled with
//! labelled samples, and encoded as OpenMetrics or as the Prometheus text
//! format 0.0.4.

use std::{
    collections::{HashMap, HashSet},
    sync::atomic::AtomicU64,
};

use prometheus_client::{
    encoding::text,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

type Labels = Vec<(String, String)>;

/// One declared family, registered at its first sample (whose type, whole
/// or fractional, sets the gauge's value type; a family sampled without
/// labels is a single metric, written without braces). A family without
/// samples is left out of the exposition, as prometheus-client does.
enum Metric {
    Declared { kind: Kind, help: String },
    Counter(Family<Labels, Counter<u64>>),
    Gauge(Family<Labels, Gauge<u64, AtomicU64>>),
    GaugeF(Family<Labels, Gauge<f64, AtomicU64>>),
    Counter1(Counter<u64>),
    Gauge1(Gauge<u64, AtomicU64>),
    GaugeF1(Gauge<f64, AtomicU64>),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

/// The families of one scrape, in the order of their first samples.
#[derive(Default)]
pub(super) struct Exposition {
    registry: Registry,
    metrics: HashMap<String, Metric>,
    /// Counter names without their `_total`, as OpenMetrics names them.
    counters: HashSet<String>,
}

impl Exposition {
    /// Declares family `name` of `kind` ("counter", whose name ends in
    /// `_total`, or "gauge").
    pub(super) fn family(&mut self, name: &str, kind: &str, help: &str) {
        let kind = if kind == "counter" {
            Kind::Counter
        } else {
            Kind::Gauge
        };
        if self.metrics.contains_key(name) {
            return;
        }
        // prometheus-client ends every help with a period.
        let help = help.strip_suffix('.').unwrap_or(help).to_string();
        self.metrics
            .insert(name.to_string(), Metric::Declared { kind, help });
    }

    pub(super) fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.set(name, labels, false, value, value as f64);
    }

    /// A fractional sample; non-finite values are left out.
    pub(super) fn sample_f(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        if value.is_finite() {
            // The counters sampled this way count whole things.
            self.set(name, labels, true, value as u64, value);
        }
    }

    fn set(&mut self, name: &str, labels: &[(&str, &str)], fractional: bool, whole: u64, f: f64) {
        let single = labels.is_empty();
        match self.metric(name, fractional, single) {
            Metric::Counter(m) => {
                m.get_or_create(&owned(labels)).inc_by(whole);
            }
            Metric::Gauge(m) => {
                m.get_or_create(&owned(labels)).set(whole);
            }
            Metric::GaugeF(m) => {
                m.get_or_create(&owned(labels)).set(f);
            }
            Metric::Counter1(m) => {
                m.inc_by(whole);
            }
            Metric::Gauge1(m) => {
                m.set(whole);
            }
            Metric::GaugeF1(m) => {
                m.set(f);
            }
            Metric::Declared { .. } => unreachable!("registered by metric()"),
        }
    }

    /// Family `name`, registered now if it was only declared.
    fn metric(&mut self, name: &str, fractional: bool, single: bool) -> &Metric {
        let m = self
            .metrics
            .get_mut(name)
            .unwrap_or_else(|| panic!("family {name} sampled before it was declared"));
        if let Metric::Declared { kind, help } = m {
            let help = std::mem::take(help);
            let r = &mut self.registry;
            let mut name = name;
            if *kind == Kind::Counter {
                // prometheus-client adds the `_total`.
                name = name.strip_suffix("_total").unwrap_or(name);
                self.counters.insert(name.to_string());
            }
            *m = match (*kind, fractional, single) {
                (Kind::Counter, _, false) => Metric::Counter(registered(r, name, help)),
                (Kind::Gauge, false, false) => Metric::Gauge(registered(r, name, help)),
                (Kind::Gauge, true, false) => Metric::GaugeF(registered(r, name, help)),
                (Kind::Counter, _, true) => Metric::Counter1(registered(r, name, help)),
                (Kind::Gauge, false, true) => Metric::Gauge1(registered(r, name, help)),
                (Kind::Gauge, true, true) => Metric::GaugeF1(registered(r, name, help)),
            };
        }
        m
    }

    /// OpenMetrics 1.0 text (`application/openmetrics-text`).
    pub(super) fn openmetrics(self) -> String {
        let mut out = String::new();
        text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }

    /// The Prometheus text format 0.0.4 (`text/plain`): the same families,
    /// where a counter's HELP and TYPE name it with its `_total` (as its
    /// samples are), and without the OpenMetrics end marker.
    pub(super) fn text_004(self) -> String {
        let mut om = String::new();
        text::encode_registry(&mut om, &self.registry).expect("writing to a String");
        let mut out = String::with_capacity(om.len() + 64);
        for line in om.lines() {
            let descriptor = line
                .strip_prefix("# HELP ")
                .map(|r| ("# HELP ", r))
                .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
            match descriptor {
                Some((tag, rest)) => {
                    let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                    let total = if self.counters.contains(name) {
                        "_total"
                    } else {
                        ""
                    };
                    out.push_str(&format!("{tag}{name}{total} {tail}\n"));
                }
                None => {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        out
    }
}

fn registered<M>(registry: &mut Registry, name: &str, help: String) -> M
where
    M: prometheus_client::registry::Metric + Clone + Default,
{
    let m = M::default();
    registry.register(name, help, m.clone());
    m
}

fn owned(labels: &[(&str, &str)]) -> Labels {
    labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Exposition {
        let mut e = Exposition::default();
        e.family("lb_x_total", "counter", "Things counted.");
        e.sample("lb_x_total", &[("vip", "a\"b")], 3);
        e.family("lb_ratio", "gauge", "A share.");
        e.sample_f("lb_ratio", &[("vip", "a")], 0.5);
        e.sample_f("lb_ratio", &[("vip", "b")], f64::NAN);
        e.family("lb_empty", "gauge", "Nothing yet.");
        e.family("lb_one_total", "counter", "One.");
        e.sample("lb_one_total", &[], 4);
        e
    }

    #[test]
    fn prometheus_text_names_counters_with_total() {
        let t = sample().text_004();
        assert!(t.contains("# HELP lb_x_total Things counted.\n"), "{t}");
        assert!(t.contains("# TYPE lb_x_total counter\n"), "{t}");
        assert!(t.contains("lb_x_total{vip=\"a\\\"b\"} 3\n"), "{t}");
        assert!(t.contains("lb_ratio{vip=\"a\"} 0.5\n"), "{t}");
        assert!(!t.contains("vip=\"b\""), "NaN is left out: {t}");
        assert!(
            !t.contains("lb_empty"),
            "a family without samples is left out: {t}"
        );
        assert!(!t.contains("# EOF"), "{t}");
        assert!(t.contains("\nlb_one_total 4\n"), "{t}");
    }

    #[test]
    fn openmetrics_names_counter_families_without_total() {
        let t = sample().openmetrics();
        assert!(t.contains("# TYPE lb_x counter\n"), "{t}");
        assert!(t.contains("lb_x_total{vip=\"a\\\"b\"} 3\n"), "{t}");
        assert!(t.ends_with("# EOF\n"), "{t}");
    }
}
