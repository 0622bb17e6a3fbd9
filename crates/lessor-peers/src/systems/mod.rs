//! One module per system under test, each a [`crate::run::Peer`].

pub mod beanstalkd;
pub mod lessor;
pub mod nats;
pub mod postgres;
pub mod redis_streams;
