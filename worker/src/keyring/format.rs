//! The shapes of the keyring file, as TOML: `[[team]]` tables and one optional `[heartbeat]`.

use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KeyringFile {
    #[serde(default)]
    pub(super) team: Vec<TeamEntry>,
    pub(super) heartbeat: Option<HeartbeatEntry>,
}

/// Lists the fields that say where an integration's key and API come from once: they make
/// `KeySource` and sit in both tables that name an integration. They are written into each
/// table rather than `#[serde(flatten)]`ed, because a flattened table loses what an "unknown
/// field" message shows: the line of the field, and the fields the table takes.
macro_rules! integration_tables {
    ($($field:ident),+ $(,)?) => {
        /// Where an integration's key and API come from, as written in the file.
        pub(super) struct KeySource {
            $(pub(super) $field: Option<String>,)+
        }

        /// A `[[team]]` table.
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(super) struct TeamEntry {
            pub(super) id: toml::Spanned<String>,
            $($field: Option<String>,)+
        }

        impl TeamEntry {
            /// The id, and where the team's key and API come from.
            pub(super) fn into_parts(self) -> (toml::Spanned<String>, KeySource) {
                (self.id, KeySource { $($field: self.$field,)+ })
            }
        }

        /// The `[heartbeat]` table.
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(super) struct HeartbeatEntry {
            pub(super) name: toml::Spanned<String>,
            $($field: Option<String>,)+
            pub(super) interval: Option<String>,
        }

        impl HeartbeatEntry {
            /// The name, the interval, and where the heartbeat's key and API come from.
            pub(super) fn into_parts(
                self,
            ) -> (toml::Spanned<String>, Option<String>, KeySource) {
                (self.name, self.interval, KeySource { $($field: self.$field,)+ })
            }
        }
    };
}

integration_tables!(
    integration_key,
    integration_key_env,
    integration_key_file,
    region,
    api_url,
    ca_file,
);
