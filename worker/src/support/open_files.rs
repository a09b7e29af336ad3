//! Raising the process's open-file limit at start-up.

/// The soft open-file limit is raised towards the hard one, never past this: some libraries
/// size tables by the soft limit, and a container's hard limit can be a billion.
const OPEN_FILES_WANTED: u64 = 65_536;

/// Raises the soft limit on open files towards the hard one, so that a burst of connections
/// (to the endpoint, to Opsgenie) does not run the process out of descriptors at the distro's
/// default of 1024. Failing to raise it is not fatal: the endpoint caps its connections either way.
pub(crate) fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(OPEN_FILES_WANTED) {
        Ok(limit) => tracing::debug!(limit, "The open-file limit is set."),
        Err(error) => tracing::warn!(error = %error, "Could not raise the open-file limit."),
    }
}
