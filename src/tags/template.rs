//! Prompt templates: literal text, `<Tag>` references and `{slot}` inputs.
//!
//! Only the template is parsed. Slot values are substituted afterwards as plain text, so a
//! client's input can never smuggle a tag in. Chat special tokens such as `<|im_start|>` are
//! not tags (`|` is not allowed in a tag name) and stay text.

use std::collections::BTreeSet;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Text(String),
    Tag(String),
    Slot(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub source: String,
    pub segments: Vec<Segment>,
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

/// A tag name: letters, digits, `_`, `-`, `.`; 1 to 64 characters.
/// A tag's name is also its directory under `tags/`: it must not start with `.` (so `.`,
/// `..` and hidden names can never escape or vanish from the tags dir) or `-`.
pub fn is_valid_tag_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.chars().all(is_name_char)
        && name.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
}

fn is_slot_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A template longer than this is refused before it is parsed (serving and training).
pub const MAX_TEMPLATE_BYTES: usize = 64 * 1024;

/// The refusal of a template over [`MAX_TEMPLATE_BYTES`], for people.
pub fn check_size(source: &str) -> Result<(), String> {
    if source.len() > MAX_TEMPLATE_BYTES {
        return Err(format!(
            "template is {} bytes; the limit is {MAX_TEMPLATE_BYTES}",
            source.len()
        ));
    }
    Ok(())
}

/// Names are at most this long, so a reference's closing bracket is looked for only this
/// far: parsing stays linear in the template (`"<" * 10^6` was quadratic).
const MAX_NAME_LEN: usize = 64;

/// Length of a `<Name>` or `{name}` reference starting at `s[0]`, if there is one.
fn reference_len(s: &str, open: char, close: u8, valid: fn(&str) -> bool) -> Option<usize> {
    let rest = s.strip_prefix(open)?;
    let window = &rest.as_bytes()[..rest.len().min(MAX_NAME_LEN + 1)];
    // `close` is ASCII, so its byte index is a char boundary.
    let end = window.iter().position(|&b| b == close)?;
    valid(&rest[..end]).then_some(end + 2)
}

impl Template {
    pub fn parse(source: &str) -> Template {
        let mut segments = Vec::new();
        let mut text = String::new();
        let mut i = 0;
        while i < source.len() {
            let rest = &source[i..];
            let tag = reference_len(rest, '<', b'>', is_valid_tag_name);
            let slot = reference_len(rest, '{', b'}', is_slot_name);
            match (tag, slot) {
                (Some(n), _) | (_, Some(n)) => {
                    if !text.is_empty() {
                        segments.push(Segment::Text(std::mem::take(&mut text)));
                    }
                    let name = rest[1..n - 1].to_string();
                    segments.push(if tag.is_some() {
                        Segment::Tag(name)
                    } else {
                        Segment::Slot(name)
                    });
                    i += n;
                }
                _ => {
                    let Some(c) = rest.chars().next() else { break };
                    text.push(c);
                    i += c.len_utf8();
                }
            }
        }
        if !text.is_empty() {
            segments.push(Segment::Text(text));
        }
        Template {
            source: source.to_string(),
            segments,
        }
    }

    pub fn tags(&self) -> Vec<&str> {
        self.segments
            .iter()
            .filter_map(|s| {
                if let Segment::Tag(t) = s {
                    Some(t.as_str())
                } else {
                    None
                }
            })
            .collect()
    }

    /// Slot names, each once, in order of first appearance.
    pub fn slots(&self) -> Vec<&str> {
        let mut seen = BTreeSet::new();
        self.segments
            .iter()
            .filter_map(|s| {
                if let Segment::Slot(n) = s {
                    Some(n.as_str())
                } else {
                    None
                }
            })
            .filter(|n| seen.insert(*n))
            .collect()
    }

    /// The last tag in the template: where a head reads its hidden state.
    pub fn last_tag(&self) -> Option<&str> {
        self.tags().last().copied()
    }

    /// Every reference to tag `from` made a reference to `to` (a translation template's
    /// languages chosen per request); false, and nothing changed, if there is none.
    pub fn replace_tag(&mut self, from: &str, to: &str) -> bool {
        let mut found = false;
        for segment in &mut self.segments {
            if matches!(segment, Segment::Tag(t) if t == from) {
                *segment = Segment::Tag(to.to_string());
                found = true;
            }
        }
        if found {
            self.source = render(&self.segments);
        }
        found
    }

    /// A template made of `segments` as they are (text is not parsed for references: a
    /// chat template's rendering may hold `<` and `{` of its own).
    pub fn from_segments(segments: Vec<Segment>) -> Template {
        Template {
            source: render(&segments),
            segments,
        }
    }
}

/// The source text that `segments` read as.
fn render(segments: &[Segment]) -> String {
    segments
        .iter()
        .map(|s| match s {
            Segment::Text(t) => t.clone(),
            Segment::Tag(t) => format!("<{t}>"),
            Segment::Slot(n) => format!("{{{n}}}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replacing_a_tag_changes_its_references_only() {
        let mut t = Template::parse("<T><EN> to<FR>: {text} <EN>");
        assert!(t.replace_tag("EN", "IT"));
        assert_eq!(t.source, "<T><IT> to<FR>: {text} <IT>");
        assert_eq!(t.tags(), ["T", "IT", "FR", "IT"]);
        assert!(!t.replace_tag("DE", "ES"));
        assert!(!t.replace_tag("text", "ES"), "a slot is not a tag");
        assert_eq!(t.source, "<T><IT> to<FR>: {text} <IT>");
    }

    #[test]
    fn parses_tags_slots_and_leaves_chat_tokens_as_text() {
        let t = Template::parse("<|im_start|>user <SMILES> {smiles}. {x}{smiles} <QED>");
        assert_eq!(
            t.segments,
            vec![
                Segment::Text("<|im_start|>user ".into()),
                Segment::Tag("SMILES".into()),
                Segment::Text(" ".into()),
                Segment::Slot("smiles".into()),
                Segment::Text(". ".into()),
                Segment::Slot("x".into()),
                Segment::Slot("smiles".into()),
                Segment::Text(" ".into()),
                Segment::Tag("QED".into()),
            ]
        );
        assert_eq!(t.slots(), vec!["smiles", "x"]);
        assert_eq!(t.last_tag(), Some("QED"));
    }

    #[test]
    fn parsing_is_linear_in_the_template() {
        // Quadratic parsing took 24 s on this; linear takes milliseconds.
        let evil = "<".repeat(1_000_000) + "{x}" + &"{".repeat(1_000_000);
        let started = std::time::Instant::now();
        let t = Template::parse(&evil);
        assert_eq!(t.slots(), vec!["x"]);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        // A name of exactly the longest length still parses; one longer is text.
        let long = "a".repeat(64);
        assert_eq!(
            Template::parse(&format!("<{long}>")).tags(),
            vec![long.as_str()]
        );
        assert!(Template::parse(&format!("<{long}a>")).tags().is_empty());
    }

    #[test]
    fn names_that_are_paths_are_not_tag_names() {
        for bad in [".", "..", ".hidden", "-x", "a/b", ""] {
            assert!(!is_valid_tag_name(bad), "{bad:?}");
        }
        for good in ["QED", "en.fr", "_x", "9a-b"] {
            assert!(is_valid_tag_name(good), "{good:?}");
        }
        assert!(Template::parse("<..> {x}").tags().is_empty());
    }

    #[test]
    fn malformed_references_stay_text() {
        let t = Template::parse("a < b > c {not a slot} <> {} <x y>");
        assert_eq!(
            t.segments,
            vec![Segment::Text("a < b > c {not a slot} <> {} <x y>".into())]
        );
        assert!(is_valid_tag_name("BA.v2-x_1"));
        assert!(!is_valid_tag_name(&"x".repeat(65)));
        assert!(!is_valid_tag_name("|im_end|"));
    }
}
