//! The arguments of the client commands (clap). `dstore --help` is generated from these doc comments,
//! so they are written for users.

use std::path::PathBuf;

use clap::{Args, Subcommand};

/// Where the server is, and how to print its answers. Shared by every client command.
#[derive(Args, Clone, Debug)]
pub struct Connection {
    /// Base URL of the dstore server.
    #[arg(
        long,
        env = "DSTORE_SERVER",
        default_value = "http://127.0.0.1:2020",
        global = true
    )]
    pub server: String,
    /// Print the server's JSON answer as it is instead of a summary.
    #[arg(long, global = true)]
    pub json: bool,
    /// The API key (or master key, for `dstore keys`) sent as `Authorization: Bearer`.
    #[arg(long, env = "DSTORE_API_KEY", global = true, hide_env_values = true)]
    pub api_key: Option<String>,
    /// Seconds to wait for the server to send anything before giving up (a dry run counts every
    /// stored item, which takes minutes on a large project).
    #[arg(
        long,
        env = "DSTORE_READ_TIMEOUT",
        default_value_t = 600,
        global = true,
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub read_timeout: u64,
}

/// The commands that talk to a running server.
#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Put, show or remove a blueprint in a project's working copy (on a running server).
    Blueprint {
        #[command(subcommand)]
        command: BlueprintCommand,
        #[command(flatten)]
        connection: Connection,
    },
    /// Freeze a project's working copy as its next version (on a running server).
    Freeze {
        /// The project, e.g. `myblog`.
        project: String,
        /// Change nothing: print what the freeze would do to each live version's items and what each
        /// store would run. Exits 1 when the freeze would be refused.
        #[arg(long, conflicts_with = "force")]
        dry_run: bool,
        /// Freeze even though values would be lost (the version is marked forced).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show the changes between two frozen versions with their compatibility verdicts.
    Diff {
        /// The project, e.g. `myblog`.
        project: String,
        /// The older version.
        from: u32,
        /// The newer version.
        to: u32,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show versions, migrations and back-fill progress (of one project, or of all).
    Versions {
        /// The project; all projects when omitted.
        project: Option<String>,
        /// Keep showing progress until every back-fill has finished.
        #[arg(long, short)]
        watch: bool,
        /// With --watch: give up (exit 1) after this many seconds.
        #[arg(long, value_name = "SECONDS", requires = "watch")]
        timeout: Option<u64>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Print a project's changes as NDJSON, one line per change, in revision order.
    Changes {
        /// The project, e.g. `myblog`.
        project: String,
        /// Show items as clients of this version see them (default: the newest).
        #[arg(long)]
        version: Option<u32>,
        /// Start after this revision (0: the latest state of every item first).
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Only these blueprints (comma-separated).
        #[arg(long)]
        blueprint: Option<String>,
        /// Keep printing new changes; reconnects from the last revision seen when the connection
        /// drops.
        #[arg(long, short)]
        follow: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Put, show or delete an item (on a running server).
    Item {
        #[command(subcommand)]
        command: ItemCommand,
        #[command(flatten)]
        connection: Connection,
    },
    /// Make, list, show, rotate and revoke API keys (with a master key or a keys.manage key).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Make an API key; prints its secret, shown this once.
    Create {
        /// A name for people, e.g. `blog-frontend`.
        name: String,
        /// Comma-separated actions: blueprints.read, blueprints.write, items.read, items.write,
        /// projects.delete, operations, keys.manage, or *.
        #[arg(long, short, value_delimiter = ',', required = true)]
        actions: Vec<String>,
        /// Comma-separated projects: names, prefix* patterns, or *.
        #[arg(long, short, value_delimiter = ',', required = true)]
        projects: Vec<String>,
        #[arg(long, short, default_value = "")]
        description: String,
        /// When the key stops working (RFC 3339, e.g. 2027-01-01T00:00:00Z); never by default.
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// List the API keys (never their secrets).
    List,
    /// Show one API key.
    Show {
        /// The key's id (the part after `dstore_`).
        id: String,
    },
    /// Give a key a new secret; the old one keeps working for the grace period.
    Rotate {
        id: String,
        /// Seconds the old secret keeps working (default: the server's auth.rotation_grace_secs).
        #[arg(long)]
        grace: Option<u64>,
    },
    /// Revoke a key at once.
    Revoke { id: String },
}

#[derive(Subcommand, Debug)]
pub enum BlueprintCommand {
    /// Put a blueprint from a JSON file (`-` reads standard input) into the working copy.
    Put {
        /// The project, e.g. `myblog`.
        project: String,
        /// The blueprint, e.g. `article`.
        blueprint: String,
        /// A JSON file with the blueprint's definition, or `-` for standard input.
        file: PathBuf,
    },
    /// Print a blueprint as JSON: the working copy, or as frozen in --version.
    Get {
        /// The project, e.g. `myblog`.
        project: String,
        /// The blueprint, e.g. `article`.
        blueprint: String,
        /// A frozen version instead of the working copy.
        #[arg(long, short)]
        version: Option<u32>,
    },
    /// Remove a blueprint from the working copy (takes effect at the next freeze).
    Delete {
        /// The project, e.g. `myblog`.
        project: String,
        /// The blueprint, e.g. `article`.
        blueprint: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ItemCommand {
    /// Write an item from a JSON file (`-` reads standard input). Its `id` names the item; without
    /// one the server generates it.
    Put {
        /// The project, e.g. `myblog`.
        project: String,
        /// The blueprint, e.g. `article`.
        blueprint: String,
        /// A JSON file with one item (with `project_version`), or `-` for standard input.
        file: PathBuf,
        /// Answer only once every store has the write.
        #[arg(long)]
        wait: bool,
    },
    /// Print an item as JSON, as a client of --version sees it (default: the newest version).
    Get {
        /// The project, e.g. `myblog`.
        project: String,
        /// The blueprint, e.g. `article`.
        blueprint: String,
        /// The item's uuid.
        id: String,
        /// The version whose clients' view to show.
        #[arg(long, short)]
        version: Option<u32>,
    },
    /// Delete an item from every store and version (a missing item is not an error).
    Delete {
        /// The project, e.g. `myblog`.
        project: String,
        /// The blueprint, e.g. `article`.
        blueprint: String,
        /// The item's uuid.
        id: String,
        /// Answer only once every store has the delete.
        #[arg(long)]
        wait: bool,
    },
}
