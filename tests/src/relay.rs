//! A TCP relay that a test puts between a worker and RabbitMQ or Redis, so that an outage can
//! be staged for one worker without touching the servers every other test shares.
//!
//! While it is cut, every relayed connection is closed and new ones are accepted only to be
//! closed at once: the client sees what it would see if the server went away (a connection
//! that ends, then connections that fail), and reconnects by itself once it is restored.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running relay; stops accepting and drops every relayed connection when dropped.
pub struct Relay {
    addr: SocketAddr,
    shared: Arc<RelayState>,
    accept: JoinHandle<()>,
}

struct RelayState {
    target: SocketAddr,
    cut: AtomicBool,
    /// Bumped on every cut (and on drop); each relayed connection ends when it changes, which
    /// is how a cut reaches connections that are idle in both directions.
    generation: watch::Sender<u64>,
    /// Connections relayed through to the target since start, for tests that want to see
    /// that a client came back.
    relayed: AtomicU64,
    /// Connections relaying right now; `cut` waits for it to reach zero.
    active: AtomicU64,
}

impl Relay {
    /// Listens on 127.0.0.1 at a free port and relays every connection to `target`.
    ///
    /// Fails when no local port can be bound.
    pub async fn start(target: SocketAddr) -> std::io::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(RelayState {
            target,
            cut: AtomicBool::new(false),
            generation: watch::Sender::new(0),
            relayed: AtomicU64::new(0),
            active: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(Relay {
            addr,
            shared,
            accept,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `amqp://guest:guest@<relay>/%2f`: the test broker's URL, through this relay.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// `redis://<relay>`: the test Redis, through this relay.
    pub fn redis_url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Closes every relayed connection and refuses new ones until `restore`. When it returns,
    /// no byte passes any more: a test may read the server directly and know that what it
    /// sees cannot change through the relay.
    pub async fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        self.shared.generation.send_modify(|g| *g += 1);
        while self.shared.active.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Relays new connections again.
    pub fn restore(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// Connections relayed through to the target so far.
    pub fn relayed(&self) -> u64 {
        self.shared.relayed.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.shared.generation.send_modify(|g| *g += 1);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<RelayState>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if shared.cut.load(Ordering::SeqCst) {
            // Accepting and closing (rather than not listening) keeps the port ours, so a
            // restore can never find it taken by someone else.
            drop(client);
            continue;
        }
        tokio::spawn(relay_one(client, Arc::clone(&shared)));
    }
}

async fn relay_one(mut client: TcpStream, shared: Arc<RelayState>) {
    let mut generation = shared.generation.subscribe();
    generation.mark_unchanged();
    let Ok(mut server) = TcpStream::connect(shared.target).await else {
        return;
    };
    shared.active.fetch_add(1, Ordering::SeqCst);
    let _active = Active(&shared.active);
    // A cut may have come while connecting; the client must not get through it.
    if shared.cut.load(Ordering::SeqCst) || generation.has_changed().unwrap_or(true) {
        return;
    }
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    shared.relayed.fetch_add(1, Ordering::SeqCst);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = generation.changed() => {}
    }
}

/// Counts a connection out of `RelayState::active` however its task ends.
struct Active<'a>(&'a AtomicU64);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
