//! Readiness, kept in one place: `/readyz` reads it, the consumer and the Redis calls write it.

use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Default)]
pub struct Health {
    consuming: AtomicBool,
    redis: AtomicBool,
}

impl Health {
    pub fn set_consuming(&self, on: bool) {
        self.consuming.store(on, Ordering::Relaxed);
    }

    pub fn set_redis(&self, up: bool) {
        self.redis.store(up, Ordering::Relaxed);
    }

    /// `Ok` when ready, else why not.
    pub fn readiness(&self) -> Result<(), &'static str> {
        match (
            self.consuming.load(Ordering::Relaxed),
            self.redis.load(Ordering::Relaxed),
        ) {
            (true, true) => Ok(()),
            (false, _) => Err("not consuming from RabbitMQ"),
            (true, false) => Err("Redis is unreachable"),
        }
    }
}
