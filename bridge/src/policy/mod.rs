//! Who may do what, and the record of what was done: identities and grants ([`auth`]),
//! the authenticated [`Caller`], and the audit trail ([`audit`]).

pub mod audit;
pub mod auth;
pub mod caller;

pub use caller::Caller;
