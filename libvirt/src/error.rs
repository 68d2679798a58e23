//! libvirt's errors, sorted by what a caller can do about them.

use virt::error::{Error, ErrorDomain, ErrorNumber};

/// Why a libvirt call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LibvirtError {
    /// libvirtd cannot be reached: not running, restarting, the connection closed.
    #[error("libvirt unavailable: {0}")]
    Unavailable(String),
    /// No such domain, or it is not running.
    #[error("domain not running: {0}")]
    NotRunning(String),
    /// The domain's guest agent is not connected or stopped answering.
    #[error("guest agent unresponsive: {0}")]
    AgentUnresponsive(String),
    /// libvirt's own timeout passed (the agent's reply, or the domain's job lock).
    #[error("libvirt timed out: {0}")]
    TimedOut(String),
    /// The guest agent answered with an error; libvirt passes on only its description.
    #[error("guest agent error: {0}")]
    AgentFailed(String),
    /// The domain is busy in libvirt: an earlier agent command still runs, or libvirt's
    /// job lock could not be had. Nothing was sent; a retry may work.
    #[error("domain busy in libvirt: {0}")]
    Busy(String),
    /// Our deadline passed before libvirt answered.
    #[error("no answer from libvirt before the deadline")]
    Timeout,
    /// libvirt refused or failed the operation for another reason.
    #[error("libvirt refused it ({code}): {message}")]
    Refused {
        /// libvirt's error number, as its name (`operationfailed`, `xmlerror`, ...).
        code: String,
        /// libvirt's message.
        message: String,
    },
}

/// libvirt's prefix for an agent that answered with an error (libvirt 9.0, which reports
/// it as an internal error; later versions use `VIR_ERR_AGENT_COMMAND_FAILED`).
const AGENT_FAILED_PREFIX: &str = "internal error: unable to execute QEMU agent command '";

/// The agent's own description in libvirt's message for a failed agent command.
fn agent_description(message: &str) -> Option<&str> {
    let rest = message.strip_prefix(AGENT_FAILED_PREFIX)?;
    let (_command, desc) = rest.split_once("': ")?;
    Some(desc)
}

impl From<Error> for LibvirtError {
    fn from(e: Error) -> Self {
        let message = e.message().to_string();
        let connection = e
            .domain()
            .is_known_and(|d| matches!(d, ErrorDomain::Rpc | ErrorDomain::Remote));
        let Some(code) = e
            .code()
            .is_known()
            .then(|| e.code().unwrap_or(ErrorNumber::InternalError))
        else {
            return Self::Refused {
                code: "unknown".into(),
                message,
            };
        };
        match code {
            ErrorNumber::NoDomain => Self::NotRunning(message),
            ErrorNumber::OperationInvalid if message.contains("not running") => {
                Self::NotRunning(message)
            }
            ErrorNumber::AgentUnresponsive => Self::AgentUnresponsive(message),
            // libvirt 9.0's text when another job holds the domain: nothing was sent.
            ErrorNumber::OperationTimeout if message.contains("state change lock") => {
                Self::Busy(message)
            }
            ErrorNumber::AgentCommandTimeout | ErrorNumber::OperationTimeout => {
                Self::TimedOut(message)
            }
            ErrorNumber::AgentCommandFailed => {
                let desc = agent_description(&message).unwrap_or(&message).to_string();
                Self::AgentFailed(desc)
            }
            ErrorNumber::InternalError if agent_description(&message).is_some() => {
                Self::AgentFailed(agent_description(&message).unwrap_or(&message).to_string())
            }
            ErrorNumber::Rpc | ErrorNumber::InvalidConn | ErrorNumber::NoConnect => {
                Self::Unavailable(message)
            }
            ErrorNumber::SystemError if connection => Self::Unavailable(message),
            other => Self::Refused {
                code: other.to_string(),
                message,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_description_is_cut_out_of_libvirts_message() {
        let m = "internal error: unable to execute QEMU agent command 'guest-set-memory-blocks': \
                 Parameter 'mem-blks' is missing";
        assert_eq!(
            agent_description(m),
            Some("Parameter 'mem-blks' is missing")
        );
        assert_eq!(agent_description("internal error: something else"), None);
    }
}
