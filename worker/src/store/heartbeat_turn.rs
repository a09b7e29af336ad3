//! The fleet's turn to ping a heartbeat: one key per heartbeat, made by the one replica whose
//! turn it is, so that the fleet pings about once per interval however many replicas ask.

use std::time::Duration;

use fred::prelude::KeysInterface as _;
use fred::types::{Expiration, SetOptions};

use super::{Store, StoreError};

impl Store {
    /// Takes the fleet's turn to ping the heartbeat `name`: true for the one replica whose
    /// `SET NX` made the key, which then lives `interval`.
    pub(crate) async fn take_heartbeat_turn(
        &self,
        name: &str,
        interval: Duration,
        replica: &str,
    ) -> Result<bool, StoreError> {
        let ms = i64::try_from(interval.as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        let set: Option<String> = Box::pin(self.client.set(
            self.keys.heartbeat(name),
            replica,
            Some(Expiration::PX(ms)),
            Some(SetOptions::NX),
            false,
        ))
        .await?;
        Ok(set.is_some())
    }
}
