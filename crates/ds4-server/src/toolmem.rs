//! The exact-DSML replay map (ds4's `tool_memory`): tool id → the exact DSML block the model
//! sampled, so that when a client sends the tool calls back as JSON, the prompt re-renders
//! byte-identically to what is in the KV cache.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use ds4_tokenizer::{Message, Role};

/// Hard byte cap of the map (ds4: 512 MiB).
pub const MAX_BYTES: usize = 512 << 20;

#[derive(Debug)]
struct Entry {
    dsml: Arc<str>,
    stamp: u64,
}

/// LRU map from tool id to DSML block.
#[derive(Debug)]
pub struct ToolMemory {
    map: HashMap<String, Entry>,
    order: BTreeMap<u64, String>,
    next: u64,
    bytes: usize,
    max_ids: usize,
    max_bytes: usize,
}

/// Replay statistics of one request (logged in the trace).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplayStats {
    /// Assistant turns replayed from memory.
    pub mem: usize,
    /// Assistant turns replayed from mappings found on disk.
    pub disk: usize,
    /// Assistant turns rendered canonically from JSON.
    pub canonical: usize,
    /// Tool ids with no mapping.
    pub missing_ids: usize,
}

impl ToolMemory {
    pub fn new(max_ids: usize, max_bytes: usize) -> ToolMemory {
        ToolMemory {
            map: HashMap::new(),
            order: BTreeMap::new(),
            next: 0,
            bytes: 0,
            max_ids,
            max_bytes,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn cost(id: &str, dsml: &str) -> usize {
        id.len() + dsml.len() + 64
    }

    /// Remember `dsml` for every id of a turn.
    pub fn insert(&mut self, ids: &[String], dsml: Arc<str>) {
        if self.max_ids == 0 {
            return;
        }
        for id in ids {
            self.remove(id);
            self.next += 1;
            self.bytes += Self::cost(id, &dsml);
            self.order.insert(self.next, id.clone());
            self.map.insert(
                id.clone(),
                Entry {
                    dsml: dsml.clone(),
                    stamp: self.next,
                },
            );
        }
        while self.map.len() > self.max_ids || self.bytes > self.max_bytes {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some(e) = self.map.remove(&oldest) {
                self.bytes -= Self::cost(&oldest, &e.dsml);
            }
        }
    }

    fn remove(&mut self, id: &str) {
        if let Some(e) = self.map.remove(id) {
            self.order.remove(&e.stamp);
            self.bytes -= Self::cost(id, &e.dsml);
        }
    }

    fn touch(&mut self, id: &str) {
        if let Some(e) = self.map.get_mut(id) {
            self.order.remove(&e.stamp);
            self.next += 1;
            e.stamp = self.next;
            self.order.insert(self.next, id.to_string());
        }
    }

    /// The DSML of `id`.
    pub fn get(&self, id: &str) -> Option<Arc<str>> {
        self.map.get(id).map(|e| e.dsml.clone())
    }

    /// The block shared by all `ids`, if every id maps to the same block (marks them used).
    pub fn block_for(&mut self, ids: &[&str]) -> Option<Arc<str>> {
        let first = self.get(ids.first()?)?;
        for id in ids {
            let d = self.get(id)?;
            if *d != *first {
                return None;
            }
        }
        for id in ids {
            self.touch(id);
        }
        Some(first)
    }

    /// The most recently used mappings (for checkpoint tool maps), newest first.
    pub fn recent(&self, n: usize) -> Vec<(String, String)> {
        self.order
            .iter()
            .rev()
            .take(n)
            .filter_map(|(_, id)| self.map.get(id).map(|e| (id.clone(), e.dsml.to_string())))
            .collect()
    }
}

/// The ids of an assistant message's tool calls, if it has calls and all have ids.
pub fn message_call_ids(m: &Message) -> Option<Vec<&str>> {
    if m.role != Role::Assistant || m.tool_calls.is_empty() {
        return None;
    }
    m.tool_calls.iter().map(|c| c.id.as_deref()).collect()
}

/// Every tool-call id of assistant messages that the memory does not know.
pub fn missing_ids(mem: &ToolMemory, msgs: &[Message]) -> Vec<String> {
    let mut out = Vec::new();
    for m in msgs {
        if let Some(ids) = message_call_ids(m) {
            for id in ids {
                if mem.get(id).is_none() && !out.iter().any(|o| o == id) {
                    out.push(id.to_string());
                }
            }
        }
    }
    out
}

/// Set `raw_dsml` on every assistant message whose call ids all map to one block.
/// `from_disk` lists ids whose mapping was just loaded from disk (for the stats).
pub fn attach(mem: &mut ToolMemory, msgs: &mut [Message], from_disk: &[String]) -> ReplayStats {
    let mut st = ReplayStats::default();
    for m in msgs.iter_mut() {
        if m.role != Role::Assistant || m.tool_calls.is_empty() {
            continue;
        }
        let ids: Option<Vec<String>> = m.tool_calls.iter().map(|c| c.id.clone()).collect();
        let Some(ids) = ids else {
            st.canonical += 1;
            continue;
        };
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        st.missing_ids += refs.iter().filter(|id| mem.get(id).is_none()).count();
        match mem.block_for(&refs) {
            Some(block) => {
                if refs.iter().any(|id| from_disk.iter().any(|d| d == id)) {
                    st.disk += 1;
                } else {
                    st.mem += 1;
                }
                m.raw_dsml = Some(block.to_string());
            }
            None => st.canonical += 1,
        }
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;
    use ds4_tokenizer::ToolCall;

    #[test]
    fn lru_prunes_oldest_and_blocks_must_agree() {
        let mut m = ToolMemory::new(3, MAX_BYTES);
        let a: Arc<str> = "A".into();
        let b: Arc<str> = "B".into();
        m.insert(&["1".into(), "2".into()], a.clone());
        m.insert(&["3".into()], b.clone());
        assert_eq!(m.block_for(&["1", "2"]).as_deref(), Some("A"));
        assert!(m.block_for(&["1", "3"]).is_none());
        // 1 and 2 were touched, 3 is the oldest now.
        m.insert(&["4".into()], b);
        assert_eq!(m.len(), 3);
        assert!(m.get("3").is_none());
        assert!(m.get("1").is_some());
        let r = m.recent(1);
        assert_eq!(r[0].0, "4");
    }

    #[test]
    fn byte_cap_prunes() {
        let mut m = ToolMemory::new(100, 200);
        for i in 0..10 {
            m.insert(&[format!("id{i}")], Arc::from("x".repeat(50)));
        }
        assert!(m.len() <= 2);
        assert!(m.get("id9").is_some());
    }

    #[test]
    fn attach_sets_raw_dsml() {
        let mut mem = ToolMemory::new(10, MAX_BYTES);
        mem.insert(&["call_a".into()], Arc::from("\n\nBLOCK"));
        let mut msgs = vec![
            Message::user("hi"),
            Message::assistant("")
                .with_tool_calls(vec![ToolCall::new("f", "{}").with_id("call_a")]),
            Message::assistant("")
                .with_tool_calls(vec![ToolCall::new("f", "{}").with_id("call_zz")]),
        ];
        let st = attach(&mut mem, &mut msgs, &[]);
        assert_eq!(msgs[1].raw_dsml.as_deref(), Some("\n\nBLOCK"));
        assert!(msgs[2].raw_dsml.is_none());
        assert_eq!(
            st,
            ReplayStats {
                mem: 1,
                disk: 0,
                canonical: 1,
                missing_ids: 1
            }
        );
    }
}
