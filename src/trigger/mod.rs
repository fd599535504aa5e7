//! Triggers: what starts a plugin run.
//!
//! A run starts because a cron schedule fired ([`cron`]), a webhook delivery was
//! verified ([`webhook`]), or someone asked (manual, through the API). This module owns
//! the first two up to the point of "start this plugin now, for this reason"; the run
//! itself belongs to the plugin runtime and its record to [`crate::runs`].

pub mod cron;
pub mod units;
pub mod webhook;
