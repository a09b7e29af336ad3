//! Shutdown: SIGTERM or SIGINT turns one flag, and every wait in the worker listens to it.

use tokio::sync::watch;
use tokio::time::Instant;

/// A cheap, cloneable view of "has shutdown begun?".
#[derive(Clone, Debug)]
pub struct Shutdown {
    receiver: watch::Receiver<bool>,
}

/// Begins the shutdown; kept by whoever decides it (the signal task, or a test).
#[derive(Debug)]
pub struct ShutdownTrigger {
    sender: watch::Sender<bool>,
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        self.sender.send_replace(true);
    }
}

impl Shutdown {
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (sender, receiver) = watch::channel(false);
        (ShutdownTrigger { sender }, Shutdown { receiver })
    }

    pub fn is_triggered(&self) -> bool {
        *self.receiver.borrow()
    }

    /// Resolves once shutdown has begun (at once if it has).
    pub async fn triggered(&self) {
        let mut receiver = self.receiver.clone();
        // An error means every trigger is gone: nobody can begin a shutdown any more.
        if receiver.wait_for(|t| *t).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Sleeps until `deadline`; false when shutdown began first.
    pub async fn sleep_until(&self, deadline: Instant) -> bool {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => true,
            () = self.triggered() => false,
        }
    }
}

/// Triggers `trigger` on the first SIGTERM or SIGINT.
pub fn on_signals(trigger: ShutdownTrigger) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(
            signal = name,
            "Shutting down: no new jobs; finishing the ones in flight."
        );
        trigger.trigger();
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_trigger_cuts_a_sleep_short() {
        let (trigger, shutdown) = Shutdown::new();
        let far = Instant::now() + Duration::from_secs(3600);
        let sleeper = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { shutdown.sleep_until(far).await }
        });
        tokio::task::yield_now().await;
        trigger.trigger();
        assert!(!sleeper.await.unwrap());
        assert!(shutdown.is_triggered());
        assert!(Instant::now() < far);
    }

    #[tokio::test(start_paused = true)]
    async fn a_sleep_without_trigger_completes() {
        let (_trigger, shutdown) = Shutdown::new();
        assert!(
            shutdown
                .sleep_until(Instant::now() + Duration::from_secs(5))
                .await
        );
    }
}
