//! Every kernel must begin with `PDL_ENTRY();` (griddepcontrol.wait, then launch_dependents):
//! launches carry the programmatic-dependent-launch attribute (src/rt.rs `launch_raw`), so a
//! kernel without the wait could start before its predecessor's writes are visible. Text check
//! of the kernel sources; runs without a GPU.
//!
//! Two exceptions, both named in common.cuh: `PDL_WAIT_ONLY();` (the wait without the early
//! trigger: kernels that write weights) and `PDL_DEFERRED();` (a weight prologue before the
//! wait): such a kernel must call `pdl_wait();` itself or a device function of the same file
//! that does.

#[test]
fn every_kernel_starts_with_pdl_entry() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let common = std::fs::read_to_string(dir.join("common.cuh")).unwrap();
    assert!(
        common.contains("#define PDL_ENTRY() asm volatile(\"griddepcontrol.wait;"),
        "common.cuh must define PDL_ENTRY as griddepcontrol.wait first"
    );
    let mut kernels = 0;
    let mut missing = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().and_then(|x| x.to_str()) != Some("cu") {
            continue;
        }
        let s = std::fs::read_to_string(&path).unwrap();
        // Device functions of this file whose body calls pdl_wait() (for PDL_DEFERRED kernels).
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
            let end = s[at + brace..]
                .find("\n}")
                .map_or(s.len(), |e| at + brace + e);
            if s[at + brace..end].contains("pdl_wait();") {
                waiting.push(name.to_string());
            }
        }
        assert!(
            s.contains("#include \"common.cuh\""),
            "{} does not include common.cuh (PDL_ENTRY)",
            path.display()
        );
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
            let body = s[brace + 1..].trim_start();
            let deferred_ok = body.starts_with("PDL_DEFERRED();") && {
                // The kernel's body (a one-line macro body or up to the closing brace) calls
                // a function that waits.
                let end = body.find("\n}").unwrap_or(body.len());
                body[..end].contains("pdl_wait();")
                    || waiting.iter().any(|f| {
                        body[..end].contains(&format!("{f}<"))
                            || body[..end].contains(&format!("{f}("))
                    })
            };
            if !(body.starts_with("PDL_ENTRY();")
                || body.starts_with("PDL_WAIT_ONLY();")
                || deferred_ok)
            {
                let name_end = s[at..brace].find('(').map_or(brace, |p| at + p);
                missing.push(format!("{}: {}", path.display(), &s[at..name_end]));
            }
        }
    }
    assert!(kernels > 40, "found only {kernels} kernels");
    assert!(
        missing.is_empty(),
        "kernels without PDL_ENTRY: {missing:#?}"
    );
}
