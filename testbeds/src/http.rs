//! The one request the simulated devices make: a JSON POST with an optional bearer token.

use serde::Serialize;

use crate::error::SimError;

pub async fn post<T: serde::de::DeserializeOwned>(http: &reqwest::Client, url: &str, token: Option<&str>, body: &impl Serialize) -> Result<T, SimError> {
    let err = |reason: String| SimError::Post { url: url.to_owned(), reason };
    let mut req = http.post(url).json(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.map_err(|e| err(outpost_protocol::display_chain(&e)))?;
    let status = resp.status();
    let text = resp.text().await.map_err(|e| err(outpost_protocol::display_chain(&e)))?;
    if !status.is_success() {
        return Err(err(format!("{status}: {}", text.chars().take(300).collect::<String>())));
    }
    serde_json::from_str(&text).map_err(|e| err(e.to_string()))
}
