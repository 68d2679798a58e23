//! Requests, replies and error classes of the QGA protocol.
//!
//! The agent builds a [`Request`] from whatever JSON value the codec produced, with the
//! reference agent's rules and error texts ([`Request::from_value`]). The host parses
//! replies with [`Response::from_value`], which accepts any well-formed reply and rejects
//! everything else with a [`ResponseError`] rather than guessing.

use std::fmt;

use serde::de::{Deserializer, Error as _};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The `class` member of a QGA error reply.
///
/// Hosts must branch on the class, never on `desc`. Unknown classes from a newer agent are
/// kept verbatim in [`ErrorClass::Other`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Everything without a more specific class: bad arguments, failed operations.
    GenericError,
    /// The command does not exist, or was disabled with `--block-rpcs`/`--allow-rpcs`.
    CommandNotFound,
    /// A device exists but is not active.
    DeviceNotActive,
    /// A device named by the request does not exist.
    DeviceNotFound,
    /// A KVM capability is missing.
    KvmMissingCap,
    /// A class this crate does not know.
    Other(String),
}

impl ErrorClass {
    /// The class as it appears on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            Self::GenericError => "GenericError",
            Self::CommandNotFound => "CommandNotFound",
            Self::DeviceNotActive => "DeviceNotActive",
            Self::DeviceNotFound => "DeviceNotFound",
            Self::KvmMissingCap => "KVMMissingCap",
            Self::Other(s) => s,
        }
    }
}

impl From<&str> for ErrorClass {
    fn from(s: &str) -> Self {
        match s {
            "GenericError" => Self::GenericError,
            "CommandNotFound" => Self::CommandNotFound,
            "DeviceNotActive" => Self::DeviceNotActive,
            "DeviceNotFound" => Self::DeviceNotFound,
            "KVMMissingCap" => Self::KvmMissingCap,
            other => Self::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorClass {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorClass {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(Self::from(s.as_str()))
    }
}

/// The body of an error reply: `{"class": ..., "desc": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct QgaError {
    /// What kind of failure; the only part hosts may branch on.
    pub class: ErrorClass,
    /// Human-readable detail. Not a contract.
    pub desc: String,
}

impl QgaError {
    /// A `GenericError` with the given description.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// A `CommandNotFound` with the given description.
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::CommandNotFound,
            desc: desc.into(),
        }
    }
}

/// A validated request: `{"execute": NAME, "arguments": {...}, "id": ANY}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The command name, e.g. `guest-get-memory-blocks`.
    pub execute: String,
    /// The command's arguments; absent and `{}` mean the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<Map<String, Value>>,
    /// Echoed verbatim in the reply when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
}

impl Request {
    /// Validates a decoded JSON value as a request, the way the reference agent does.
    ///
    /// On failure, returns the error reply to send, with the request's `id` when the input
    /// was an object that had one (the reference echoes it even for invalid requests).
    pub fn from_value(value: Value) -> Result<Self, Box<Response>> {
        let Value::Object(mut obj) = value else {
            return Err(Box::new(Response::error(
                QgaError::generic("QMP input must be a JSON object"),
                None,
            )));
        };
        let id = obj.remove("id");
        let fail = |desc: String| Box::new(Response::error(QgaError::generic(desc), id.clone()));

        if let Some(key) = obj.keys().find(|k| *k != "execute" && *k != "arguments") {
            return Err(fail(format!("QMP input member '{key}' is unexpected")));
        }
        let execute = match obj.remove("execute") {
            Some(Value::String(s)) => s,
            Some(_) => return Err(fail("QMP input member 'execute' must be a string".into())),
            None => return Err(fail("QMP input lacks member 'execute'".into())),
        };
        let arguments = match obj.remove("arguments") {
            None => None,
            Some(Value::Object(map)) => Some(map),
            Some(_) => {
                return Err(fail(
                    "QMP input member 'arguments' must be an object".into(),
                ));
            }
        };
        Ok(Self {
            execute,
            arguments,
            id,
        })
    }
}

/// A request as a host sends it: `{"execute": NAME, "arguments": ARGS, "id": ID}`, the
/// arguments serialised straight from their schema type (no JSON tree is built).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Command<'a, A> {
    /// The command name, e.g. `guest-set-memory-blocks`.
    pub execute: &'a str,
    /// The arguments, if the command takes any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<A>,
    /// The id the reply must echo; `None` for `guest-sync-delimited`, whose reply is its
    /// own argument.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
}

/// The outcome carried by a reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// `{"return": VALUE}`
    Return(Value),
    /// `{"error": {"class": ..., "desc": ...}}`
    Error(QgaError),
}

/// A reply: an [`Outcome`] plus the echoed request `id`, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// Success value or error.
    pub outcome: Outcome,
    /// The `id` of the request this answers, when the request had one.
    pub id: Option<Value>,
}

/// Why a JSON value is not a well-formed reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// Not a JSON object.
    #[error("reply is not a JSON object")]
    NotAnObject,
    /// Neither `return` nor `error`, or both.
    #[error("reply has neither 'return' nor 'error' (or both)")]
    NoOutcome,
    /// `error` is not `{"class": STRING, "desc": STRING}`.
    #[error("reply has a malformed 'error' member: {0}")]
    BadError(String),
    /// A member other than `return`, `error` and `id`.
    #[error("reply has unexpected member '{0}'")]
    UnexpectedMember(String),
}

impl Response {
    /// A success reply.
    pub fn ok(value: Value, id: Option<Value>) -> Self {
        Self {
            outcome: Outcome::Return(value),
            id,
        }
    }

    /// An error reply.
    pub fn error(error: QgaError, id: Option<Value>) -> Self {
        Self {
            outcome: Outcome::Error(error),
            id,
        }
    }

    /// Parses a reply received from an agent.
    pub fn from_value(value: Value) -> Result<Self, ResponseError> {
        let Value::Object(mut obj) = value else {
            return Err(ResponseError::NotAnObject);
        };
        let id = obj.remove("id");
        let ret = obj.remove("return");
        let err = obj.remove("error");
        if let Some(key) = obj.keys().next() {
            return Err(ResponseError::UnexpectedMember(key.clone()));
        }
        let outcome = match (ret, err) {
            (Some(v), None) => Outcome::Return(v),
            (None, Some(e)) => Outcome::Error(
                serde_json::from_value(e).map_err(|e| ResponseError::BadError(e.to_string()))?,
            ),
            _ => return Err(ResponseError::NoOutcome),
        };
        Ok(Self { outcome, id })
    }

    /// The success value, or the agent's error.
    pub fn into_result(self) -> Result<Value, QgaError> {
        match self.outcome {
            Outcome::Return(v) => Ok(v),
            Outcome::Error(e) => Err(e),
        }
    }
}

impl Serialize for Response {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(1 + usize::from(self.id.is_some())))?;
        match &self.outcome {
            Outcome::Return(v) => map.serialize_entry("return", v)?,
            Outcome::Error(e) => map.serialize_entry("error", e)?,
        }
        if let Some(id) = &self.id {
            map.serialize_entry("id", id)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Response {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(d)?;
        Self::from_value(value).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rejected(v: Value) -> Response {
        *Request::from_value(v).expect_err("should be rejected")
    }

    #[test]
    fn request_validation_matches_reference_texts() {
        let r = rejected(json!([1, 2]));
        assert_eq!(
            r.outcome,
            Outcome::Error(QgaError::generic("QMP input must be a JSON object"))
        );
        assert_eq!(r.id, None);

        let r = rejected(json!({"execut": "guest-ping", "id": 7}));
        assert_eq!(
            r.outcome,
            Outcome::Error(QgaError::generic("QMP input member 'execut' is unexpected"))
        );
        assert_eq!(
            r.id,
            Some(json!(7)),
            "id is echoed even for invalid requests"
        );

        let r = rejected(json!({"execute": 5}));
        assert_eq!(
            r.outcome,
            Outcome::Error(QgaError::generic(
                "QMP input member 'execute' must be a string"
            ))
        );
        let r = rejected(json!({"execute": "guest-ping", "arguments": []}));
        assert_eq!(
            r.outcome,
            Outcome::Error(QgaError::generic(
                "QMP input member 'arguments' must be an object"
            ))
        );
        let r = rejected(json!({"exec-oob": "guest-ping"}));
        assert_eq!(
            r.outcome,
            Outcome::Error(QgaError::generic(
                "QMP input member 'exec-oob' is unexpected"
            ))
        );
    }

    #[test]
    fn host_commands_serialise_without_absent_members() {
        let sync = Command {
            execute: "guest-sync-delimited",
            arguments: Some(crate::schema::GuestSyncArgs { id: 5 }),
            id: None,
        };
        assert_eq!(
            serde_json::to_string(&sync).expect("serialize"),
            r#"{"execute":"guest-sync-delimited","arguments":{"id":5}}"#
        );
        let ping: Command<'_, ()> = Command {
            execute: "guest-ping",
            arguments: None,
            id: Some(9),
        };
        assert_eq!(
            serde_json::to_string(&ping).expect("serialize"),
            r#"{"execute":"guest-ping","id":9}"#
        );
    }

    #[test]
    fn request_accepts_any_id() {
        let req =
            Request::from_value(json!({"execute": "guest-ping", "id": {"a": [1]}})).expect("valid");
        assert_eq!(req.execute, "guest-ping");
        assert_eq!(req.id, Some(json!({"a": [1]})));
        assert_eq!(req.arguments, None);
    }

    #[test]
    fn reply_round_trip_keeps_member_names() {
        let ok = Response::ok(json!({}), Some(json!("abc")));
        assert_eq!(
            serde_json::to_string(&ok).expect("serialize"),
            r#"{"return":{},"id":"abc"}"#
        );
        let err = Response::error(QgaError::command_not_found("nope"), None);
        let text = serde_json::to_string(&err).expect("serialize");
        assert_eq!(
            text,
            r#"{"error":{"class":"CommandNotFound","desc":"nope"}}"#
        );
        let back: Response = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, err);
    }

    #[test]
    fn reply_parser_rejects_what_is_not_a_reply() {
        assert_eq!(
            Response::from_value(json!(1)),
            Err(ResponseError::NotAnObject)
        );
        assert_eq!(
            Response::from_value(json!({"id": 1})),
            Err(ResponseError::NoOutcome)
        );
        assert_eq!(
            Response::from_value(json!({"return": 1, "error": {"class": "x", "desc": "y"}})),
            Err(ResponseError::NoOutcome)
        );
        assert!(matches!(
            Response::from_value(json!({"error": {"class": 3}})),
            Err(ResponseError::BadError(_))
        ));
        assert_eq!(
            Response::from_value(json!({"return": 1, "x": 2})),
            Err(ResponseError::UnexpectedMember("x".into()))
        );
        let unknown = Response::from_value(json!({"error": {"class": "NewClass", "desc": "d"}}))
            .expect("parse");
        assert_eq!(
            unknown.into_result(),
            Err(QgaError {
                class: ErrorClass::Other("NewClass".into()),
                desc: "d".into()
            })
        );
    }
}
