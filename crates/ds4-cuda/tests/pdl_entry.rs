//! Every kernel must begin with `PDL_ENTRY();` (griddepcontrol.wait, then launch_dependents):
//! launches carry the programmatic-dependent-launch attribute (src/rt.rs `launch_raw`), so a
//! kernel without the wait could start before its predecessor's writes are visible. Text check
//! of the kernel sources; runs without a GPU.

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
            if !body.starts_with("PDL_ENTRY();") {
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
