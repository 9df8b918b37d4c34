//! One scheduler for per-(VIP, backend) probes, health checks and load polls
//! alike: each pair is probed at its VIP's interval, all due pairs at once.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    net::SocketAddr,
    time::Duration,
};

use tokio::time::Instant;

use crate::{
    balancer::Pair,
    config::{BalancerConfig, VipConfig},
};

/// A probe due now: the pair, the address to probe and the VIP's settings.
#[derive(Debug, Clone)]
pub struct Probe<T> {
    pub pair: Pair,
    pub target: SocketAddr,
    pub settings: T,
}

/// When each pair is due next, and what the caller keeps per pair (the
/// health checks' rise/fall tracker, say) for as long as the pair is probed.
#[derive(Debug)]
pub struct Schedule<S = ()> {
    next: HashMap<Pair, (Instant, S)>,
}

impl<S> Default for Schedule<S> {
    fn default() -> Self {
        Schedule {
            next: HashMap::new(),
        }
    }
}

impl<S: Default> Schedule<S> {
    /// The pairs due at `now` among the VIPs that `settings` selects (it
    /// gives the VIP's settings, the port to probe and the interval). Pairs
    /// no longer selected are forgotten; a new pair is due at once.
    pub fn due<T: Clone>(
        &mut self,
        config: &BalancerConfig,
        now: Instant,
        settings: impl Fn(&VipConfig) -> Option<(&T, u16)>,
    ) -> Vec<Probe<T>> {
        let mut live = HashSet::new();
        let mut due = Vec::new();
        for v in &config.vips {
            let Some((s, port)) = settings(v) else {
                continue;
            };
            for be in &v.backends {
                let pair = ((v.address, v.port, v.protocol), be.address);
                live.insert(pair);
                if self.next.get(&pair).is_none_or(|(at, _)| *at <= now) {
                    due.push(Probe {
                        pair,
                        target: SocketAddr::new(be.address, port),
                        settings: s.clone(),
                    });
                }
            }
        }
        self.next.retain(|p, _| live.contains(p));
        due
    }

    /// Runs every due probe at once, and schedules each pair's next one
    /// `interval(settings)` after `now`.
    pub async fn run<T, R, F, Fut>(
        &mut self,
        due: Vec<Probe<T>>,
        now: Instant,
        interval: impl Fn(&T) -> Duration,
        probe: F,
    ) -> Vec<(Probe<T>, R)>
    where
        F: Fn(SocketAddr, T) -> Fut,
        Fut: Future<Output = R>,
        T: Clone,
    {
        for p in &due {
            self.next
                .entry(p.pair)
                .or_insert_with(|| (now, S::default()))
                .0 = now + interval(&p.settings);
        }
        let runs = due.into_iter().map(|p| {
            let run = probe(p.target, p.settings.clone());
            async move { (p, run.await) }
        });
        futures::future::join_all(runs).await
    }

    /// What the caller keeps for a pair the schedule follows.
    pub fn kept(&mut self, pair: &Pair) -> Option<&mut S> {
        self.next.get_mut(pair).map(|(_, s)| s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn config(vips: &str) -> BalancerConfig {
        let text = format!(
            "[datapath]\ninterfaces=[\"eth0\"]\n[encap]\nsource_v4=\"198.18.200.0/24\"\n{vips}"
        );
        Config::from_toml(&text).unwrap().balancer.unwrap()
    }

    const CHECKED: &str = r#"
[[vips]]
name = "web"
address = "198.18.10.1"
port = 80
protocol = "tcp"
backends = [ { address = "198.18.0.11" }, { address = "198.18.0.12" } ]
health = { kind = "tcp", interval_ms = 1000, port = 8080 }
[[vips]]
name = "dns"
address = "198.18.10.2"
port = 53
protocol = "udp"
backends = [ { address = "198.18.0.13" } ]
"#;

    #[tokio::test]
    async fn pairs_are_due_at_their_interval_and_forgotten_when_gone() {
        let cfg = config(CHECKED);
        fn select(v: &VipConfig) -> Option<(&crate::config::HealthCheck, u16)> {
            v.health.as_ref().map(|h| (h, h.port))
        }
        let mut s: Schedule = Schedule::default();
        let t0 = Instant::now();
        let due = s.due(&cfg, t0, select);
        let targets: Vec<String> = due.iter().map(|p| p.target.to_string()).collect();
        assert_eq!(
            targets,
            ["198.18.0.11:8080", "198.18.0.12:8080"],
            "unchecked VIPs are left out"
        );
        let results = s
            .run(
                due,
                t0,
                |h| Duration::from_millis(h.interval_ms),
                |target, _| async move { target.port() },
            )
            .await;
        assert_eq!(results.len(), 2);
        assert!(results.iter().all(|(_, r)| *r == 8080));
        assert!(s
            .due(&cfg, t0 + Duration::from_millis(999), select)
            .is_empty());
        assert_eq!(
            s.due(&cfg, t0 + Duration::from_millis(1000), select).len(),
            2
        );
        // A backend removed from the configuration is forgotten.
        let pair = results[1].0.pair;
        let smaller = config(&CHECKED.replace(", { address = \"198.18.0.12\" }", ""));
        assert_eq!(s.due(&smaller, t0, select).len(), 0);
        assert!(!s.next.contains_key(&pair));
    }
}
