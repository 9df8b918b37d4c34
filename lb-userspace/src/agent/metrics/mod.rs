//! The HTTP listener on `[metrics] listen`: `/metrics` (the Prometheus text
//! format 0.0.4, or OpenMetrics when the scraper asks for it), and the
//! read-only dashboard with its JSON endpoints (`super::dashboard`).

mod exposition;
mod series;

use std::time::Duration;

use axum::{
    http::{header, HeaderMap, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use tokio::net::TcpListener;

use super::{dashboard, state::Shared};
use crate::limits::{self, Bound, HttpBound};

/// How many clients (scrapers, dashboards) may be connected at once, and
/// for how long.
const HTTP: HttpBound = HttpBound {
    bound: Bound {
        name: "metrics",
        max_connections: 32,
    },
    header_timeout: Duration::from_secs(5),
    lifetime: Duration::from_secs(60),
};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `/metrics` and the dashboard on `listener`.
pub(crate) async fn serve(listener: TcpListener, state: Shared) {
    let history = dashboard::History::start(state.clone());
    let metrics = {
        let state = state.clone();
        get(move |headers: HeaderMap| {
            let state = state.clone();
            async move { scrape(&state, &headers).await }
        })
    };
    let app = Router::new()
        .route("/metrics", metrics)
        .merge(dashboard::routes(state, history))
        .fallback(not_found);
    limits::serve_http(listener, app, HTTP).await;
}

/// One scrape, in the format the `Accept` header prefers.
async fn scrape(state: &Shared, headers: &HeaderMap) -> Response {
    let exposition = match series::render(state).await {
        Ok(e) => e,
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                format!("{e:#}\n"),
            )
                .into_response()
        }
    };
    if wants_openmetrics(headers) {
        (
            [(header::CONTENT_TYPE, OPENMETRICS)],
            exposition.openmetrics(),
        )
            .into_response()
    } else {
        (
            [(header::CONTENT_TYPE, PROMETHEUS_TEXT)],
            exposition.text_004(),
        )
            .into_response()
    }
}

/// Whether the `Accept` header ranks OpenMetrics above the plain text
/// format (Prometheus asks for both, OpenMetrics first).
fn wants_openmetrics(headers: &HeaderMap) -> bool {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|a| a.to_str().ok()) else {
        return false;
    };
    let quality = |wanted: &str| -> f32 {
        accept
            .split(',')
            .filter_map(|part| {
                let mut params = part.split(';').map(str::trim);
                let media = params.next()?;
                if !media.eq_ignore_ascii_case(wanted) {
                    return None;
                }
                let q = params
                    .find_map(|p| p.strip_prefix("q="))
                    .and_then(|q| q.parse().ok())
                    .unwrap_or(1.0);
                Some(q)
            })
            .fold(0.0, f32::max)
    };
    let om = quality("application/openmetrics-text");
    om > 0.0 && om >= quality("text/plain")
}

async fn not_found(uri: Uri) -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!(
            "no page at {}: this listener serves /metrics, the dashboard at / and its JSON at {}\n",
            uri.path(),
            dashboard::API_PATHS.join(", ")
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_when_ranked_first() {
        let accept = |a: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT, a.parse().unwrap());
            wants_openmetrics(&h)
        };
        assert!(!wants_openmetrics(&HeaderMap::new()));
        assert!(accept("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"));
        assert!(accept("application/openmetrics-text"));
        assert!(!accept("text/plain;version=0.0.4"));
        assert!(!accept("text/plain, application/openmetrics-text;q=0.5"));
        assert!(!accept("*/*"));
    }
}
