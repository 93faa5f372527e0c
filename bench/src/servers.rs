//! Starting and stopping the servers under test: topichub, nats-server, nginx + nchan, mosquitto
//! the raw fan-out program and the unary-publish floors, each on a free loopback port, pinned to its own core.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// One kind of server process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Topichub,
    /// topichub with `--data-dir` (default `--fsync always`).
    TopichubDisk,
    /// topichub with `--data-dir` and `--fsync every=1s`.
    TopichubDiskEvery,
    Nats,
    /// nats-server with JetStream on (file storage in the run's scratch directory).
    Jetstream,
    Nchan,
    Mosquitto,
    Raw,
    /// `topichub-bench floor-server`: unary `Publish` answered by hyper's HTTP/2 server alone
    /// (`--layer h2`) or by tonic over it (`--layer tonic`), with no broker behind.
    Floor(crate::floor::Layer),
    /// One nats-server of a three-node JetStream cluster (cluster scenario).
    ClusterNats,
    /// One topichub node of a cluster, `serve --nats` (cluster scenario).
    ClusterTopichub,
}

/// Where to find the programs and how to pin them.
#[derive(Clone, Debug)]
pub struct Launch {
    pub topichub_bin: PathBuf,
    /// This program (`raw-server` is one of its subcommands).
    pub self_bin: PathBuf,
    /// CPU list for `taskset -c` (None: no pinning).
    pub server_cpus: Option<String>,
    /// Scratch directory for configuration files and logs.
    pub work_dir: PathBuf,
}

/// A running server; stopped (SIGTERM, then SIGKILL) on drop.
pub struct Server {
    pub kind: Kind,
    pub addr: SocketAddr,
    child: Child,
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts a server with empty storage (a durable kind's data from an earlier run is removed).
    pub fn start(kind: Kind, launch: &Launch) -> anyhow::Result<Server> {
        let dir = Self::dir(kind, launch);
        let _ = std::fs::remove_dir_all(dir.join("data"));
        Self::start_with(kind, launch, &[])
    }

    /// The scratch directory of a kind; durable kinds keep their data in `data/` below it.
    pub fn dir(kind: Kind, launch: &Launch) -> PathBuf {
        let name = match kind {
            Kind::Floor(layer) => format!("{}-floor", layer.name()),
            other => format!("{other:?}").to_lowercase(),
        };
        launch.work_dir.join(name)
    }

    /// Starts a server on the data its kind's directory holds, with `extra` arguments.
    pub fn start_with(kind: Kind, launch: &Launch, extra: &[String]) -> anyhow::Result<Server> {
        let port = free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let dir = Self::dir(kind, launch);
        std::fs::create_dir_all(&dir)?;
        let data = path(&dir.join("data"));
        let (program, mut args): (PathBuf, Vec<String>) = match kind {
            Kind::Topichub | Kind::TopichubDisk | Kind::TopichubDiskEvery => {
                let mut args: Vec<String> = vec![
                    "serve".into(),
                    "--listen".into(),
                    addr.to_string(),
                    "--max-subscriptions-per-connection".into(),
                    "100000".into(),
                ];
                match kind {
                    Kind::TopichubDisk => args.extend(["--data-dir".into(), data]),
                    Kind::TopichubDiskEvery => args.extend([
                        "--data-dir".into(),
                        data,
                        "--fsync".into(),
                        "every=1s".into(),
                    ]),
                    _ => {}
                }
                (launch.topichub_bin.clone(), args)
            }
            Kind::Jetstream => {
                let conf = dir.join("nats.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "listen: {addr}\nmax_payload: 1MB\njetstream {{\n  store_dir: \"{data}\"\n}}\n"
                    ),
                )?;
                ("nats-server".into(), vec!["-c".into(), path(&conf)])
            }
            Kind::Nats => {
                let conf = dir.join("nats.conf");
                std::fs::write(
                    &conf,
                    format!("listen: {addr}\nmax_connections: 1000000\nmax_payload: 1MB\n"),
                )?;
                ("nats-server".into(), vec!["-c".into(), path(&conf)])
            }
            Kind::Nchan => {
                let conf = dir.join("nginx.conf");
                std::fs::write(&conf, nginx_conf(addr, &dir))?;
                (
                    "nginx".into(),
                    vec!["-p".into(), path(&dir), "-c".into(), path(&conf)],
                )
            }
            Kind::Mosquitto => {
                let conf = dir.join("mosquitto.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                         max_connections -1\nlog_dest stderr\nlog_type error\n"
                    ),
                )?;
                ("mosquitto".into(), vec!["-c".into(), path(&conf)])
            }
            Kind::Raw => (
                launch.self_bin.clone(),
                vec!["raw-server".into(), "--listen".into(), addr.to_string()],
            ),
            Kind::Floor(layer) => (
                launch.self_bin.clone(),
                vec![
                    "floor-server".into(),
                    "--listen".into(),
                    addr.to_string(),
                    "--layer".into(),
                    layer.name().into(),
                ],
            ),
            Kind::ClusterNats | Kind::ClusterTopichub => {
                bail!("{kind:?} is started by the cluster scenario (Server::spawn)")
            }
        };
        args.extend(extra.iter().cloned());
        Self::spawn(kind, addr, &dir, &program, &args, launch)
    }

    /// Starts `program` with `args`, pinned as `launch` says, logging to `dir/server.log`, and
    /// waits until it accepts connections at `addr`.
    pub fn spawn(
        kind: Kind,
        addr: SocketAddr,
        dir: &Path,
        program: &Path,
        args: &[String],
        launch: &Launch,
    ) -> anyhow::Result<Server> {
        std::fs::create_dir_all(dir)?;
        let log = std::fs::File::create(dir.join("server.log"))?;
        let mut command = match &launch.server_cpus {
            Some(cpus) => {
                let mut c = Command::new("taskset");
                c.args(["-c", cpus]).arg(program);
                c
            }
            None => Command::new(program),
        };
        command
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let mut server = Server { kind, addr, child };
        server.wait_listening(dir)?;
        Ok(server)
    }

    fn wait_listening(&mut self, dir: &Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait()? {
                let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
                bail!(
                    "{:?} exited with {status} before listening:\n{log}",
                    self.kind
                );
            }
            if std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{:?} did not listen on {} within 15 s",
                    self.kind,
                    self.addr
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Server {
    /// Ends the server with SIGKILL, as a crash would, and waits for it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // nginx's master stops its workers on SIGTERM (QUIT would wait for the SSE streams).
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn path(p: &Path) -> String {
    p.display().to_string()
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// nginx with nchan: one worker (the server gets one core), `POST /pub?id=T` publishes,
/// `GET /sub?id=T` subscribes over EventSource, starting with the next message.
fn nginx_conf(addr: SocketAddr, dir: &Path) -> String {
    let dir = path(dir);
    format!(
        r#"load_module /usr/lib/nginx/modules/ngx_nchan_module.so;
daemon off;
worker_processes 1;
worker_rlimit_nofile 1048576;
pid {dir}/nginx.pid;
error_log {dir}/error.log error;
events {{
    worker_connections 1000000;
    multi_accept on;
}}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    server {{
        listen {addr} backlog=65535;
        location = /pub {{
            nchan_publisher;
            nchan_channel_id $arg_id;
            nchan_message_buffer_length 100;
            nchan_message_timeout 60s;
        }}
        location = /sub {{
            nchan_subscriber eventsource;
            nchan_channel_id $arg_id;
            nchan_subscriber_first_message newest;
        }}
    }}
}}
"#
    )
}
