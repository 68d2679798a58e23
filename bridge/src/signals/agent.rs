//! The agent's part of a snapshot: `__org.qga-bridge_get-memory-stats`, or, from an agent
//! without it, why not — told apart through `guest-info` as memory hotplug tells its
//! extensions apart ([`Capabilities`]).

use std::sync::Arc;

use qga_wire::{
    ErrorClass, QgaError,
    schema::{GuestAgentInfo, GuestMemoryStats, command},
};
use tokio::time::Instant;

use crate::{
    call::{Call, Reply},
    error::BridgeError,
    hotplug::ctx::Capabilities,
    session::Session,
};

/// The agent's stats; `Ok(Err(reason))` from an agent without the extension (qemu-ga, an
/// older qga-agent, ours with it blocked); `Err` when the agent cannot be asked at all.
pub async fn stats(
    session: &Arc<Session>,
    deadline: Instant,
) -> Result<Result<GuestMemoryStats, String>, BridgeError> {
    match session.call(Call::GetMemoryStats, Some(deadline)).await {
        Ok(Reply::MemoryStats(stats)) => Ok(Ok(*stats)),
        Ok(_) => Err(BridgeError::BadReply {
            vm: session.name().to_string(),
            reason: "the memory stats call got another call's reply".into(),
        }),
        Err(BridgeError::Agent(q)) if q.class == ErrorClass::CommandNotFound => {
            Ok(Err(lacking(session, deadline, &q).await))
        }
        Err(e) => Err(e),
    }
}

/// Why the agent has no stats, in words for an operator: which agent it is (from
/// `guest-info`, when it answers) and whether the command is missing or disabled.
async fn lacking(session: &Arc<Session>, deadline: Instant, refusal: &QgaError) -> String {
    match session.call(Call::Info, Some(deadline)).await {
        Ok(Reply::Info(info)) => reason(&info),
        _ => format!(
            "the guest's agent does not offer {}: {}",
            command::GET_MEMORY_STATS,
            refusal.desc
        ),
    }
}

/// The reason for an agent that answered `info` but not the stats.
pub fn reason(info: &GuestAgentInfo) -> String {
    let name = command::GET_MEMORY_STATS;
    let listed = info.supported_commands.iter().any(|c| c.name == name);
    let caps = Capabilities::of(info);
    let ours = caps.zones || caps.online_type || caps.online_when_present;
    let version = &info.version;
    match (listed, ours) {
        (true, _) => format!("the guest's agent has {name} disabled (qga-agent {version})"),
        (false, true) => {
            format!("the guest's agent does not offer {name} (qga-agent {version}, older)")
        }
        (false, false) => format!("the guest's agent does not offer {name} (qemu-ga {version})"),
    }
}

#[cfg(test)]
mod tests {
    use qga_wire::schema::GuestAgentCommandInfo;

    use super::*;

    fn info(version: &str, commands: &[(&str, bool)]) -> GuestAgentInfo {
        GuestAgentInfo {
            version: version.into(),
            supported_commands: commands
                .iter()
                .map(|&(name, enabled)| GuestAgentCommandInfo {
                    name: name.into(),
                    enabled,
                    success_response: true,
                })
                .collect(),
        }
    }

    #[test]
    fn the_reason_names_the_agent_and_what_it_lacks() {
        let qemu_ga = info("7.2.22", &[("guest-ping", true)]);
        assert_eq!(
            reason(&qemu_ga),
            "the guest's agent does not offer __org.qga-bridge_get-memory-stats (qemu-ga 7.2.22)"
        );
        let blocked = info(
            "0.9.0",
            &[
                (command::GET_MEMORY_ZONES, true),
                (command::GET_MEMORY_STATS, false),
            ],
        );
        assert!(reason(&blocked).contains("has __org.qga-bridge_get-memory-stats disabled"));
        let older = info("0.8.0", &[(command::GET_MEMORY_ZONES, true)]);
        assert!(reason(&older).ends_with("(qga-agent 0.8.0, older)"));
    }
}
