//! Reading an official checkpoint: `model.safetensors.index.json` + shards, or a single
//! `model.safetensors`. Shard headers are parsed once at open; tensor data is read through
//! memory maps that are opened on demand and closed again (at most [`MAX_OPEN_SHARDS`] at a
//! time), so resident memory stays bounded while converting a checkpoint larger than RAM.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::error::{ConvertError, Result, io_err};

/// Shards kept mapped at once.
pub const MAX_OPEN_SHARDS: usize = 2;

/// Name of the index file.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Name of the single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

/// One tensor's header entry.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    shard: usize,
    /// Absolute byte range in the shard file.
    start: usize,
    end: usize,
}

impl TensorEntry {
    /// Number of elements.
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }
    /// Size in bytes.
    pub fn n_bytes(&self) -> usize {
        self.end - self.start
    }
}

struct Shard {
    path: PathBuf,
    map: Option<memmap2::Mmap>,
    last_use: u64,
}

/// An open checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, TensorEntry>,
    clock: u64,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("shards", &self.shards.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    // SAFETY: read-only mapping of a checkpoint file that is not modified while converting
    // (the same contract as every safetensors loader); all accesses are bounds-checked.
    unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(path))
}

fn valid_shard_name(file: &str) -> bool {
    !file.is_empty()
        && file != "."
        && file != ".."
        && !file.contains('/')
        && !file.contains('\\')
        && !file.contains('\0')
}

impl Checkpoint {
    /// Open a checkpoint directory and parse every shard header.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        // shard file -> names the index assigns to it (None: take the whole shard).
        let mut files: Vec<(String, Option<Vec<String>>)> = Vec::new();
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(io_err(&index_path))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|source| ConvertError::Json {
                    path: index_path.clone(),
                    source,
                })?;
            let bad = |reason: String| ConvertError::Index {
                path: index_path.clone(),
                reason,
            };
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| bad("no \"weight_map\" object".into()))?;
            let mut by_file: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (name, file) in map {
                let file = file
                    .as_str()
                    .ok_or_else(|| bad(format!("entry {name:?} is not a file name string")))?;
                if !valid_shard_name(file) {
                    return Err(bad(format!(
                        "entry {name:?} names {file:?}, not a file in the checkpoint folder"
                    )));
                }
                by_file
                    .entry(file.to_string())
                    .or_default()
                    .push(name.clone());
            }
            files.extend(by_file.into_iter().map(|(f, names)| (f, Some(names))));
        } else if single_path.exists() {
            files.push((SINGLE_FILE.to_string(), None));
        } else {
            return Err(ConvertError::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("neither {INDEX_FILE} nor {SINGLE_FILE} found"),
                ),
            });
        }

        let mut shards = Vec::new();
        let mut tensors = BTreeMap::new();
        for (file, names) in files {
            let path = dir.join(&file);
            let map = map_file(&path)?;
            let (n, meta) =
                SafeTensors::read_metadata(&map).map_err(|e| ConvertError::Safetensors {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            let data_start = 8 + n;
            let shard_idx = shards.len();
            let infos = meta.tensors();
            let mut listed: HashMap<&str, bool> = HashMap::new();
            if let Some(names) = &names {
                for nm in names {
                    listed.insert(nm.as_str(), false);
                }
            }
            for (name, info) in infos {
                match listed.get_mut(name.as_str()) {
                    Some(seen) => *seen = true,
                    None if names.is_some() => {
                        return Err(ConvertError::Index {
                            path: index_path.clone(),
                            reason: format!(
                                "shard {file:?} holds tensor {name:?} that the index does not list"
                            ),
                        });
                    }
                    None => {}
                }
                let (s, e) = info.data_offsets;
                tensors.insert(
                    name.clone(),
                    TensorEntry {
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        shard: shard_idx,
                        start: data_start + s,
                        end: data_start + e,
                    },
                );
            }
            if let Some((name, _)) = listed.iter().find(|(_, seen)| !**seen) {
                return Err(ConvertError::NotInShard {
                    name: name.to_string(),
                    shard: file,
                });
            }
            shards.push(Shard {
                path,
                map: None,
                last_use: 0,
            });
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            shards,
            tensors,
            clock: 0,
        })
    }

    /// The checkpoint folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    /// One tensor's header entry.
    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    /// Whether the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the checkpoint holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The raw bytes of a tensor (mapping its shard if needed).
    pub fn bytes(&mut self, name: &str) -> Result<&[u8]> {
        let entry = self
            .tensors
            .get(name)
            .ok_or_else(|| ConvertError::MissingTensor {
                name: name.to_string(),
                gguf: String::new(),
            })?;
        let (si, start, end) = (entry.shard, entry.start, entry.end);
        self.clock += 1;
        if self.shards[si].map.is_none() {
            let open = self.shards.iter().filter(|s| s.map.is_some()).count();
            if open >= MAX_OPEN_SHARDS
                && let Some(lru) = self
                    .shards
                    .iter_mut()
                    .filter(|s| s.map.is_some())
                    .min_by_key(|s| s.last_use)
            {
                lru.map = None;
            }
            let map = map_file(&self.shards[si].path)?;
            self.shards[si].map = Some(map);
        }
        let shard = &mut self.shards[si];
        shard.last_use = self.clock;
        let path = shard.path.clone();
        let map = shard
            .map
            .as_ref()
            .ok_or_else(|| ConvertError::Safetensors {
                path: path.clone(),
                reason: "shard mapping vanished".into(),
            })?;
        map.get(start..end)
            .ok_or_else(|| ConvertError::Safetensors {
                path,
                reason: format!(
                    "tensor {name:?} lies outside the file (changed while converting?)"
                ),
            })
    }
}
