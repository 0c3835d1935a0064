//! The Flotta edge API protocol layer (PROTOCOL.md): wire messages, the mTLS
//! client, the device identity and the hardware inventory sent with enrolment,
//! registration and heartbeats. No controller logic lives here.

pub mod client;
mod der;
pub mod hardware;
pub mod identity;
pub mod messages;
