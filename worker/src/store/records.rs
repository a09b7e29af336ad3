//! The record of a delivery (docs/contract.md section 7): its entry in the deliveries stream,
//! the sent marker and the incident's sequence, and with them the lease freed and the
//! confirmation to ask for later, all written by one `steps.lua` call.

use std::sync::Arc;

use super::keys::JobKeys;
use super::pending::Pending;
use super::steps::Call;
use super::{Store, StoreError};

/// A stream entry's field/value pairs.
pub(crate) type Fields = Arc<[(&'static str, String)]>;

impl Store {
    /// `record_confirming` without a confirmation to ask for.
    #[cfg(test)]
    pub(crate) async fn record(
        &self,
        keys: &Arc<JobKeys>,
        fields: &Fields,
    ) -> Result<String, StoreError> {
        self.record_confirming(keys, fields, None).await
    }

    /// Writes the stream entry, the sent marker and the incident's sequence, and frees the
    /// lease, atomically; with `pending`, the confirmation to ask for later too. Returns the
    /// stream entry id, or "" when the notification was already recorded (nothing is written
    /// then but the lease is freed).
    ///
    /// With `--redis-replicas N`, fails unless N replicas hold the record too; writing it
    /// again is safe (see `steps.lua`).
    pub(crate) async fn record_confirming(
        &self,
        keys: &Arc<JobKeys>,
        fields: &Fields,
        pending: Option<Arc<Pending>>,
    ) -> Result<String, StoreError> {
        let id = self
            .step(Call {
                keys: Arc::clone(keys),
                record: Some(Arc::clone(fields)),
                pending,
            })
            .await?;
        self.replicated(&[&keys.sent]).await?;
        Ok(id)
    }
}
