//! The HTTP(S) client of health checks and load polls: one `reqwest` client
//! per backend and TLS setting, kept between probes so connections are
//! reused (keep-alive); redirects are refused and bodies are read up to
//! `MAX_BODY` bytes.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use reqwest::{redirect, Client, StatusCode};

use crate::config::TlsCheck;

/// The largest body a check or a load report may have.
pub const MAX_BODY: usize = 64 * 1024;

/// A client unused for this long is dropped (its backend left the
/// configuration, or its TLS settings changed).
const IDLE: Duration = Duration::from_secs(600);

/// Idle connections are closed after this long.
const POOL_IDLE: Duration = Duration::from_secs(90);

/// The answer to one request: its status and its body (at most `MAX_BODY`).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Vec<u8>,
    /// Where a redirect pointed (it is not followed).
    pub location: Option<String>,
}

type Key = (SocketAddr, Option<TlsCheck>);

/// The clients of the probes, one per (backend address, TLS settings).
#[derive(Default)]
pub struct Clients {
    clients: Mutex<HashMap<Key, (Client, Instant)>>,
}

impl Clients {
    /// `GET path` from `target`, over TLS when `tls` is set.
    pub async fn get(
        &self,
        target: SocketAddr,
        path: &str,
        tls: Option<&TlsCheck>,
        accept: &str,
    ) -> Result<Answer> {
        let client = self.client(target, tls)?;
        let url = match tls {
            None => format!("http://{target}{path}"),
            Some(TlsCheck {
                server_name: Some(name),
                ..
            }) => format!("https://{name}:{}{path}", target.port()),
            Some(_) => format!("https://{target}{path}"),
        };
        let mut response = client
            .get(&url)
            .header(reqwest::header::ACCEPT, accept)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = response.status();
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .map(|l| String::from_utf8_lossy(l.as_bytes()).into_owned());
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.context("reading the body")? {
            if body.len() + chunk.len() > MAX_BODY {
                bail!("the body is over {MAX_BODY} bytes");
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer {
            status,
            body,
            location,
        })
    }

    fn client(&self, target: SocketAddr, tls: Option<&TlsCheck>) -> Result<Client> {
        let key = (target, tls.cloned());
        let now = Instant::now();
        let mut clients = self.clients.lock().expect("not poisoned");
        clients.retain(|_, (_, used)| now.duration_since(*used) < IDLE);
        if let Some((client, used)) = clients.get_mut(&key) {
            *used = now;
            return Ok(client.clone());
        }
        let client = build(target, tls)?;
        clients.insert(key, (client.clone(), now));
        Ok(client)
    }
}

fn build(target: SocketAddr, tls: Option<&TlsCheck>) -> Result<Client> {
    let mut b = Client::builder()
        .user_agent("lb-agent")
        .redirect(redirect::Policy::none())
        .no_proxy()
        .pool_idle_timeout(POOL_IDLE)
        .pool_max_idle_per_host(1)
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        b = b.use_rustls_tls().https_only(true);
        if let Some(pem) = &tls.ca_pem {
            b = b.tls_built_in_root_certs(false);
            for cert in reqwest::Certificate::from_pem_bundle(pem).context("the CA bundle")? {
                b = b.add_root_certificate(cert);
            }
        }
        if let Some(name) = &tls.server_name {
            b = b.resolve(name, target);
        }
    }
    b.build().context("building the HTTP client")
}

/// A failed check's reason for an answer whose status is not `expect`.
pub fn wrong_status(a: &Answer, expect: u16) -> anyhow::Error {
    match (&a.location, a.status.is_redirection()) {
        (Some(to), true) => anyhow::anyhow!(
            "HTTP status {}, expected {expect} (a redirect to {to:?}; redirects are not followed)",
            a.status.as_u16()
        ),
        _ => anyhow::anyhow!("HTTP status {}, expected {expect}", a.status.as_u16()),
    }
}
