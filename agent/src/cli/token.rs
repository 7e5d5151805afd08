//! `countersign approver hash-token`: tokens are configured by their SHA-256 only.
use std::io::Read as _;

use base64::Engine as _;

/// Prints the SHA-256 of a token from standard input, or makes a new token and prints both.
pub fn hash_token(new: bool) -> anyhow::Result<()> {
    if new {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("random source: {e}"))?;
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        println!("token:  {token}");
        println!("sha256: {}", crate::sign::sha256_hex(token.as_bytes()));
        return Ok(());
    }
    let mut token = String::new();
    std::io::stdin().take(4096).read_to_string(&mut token)?;
    let token = token.trim();
    anyhow::ensure!(!token.is_empty(), "no token on standard input");
    println!("{}", crate::sign::sha256_hex(token.as_bytes()));
    Ok(())
}
