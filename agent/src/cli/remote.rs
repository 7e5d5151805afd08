//! `countersign requests … --approver URL`: the same commands against a remote approver,
//! with an approver token (from `--token-file` or `$COUNTERSIGN_APPROVER_TOKEN`).
use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::proto::{Decision, RequestView};

/// Environment variable holding an approver token.
pub const ENV_TOKEN: &str = "COUNTERSIGN_APPROVER_TOKEN";

pub struct Remote {
    pub url: String,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
}

impl Remote {
    fn token(&self) -> anyhow::Result<String> {
        if let Some(f) = &self.token_file {
            let t = std::fs::read_to_string(f)
                .with_context(|| format!("reading the token file {}", f.display()))?;
            return Ok(t.trim().to_owned());
        }
        std::env::var(ENV_TOKEN)
            .map(|t| t.trim().to_owned())
            .map_err(|_| {
                anyhow::anyhow!("an approver token is needed: --token-file FILE or ${ENV_TOKEN}")
            })
    }

    fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let token = self.token()?;
        let mut client = reqwest::Client::builder().timeout(Duration::from_secs(30));
        if let Some(ca) = &self.ca_file {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            client = client.add_root_certificate(
                reqwest::Certificate::from_pem(&pem)
                    .with_context(|| format!("{}: not a PEM certificate", ca.display()))?,
            );
        }
        let client = client.build()?;
        let url = format!("{}{path}", self.url.trim_end_matches('/'));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let mut req = client.request(method, &url).bearer_auth(token);
            if let Some(b) = body {
                req = req.json(&b);
            }
            let resp = req.send().await.map_err(|e| {
                anyhow::anyhow!(
                    "cannot reach the approver at {url}: {}",
                    crate::daemon::remote::chain(&e)
                )
            })?;
            let status = resp.status();
            let v: Value = resp
                .json()
                .await
                .with_context(|| format!("{url}: HTTP {status}, not JSON"))?;
            if !status.is_success() {
                bail!(
                    "{}",
                    v["error"]
                        .as_str()
                        .unwrap_or("the approver refused (no reason given)")
                );
            }
            Ok(v)
        })
    }

    pub fn list(&self, state: Option<&str>, json: bool) -> anyhow::Result<()> {
        let path = format!("/v1/requests?state={}", state.unwrap_or("pending"));
        let v = self.call(reqwest::Method::GET, &path, None)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(());
        }
        let items = v.as_array().cloned().unwrap_or_default();
        if items.is_empty() {
            println!("no {} requests", state.unwrap_or("pending"));
        }
        for r in items {
            let mut view: RequestView = serde_json::from_value(r["request"].clone())
                .context("the approver sent a request of an unknown shape")?;
            // The approver's id is what its commands take.
            let host_request = view.id;
            view.id = r["id"].as_u64().unwrap_or(0);
            print!("{}", super::requests::render(&view));
            println!(
                "       host:        {} (request {host_request}), state {}, needs {} approval(s){}",
                r["host_name"].as_str().unwrap_or("?"),
                r["state"].as_str().unwrap_or("?"),
                r["quorum"].as_u64().unwrap_or(1),
                r["on_behalf_of"]
                    .as_str()
                    .map(|o| format!(", works for {o}"))
                    .unwrap_or_default()
            );
            for a in r["answers"].as_array().into_iter().flatten() {
                println!(
                    "       answer:      {} {} via {}",
                    a["approver"].as_str().unwrap_or("?"),
                    a["decision"].as_str().unwrap_or("?"),
                    a["channel"].as_str().unwrap_or("?")
                );
            }
        }
        Ok(())
    }

    /// Approves, giving the grant of scope `grant` if the rule offers one.
    pub fn approve(
        &self,
        id: u64,
        reason: Option<&str>,
        grant: Option<&str>,
    ) -> anyhow::Result<()> {
        let Some(scope) = grant else {
            return self.answer_with(id, Decision::Approve, reason, None);
        };
        let r = self.call(reqwest::Method::GET, &format!("/v1/requests/{id}"), None)?;
        let offers = r["grants"].as_array().cloned().unwrap_or_default();
        let Some(index) = offers.iter().position(|o| o["scope"] == scope) else {
            let offered: Vec<String> = offers
                .iter()
                .filter_map(|o| o["describe"].as_str().map(str::to_owned))
                .collect();
            bail!(
                "request #{id} offers no `{scope}` grant (offered: {})",
                if offered.is_empty() {
                    "none".to_owned()
                } else {
                    offered.join("; ")
                }
            );
        };
        self.answer_with(id, Decision::Approve, reason, Some(index))
    }

    pub fn answer(&self, id: u64, decision: Decision, reason: Option<&str>) -> anyhow::Result<()> {
        self.answer_with(id, decision, reason, None)
    }

    fn answer_with(
        &self,
        id: u64,
        decision: Decision,
        reason: Option<&str>,
        grant: Option<usize>,
    ) -> anyhow::Result<()> {
        let v = self.call(
            reqwest::Method::POST,
            &format!("/v1/requests/{id}/answer"),
            Some(
                serde_json::json!({"decision": decision, "justification": reason, "grant": grant}),
            ),
        )?;
        match v["result"].as_str() {
            Some("decided") => println!(
                "request #{id}: decided: {}",
                v["decision"].as_str().unwrap_or("?")
            ),
            Some("counted") => println!(
                "request #{id}: your {decision} is counted ({} of {} approvals)",
                v["have"], v["need"]
            ),
            Some("duplicate") => println!("request #{id}: you answered already"),
            _ => println!("request #{id}: {v}"),
        }
        Ok(())
    }

    /// `countersign grants list --approver URL`.
    pub fn grants(&self, json: bool) -> anyhow::Result<()> {
        let v = self.call(reqwest::Method::GET, "/v1/grants", None)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(());
        }
        let items = v.as_array().cloned().unwrap_or_default();
        if items.is_empty() {
            println!("no grants in force");
        }
        for g in items {
            println!(
                "{:<10} {} for request #{} on host {} until {} (by {})",
                g["id"].as_str().unwrap_or("?"),
                g["scope"].as_str().unwrap_or("?"),
                g["request"],
                g["host_id"].as_str().unwrap_or("?"),
                g["expires"].as_str().unwrap_or("?"),
                g["granted_by"].as_str().unwrap_or("?")
            );
        }
        Ok(())
    }

    /// `countersign grants revoke ID --approver URL`.
    pub fn revoke(&self, id: &str) -> anyhow::Result<()> {
        self.call(
            reqwest::Method::POST,
            &format!("/v1/grants/{id}/revoke"),
            None,
        )?;
        println!("grant {id}: revoked");
        Ok(())
    }
}
