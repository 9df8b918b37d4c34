//! Load feedback: a backend's load level from its reports and its flows,
//! the damping of that level, and the weight factor it gives.

use crate::config::VipConfig;

/// How load levels are damped (weight of a new observation in the moving
/// average) and the smallest weight-factor change that rebuilds a table: the
/// VIP's feedback settings, or 0.5 and 0.1 without them.
pub(super) fn damping(cfg: &VipConfig) -> (f64, f64) {
    cfg.feedback
        .as_ref()
        .map_or((0.5, 0.1), |f| (f.smoothing, f.min_change))
}

/// A backend's load level from what is known of it: the larger of its damped
/// load report and its active flows over `max_flows`.
pub fn load_level(reported: Option<f64>, active_flows: u64, max_flows: Option<u32>) -> Option<f64> {
    let from_flows = max_flows.map(|m| active_flows as f64 / f64::from(m));
    match (reported, from_flows) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// The weight factor for a load: a fully loaded backend keeps a trickle.
pub fn weight_factor(load: f64) -> f64 {
    (1.0 - load).clamp(0.05, 1.0)
}

/// The load factor to apply, with hysteresis: it moves only by `min_change`
/// or more, so noise in the load does not rebuild the table.
pub(super) fn next_factor(applied: f64, level: Option<f64>, min_change: f64) -> f64 {
    let wanted = level.map_or(1.0, weight_factor);
    let diff = (wanted - applied).abs();
    if diff > 1e-12 && diff + 1e-9 >= min_change {
        wanted
    } else {
        applied
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_factor_keeps_a_trickle() {
        assert_eq!(weight_factor(0.0), 1.0);
        assert!((weight_factor(0.75) - 0.25).abs() < 1e-12);
        assert_eq!(weight_factor(1.0), 0.05);
        assert_eq!(weight_factor(-3.0), 1.0);
    }

    #[test]
    fn load_level_takes_the_larger_known_figure() {
        assert_eq!(load_level(None, 10, None), None);
        assert_eq!(load_level(Some(0.3), 10, None), Some(0.3));
        assert_eq!(load_level(None, 50, Some(100)), Some(0.5));
        assert_eq!(load_level(Some(0.3), 50, Some(100)), Some(0.5));
        assert_eq!(load_level(Some(0.7), 50, Some(100)), Some(0.7));
    }
}
