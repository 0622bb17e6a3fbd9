//! The route table of the v1 API, shared with the server: [`Rpc`] types such as [`QueueProduce`] name a path and its
//! request and response messages, for [`crate::Client::call`].
//!
//! Re-exported from [`lessor_proto::routes`] so that the client and the server cannot disagree on a path.

pub use lessor_proto::routes::*;
