//! RESP on the wire: the request parser (client side), the reply framer (shard side) and the
//! replies the proxy builds itself.

pub mod reply;
pub mod request;
pub mod scan;

pub use reply::Proto;
pub use request::{Limits, Parsed, ProtoError, Request, RequestParser};
pub use scan::{Frame, ReplyScanner, ScanError};
