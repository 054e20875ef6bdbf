//! Every kernel must begin with `PDL_ENTRY();` (griddepcontrol.wait, then launch_dependents):
//! launches carry the programmatic-dependent-launch attribute (src/rt.rs `launch_raw`), so a
//! kernel without the wait could start before its predecessor's writes are visible. Text check
//! of the kernel sources; runs without a GPU.
//!
//! The one exception (common.cuh): `PDL_DEFERRED();`, a weight prologue before the wait. Only
//! the kernels of `ds4_cuda::PDL_DEFERRED_KERNELS` may use it (each was reviewed: it reads only weights before the
//! wait), and its body must call `pdl_wait();` itself or call a device function of the same
//! file whose body does.

/// The text from the `{` at `open` to its matching `}` (braces inside strings and asm
/// templates come in pairs too).
fn block(s: &str, open: usize) -> &str {
    let mut depth = 0usize;
    for (i, c) in s[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return &s[open..=open + i];
                }
            }
            _ => {}
        }
    }
    &s[open..]
}

/// Whether `body` calls `f` (as `f(` or `f<`).
fn calls(body: &str, f: &str) -> bool {
    body.contains(&format!("{f}(")) || body.contains(&format!("{f}<"))
}

#[test]
fn every_kernel_starts_with_pdl_entry() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let common = std::fs::read_to_string(dir.join("common.cuh")).unwrap();
    assert!(
        common.contains("#define PDL_ENTRY() asm volatile(\"griddepcontrol.wait;"),
        "common.cuh must define PDL_ENTRY as griddepcontrol.wait first"
    );
    let mut kernels = 0;
    let mut deferred = 0;
    let mut missing = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().and_then(|x| x.to_str()) != Some("cu") {
            continue;
        }
        let s = std::fs::read_to_string(&path).unwrap();
        assert!(
            s.contains("#include \"common.cuh\""),
            "{} does not include common.cuh (PDL_ENTRY)",
            path.display()
        );
        // Device functions of this file whose body calls pdl_wait().
        let mut waiting = Vec::new();
        let mut from = 0;
        while let Some(i) = s[from..].find("__device__") {
            let at = from + i;
            from = at + 10;
            let (Some(paren), Some(brace)) = (s[at..].find('('), s[at..].find('{')) else {
                continue;
            };
            if paren > brace || s[at..at + brace].contains(';') {
                continue;
            }
            let name = s[at..at + paren].split_whitespace().last().unwrap_or("");
            if block(&s, at + brace).contains("pdl_wait();") {
                waiting.push(name.to_string());
            }
        }
        let mut from = 0;
        while let Some(i) = s[from..].find("__global__") {
            let at = from + i;
            from = at + 10;
            let line_start = s[..at].rfind('\n').map_or(0, |p| p + 1);
            if s[line_start..at].trim_start().starts_with("//") {
                continue;
            }
            let Some(brace) = s[at..].find('{').map(|b| at + b) else {
                continue;
            };
            if s[at..brace].contains(';') {
                continue; // a declaration, not a definition
            }
            kernels += 1;
            // Every kernel is named ds4_… (the attributes before it take arguments too).
            let head = &s[at..brace];
            let name = head
                .find("ds4_")
                .map_or(head, |p| &head[p..])
                .split('(')
                .next()
                .unwrap_or("");
            let body = block(&s, brace);
            let first = body[1..].trim_start();
            let ok = if first.starts_with("PDL_DEFERRED();") {
                deferred += 1;
                ds4_cuda::PDL_DEFERRED_KERNELS
                    .iter()
                    .any(|p| name.starts_with(p))
                    && (body.contains("pdl_wait();") || waiting.iter().any(|f| calls(body, f)))
            } else {
                first.starts_with("PDL_ENTRY();")
            };
            if !ok {
                missing.push(format!("{}: {name}", path.display()));
            }
        }
    }
    assert!(kernels > 40, "found only {kernels} kernels");
    assert!(deferred >= 4, "found only {deferred} PDL_DEFERRED kernels");
    assert!(
        missing.is_empty(),
        "kernels without PDL_ENTRY (or an allowed PDL_DEFERRED that waits): {missing:#?}"
    );
}
