//! Acks in batches. A job's task reports its delivery tag once the outcome is durable; one
//! task per channel acks the contiguous run of settled tags from the oldest unsettled one with
//! a single `multiple` ack. Tags settled out of order wait a few milliseconds for the run to
//! reach them, and are acked one by one if it does not, so a slow job never holds the prefetch
//! window: an unacked tag is a slot the broker does not refill.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use lapin::Channel;
use lapin::options::BasicAckOptions;
use tokio::sync::mpsc;

/// How a job left the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Settled {
    /// Durable: to be acked.
    Ack(u64),
    /// Already nacked by its task: only moves the run along.
    Nacked(u64),
}

/// The batcher's pure state: which tags are settled, and what to ack now.
#[derive(Debug)]
struct AckPlan {
    /// The oldest tag not yet settled (tags start at 1 on a channel).
    next: u64,
    /// Settled tags above `next`; `true` while they still need an ack.
    waiting: BTreeMap<u64, bool>,
    /// How many acked-out-of-order tags may wait before they are acked one by one.
    patience: usize,
}

/// What to send the broker.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct AckBatch {
    /// Ack every outstanding tag up to this one (`multiple`).
    up_to: Option<u64>,
    /// Ack these one by one.
    single: Vec<u64>,
}

impl AckPlan {
    fn new(patience: usize) -> AckPlan {
        AckPlan {
            next: 1,
            waiting: BTreeMap::new(),
            patience: patience.max(1),
        }
    }

    /// True while a settled tag is waiting for its ack.
    fn holds_acks(&self) -> bool {
        self.waiting.values().any(|needs_ack| *needs_ack)
    }

    fn settle(&mut self, settled: Settled) {
        match settled {
            Settled::Ack(tag) => self.waiting.insert(tag, true),
            Settled::Nacked(tag) => self.waiting.insert(tag, false),
        };
    }

    /// The acks for what has been settled so far. `flush` acks out-of-order tags too.
    fn take(&mut self, flush: bool) -> AckBatch {
        let mut batch = AckBatch::default();
        while let Some(needs_ack) = self.waiting.remove(&self.next) {
            if needs_ack {
                batch.up_to = Some(self.next);
            }
            self.next += 1;
        }
        let unacked = self.waiting.values().filter(|n| **n).count();
        if flush || unacked >= self.patience {
            for (tag, needs_ack) in &mut self.waiting {
                if *needs_ack {
                    batch.single.push(*tag);
                    *needs_ack = false;
                }
            }
        }
        batch
    }
}

/// How long a tag settled out of order waits for the run to reach it. Its prefetch slot stays
/// taken meanwhile: behind an API 100 ms away, the 50 ms tick this replaces could hold a slot
/// for half a cycle. A few milliseconds still let the run catch up in a backlog drain, where
/// jobs finish nearly in order, so the broker still gets mostly `multiple` acks.
const OUT_OF_ORDER_WAIT: Duration = Duration::from_millis(5);

/// Runs until every sender is gone, then acks what is left.
pub(super) async fn run(
    channel: Channel,
    mut settled: mpsc::UnboundedReceiver<Settled>,
    prefetch: u16,
) {
    let mut plan = AckPlan::new(usize::from(prefetch / 4));
    // When the oldest tag still waiting for its ack must be acked, whatever the run does.
    let mut flush_at: Option<Instant> = None;
    loop {
        let due = async {
            match flush_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let flush = tokio::select! {
            next = settled.recv() => match next {
                Some(s) => {
                    plan.settle(s);
                    while let Ok(more) = settled.try_recv() {
                        plan.settle(more);
                    }
                    false
                }
                None => {
                    send(&channel, plan.take(true)).await;
                    return;
                }
            },
            () = due => true,
        };
        send(&channel, plan.take(flush)).await;
        flush_at = if plan.holds_acks() {
            flush_at.or_else(|| Some(Instant::now() + OUT_OF_ORDER_WAIT))
        } else {
            None
        };
    }
}

async fn send(channel: &Channel, batch: AckBatch) {
    let acks = batch
        .up_to
        .map(|tag| (tag, true))
        .into_iter()
        .chain(batch.single.into_iter().map(|tag| (tag, false)));
    for (tag, multiple) in acks {
        if let Err(error) = channel.basic_ack(tag, BasicAckOptions { multiple }).await {
            // The channel is gone: the broker requeues what it had not seen acked, and the
            // Redis record makes a second delivery harmless.
            tracing::warn!(error = %error, delivery_tag = tag, "Could not ack.");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One `multiple` ack up to `tag`.
    fn up_to(tag: u64) -> AckBatch {
        AckBatch {
            up_to: Some(tag),
            single: vec![],
        }
    }

    /// These tags acked one by one.
    fn singles(tags: &[u64]) -> AckBatch {
        AckBatch {
            up_to: None,
            single: tags.to_vec(),
        }
    }

    #[test]
    fn a_contiguous_run_is_one_multiple_ack() {
        let mut plan = AckPlan::new(16);
        for tag in [3, 1, 2] {
            plan.settle(Settled::Ack(tag));
        }
        assert_eq!(plan.take(false), up_to(3));
        assert_eq!(plan.take(false), AckBatch::default());
    }

    #[test]
    fn a_gap_holds_later_tags_until_it_closes() {
        let mut plan = AckPlan::new(16);
        plan.settle(Settled::Ack(2));
        plan.settle(Settled::Ack(3));
        assert_eq!(plan.take(false), AckBatch::default());
        plan.settle(Settled::Ack(1));
        assert_eq!(plan.take(false), up_to(3));
    }

    #[test]
    fn a_nacked_tag_moves_the_run_without_an_ack() {
        let mut plan = AckPlan::new(16);
        plan.settle(Settled::Nacked(1));
        assert_eq!(plan.take(false), AckBatch::default());
        plan.settle(Settled::Ack(2));
        plan.settle(Settled::Nacked(3));
        assert_eq!(plan.take(false), up_to(2));
        plan.settle(Settled::Ack(4));
        assert_eq!(plan.take(false), up_to(4));
    }

    #[test]
    fn a_slow_job_does_not_hold_the_others() {
        let mut plan = AckPlan::new(2);
        plan.settle(Settled::Ack(2));
        assert_eq!(plan.take(false), AckBatch::default());
        plan.settle(Settled::Ack(3));
        // Patience ran out: acked one by one while tag 1 is still in flight.
        assert_eq!(plan.take(false), singles(&[2, 3]));
        // When tag 1 settles, the run passes 2 and 3 without acking them again.
        plan.settle(Settled::Ack(1));
        assert_eq!(plan.take(false), up_to(1));
        plan.settle(Settled::Ack(4));
        assert_eq!(plan.take(false), up_to(4));
    }

    #[test]
    fn a_flush_acks_out_of_order_tags() {
        let mut plan = AckPlan::new(64);
        plan.settle(Settled::Ack(5));
        assert!(plan.holds_acks());
        assert_eq!(plan.take(true), singles(&[5]));
        assert!(!plan.holds_acks());
        plan.settle(Settled::Nacked(7));
        assert!(!plan.holds_acks(), "a nacked tag needs no ack");
    }
}
