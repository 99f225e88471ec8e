//! dstore: a blueprint-driven write service. See ARCHITECTURE.md for how the modules fit together.

pub use dstore_model::{blueprint, bulk, document, json};

pub mod allocator;
pub mod aside;
pub mod auth;
pub mod budget;
pub mod catalog;
pub mod config;
pub mod feed;
pub mod http;
pub mod journal;
pub mod projector;
pub mod queue;
pub mod rocks;
pub mod startup;
pub mod storage;
pub mod supervise;
pub mod telemetry;
pub mod write;
