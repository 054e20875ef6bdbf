//! ds4's command-line spellings that clap cannot express, as one rewrite of the arguments
//! before clap parses them (ds4-features.md §1.1, §1.2):
//! - `-sys TEXT` is `--system TEXT` (clap's short flags are one letter);
//! - no subcommand: `ds4 -p TEXT …` (any flag only `ds4 run` has: `--prompt-file`,
//!   `--perplexity-file`, the dumps, …) is `ds4 run …`; `ds4 [FLAGS]` without such a flag, or
//!   `ds4` alone, is the interactive REPL, `ds4 chat …`.
//!
//! - options before the subcommand: `ds4 -m F serve …` is `ds4 serve -m F …` (the first word
//!   that is neither an option nor an option's value names a subcommand: it moves to the front);
//! - `ds4 --inspect [-m F] …` is `ds4 inspect F` (the model file, default `ds4flash.gguf`; the
//!   other flags do not matter for it), and `ds4 --server` is refused, as ds4 does, pointing at
//!   `ds4 serve` ([`refusal`]).
//!
//! A first argument that is not a flag (a subcommand, or something clap will reject) and a
//! first argument `-h`/`--help`/`-V`/`--version` leave the line as it is, so the subcommands
//! and clap's top-level help and version are unchanged. Everything after `--` is left alone.

use std::ffi::OsString;

/// Which flags send a subcommand-less line to `run`: the long names (without `--`) and short
/// letters that `run` has and `chat` does not.
#[derive(Clone, Debug, Default)]
pub struct RunOnly {
    pub longs: Vec<String>,
    pub shorts: Vec<char>,
}

impl RunOnly {
    /// From clap's definitions of the two subcommands.
    pub fn from_commands(run: &clap::Command, chat: &clap::Command) -> RunOnly {
        let longs = |c: &clap::Command| -> Vec<String> {
            c.get_arguments()
                .flat_map(|a| {
                    a.get_long_and_visible_aliases()
                        .unwrap_or_default()
                        .into_iter()
                        .map(str::to_string)
                })
                .collect()
        };
        let shorts = |c: &clap::Command| -> Vec<char> {
            c.get_arguments()
                .flat_map(|a| a.get_short_and_visible_aliases().unwrap_or_default())
                .collect()
        };
        let (chat_l, chat_s) = (longs(chat), shorts(chat));
        RunOnly {
            longs: longs(run)
                .into_iter()
                .filter(|l| !chat_l.contains(l))
                .collect(),
            shorts: shorts(run)
                .into_iter()
                .filter(|s| !chat_s.contains(s))
                .collect(),
        }
    }

    fn matches(&self, arg: &str) -> bool {
        if let Some(long) = arg.strip_prefix("--") {
            let name = long.split_once('=').map_or(long, |(n, _)| n);
            self.longs.iter().any(|l| l == name)
        } else if let Some(short) = arg.strip_prefix('-') {
            short
                .chars()
                .next()
                .is_some_and(|c| self.shorts.contains(&c))
        } else {
            false
        }
    }
}

/// The subcommand names and the options that take a value (in any subcommand), to find a
/// subcommand written after options.
#[derive(Clone, Debug, Default)]
pub struct Subcommands {
    pub names: Vec<String>,
    pub value_longs: Vec<String>,
    pub value_shorts: Vec<char>,
}

impl Subcommands {
    /// From clap's definition of the whole command line.
    pub fn from_command(cmd: &clap::Command) -> Subcommands {
        let mut s = Subcommands::default();
        for sc in cmd.get_subcommands() {
            s.names.push(sc.get_name().to_string());
            for a in sc.get_arguments().filter(|a| a.get_action().takes_values()) {
                let longs = a.get_long_and_visible_aliases().unwrap_or_default();
                s.value_longs.extend(longs.into_iter().map(str::to_string));
                s.value_shorts
                    .extend(a.get_short_and_visible_aliases().unwrap_or_default());
            }
        }
        s
    }

    /// The index in `args[1..end]` of the first word that is neither an option nor an option's
    /// value, when it names a subcommand.
    fn find(&self, args: &[OsString], end: usize) -> Option<usize> {
        let mut i = 1;
        while i < end {
            let a = args[i].to_str()?;
            let takes_value = if let Some(long) = a.strip_prefix("--") {
                self.value_longs.iter().any(|l| l == long)
            } else if let Some(short) = a.strip_prefix('-').filter(|s| !s.is_empty()) {
                // `-m F`; `-mF` and `-m=F` carry their value.
                let mut c = short.chars();
                c.next().is_some_and(|c| self.value_shorts.contains(&c)) && c.next().is_none()
            } else {
                return self.names.iter().any(|n| n == a).then_some(i);
            };
            i += if takes_value { 2 } else { 1 };
        }
        None
    }
}

/// The model file a line names (`-m F`, `-mF`, `-m=F`, `--model F`, `--model=F`; the last one).
fn model_arg(args: &[OsString]) -> Option<OsString> {
    let mut m = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let Some(s) = a.to_str() else { continue };
        if s == "-m" || s == "--model" {
            m = it.next().cloned().or(m);
        } else if let Some(v) = s.strip_prefix("--model=") {
            m = Some(v.into());
        } else if let Some(v) = s.strip_prefix("-m") {
            m = Some(v.strip_prefix('=').unwrap_or(v).into());
        }
    }
    m
}

/// ds4's refusal of a line without a subcommand, if any: `--server` (ds4's server is another
/// program; here it is `ds4 serve`). Printed as `ds4: …` with exit status 2.
pub fn refusal(args: &[OsString], subs: &Subcommands) -> Option<&'static str> {
    let end = options_end(args);
    let first = args.get(1)?.to_str()?;
    let no_sub = first.starts_with('-') && subs.find(args, end).is_none();
    (no_sub && args[1..end].iter().any(|a| a == "--server"))
        .then_some("use `ds4 serve` for the HTTP server")
}

/// Where the options clap parses end: at `--` (exclusive), else the end of the line.
fn options_end(args: &[OsString]) -> usize {
    args.iter()
        .skip(1)
        .position(|a| a == "--")
        .map_or(args.len(), |i| i + 1)
}

/// The rewritten arguments (`args[0]` is the program name).
pub fn rewrite(mut args: Vec<OsString>, run_only: &RunOnly, subs: &Subcommands) -> Vec<OsString> {
    // Up to `--` (exclusive): the options clap will parse.
    let end = options_end(&args);
    for a in &mut args[1.min(end)..end] {
        if a == "-sys" {
            *a = "--system".into();
        }
    }
    let Some(first) = args.get(1).and_then(|a| a.to_str()) else {
        if args.len() <= 1 {
            args.push("chat".into());
        }
        return args;
    };
    let keep = matches!(first, "-h" | "--help" | "-V" | "--version")
        || !first.starts_with('-')
        || first == "--"
        || first == "-";
    if keep {
        return args;
    }
    if let Some(i) = subs.find(&args, end) {
        let sc = args.remove(i);
        args.insert(1, sc);
        return args;
    }
    if args[1..end].iter().any(|a| a == "--inspect") {
        let model = model_arg(&args[1..end]).unwrap_or_else(|| crate::common::DEFAULT_MODEL.into());
        return vec![args[0].clone(), "inspect".into(), model];
    }
    let one_shot = args[1..end]
        .iter()
        .any(|a| a.to_str().is_some_and(|s| run_only.matches(s)));
    args.insert(1, if one_shot { "run" } else { "chat" }.into());
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_only() -> RunOnly {
        RunOnly {
            longs: [
                "prompt",
                "prompt-file",
                "perplexity-file",
                "dump-tokens",
                "json",
            ]
            .map(String::from)
            .to_vec(),
            shorts: vec!['p'],
        }
    }

    fn subs() -> Subcommands {
        Subcommands {
            names: ["run", "chat", "serve", "bench", "inspect"]
                .map(String::from)
                .to_vec(),
            value_longs: ["model", "prompt", "port", "ctx-max", "ctx", "system"]
                .map(String::from)
                .to_vec(),
            value_shorts: vec!['m', 'p', 'n', 'c'],
        }
    }

    fn rw(line: &[&str]) -> Vec<String> {
        let mut a: Vec<OsString> = vec!["ds4".into()];
        a.extend(line.iter().map(OsString::from));
        rewrite(a, &run_only(), &subs())
            .into_iter()
            .skip(1)
            .map(|s| s.into_string().unwrap())
            .collect()
    }

    #[test]
    fn no_subcommand_is_run_with_a_prompt_else_chat() {
        assert_eq!(rw(&[]), ["chat"]);
        assert_eq!(rw(&["-p", "hi"]), ["run", "-p", "hi"]);
        assert_eq!(rw(&["-phi", "-n", "3"]), ["run", "-phi", "-n", "3"]);
        assert_eq!(rw(&["--prompt=hi"]), ["run", "--prompt=hi"]);
        assert_eq!(
            rw(&["-m", "x.gguf", "--prompt-file", "f"]),
            ["run", "-m", "x.gguf", "--prompt-file", "f"]
        );
        assert_eq!(
            rw(&["--perplexity-file", "t.txt"]),
            ["run", "--perplexity-file", "t.txt"]
        );
        assert_eq!(
            rw(&["--dump-tokens", "-p", "x"]),
            ["run", "--dump-tokens", "-p", "x"]
        );
        assert_eq!(
            rw(&["-m", "x.gguf", "--nothink"]),
            ["chat", "-m", "x.gguf", "--nothink"]
        );
        assert_eq!(rw(&["--temp", "0"]), ["chat", "--temp", "0"]);
        // A prompt flag after `--` is not an option.
        assert_eq!(
            rw(&["-c", "9", "--", "-p"]),
            ["chat", "-c", "9", "--", "-p"]
        );
        // Flag names that only start like a run flag do not count.
        assert_eq!(rw(&["--prompting"]), ["chat", "--prompting"]);
    }

    #[test]
    fn options_before_the_subcommand_move_behind_it() {
        assert_eq!(
            rw(&["-m", "x.gguf", "serve", "--port", "0"]),
            ["serve", "-m", "x.gguf", "--port", "0"]
        );
        assert_eq!(
            rw(&["--model", "x.gguf", "--nothink", "bench", "--ctx-max", "8"]),
            ["bench", "--model", "x.gguf", "--nothink", "--ctx-max", "8"]
        );
        assert_eq!(
            rw(&["-mx.gguf", "-m=y", "--ctx=9", "inspect", "f"]),
            ["inspect", "-mx.gguf", "-m=y", "--ctx=9", "f"]
        );
        // An option's value that happens to be a subcommand name stays a value.
        assert_eq!(rw(&["-p", "serve"]), ["run", "-p", "serve"]);
        assert_eq!(
            rw(&["--system", "chat", "-n", "3"]),
            ["chat", "--system", "chat", "-n", "3"]
        );
        // A word that is no subcommand, and anything after `--`, are left to the other rules.
        assert_eq!(rw(&["-m", "x", "hello"]), ["chat", "-m", "x", "hello"]);
        assert_eq!(
            rw(&["-c", "9", "--", "serve"]),
            ["chat", "-c", "9", "--", "serve"]
        );
        assert_eq!(rw(&["-sys", "S", "serve"]), ["serve", "--system", "S"]);
    }

    #[test]
    fn inspect_and_server_spellings() {
        assert_eq!(rw(&["--inspect", "-m", "x.gguf"]), ["inspect", "x.gguf"]);
        assert_eq!(rw(&["--inspect"]), ["inspect", "ds4flash.gguf"]);
        assert_eq!(
            rw(&["--ctx", "9", "--inspect", "--model=y.gguf", "--cuda"]),
            ["inspect", "y.gguf"]
        );
        assert_eq!(rw(&["-mz.gguf", "--inspect"]), ["inspect", "z.gguf"]);
        let line = |l: &[&str]| -> Vec<OsString> {
            std::iter::once("ds4")
                .chain(l.iter().copied())
                .map(OsString::from)
                .collect()
        };
        assert!(refusal(&line(&["--server", "-m", "x"]), &subs()).is_some());
        assert!(refusal(&line(&["-m", "x", "--server"]), &subs()).is_some());
        assert!(refusal(&line(&["serve", "--port", "0"]), &subs()).is_none());
        assert!(refusal(&line(&["-m", "x", "serve"]), &subs()).is_none());
        assert!(refusal(&line(&["-p", "x", "--", "--server"]), &subs()).is_none());
    }

    #[test]
    fn subcommands_help_and_version_are_unchanged() {
        for line in [
            &["run", "-p", "hi"][..],
            &["chat", "--nothink"],
            &["serve", "--port", "0"],
            &["bench", "--ctx-max", "8"],
            &["inspect", "m.gguf"],
            &["help"],
            &["-h"],
            &["--help"],
            &["-V"],
            &["--version"],
            &["nonsense", "-p", "x"],
            &["--", "-p"],
        ] {
            assert_eq!(rw(line), line, "{line:?}");
        }
    }

    #[test]
    fn sys_is_system_everywhere_but_after_double_dash() {
        assert_eq!(
            rw(&["run", "-sys", "S", "-p", "x"]),
            ["run", "--system", "S", "-p", "x"]
        );
        assert_eq!(rw(&["bench", "-sys", "S"]), ["bench", "--system", "S"]);
        assert_eq!(
            rw(&["-sys", "", "-p", "x"]),
            ["run", "--system", "", "-p", "x"]
        );
        assert_eq!(rw(&["-sys", "S"]), ["chat", "--system", "S"]);
        assert_eq!(rw(&["chat", "--", "-sys"]), ["chat", "--", "-sys"]);
        // Only the exact token.
        assert_eq!(rw(&["run", "-sysx"]), ["run", "-sysx"]);
    }

    #[test]
    fn non_utf8_arguments_pass_through() {
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStringExt;
            let bad = OsString::from_vec(vec![b'-', b'p', 0xff]);
            let out = rewrite(
                vec!["ds4".into(), "-m".into(), bad.clone()],
                &run_only(),
                &subs(),
            );
            assert_eq!(
                out,
                vec!["ds4".into(), "chat".into(), "-m".into(), bad.clone()]
            );
            let out = rewrite(vec!["ds4".into(), bad.clone()], &run_only(), &subs());
            assert_eq!(out, vec![OsString::from("ds4"), bad]);
        }
    }
}
