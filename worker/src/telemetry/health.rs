//! Readiness, kept in one place: `/readyz` reads it, the consumer and the Redis calls write it,
//! and every change is mirrored in the `opsgenie_ready` gauge.

use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Default)]
pub struct Health {
    consuming: AtomicBool,
    redis: AtomicBool,
}

impl Health {
    pub fn set_consuming(&self, on: bool) {
        if self.consuming.swap(on, Ordering::Relaxed) != on {
            self.publish();
        }
    }

    /// Called on every Redis answer, so the gauge is written only when the state changes.
    pub fn set_redis(&self, up: bool) {
        if self.redis.swap(up, Ordering::Relaxed) != up {
            self.publish();
        }
    }

    /// Writes the readiness to `opsgenie_ready`. Two changes at once may write it out of
    /// order; the Redis probe calls this every few seconds, which puts it right again.
    pub fn publish(&self) {
        let ready = if self.readiness().is_ok() { 1.0 } else { 0.0 };
        metrics::gauge!(crate::telemetry::catalogue::READY).set(ready);
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
