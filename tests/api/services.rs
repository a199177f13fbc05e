//! The real PostgreSQL and Redis this machine runs (127.0.0.1:5432, trust auth; 127.0.0.1:6379),
//! shared by tests running in parallel: each test gets its own database and its own key prefix,
//! removed when the handle drops (also when the test fails). A test that must stop Redis starts
//! its own `redis-server` on a free port ([`OwnRedis`]).

use std::process::{Child, Command, Stdio};

use sqlx::Connection;
use sqlx::postgres::PgConnection;

/// The server's maintenance database, where test databases are created and dropped.
fn admin_url() -> String {
    std::env::var("MANGOO_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub fn redis_url() -> String {
    std::env::var("MANGOO_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// A database of its own on the test PostgreSQL server, dropped with the handle.
pub struct TestDatabase {
    pub url: String,
    name: String,
}

impl TestDatabase {
    /// A connection of the test's own to this database (not one of Mangoo's).
    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url).await.unwrap()
    }

    /// The server processes of Mangoo's connections to this database waiting for a lock.
    pub async fn mangoo_backends_waiting_on_a_lock(&self) -> Vec<i32> {
        let mut conn = self.connect().await;
        let pids = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 \
             AND application_name = 'mangoo' AND wait_event_type = 'Lock'",
        )
        .bind(&self.name)
        .fetch_all(&mut conn)
        .await
        .unwrap();
        conn.close().await.unwrap();
        pids
    }

    /// Ends every connection Mangoo has to this database, idle or mid-statement, as an operator's
    /// `pg_terminate_backend` (or a failover) does; the number ended.
    pub async fn terminate_mangoo_connections(&self) -> usize {
        let mut conn = self.connect().await;
        let ended: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 \
             AND application_name = 'mangoo' AND pid <> pg_backend_pid()",
        )
        .bind(&self.name)
        .fetch_all(&mut conn)
        .await
        .unwrap();
        conn.close().await.unwrap();
        ended.into_iter().filter(|ended| *ended).count()
    }

    pub async fn create() -> Self {
        let admin = admin_url();
        let name = unique("mangoo_test");
        let mut conn = PgConnection::connect(&admin)
            .await
            .expect("PostgreSQL runs at 127.0.0.1:5432 (MANGOO_TEST_POSTGRES_URL)");
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        let base = admin.rsplit_once('/').expect("a URL with a database").0;
        Self {
            url: format!("{base}/{name}"),
            name,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop runs outside any async context we can rely on (maybe during a panic): a thread of
        // its own with a small runtime. FORCE ends connections a failed test left open.
        let (admin, name) = (admin_url(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let mut conn = PgConnection::connect(&admin).await?;
                sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await?;
                conn.close().await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {}", self.name);
        }
    }
}

/// A key prefix of its own on a Redis server; every key under it is deleted with the handle.
pub struct TestKeys {
    pub url: String,
    pub prefix: String,
}

impl TestKeys {
    pub fn new() -> Self {
        Self::on(redis_url())
    }

    pub fn on(url: String) -> Self {
        Self {
            url,
            prefix: unique("mangoo-test"),
        }
    }

    /// A connection to the server, for a test that edits keys directly.
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url.as_str())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Keys under the prefix right now.
    pub fn keys(&self) -> Vec<String> {
        let client = redis::Client::open(self.url.as_str()).unwrap();
        let Ok(mut conn) = client.get_connection() else {
            return Vec::new();
        };
        let pattern = format!("{}:*", self.prefix);
        let keys: redis::Iter<String> = redis::cmd("SCAN")
            .cursor_arg(0)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .clone()
            .iter(&mut conn)
            .unwrap();
        keys.filter_map(Result::ok).collect()
    }
}

impl Drop for TestKeys {
    fn drop(&mut self) {
        let keys = self.keys();
        if keys.is_empty() {
            return;
        }
        if let Ok(mut conn) =
            redis::Client::open(self.url.as_str()).and_then(|c| c.get_connection())
        {
            let _: Result<(), _> = redis::cmd("DEL").arg(&keys).query(&mut conn);
        }
    }
}

/// A port nothing listens on right now, for a server started as another process.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` of the test's own on a free port, for tests that stop and restart it.
pub struct OwnRedis {
    pub port: u16,
    child: Option<Child>,
    /// Extra command-line arguments (e.g. `--replicaof`), used again on each start.
    args: Vec<String>,
}

impl OwnRedis {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(args: &[&str]) -> Self {
        let port = free_port();
        let mut redis = Self {
            port,
            child: None,
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        let _ = std::fs::remove_dir_all(redis.dir());
        redis.resume();
        redis
    }

    /// One command, answered synchronously (`REPLICAOF`, `FLUSHALL`, `XDEL`…).
    pub fn command(&self, args: &[&str]) -> redis::Value {
        let mut conn = redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap();
        let mut command = redis::cmd(args[0]);
        for arg in &args[1..] {
            command.arg(*arg);
        }
        command.query(&mut conn).unwrap()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// A node for [`OwnCluster`], its cluster state in its own directory (emptied first: a port
    /// used by an earlier run must not bring back that run's cluster).
    fn start_cluster_node() -> Self {
        let port = free_port();
        let state = "nodes.conf".to_owned();
        // The bus defaults to port + 10,000, which may be taken or past 65,535: a port of its own.
        let bus = free_port().to_string();
        let mut redis = Self {
            port,
            child: None,
            args: ["--cluster-enabled", "yes", "--cluster-config-file", &state]
                .iter()
                .chain(&["--cluster-port", bus.as_str()])
                .map(|a| a.to_string())
                .collect(),
        };
        let _ = std::fs::remove_dir_all(redis.dir());
        redis.resume();
        redis
    }

    /// Its working directory, of its own: a replica saves what it received from its primary as
    /// `dump.rdb` there, and a server started later in a shared directory would load it.
    fn dir(&self) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("mangoo-test-redis-{}", self.port))
    }

    /// Starts it (again, empty) on the same port, and waits until it answers.
    pub fn resume(&mut self) {
        let dir = self.dir();
        let _ = std::fs::remove_file(dir.join("dump.rdb"));
        std::fs::create_dir_all(&dir).expect("a directory for redis-server");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            // A replica's full sync would otherwise write dump.rdb into the working directory.
            .args([
                "--repl-diskless-sync",
                "yes",
                "--repl-diskless-sync-delay",
                "0",
            ])
            .arg("--dir")
            .arg(&dir)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).unwrap();
        let deadline = std::time::Instant::now() + super::helpers::HANG_GUARD;
        while client.get_connection().is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Kills it (SIGKILL: no goodbye to clients).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Three `redis-server --cluster-enabled yes` of the test's own, their 16,384 slots split by
/// `redis-cli --cluster create` (no replicas): a real Redis Cluster, as ElastiCache and Valkey
/// Serverless present themselves.
pub struct OwnCluster {
    pub nodes: Vec<OwnRedis>,
}

impl OwnCluster {
    pub fn start() -> Self {
        let nodes: Vec<OwnRedis> = (0..3).map(|_| OwnRedis::start_cluster_node()).collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli is installed");
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        let deadline = std::time::Instant::now() + super::helpers::HANG_GUARD;
        for node in &nodes {
            loop {
                let info = match node.command(&["CLUSTER", "INFO"]) {
                    redis::Value::BulkString(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                    redis::Value::VerbatimString { text, .. } => text,
                    other => panic!("CLUSTER INFO answered {other:?}"),
                };
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the cluster never formed"
                );
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        Self { nodes }
    }

    /// One node's address: the client learns the others from it.
    pub fn seed_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.nodes[0].port)
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(self.dir());
    }
}

/// A TCP path to a real server that a test can cut and restore: a network partition between
/// Mangoo and its database, without stopping the database other tests share.
///
/// Its target can move, as a DNS name does after a failover: connections made after
/// [`Partition::redirect`] reach the new target; those already open stay where they were.
pub struct Partition {
    pub port: u16,
    open: tokio::sync::watch::Sender<Path>,
    target: std::sync::Arc<std::sync::Mutex<String>>,
    _accept: tokio::task::JoinHandle<()>,
}

/// The state of a [`Partition`]'s path.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    Open,
    /// Connections are closed and new ones refused: what a server gone away looks like.
    Cut,
    /// Nothing gets through and nothing is closed: packets vanish (a black-holed route, a NAT
    /// that forgot the flow). Connections held meanwhile are closed when the path is restored.
    Hole,
}

impl Partition {
    /// Forwards `127.0.0.1:<port>` to `target`; starts cut when `open` is false.
    pub async fn to(target: &str, open: bool) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (switch, _) = tokio::sync::watch::channel(if open { Path::Open } else { Path::Cut });
        let state = switch.clone();
        let target = std::sync::Arc::new(std::sync::Mutex::new(target.to_owned()));
        let current = target.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let mut path = state.subscribe();
                let now = *path.borrow_and_update();
                match now {
                    Path::Cut => continue, // dropped: refused as a cut network would
                    Path::Hole => {
                        tokio::spawn(async move {
                            let _ = path.wait_for(|p| *p != Path::Hole).await;
                            drop(client);
                        });
                        continue;
                    }
                    Path::Open => {}
                }
                let target = current.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let closed = tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
                        changed = path.wait_for(|p| *p != Path::Open) => changed.is_ok(),
                    };
                    if closed {
                        // Held open, silent, until the hole ends; then closed.
                        let _ = path.wait_for(|p| *p != Path::Hole).await;
                    }
                });
            }
        });
        Self {
            port,
            open: switch,
            target,
            _accept: accept,
        }
    }

    /// New connections go to `target` from now on.
    pub fn redirect(&self, target: &str) {
        *self.target.lock().unwrap() = target.to_owned();
    }

    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn cut(&self) {
        self.open.send_replace(Path::Cut);
    }

    /// Packets vanish both ways; nothing is closed until [`Partition::restore`].
    pub fn black_hole(&self) {
        self.open.send_replace(Path::Hole);
    }

    pub fn restore(&self) {
        self.open.send_replace(Path::Open);
    }

    /// The database URL `url` with its host and port replaced by this path.
    pub fn database_url(&self, url: &str) -> String {
        url.replace("127.0.0.1:5432", &format!("127.0.0.1:{}", self.port))
    }
}
