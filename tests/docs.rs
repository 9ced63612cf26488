//! The documentation, checked: every link in the project's Markdown pages resolves (a file that is
//! there, a heading that is there), and docs/configuration.md holds the CLI's `--help`
//! exactly as the binary prints it. `TAGLLM_BLESS_DOCS=1 cargo test --test docs`
//! rewrites the `--help` blocks after a flag changed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use pulldown_cmark::{Event, HeadingLevel, Parser, Tag, TagEnd};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every Markdown page of the project: README.md, docs/, and the READMEs beside the code
/// (build outputs, caches, fetched data and staged build contexts aside: docker/cuda holds
/// a copy of tags/ once `scripts/build-cuda.sh --stage-docker` ran, whose relative links
/// point nowhere from there).
fn pages() -> Vec<PathBuf> {
    const SKIP: [&str; 7] = [
        "target",
        "models",
        "data",
        "runs",
        ".cache",
        ".git",
        "node_modules",
    ];
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if path.is_dir() {
                let staged = path.ends_with("docker/cuda");
                if !SKIP.contains(&name.as_str()) && !name.starts_with('.') && !staged {
                    walk(&path, out);
                }
            } else if path.extension().is_some_and(|e| e == "md") {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root(), &mut out);
    out.sort();
    out
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

struct Page {
    links: Vec<String>,
    anchors: BTreeSet<String>,
}

fn read_page(path: &Path) -> Page {
    let text = std::fs::read_to_string(path).unwrap();
    let mut links = Vec::new();
    let mut anchors = BTreeSet::new();
    let mut heading: Option<String> = None;
    for event in Parser::new(&text) {
        match event {
            Event::Start(Tag::Link { dest_url, .. })
            | Event::Start(Tag::Image { dest_url, .. }) => links.push(dest_url.to_string()),
            Event::Start(Tag::Heading { level, .. }) if level <= HeadingLevel::H6 => {
                heading = Some(String::new())
            }
            Event::Text(t) | Event::Code(t) => {
                if let Some(h) = heading.as_mut() {
                    h.push_str(&t)
                }
            }
            Event::End(TagEnd::Heading(_)) => {
                anchors.insert(slug(&heading.take().unwrap_or_default()));
            }
            _ => {}
        }
    }
    Page { links, anchors }
}

#[test]
fn every_link_in_the_readme_and_docs_resolves() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in pages() {
        let links = read_page(&page).links;
        for link in links {
            if link.starts_with("http://") || link.starts_with("https://") {
                continue; // no network here; the docs link out only to upstream projects
            }
            checked += 1;
            let (file, anchor) = match link.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (link.as_str(), None),
            };
            let target = if file.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(file)
            };
            if !target.exists() {
                broken.push(format!("{}: {link} (no such file)", page.display()));
                continue;
            }
            if let Some(anchor) = anchor {
                let is_page = target.extension().is_some_and(|e| e == "md");
                if !is_page || !read_page(&target).anchors.contains(anchor) {
                    broken.push(format!("{}: {link} (no such heading)", page.display()));
                }
            }
        }
    }
    assert!(
        checked > 40,
        "only {checked} links found: is the parser reading the pages?"
    );
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn slugs_are_githubs() {
    assert_eq!(slug("Quick start"), "quick-start");
    assert_eq!(slug("Deploy (docker compose)"), "deploy-docker-compose");
    assert_eq!(slug("`tagllm serve`"), "tagllm-serve");
}

const HELP_BEGIN: &str = "<!-- help: ";
const HELP_END: &str = "<!-- /help -->";

/// `tagllm ARGS --help` as a fresh shell prints it: no TAGLLM_* variable set, since clap
/// shows an env var's value in place of the default.
fn help(args: &str) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tagllm"));
    for (key, _) in std::env::vars() {
        if key.starts_with("TAGLLM_") {
            cmd.env_remove(key);
        }
    }
    let out = cmd
        .args(args.split_whitespace())
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "tagllm {args} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

/// The subcommands `tagllm ARGS --help` lists (clap's `Commands:` section).
fn subcommands(args: &str) -> Vec<String> {
    let text = help(args);
    let Some(list) = text.split("Commands:\n").nth(1) else {
        return Vec::new();
    };
    list.lines()
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(|name| format!("{args} {name}").trim().to_string())
        .collect()
}

#[test]
fn the_configuration_page_is_the_clis_help() {
    let path = root().join("docs/configuration.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut out = String::new();
    let mut documented = Vec::new();
    let mut stale = Vec::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find(HELP_BEGIN) {
        let (before, block) = rest.split_at(start);
        out.push_str(before);
        let line_end = block.find('\n').unwrap();
        let args = block[HELP_BEGIN.len()..line_end]
            .trim_end_matches("-->")
            .trim();
        let end = block
            .find(HELP_END)
            .expect("a help block without its end marker");
        let expected = format!("{}\n```text\n{}```\n", &block[..line_end], help(args));
        if block[..end] != expected {
            stale.push(args.to_string());
        }
        out.push_str(&expected);
        documented.push(args.to_string());
        rest = &block[end..];
    }
    out.push_str(rest);
    if std::env::var_os("TAGLLM_BLESS_DOCS").is_some() {
        std::fs::write(&path, &out).unwrap();
        return;
    }
    assert!(
        stale.is_empty(),
        "docs/configuration.md differs from `tagllm {{}} --help` for {stale:?}; \
         TAGLLM_BLESS_DOCS=1 cargo test --test docs rewrites it"
    );
    let mut commands = subcommands("");
    for nested in commands.clone() {
        commands.extend(subcommands(&nested));
    }
    let missing: Vec<_> = commands
        .iter()
        .filter(|c| !documented.contains(c))
        .collect();
    assert!(
        missing.is_empty(),
        "commands without a help block: {missing:?}"
    );
}
