//! `dstore keys`: API keys through `/_keys`, with a master key or a `keys.manage` key for every
//! project (which makes and changes only keys whose actions it holds).

use reqwest::Method;
use serde_json::{json, Value};

use super::client::{print_json, CliError, Client};
use super::KeysCommand;

fn line(key: &Value) -> String {
    let list = |v: &Value| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default()
    };
    format!(
        "{}  {:<24} actions {}  projects {}  expires {}  last used {}",
        key["id"].as_str().unwrap_or("?"),
        key["name"].as_str().unwrap_or(""),
        list(&key["actions"]),
        list(&key["projects"]),
        key["expires_at"].as_str().unwrap_or("never"),
        key["last_used_at"].as_str().unwrap_or("never"),
    )
}

pub(super) async fn run(client: &Client, command: KeysCommand) -> Result<(), CliError> {
    match command {
        KeysCommand::Create {
            name,
            actions,
            projects,
            description,
            expires_at,
        } => {
            let body = json!({
                "name": name, "description": description, "actions": actions,
                "projects": projects, "expires_at": expires_at,
            });
            let key = client
                .call(Method::POST, &["_keys"], &[], Some(&body))
                .await?
                .1;
            client.summary(&key, || {
                format!(
                    "{}\n{}\nthe key is shown this once: keep it (clients send it as Authorization: Bearer <key>)",
                    line(&key),
                    key["key"].as_str().unwrap_or("")
                )
            });
        }
        KeysCommand::List => {
            // Every page, each after the last key of the one before.
            let mut body = client.call(Method::GET, &["_keys"], &[], None).await?.1;
            while let Some(next) = body["next"].as_str().map(str::to_string) {
                let query = [("after", next.as_str())];
                let page = client.call(Method::GET, &["_keys"], &query, None).await?.1;
                let more = page["keys"].as_array().cloned().unwrap_or_default();
                if let Some(keys) = body["keys"].as_array_mut() {
                    keys.extend(more);
                }
                body["next"] = page["next"].clone();
            }
            if let Some(body) = body.as_object_mut() {
                body.remove("next");
            }
            client.summary(&body, || {
                let keys = body["keys"].as_array().cloned().unwrap_or_default();
                if keys.is_empty() {
                    "no API keys".into()
                } else {
                    keys.iter().map(line).collect::<Vec<_>>().join("\n")
                }
            });
        }
        KeysCommand::Show { id } => {
            let body = client
                .call(Method::GET, &["_keys", id_of(&id)], &[], None)
                .await?
                .1;
            print_json(&body);
        }
        KeysCommand::Rotate { id, grace } => {
            let grace = grace.map(|g| g.to_string());
            let query: Vec<(&str, &str)> = grace.iter().map(|g| ("grace", g.as_str())).collect();
            let key = client
                .call(
                    Method::POST,
                    &["_keys", id_of(&id), "_rotate"],
                    &query,
                    None,
                )
                .await?
                .1;
            client.summary(&key, || {
                format!(
                    "{}\nthe old secret works until {}\n{}",
                    line(&key),
                    key["previous_secret_valid_until"].as_str().unwrap_or("now"),
                    key["key"].as_str().unwrap_or("")
                )
            });
        }
        KeysCommand::Revoke { id } => {
            let body = client
                .call(Method::DELETE, &["_keys", id_of(&id)], &[], None)
                .await?
                .1;
            client.summary(&body, || format!("key {} revoked", id_of(&id)));
        }
    }
    Ok(())
}

/// The id of a key given by its id or, pasted whole, by the key itself: the secret never travels
/// in a path, where the audit log and any proxy's access log would keep it.
fn id_of(given: &str) -> &str {
    dstore::auth::split_key(given).map_or(given, |(id, _)| id)
}
