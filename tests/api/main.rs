//! Black-box tests: each starts the real service on a random port and drives it over HTTP.

mod blueprints;
mod cli;
mod helpers;
mod items;
mod kitchensink;
mod process;
mod projectors;
