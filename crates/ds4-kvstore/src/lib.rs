//! Disk KV checkpoints (`--kv-disk-dir`) in ds4's KVC file format.
//!
//! A checkpoint stores a session payload (the engine's snapshot bytes) together with the exact
//! rendered text of the prompt prefix it covers. The file is named by the SHA-1 of that text, so a
//! new request finds the longest stored prefix of its own rendered prompt by hashing its prefixes.
//!
//! File layout (little-endian; ds4's `ds4_kvstore.h`):
//! ```text
//! 0   "KVC"  u8 version=1  u8 routed-quant bits  u8 save reason  u8 ext flags  u8 reserved
//! 8   u32 tokens  u32 hits  u32 ctx  u8[4] reserved
//! 24  u64 created  u64 last_used  u64 payload bytes
//! 48  u32 text bytes, text, payload
//!     [ext bit 0] "KTM" u8 1, u32 n, n × (u32 id_len, u32 dsml_len, id, dsml)
//!     [ext bit 3] "KCS" u8 1, [u8; 32] model fingerprint, [u8; 32] SHA-256 of the file
//! ```
//! Beyond ds4: files are written atomically (temp file, fsync, rename, fsync of the directory),
//! and every file carries the integrity trailer (ext bit 3). The SHA-256 covers the whole file
//! up to the trailer's hash, with the two fields that are rewritten in place (hits at 12, last_used
//! at 32) read as zero. A file without the trailer, with a different model fingerprint, a bad
//! hash, or any structural damage is ignored with a log line and never loaded.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use sha1::Sha1;
use sha2::{Digest, Sha256};

/// File magic.
pub const MAGIC: &[u8; 3] = b"KVC";
/// Format version.
pub const VERSION: u8 = 1;
/// Fixed header size.
pub const HEADER_BYTES: usize = 48;
/// Extension flag: tool-id → DSML map appended.
pub const EXT_TOOL_MAP: u8 = 1;
/// Extension flag: the cache text is the Responses-visible transcript.
pub const EXT_RESPONSES_VISIBLE: u8 = 2;
/// Extension flag: the cache text is the thinking-visible transcript.
pub const EXT_THINKING_VISIBLE: u8 = 4;
/// Extension flag: integrity trailer (model fingerprint + SHA-256) appended. Always set by us.
pub const EXT_INTEGRITY: u8 = 8;
const TRAILER_BYTES: usize = 4 + 32 + 32;

/// Why a checkpoint was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum SaveReason {
    Unknown = 0,
    Cold = 1,
    Continued = 2,
    Evict = 3,
    Shutdown = 4,
    AgentSystem = 5,
    AgentSession = 6,
}

impl SaveReason {
    fn from_u8(v: u8) -> Option<SaveReason> {
        use SaveReason::*;
        Some(match v {
            0 => Unknown,
            1 => Cold,
            2 => Continued,
            3 => Evict,
            4 => Shutdown,
            5 => AgentSystem,
            6 => AgentSession,
            _ => return None,
        })
    }

    /// Lower-case name for logs.
    pub fn name(self) -> &'static str {
        use SaveReason::*;
        match self {
            Unknown => "unknown",
            Cold => "cold",
            Continued => "continued",
            Evict => "evict",
            Shutdown => "shutdown",
            AgentSystem => "agent-system",
            AgentSession => "agent-session",
        }
    }
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("kv store I/O on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kv file {path} is invalid: {reason}")]
    Invalid { path: String, reason: String },
    #[error("kv file {path} belongs to another model (fingerprint mismatch)")]
    Foreign { path: String },
    #[error("checkpoint of {bytes} bytes exceeds the disk budget of {budget} bytes")]
    TooLarge { bytes: u64, budget: u64 },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KvError + '_ {
    move |source| KvError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The fixed header of a KVC file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvHeader {
    pub quant_bits: u8,
    pub reason: SaveReason,
    pub ext_flags: u8,
    pub tokens: u32,
    pub hits: u32,
    pub ctx: u32,
    pub created: u64,
    pub last_used: u64,
    pub payload_bytes: u64,
}

impl KvHeader {
    fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..3].copy_from_slice(MAGIC);
        b[3] = VERSION;
        b[4] = self.quant_bits;
        b[5] = self.reason as u8;
        b[6] = self.ext_flags;
        b[8..12].copy_from_slice(&self.tokens.to_le_bytes());
        b[12..16].copy_from_slice(&self.hits.to_le_bytes());
        b[16..20].copy_from_slice(&self.ctx.to_le_bytes());
        b[24..32].copy_from_slice(&self.created.to_le_bytes());
        b[32..40].copy_from_slice(&self.last_used.to_le_bytes());
        b[40..48].copy_from_slice(&self.payload_bytes.to_le_bytes());
        b
    }

    fn parse(b: &[u8], path: &Path) -> Result<KvHeader, KvError> {
        let bad = |reason: &str| KvError::Invalid {
            path: path.display().to_string(),
            reason: reason.to_string(),
        };
        if b.len() < HEADER_BYTES {
            return Err(bad("shorter than the 48-byte header"));
        }
        if &b[0..3] != MAGIC {
            return Err(bad("bad magic"));
        }
        if b[3] != VERSION {
            return Err(bad(&format!("unsupported version {}", b[3])));
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        Ok(KvHeader {
            quant_bits: b[4],
            reason: SaveReason::from_u8(b[5]).ok_or_else(|| bad("unknown save reason"))?,
            ext_flags: b[6],
            tokens: u32_at(8),
            hits: u32_at(12),
            ctx: u32_at(16),
            created: u64_at(24),
            last_used: u64_at(32),
            payload_bytes: u64_at(40),
        })
    }
}

/// A checkpoint to write.
#[derive(Clone, Debug)]
pub struct Checkpoint<'a> {
    /// The exact cache text (rendered prompt prefix) the payload covers.
    pub text: &'a [u8],
    /// The engine's session snapshot bytes.
    pub payload: &'a [u8],
    /// Tokens in the payload.
    pub tokens: u32,
    /// Context size the session was created with.
    pub ctx: u32,
    /// Routed-expert quant bits of the model (2 or 4).
    pub quant_bits: u8,
    pub reason: SaveReason,
    /// Extra ext flags (EXT_RESPONSES_VISIBLE / EXT_THINKING_VISIBLE).
    pub key_flags: u8,
    /// Tool id → exact DSML block; only entries whose DSML occurs in `text` are stored.
    pub tool_map: &'a [(String, String)],
}

/// A checkpoint read back.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub header: KvHeader,
    pub text: Vec<u8>,
    pub payload: Vec<u8>,
    pub tool_map: Vec<(String, String)>,
}

/// One file in the directory (header and text length only; the payload stays on disk).
#[derive(Clone, Debug)]
pub struct KvEntry {
    pub path: PathBuf,
    /// Hex SHA-1 of the cache text (the file stem).
    pub sha1: String,
    pub header: KvHeader,
    pub text_bytes: u64,
    pub file_bytes: u64,
}

/// Store options (`--kv-cache-*`).
#[derive(Clone, Debug)]
pub struct KvOptions {
    /// Disk budget in bytes (`--kv-disk-space-mb`).
    pub budget_bytes: u64,
    /// Smallest checkpoint worth keeping, in tokens.
    pub min_tokens: u32,
    /// Refuse entries written for a model with different routed-expert quant bits.
    pub reject_different_quant: bool,
    /// Routed-expert quant bits of the running model.
    pub quant_bits: u8,
    /// 32-byte model fingerprint; files with another one are ignored.
    pub fingerprint: [u8; 32],
}

/// SHA-1 of `text` in lower-case hex (the file name stem).
pub fn sha1_hex(text: &[u8]) -> String {
    let d = Sha1::digest(text);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Current unix time in seconds.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A directory of KVC checkpoints with an LRU-ish byte budget.
#[derive(Debug)]
pub struct KvStore {
    dir: PathBuf,
    opts: KvOptions,
}

impl KvStore {
    /// Open (creating if needed) a store directory and evict down to the budget.
    pub fn open(dir: impl Into<PathBuf>, opts: KvOptions) -> Result<KvStore, KvError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let store = KvStore { dir, opts };
        store.evict_to_budget(None)?;
        Ok(store)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The options.
    pub fn options(&self) -> &KvOptions {
        &self.opts
    }

    fn path_for(&self, sha: &str) -> PathBuf {
        self.dir.join(format!("{sha}.kv"))
    }

    /// Write a checkpoint atomically. Returns the entry written.
    pub fn store(&self, cp: &Checkpoint<'_>) -> Result<KvEntry, KvError> {
        let sha = sha1_hex(cp.text);
        let path = self.path_for(&sha);
        let now = now_unix();
        let tool_map: Vec<&(String, String)> = cp
            .tool_map
            .iter()
            .filter(|(_, dsml)| contains(cp.text, dsml.as_bytes()))
            .collect();
        let mut ext =
            EXT_INTEGRITY | (cp.key_flags & (EXT_RESPONSES_VISIBLE | EXT_THINKING_VISIBLE));
        if !tool_map.is_empty() {
            ext |= EXT_TOOL_MAP;
        }
        let header = KvHeader {
            quant_bits: cp.quant_bits,
            reason: cp.reason,
            ext_flags: ext,
            tokens: cp.tokens,
            hits: 0,
            ctx: cp.ctx,
            created: now,
            last_used: now,
            payload_bytes: cp.payload.len() as u64,
        };
        let mut body =
            Vec::with_capacity(HEADER_BYTES + 4 + cp.text.len() + cp.payload.len() + 256);
        body.extend_from_slice(&header.to_bytes());
        body.extend_from_slice(&(cp.text.len() as u32).to_le_bytes());
        body.extend_from_slice(cp.text);
        body.extend_from_slice(cp.payload);
        if !tool_map.is_empty() {
            body.extend_from_slice(b"KTM");
            body.push(1);
            body.extend_from_slice(&(tool_map.len() as u32).to_le_bytes());
            for (id, dsml) in &tool_map {
                body.extend_from_slice(&(id.len() as u32).to_le_bytes());
                body.extend_from_slice(&(dsml.len() as u32).to_le_bytes());
                body.extend_from_slice(id.as_bytes());
                body.extend_from_slice(dsml.as_bytes());
            }
        }
        body.extend_from_slice(b"KCS");
        body.push(1);
        body.extend_from_slice(&self.opts.fingerprint);
        let hash = file_hash(&body);
        body.extend_from_slice(&hash);
        let total = body.len() as u64;
        if total > self.opts.budget_bytes {
            return Err(KvError::TooLarge {
                bytes: total,
                budget: self.opts.budget_bytes,
            });
        }
        let tmp = self
            .dir
            .join(format!(".{sha}.kv.tmp.{}", std::process::id()));
        {
            let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
            f.write_all(&body).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
        }
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        tracing::info!(target: "kvcache", file = %path.display(), tokens = cp.tokens, bytes = total, reason = cp.reason.name(), "stored checkpoint");
        let entry = KvEntry {
            path: path.clone(),
            sha1: sha,
            header,
            text_bytes: cp.text.len() as u64,
            file_bytes: total,
        };
        self.evict_to_budget(Some(&path))?;
        Ok(entry)
    }

    /// Every readable entry of the directory (headers only). Unreadable or foreign-looking
    /// files are skipped with a log line.
    pub fn entries(&self) -> Vec<KvEntry> {
        let mut out = Vec::new();
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return out;
        };
        for e in rd.flatten() {
            let path = e.path();
            let Some(stem) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".kv"))
            else {
                continue;
            };
            if stem.len() != 40 || !stem.bytes().all(|c| c.is_ascii_hexdigit()) {
                continue;
            }
            match read_entry(&path, stem) {
                Ok(entry) => out.push(entry),
                Err(err) => tracing::warn!(target: "kvcache", "ignoring {}: {err}", path.display()),
            }
        }
        out
    }

    /// Find the longest stored prefix of `prompt_text` usable at context `ctx`.
    pub fn lookup(&self, prompt_text: &[u8], ctx: u32) -> Option<KvEntry> {
        let mut candidates: Vec<KvEntry> = self
            .entries()
            .into_iter()
            .filter(|e| {
                e.header.tokens >= self.opts.min_tokens
                    && e.header.ctx <= ctx
                    && e.text_bytes <= prompt_text.len() as u64
                    && (!self.opts.reject_different_quant
                        || e.header.quant_bits == self.opts.quant_bits)
                    && sha1_hex(&prompt_text[..e.text_bytes as usize]) == e.sha1
            })
            .collect();
        candidates.sort_by_key(|e| std::cmp::Reverse(e.text_bytes));
        candidates.into_iter().next()
    }

    /// Load and verify an entry. A damaged or foreign file is deleted and reported as an error.
    pub fn load(&self, entry: &KvEntry) -> Result<Loaded, KvError> {
        match read_full(&entry.path, &self.opts.fingerprint) {
            Ok(l) => {
                if sha1_hex(&l.text) != entry.sha1 {
                    let err = KvError::Invalid {
                        path: entry.path.display().to_string(),
                        reason: "text does not match the file name".into(),
                    };
                    tracing::warn!(target: "kvcache", "ignoring {}: {err}", entry.path.display());
                    return Err(err);
                }
                Ok(l)
            }
            Err(err) => {
                tracing::warn!(target: "kvcache", "ignoring {}: {err}", entry.path.display());
                if matches!(err, KvError::Invalid { .. }) {
                    let _ = fs::remove_file(&entry.path);
                }
                Err(err)
            }
        }
    }

    /// Count a hit: bump `hits` and `last_used` in place (not covered by the hash).
    pub fn touch(&self, entry: &KvEntry) -> Result<(), KvError> {
        let mut f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&entry.path)
            .map_err(io_err(&entry.path))?;
        let mut hdr = [0u8; HEADER_BYTES];
        f.read_exact(&mut hdr).map_err(io_err(&entry.path))?;
        let h = KvHeader::parse(&hdr, &entry.path)?;
        f.seek(SeekFrom::Start(12)).map_err(io_err(&entry.path))?;
        f.write_all(&h.hits.saturating_add(1).to_le_bytes())
            .map_err(io_err(&entry.path))?;
        f.seek(SeekFrom::Start(32)).map_err(io_err(&entry.path))?;
        f.write_all(&now_unix().to_le_bytes())
            .map_err(io_err(&entry.path))?;
        Ok(())
    }

    /// Delete an entry (a consumed hit, or a file found damaged).
    pub fn remove(&self, entry: &KvEntry) {
        let _ = fs::remove_file(&entry.path);
    }

    /// Tool-id → DSML mappings for `ids` found in any stored file's tool map.
    pub fn find_tool_ids(&self, ids: &[&str]) -> HashMap<String, String> {
        let mut out = HashMap::new();
        if ids.is_empty() {
            return out;
        }
        for e in self.entries() {
            if e.header.ext_flags & EXT_TOOL_MAP == 0 {
                continue;
            }
            if let Ok(l) = read_full(&e.path, &self.opts.fingerprint) {
                for (id, dsml) in l.tool_map {
                    if ids.contains(&id.as_str()) {
                        out.insert(id, dsml);
                    }
                }
            }
        }
        out
    }

    /// Evict lowest-score files until the directory fits the budget. `protect` (the file just
    /// written) is evicted last.
    pub fn evict_to_budget(&self, protect: Option<&Path>) -> Result<(), KvError> {
        let mut entries = self.entries();
        let budget = self.opts.budget_bytes + self.opts.budget_bytes / 100;
        let mut total: u64 = entries.iter().map(|e| e.file_bytes).sum();
        if total <= budget {
            return Ok(());
        }
        let now = now_unix();
        entries.sort_by(|a, b| {
            let pa = Some(a.path.as_path()) == protect;
            let pb = Some(b.path.as_path()) == protect;
            pa.cmp(&pb)
                .then(
                    eviction_score(a, now)
                        .partial_cmp(&eviction_score(b, now))
                        .unwrap_or(std::cmp::Ordering::Equal),
                )
                .then(a.header.last_used.cmp(&b.header.last_used))
        });
        for e in entries {
            if total <= budget {
                break;
            }
            tracing::info!(target: "kvcache", file = %e.path.display(), bytes = e.file_bytes, "evicting checkpoint");
            let _ = fs::remove_file(&e.path);
            total = total.saturating_sub(e.file_bytes);
        }
        Ok(())
    }

    /// Total bytes on disk.
    pub fn used_bytes(&self) -> u64 {
        self.entries().iter().map(|e| e.file_bytes).sum()
    }
}

/// ds4's eviction score: `(effective_hits + 1) × tokens / file_size`, with hits decaying by half
/// every 6 hours since the last use.
pub fn eviction_score(e: &KvEntry, now: u64) -> f64 {
    let age = now.saturating_sub(e.header.last_used) as f64;
    let mut eff = e.header.hits as f64 * (-age / (6.0 * 3600.0)).exp2();
    if eff < 0.01 {
        eff = 0.0;
    }
    (eff + 1.0) * e.header.tokens as f64 / e.file_bytes.max(1) as f64
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn file_hash(bytes: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    // Mutable fields (hits at 12..16, last_used at 32..40) are hashed as zero.
    let mut head = [0u8; HEADER_BYTES];
    head.copy_from_slice(&bytes[..HEADER_BYTES]);
    head[12..16].fill(0);
    head[32..40].fill(0);
    h.update(head);
    h.update(&bytes[HEADER_BYTES..]);
    h.finalize().into()
}

fn read_entry(path: &Path, stem: &str) -> Result<KvEntry, KvError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let file_bytes = f.metadata().map_err(io_err(path))?.len();
    let mut hdr = [0u8; HEADER_BYTES + 4];
    f.read_exact(&mut hdr).map_err(|_| KvError::Invalid {
        path: path.display().to_string(),
        reason: "truncated header".into(),
    })?;
    let header = KvHeader::parse(&hdr, path)?;
    let text_bytes = u32::from_le_bytes([hdr[48], hdr[49], hdr[50], hdr[51]]) as u64;
    let min = HEADER_BYTES as u64 + 4 + text_bytes + header.payload_bytes;
    if header.ext_flags & EXT_INTEGRITY == 0 {
        return Err(KvError::Invalid {
            path: path.display().to_string(),
            reason: "no integrity trailer (not written by ds4-rs)".into(),
        });
    }
    if file_bytes < min + TRAILER_BYTES as u64 {
        return Err(KvError::Invalid {
            path: path.display().to_string(),
            reason: format!("truncated: {file_bytes} bytes, header promises at least {min}"),
        });
    }
    Ok(KvEntry {
        path: path.to_path_buf(),
        sha1: stem.to_ascii_lowercase(),
        header,
        text_bytes,
        file_bytes,
    })
}

fn read_full(path: &Path, fingerprint: &[u8; 32]) -> Result<Loaded, KvError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    parse_file(&bytes, path, fingerprint)
}

/// Parse and verify a whole KVC file held in memory.
pub fn parse_file(bytes: &[u8], path: &Path, fingerprint: &[u8; 32]) -> Result<Loaded, KvError> {
    let bad = |reason: String| KvError::Invalid {
        path: path.display().to_string(),
        reason,
    };
    let header = KvHeader::parse(bytes, path)?;
    if header.ext_flags & EXT_INTEGRITY == 0 {
        return Err(bad("no integrity trailer (not written by ds4-rs)".into()));
    }
    if bytes.len() < HEADER_BYTES + 4 + TRAILER_BYTES {
        return Err(bad("truncated".into()));
    }
    let body_end = bytes.len() - 32;
    let trailer = &bytes[body_end - 36..body_end];
    if &trailer[0..3] != b"KCS" || trailer[3] != 1 {
        return Err(bad("integrity trailer missing or damaged".into()));
    }
    if file_hash(&bytes[..body_end]) != bytes[body_end..] {
        return Err(bad("checksum mismatch".into()));
    }
    if trailer[4..36] != fingerprint[..] {
        return Err(KvError::Foreign {
            path: path.display().to_string(),
        });
    }
    let content = &bytes[..body_end - 36];
    let mut pos = HEADER_BYTES;
    let take = |pos: &mut usize, n: u64| -> Result<&[u8], KvError> {
        let n = usize::try_from(n).map_err(|_| bad("length overflow".into()))?;
        let end = pos
            .checked_add(n)
            .filter(|&e| e <= content.len())
            .ok_or_else(|| bad("truncated body".into()))?;
        let s = &content[*pos..end];
        *pos = end;
        Ok(s)
    };
    let u32_of = |s: &[u8]| u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    let text_len = u32_of(take(&mut pos, 4)?) as u64;
    let text = take(&mut pos, text_len)?.to_vec();
    let payload = take(&mut pos, header.payload_bytes)?.to_vec();
    let mut tool_map = Vec::new();
    if header.ext_flags & EXT_TOOL_MAP != 0 {
        let tag = take(&mut pos, 4)?;
        if &tag[..3] != b"KTM" || tag[3] != 1 {
            return Err(bad("tool map tag damaged".into()));
        }
        let n = u32_of(take(&mut pos, 4)?);
        for _ in 0..n {
            let id_len = u32_of(take(&mut pos, 4)?) as u64;
            let dsml_len = u32_of(take(&mut pos, 4)?) as u64;
            let id = String::from_utf8(take(&mut pos, id_len)?.to_vec())
                .map_err(|_| bad("tool id not UTF-8".into()))?;
            let dsml = String::from_utf8(take(&mut pos, dsml_len)?.to_vec())
                .map_err(|_| bad("tool DSML not UTF-8".into()))?;
            tool_map.push((id, dsml));
        }
    }
    if pos != content.len() {
        return Err(bad(format!("{} trailing bytes", content.len() - pos)));
    }
    Ok(Loaded {
        header,
        text,
        payload,
        tool_map,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(budget: u64) -> KvOptions {
        KvOptions {
            budget_bytes: budget,
            min_tokens: 1,
            reject_different_quant: true,
            quant_bits: 2,
            fingerprint: [7u8; 32],
        }
    }

    fn cp<'a>(text: &'a [u8], payload: &'a [u8], tools: &'a [(String, String)]) -> Checkpoint<'a> {
        Checkpoint {
            text,
            payload,
            tokens: 10,
            ctx: 4096,
            quant_bits: 2,
            reason: SaveReason::Cold,
            key_flags: 0,
            tool_map: tools,
        }
    }

    #[test]
    fn store_lookup_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = KvStore::open(dir.path(), opts(1 << 20)).unwrap();
        let tools = vec![
            ("call_1".to_string(), "<dsml>x</dsml>".to_string()),
            ("call_2".to_string(), "not in text".to_string()),
        ];
        let e = s
            .store(&cp(b"<bos>hello <dsml>x</dsml>", b"PAYLOAD", &tools))
            .unwrap();
        assert_eq!(e.sha1, sha1_hex(b"<bos>hello <dsml>x</dsml>"));
        s.store(&cp(b"<bos>hel", b"P2", &[])).unwrap();
        let hit = s
            .lookup(b"<bos>hello <dsml>x</dsml> and more", 8192)
            .unwrap();
        assert_eq!(hit.text_bytes, 25);
        let l = s.load(&hit).unwrap();
        assert_eq!(l.payload, b"PAYLOAD");
        assert_eq!(l.tool_map, vec![tools[0].clone()]);
        assert!(s.lookup(b"<bos>hello", 8192).unwrap().text_bytes == 8);
        assert!(s.lookup(b"<bos>xyz", 8192).is_none());
        // Context too small for the entry.
        assert!(s.lookup(b"<bos>hello <dsml>x</dsml>", 1024).is_none());
        // Hits are counted in place without breaking the checksum.
        s.touch(&hit).unwrap();
        let again = s.lookup(b"<bos>hello <dsml>x</dsml>!", 8192).unwrap();
        assert_eq!(again.header.hits, 1);
        assert!(s.load(&again).is_ok());
        assert_eq!(s.find_tool_ids(&["call_1", "call_9"]).len(), 1);
    }

    #[test]
    fn flipped_byte_truncation_and_foreign_files_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let s = KvStore::open(dir.path(), opts(1 << 20)).unwrap();
        let e = s.store(&cp(b"prefix text", b"0123456789", &[])).unwrap();
        let good = fs::read(&e.path).unwrap();
        for i in [
            0usize,
            5,
            9,
            30,
            44,
            50,
            60,
            good.len() - 40,
            good.len() - 1,
        ] {
            if (12..16).contains(&i) || (32..40).contains(&i) {
                continue;
            }
            let mut b = good.clone();
            b[i] ^= 0x40;
            fs::write(&e.path, &b).unwrap();
            let r = s.lookup(b"prefix text", 4096).map(|h| s.load(&h));
            assert!(!matches!(r, Some(Ok(_))), "flipped byte {i} was accepted");
        }
        for n in [0, 10, 47, 60, good.len() - 1] {
            fs::write(&e.path, &good[..n]).unwrap();
            let r = s.lookup(b"prefix text", 4096).map(|h| s.load(&h));
            assert!(!matches!(r, Some(Ok(_))), "truncation to {n} was accepted");
        }
        // Another model's fingerprint.
        fs::write(&e.path, &good).unwrap();
        let other = KvStore::open(
            dir.path(),
            KvOptions {
                fingerprint: [9u8; 32],
                ..opts(1 << 20)
            },
        )
        .unwrap();
        let hit = other.lookup(b"prefix text", 4096).unwrap();
        assert!(matches!(other.load(&hit), Err(KvError::Foreign { .. })));
        // Foreign file is not deleted, ours still loads.
        assert!(s.load(&s.lookup(b"prefix text", 4096).unwrap()).is_ok());
    }

    #[test]
    fn budget_evicts_lowest_score_and_protects_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let payload = vec![0u8; 1000];
        let s = KvStore::open(dir.path(), opts(2500)).unwrap();
        let a = s.store(&cp(b"aaaa", &payload, &[])).unwrap();
        s.touch(&a).unwrap();
        let _b = s.store(&cp(b"bbbb", &payload, &[])).unwrap();
        let c = s.store(&cp(b"cccc", &payload, &[])).unwrap();
        let names: Vec<String> = s.entries().into_iter().map(|e| e.sha1).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.contains(&a.sha1), "the hit entry is kept");
        assert!(names.contains(&c.sha1), "the new entry is protected");
        assert!(matches!(
            s.store(&cp(b"big", &vec![0u8; 5000], &[])),
            Err(KvError::TooLarge { .. })
        ));
    }

    #[test]
    fn quant_bits_and_min_tokens_filter() {
        let dir = tempfile::tempdir().unwrap();
        let s = KvStore::open(dir.path(), opts(1 << 20)).unwrap();
        let mut c = cp(b"text", b"p", &[]);
        c.quant_bits = 4;
        s.store(&c).unwrap();
        assert!(s.lookup(b"text!", 4096).is_none());
        let s2 = KvStore::open(
            dir.path(),
            KvOptions {
                reject_different_quant: false,
                min_tokens: 11,
                ..opts(1 << 20)
            },
        )
        .unwrap();
        assert!(s2.lookup(b"text!", 4096).is_none());
    }
}
