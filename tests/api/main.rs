//! Black-box tests: each starts the real service on a random port and drives it over HTTP.

mod auth;
mod blueprints;
mod changes;
mod cli;
mod cluster;
mod elasticsearch;
mod evolution;
mod faults;
mod helpers;
mod hostile;
mod items;
mod kitchensink;
mod operations;
mod postgres;
mod process;
mod projectors;
mod rabbitmq;
