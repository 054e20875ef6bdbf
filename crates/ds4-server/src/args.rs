//! `ds4 serve` flags (ds4-server's, plus the operational ones ds4 lacks).

use std::path::PathBuf;

/// Flags of `ds4 serve`. The model path and the backend are the binary's; everything about the
/// HTTP server, the live session and the disk KV cache is here.
#[derive(clap::Args, Clone, Debug)]
pub struct ServeArgs {
    /// Bind address (IPv4 or IPv6 literal, or `localhost`). Use 0.0.0.0 to listen on the LAN.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,

    /// TCP port (0: pick a free one; the chosen port is logged).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,

    /// Context size of the live session, allocated at startup.
    #[arg(short = 'c', long, default_value_t = 32768)]
    pub ctx: usize,

    /// Default `max_tokens` when a client sends no limit (always clamped to the room left in
    /// the context).
    #[arg(short = 'n', long = "tokens", default_value_t = 393_216)]
    pub tokens: usize,

    /// Require this key on every request (`Authorization: Bearer KEY` or `x-api-key: KEY`);
    /// 401 otherwise. Also read from `DS4_API_KEY`.
    #[arg(long, env = "DS4_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Enable disk KV checkpoints in this directory (created if missing).
    #[arg(long)]
    pub kv_disk_dir: Option<PathBuf>,

    /// Disk budget of the KV checkpoints, in MiB.
    #[arg(long, default_value_t = 4096)]
    pub kv_disk_space_mb: u64,

    /// Never save or load checkpoints shorter than this many tokens.
    #[arg(long, default_value_t = 512)]
    pub kv_cache_min_tokens: usize,

    /// First prompts with a length in [min, N] get a cold checkpoint; 0 disables cold saves.
    #[arg(long, default_value_t = 30000)]
    pub kv_cache_cold_max_tokens: usize,

    /// Save a checkpoint whenever the live session crosses an aligned frontier about N tokens
    /// apart (rounded up to the alignment); 0 disables.
    #[arg(long, default_value_t = 10000)]
    pub kv_cache_continued_interval_tokens: usize,

    /// Tokens trimmed from the end of a cold prompt before its checkpoint (BPE boundary
    /// safety).
    #[arg(long, default_value_t = 32)]
    pub kv_cache_boundary_trim_tokens: usize,

    /// Align cold checkpoints down to a multiple of this; 0 disables.
    #[arg(long, default_value_t = 2048)]
    pub kv_cache_boundary_align_tokens: usize,

    /// Refuse checkpoints written by a model with a different routed-expert quantization.
    #[arg(long)]
    pub kv_cache_reject_different_quant: bool,

    /// Write a human-readable trace of every request (rendered prompt, cache decisions,
    /// generated text) to FILE.
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,

    /// Most requests waiting for the engine; more are refused with 503 and `Retry-After`.
    #[arg(long, default_value_t = 64)]
    pub queue_max: usize,

    /// Largest request body accepted, in bytes (413 above).
    #[arg(long, default_value_t = 64 << 20)]
    pub max_body_bytes: usize,

    /// Send `Access-Control-Allow-*` headers (browser clients).
    #[arg(long)]
    pub cors: bool,

    /// Render earlier tool calls canonically from their JSON instead of replaying the exact
    /// sampled DSML block.
    #[arg(long)]
    pub disable_exact_dsml_tool_replay: bool,

    /// Most tool ids kept in the exact-DSML replay map (also capped at 512 MiB).
    #[arg(long, default_value_t = 100_000)]
    pub tool_memory_max_ids: usize,

    /// Tokens per prefill chunk (cancellation and keep-alives happen between chunks). Default:
    /// the backend's (8192 on CUDA, 2048 on the CPU; 2048 for a server embedded without a
    /// backend default).
    #[arg(long)]
    pub prefill_chunk: Option<usize>,

    /// Default temperature (requests may override it; thinking mode forces 1).
    #[arg(long, default_value_t = 1.0)]
    pub temp: f32,

    /// Default nucleus cut.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,

    /// Default top-k (0: no cap).
    #[arg(long, default_value_t = 0)]
    pub top_k: i32,

    /// Default min-p.
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,

    /// Default RNG seed for requests that send none (0: a fresh random seed per request).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Model id advertised by /v1/models and echoed when a request names none.
    #[arg(long)]
    pub model_name: Option<String>,

    /// Seconds between SSE keep-alive comments while a streamed request waits or prefills.
    #[arg(long, default_value_t = 5)]
    pub keepalive_secs: u64,

    /// On SIGINT/SIGTERM, seconds to wait for in-flight work before exiting anyway.
    #[arg(long, default_value_t = 10)]
    pub shutdown_grace_secs: u64,

    /// A request body that stalls this many seconds between reads is refused with 408 (ds4's
    /// 10 s socket timeout): a client that never sends its announced body does not hold a
    /// connection forever. 0 disables.
    #[arg(long, default_value_t = 10)]
    pub body_timeout_secs: u64,

    /// A connection that has not sent a whole request head within this many seconds of being
    /// accepted or of its previous response ending — a stalled partial header, or an idle
    /// keep-alive connection — is closed (ds4's 10 s socket timeout; clients reconnect, and
    /// common ones drop idle connections sooner themselves). 0 disables.
    #[arg(long, default_value_t = 10)]
    pub header_timeout_secs: u64,

    /// TEST ONLY: a JSON file of scripted generations (see the crate docs). The worker emits
    /// the scripted text's tokens instead of sampling, through the real session, parser and
    /// streaming path. Also read from `DS4_SERVER_TEST_SCRIPT`.
    #[arg(long, hide = true, env = "DS4_SERVER_TEST_SCRIPT")]
    pub test_script: Option<PathBuf>,
}

/// Largest `--header-timeout-secs` (the deadline is an `Instant` sum, which must not overflow).
const MAX_TIMEOUT_SECS: u64 = 365 * 24 * 3600;

impl Default for ServeArgs {
    fn default() -> Self {
        ServeArgs {
            host: "127.0.0.1".into(),
            port: 8000,
            ctx: 32768,
            tokens: 393_216,
            api_key: None,
            kv_disk_dir: None,
            kv_disk_space_mb: 4096,
            kv_cache_min_tokens: 512,
            kv_cache_cold_max_tokens: 30000,
            kv_cache_continued_interval_tokens: 10000,
            kv_cache_boundary_trim_tokens: 32,
            kv_cache_boundary_align_tokens: 2048,
            kv_cache_reject_different_quant: false,
            trace: None,
            queue_max: 64,
            max_body_bytes: 64 << 20,
            cors: false,
            disable_exact_dsml_tool_replay: false,
            tool_memory_max_ids: 100_000,
            prefill_chunk: None,
            temp: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.05,
            seed: 0,
            model_name: None,
            keepalive_secs: 5,
            shutdown_grace_secs: 10,
            body_timeout_secs: 10,
            header_timeout_secs: 10,
            test_script: None,
        }
    }
}

impl ServeArgs {
    /// The prefill chunk in force (`--prefill-chunk`, else ds4's 2048).
    pub fn chunk(&self) -> usize {
        self.prefill_chunk.unwrap_or(2048)
    }

    /// Check the flag combinations ds4 refuses.
    pub fn validate(&self) -> Result<(), String> {
        if self.ctx < 2 {
            return Err("--ctx must be at least 2".into());
        }
        if self.prefill_chunk == Some(0) {
            return Err("--prefill-chunk must be at least 1".into());
        }
        if self.queue_max == 0 {
            return Err("--queue-max must be at least 1".into());
        }
        if self.kv_cache_cold_max_tokens != 0
            && self.kv_cache_cold_max_tokens < self.kv_cache_min_tokens
        {
            return Err(format!(
                "--kv-cache-cold-max-tokens must be 0 or at least --kv-cache-min-tokens ({})",
                self.kv_cache_min_tokens
            ));
        }
        if self.header_timeout_secs > MAX_TIMEOUT_SECS {
            return Err(format!(
                "--header-timeout-secs must be at most {MAX_TIMEOUT_SECS} (a year)"
            ));
        }
        if !(0.0..=100.0).contains(&self.temp) {
            return Err("--temp must be in [0, 100]".into());
        }
        if !(0.0..=1.0).contains(&self.top_p) || !(0.0..=1.0).contains(&self.min_p) {
            return Err("--top-p and --min-p must be in [0, 1]".into());
        }
        Ok(())
    }

    /// The continued-save frontier spacing: the interval rounded up to the alignment.
    pub fn continued_frontier(&self) -> usize {
        let i = self.kv_cache_continued_interval_tokens;
        let a = self.kv_cache_boundary_align_tokens;
        if i == 0 {
            0
        } else if a == 0 {
            i
        } else {
            i.div_ceil(a) * a
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn defaults_bind_loopback_and_match_ds4() {
        let mut a = Cli::try_parse_from(["ds4"]).unwrap().serve;
        // (The key may come from the environment, which another test sets.)
        a.api_key = None;
        assert_eq!(a.host, "127.0.0.1");
        assert_eq!(
            crate::bind_addr(&a.host, a.port).unwrap().to_string(),
            "127.0.0.1:8000"
        );
        assert_eq!(
            crate::bind_addr("localhost", 1).unwrap().to_string(),
            "127.0.0.1:1"
        );
        assert_eq!(crate::bind_addr("::1", 2).unwrap().to_string(), "[::1]:2");
        assert!(crate::bind_addr("example.com", 2).is_err());
        assert_eq!(
            (a.ctx, a.tokens, a.kv_disk_space_mb),
            (32768, 393_216, 4096)
        );
        assert_eq!(a.continued_frontier(), 10240);
        // The clap defaults and `Default` agree.
        let d = ServeArgs::default();
        assert_eq!(format!("{a:?}"), format!("{d:?}"));
        assert!(a.validate().is_ok());
    }

    #[test]
    fn api_key_from_the_flag_or_the_environment() {
        let a = Cli::try_parse_from(["ds4", "--api-key", "k1"])
            .unwrap()
            .serve;
        assert_eq!(a.api_key.as_deref(), Some("k1"));
        // SAFETY: no other test of this binary depends on DS4_API_KEY (the defaults test
        // clears the key it parsed).
        unsafe { std::env::set_var("DS4_API_KEY", "k2") };
        let env = Cli::try_parse_from(["ds4"]).unwrap().serve;
        let flag = Cli::try_parse_from(["ds4", "--api-key", "k1"])
            .unwrap()
            .serve;
        unsafe { std::env::remove_var("DS4_API_KEY") };
        assert_eq!(env.api_key.as_deref(), Some("k2"));
        assert_eq!(flag.api_key.as_deref(), Some("k1"));
    }

    #[test]
    fn refuses_what_ds4_refuses() {
        let bad = |args: &[&str]| {
            let mut v = vec!["ds4"];
            v.extend_from_slice(args);
            Cli::try_parse_from(v).unwrap().serve.validate().is_err()
        };
        assert!(bad(&["--kv-cache-cold-max-tokens", "100"]));
        assert!(!bad(&["--kv-cache-cold-max-tokens", "0"]));
        assert!(bad(&["--queue-max", "0"]));
        assert!(bad(&["--ctx", "1"]));
        assert!(bad(&["--top-p", "1.5"]));
        assert!(bad(&["--header-timeout-secs", "18446744073709551615"]));
        assert!(!bad(&["--header-timeout-secs", "0"]));
        assert!(!bad(&["--header-timeout-secs", "600"]));
    }
}
