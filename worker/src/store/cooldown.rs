//! A team's cooldown after a 429, shared by every replica: the admission check of any job of
//! the team answers `Admission::Cooldown` while it lasts.

use std::time::Duration;

use super::{Store, StoreError};

/// Starts or lengthens a team's cooldown after a 429, for every replica.
pub(super) const COOL_DOWN: &str = include_str!("scripts/cool_down.lua");

impl Store {
    /// Makes every replica wait `wait` before its next request for `team`.
    pub(crate) async fn cool_down(&self, team: &str, wait: Duration) -> Result<(), StoreError> {
        let ms = wait.as_millis().max(1).to_string();
        let _: i64 = Box::pin(self.scripts.cool_down.evalsha_with_reload(
            &self.client,
            vec![self.keys.cooldown(team)],
            vec![ms],
        ))
        .await?;
        Ok(())
    }
}
