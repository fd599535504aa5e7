//! Manual runs: someone asked, through the API (`POST /api/plugins/{name}/run`) or the
//! CLI. Nothing to declare in the manifest and nothing to register: every installed
//! plugin can be run by hand, with the input the caller gives.

use super::{SectionError, TriggerKind, Triggers};
use crate::engine::Engine;
use crate::plugin::manifest::Triggers as TriggerSections;
use crate::plugin::{LoadedPlugin, TriggerEvent};

/// The manual trigger kind.
pub struct Manual;

impl TriggerKind for Manual {
    fn name(&self) -> &'static str {
        "manual"
    }

    fn validate(&self, _sections: &TriggerSections) -> Result<(), SectionError> {
        Ok(())
    }

    fn activate(&self, _: &Engine, _: &Triggers, _: &LoadedPlugin) -> anyhow::Result<()> {
        Ok(())
    }
}

/// The event of a run asked for by `by` (an API token's name, or `cli`) with `input`.
pub fn event(by: impl Into<String>, input: impl Into<String>) -> TriggerEvent {
    TriggerEvent::Manual {
        by: by.into(),
        input: input.into(),
    }
}
