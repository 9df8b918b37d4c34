//! A throw-away etcd (Debian's `etcd-server`, 3.4) for fleet tests: TLS with
//! client certificates made at start by the `openssl` CLI (a CA, a server
//! certificate for 127.0.0.1 and localhost, a client certificate), its data in
//! a temp dir. Dropping the guard kills it and removes the dir.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Where Debian puts the server.
pub const ETCD: &str = "/usr/bin/etcd";

pub struct Etcd {
    /// Certificates, the data dir and the log.
    pub dir: PathBuf,
    /// The network namespace it runs in (`None`: this one).
    ns: Option<String>,
    /// An address it serves on besides 127.0.0.1 (in its certificate too).
    extra: Option<String>,
    /// Client and peer ports on 127.0.0.1.
    pub client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// A port free on this namespace's loopback just now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A key and a certificate `name`.pem signed by the CA, with `ext` (the
/// extensions: SANs, key usage).
fn issue(dir: &Path, name: &str, cn: &str, ext: &str) {
    let key = format!("{name}.key");
    let csr = format!("{name}.csr");
    let pem = format!("{name}.pem");
    let extfile = format!("{name}.ext");
    std::fs::write(dir.join(&extfile), ext).expect("write ext");
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &pem,
            "-extfile",
            &extfile,
        ],
    );
}

/// A CA, a server certificate for 127.0.0.1, localhost and `extra`, and a
/// client certificate, in `dir`.
fn make_certs(dir: &Path, extra: Option<&str>) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=lb-test-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    issue(
            dir,
            "server",
            "etcd",
            &format!(
                "subjectAltName=IP:127.0.0.1,DNS:localhost{}\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
                extra.map(|a| format!(",IP:{a}")).unwrap_or_default()
            ),
        );
    issue(
            dir,
            "client",
            "lb-agent",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
        );
}

impl Etcd {
    /// Makes the certificates and starts etcd in `ns` (or here), on
    /// 127.0.0.1 ports free here; returns once it answers.
    pub fn start(ns: Option<&str>) -> Etcd {
        Etcd::start_at(ns, None)
    }

    /// Like `start`, serving clients on `extra` (an address of `ns`) too.
    pub fn start_at(ns: Option<&str>, extra: Option<&str>) -> Etcd {
        let dir =
            std::env::temp_dir().join(format!("lbt{}x-etcd-{}", std::process::id(), free_port()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("etcd temp dir");
        make_certs(&dir, extra);
        let mut etcd = Etcd {
            dir,
            ns: ns.map(str::to_string),
            extra: extra.map(str::to_string),
            client_port: free_port(),
            peer_port: free_port(),
            child: None,
        };
        etcd.restart();
        etcd
    }

    /// The `[fleet]` section that reaches this etcd, for node `node`.
    pub fn fleet_section(&self, node: &str, lease_ttl_s: u32) -> String {
        self.fleet_section_at("127.0.0.1", node, lease_ttl_s)
    }

    /// Like `fleet_section`, through `address` (127.0.0.1 or the extra one).
    pub fn fleet_section_at(&self, address: &str, node: &str, lease_ttl_s: u32) -> String {
        format!(
            "[fleet]\nendpoints = [\"https://{address}:{port}\"]\nca = \"{dir}/ca.pem\"\ncert = \"{dir}/client.pem\"\nkey = \"{dir}/client.key\"\nnode = \"{node}\"\nprefix = \"/lbtest\"\nlease_ttl_s = {lease_ttl_s}\n",
            port = self.client_port,
            dir = self.dir.display(),
        )
    }

    /// Starts etcd (again, over the same data) and waits until it says it
    /// serves clients.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "etcd is running");
        let mut client = format!("https://127.0.0.1:{}", self.client_port);
        if let Some(a) = &self.extra {
            client.push_str(&format!(",https://{a}:{}", self.client_port));
        }
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let d = |f: &str| self.dir.join(f).display().to_string();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .expect("etcd log");
        let mut cmd = match &self.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, ETCD]);
                c
            }
            None => Command::new(ETCD),
        };
        cmd.args(["--name", "test", "--data-dir", &d("data")])
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("test={peer}")])
            .args([
                "--cert-file",
                &d("server.pem"),
                "--key-file",
                &d("server.key"),
            ])
            .args(["--trusted-ca-file", &d("ca.pem"), "--client-cert-auth"])
            .stdout(Stdio::null())
            .stderr(log);
        let before = self.log().len();
        self.child = Some(cmd.spawn().expect("spawn etcd"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.log()[before..].contains("ready to serve client requests") {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("etcd exited with {status}:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "etcd not ready:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills etcd (SIGKILL) and waits for it; its data stays.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("etcd log and certificates kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A cluster of `n` etcd members in one namespace (each on its own client
/// and peer ports, on 127.0.0.1 and `extra`), sharing one CA and server
/// certificate. Members can be killed one by one; dropping the guard kills
/// the rest and removes the dir.
pub struct EtcdCluster {
    pub dir: PathBuf,
    ns: String,
    extra: String,
    /// (client port, peer port) per member.
    ports: Vec<(u16, u16)>,
    children: Vec<Option<Child>>,
}

impl EtcdCluster {
    pub fn start(ns: &str, extra: &str, n: usize) -> EtcdCluster {
        let dir = std::env::temp_dir().join(format!(
            "lbt{}x-etcd-cluster-{}",
            std::process::id(),
            free_port()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("etcd temp dir");
        make_certs(&dir, Some(extra));
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let mut cluster = EtcdCluster {
            dir,
            ns: ns.to_string(),
            extra: extra.to_string(),
            ports,
            children: Vec::new(),
        };
        for i in 0..n {
            let child = cluster.spawn(i, &initial.join(","));
            cluster.children.push(Some(child));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(0..n).all(|i| cluster.log(i).contains("ready to serve client requests")) {
            assert!(
                Instant::now() < deadline,
                "etcd cluster not ready:\n{}",
                (0..n)
                    .map(|i| cluster.log(i))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster
    }

    fn spawn(&self, i: usize, initial: &str) -> Child {
        let (client_port, peer_port) = self.ports[i];
        let client = format!(
            "https://127.0.0.1:{client_port},https://{}:{client_port}",
            self.extra
        );
        let peer = format!("http://127.0.0.1:{peer_port}");
        let d = |f: &str| self.dir.join(f).display().to_string();
        let log = std::fs::File::create(self.dir.join(format!("etcd-{i}.log"))).expect("log");
        Command::new("ip")
            .args(["netns", "exec", &self.ns, ETCD])
            .args([
                "--name",
                &format!("m{i}"),
                "--data-dir",
                &d(&format!("data-{i}")),
            ])
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args([
                "--initial-cluster",
                initial,
                "--initial-cluster-state",
                "new",
            ])
            .args([
                "--cert-file",
                &d("server.pem"),
                "--key-file",
                &d("server.key"),
            ])
            .args(["--trusted-ca-file", &d("ca.pem"), "--client-cert-auth"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd")
    }

    /// The `[fleet]` section naming every member, through `extra`.
    pub fn fleet_section(&self, node: &str, lease_ttl_s: u32) -> String {
        let endpoints: Vec<String> = self
            .ports
            .iter()
            .map(|(c, _)| format!("\"https://{}:{c}\"", self.extra))
            .collect();
        format!(
            "[fleet]\nendpoints = [{}]\nca = \"{dir}/ca.pem\"\ncert = \"{dir}/client.pem\"\nkey = \"{dir}/client.key\"\nnode = \"{node}\"\nprefix = \"/lbtest\"\nlease_ttl_s = {lease_ttl_s}\n",
            endpoints.join(", "),
            dir = self.dir.display(),
        )
    }

    /// Kills member `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("etcd-{i}.log"))).unwrap_or_default()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
        if std::thread::panicking() {
            eprintln!("etcd logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Writes `key` straight to the store, as a client other than lbctl would.
pub fn store_put(ns: &str, fleet_text: String, key: &'static str, value: &'static str) -> i64 {
    crate::topology::in_netns(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let cfg = lb_userspace::config::FleetConfig::from_toml_section(&fleet_text)
                .expect("fleet settings");
            let mut store = lb_userspace::fleet::Store::connect(&cfg)
                .await
                .expect("connect to etcd");
            store.put(key, value, None).await.expect("put")
        })
    })
    .join()
    .expect("store thread")
}
