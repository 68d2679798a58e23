//! The guest kernel's onlining policy (`auto_online_blocks`) around a plug.
//!
//! With `hotplug.auto_online = "movable"` and our agent, the guest kernel is kept onlining
//! new memory into ZONE_MOVABLE by itself, as it adds it: a plug is then as fast as the
//! kernel's own onlining, and the agent's online-when-present call only confirms. A plug
//! that asks for another online type has the kernel use that type for its DIMMs and is
//! followed by putting `online_movable` back.

use qga_wire::schema::{GuestAutoOnline, GuestMemoryOnlineType};
use tokio::time::Instant;

use super::ctx::{Capabilities, Ctx};
use crate::{
    call::{Call, Reply},
    config::AutoOnline,
    error::BridgeError,
};

/// The word `auto_online_blocks` is kept at.
const MOVABLE: &str = "online_movable";

/// What to put back after the plug.
#[derive(Debug)]
pub(super) struct Restore(&'static str);

/// Makes the guest kernel online what it adds next as `online_type`, where the bridge is
/// configured to and the agent can; returns what to put back afterwards, if anything.
pub(super) async fn prepare(
    ctx: &mut Ctx,
    caps: Capabilities,
    online_type: Option<GuestMemoryOnlineType>,
) -> Result<Option<Restore>, BridgeError> {
    let (Some(t), true, AutoOnline::Movable) =
        (online_type, caps.auto_online, ctx.settings.auto_online)
    else {
        return Ok(None);
    };
    let want = t.as_str();
    set(ctx, want).await?;
    Ok((want != MOVABLE).then_some(Restore(MOVABLE)))
}

/// Puts `auto_online_blocks` back; a failure is a warning, not the plug's failure.
pub(super) async fn restore(ctx: &mut Ctx, restore: Option<Restore>) {
    let Some(Restore(word)) = restore else {
        return;
    };
    if let Err(e) = set(ctx, word).await {
        ctx.warnings.push(format!(
            "the guest's auto_online_blocks could not be set back to {word}: {e}"
        ));
    }
}

/// Writes `word` (one agent call, no scan of the guest's blocks) and checks the kernel
/// took it; a step is recorded when it changed.
async fn set(ctx: &mut Ctx, word: &str) -> Result<(), BridgeError> {
    let start = Instant::now();
    let call = Call::SetAutoOnline(GuestAutoOnline {
        auto_online_blocks: word.to_string(),
        previous: None,
    });
    match ctx.agent(call).await? {
        Reply::AutoOnline(now) if now.auto_online_blocks == word => {
            if now.previous.as_deref() != Some(word) {
                let before = now.previous.as_deref().unwrap_or("unknown");
                ctx.step("auto-online", start, format!("{before} -> {word}"));
            }
            Ok(())
        }
        other => Err(ctx.hotplug_error(
            "auto-online",
            format!("the guest kernel did not take auto_online_blocks = {word}: {other:?}"),
        )),
    }
}
